"""``pytest-kata install``: install a Kata bundle on a host, atomically and journaled (rolls back on failure).

Exit status: 0 installed; 2 bad input or a failed install (which was rolled back; the message says whether
the host state is restored).
"""

from __future__ import annotations

import argparse
import json
import shlex

from pytest_kata.bundle import open_bundle
from pytest_kata.commands._hostargs import add_host_arguments, print_workloads
from pytest_kata.errors import KataError
from pytest_kata.install.errors import InstallError
from pytest_kata.install.installer import close_installer, open_installer
from pytest_kata.install.workloads import plant_workloads, workloads_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="install a Kata bundle on a host (atomic switch, journaled, rolls back "
                                       "on failure)",
                       description="Unpacks the bundle into /opt/kata-releases/<version>-<sha12>, switches "
                                   "/opt/kata atomically, registers kata-<shim> handlers with containerd "
                                   "(drop-in, or an edit of config.toml with a backup), restarts containerd "
                                   "and verifies the handlers. Every step is journaled on the host.")
    p.add_argument("--bundle", action="append", metavar="B", help="bundle: tarball(s) or an /opt/kata tree")
    p.add_argument("--shim", action="append", metavar="SHIM", help="register only these shims (default: all)")
    p.add_argument("--layout", choices=("versioned", "in-place"), default="versioned",
                   help="in-place extracts over /opt/kata like upstream (its rollback leaves residue)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted install from the journal")
    p.add_argument("--no-workloads", action="store_true",
                   help="do not plant workloads on the previous release (by default, when Kata and containerd "
                        "are already there, one stopped container per handler is created and started once, so "
                        "that a rollback can prove they start again; the rollback removes them)")
    add_host_arguments(p)
    p.set_defaults(func=_install)


def _install(args: argparse.Namespace) -> int:
    if not args.bundle:
        raise KataError("--bundle is required (a kata-static tarball or an /opt/kata tree)")
    installer = open_installer(args.host, args.sysroot, containerd=args.containerd, layout=args.layout)
    probe, planted = None, "workload check off (--no-workloads)"
    try:
        bundle = open_bundle(args.bundle)
        if not args.no_workloads and not args.resume:
            probe, planted = plant_workloads(installer)
        try:
            report = installer.resume(bundle, shims=args.shim) if args.resume else \
                installer.install(bundle, shims=args.shim)
        except InstallError:
            if probe is not None:  # rolled back by itself: what ran before must run again, now
                print_workloads(probe.verify())
                probe.discard(workloads_path(installer, None))
            raise
        if probe is not None:
            pending, final = workloads_path(installer, None), workloads_path(installer, report.tx)
            installer.run(f"mv -f {shlex.quote(pending)} {shlex.quote(final)}")
    finally:
        close_installer(installer)
    if args.json:
        print(json.dumps({**report.to_json(), "workloads": probe.to_json() if probe else planted}, indent=2))
        return 0
    print(f"installed {report.release} on {report.host} (sysroot {installer.sysroot}, {report.layout}); "
          f"transaction {report.tx}")
    print(f"  containerd: {report.containerd_mode}; handlers: {', '.join(sorted(report.handlers)) or 'none'}")
    print(f"  state digest before {report.digest_before[:16]}, after {report.digest_after[:16]}")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"  workloads: {planted}")
    print(f"  journal: {installer.journal.path}; undo with: pytest-kata rollback --sysroot {installer.sysroot}")
    return 0
