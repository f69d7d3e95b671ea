"""``pytest-kata rollback``: undo the last install on a host from its journal, and prove the state is restored.

Exit status: 0 restored (digest equal to before the install, and the workloads ``pytest-kata install`` planted
on the previous release start again) or nothing to do (a second rollback); 1 rolled back but the state differs
or a workload does not start again (the exact difference, any residue and each workload are printed); 2 bad
input, or no previous release to roll back to (pass --uninstall to remove a first install).
"""

from __future__ import annotations

import argparse
import json

from pytest_kata.commands._hostargs import add_host_arguments, print_workloads
from pytest_kata.install.installer import close_installer, open_installer
from pytest_kata.install.workloads import WorkloadProbe, workloads_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollback", help="undo the last install from the host's journal and verify the state",
                       description="Restores the previous release and containerd configuration recorded in the "
                                   "install journal, restarts containerd, and compares the state digest with "
                                   "the one captured before the install.")
    p.add_argument("--uninstall", action="store_true",
                   help="allow undoing a first install (removes Kata: there is no previous release)")
    p.add_argument("--layout", choices=("versioned", "in-place"), default="versioned", help=argparse.SUPPRESS)
    add_host_arguments(p)
    p.set_defaults(func=_rollback)


def _rollback(args: argparse.Namespace) -> int:
    installer = open_installer(args.host, args.sysroot, containerd=args.containerd, layout=args.layout)
    workloads = None
    try:
        last = installer.journal.last("install")
        record = None  # committed: recorded with the transaction; interrupted: still pending
        if last is not None and last.status in ("committed", "running"):
            record = workloads_path(installer, last.id if last.status == "committed" else None)
        probe = WorkloadProbe.load(installer, record) if record else None
        report = installer.rollback(uninstall=args.uninstall)
        if probe is not None and record is not None and not report.noop:
            workloads = probe.verify()
            probe.discard(record)
    finally:
        close_installer(installer)
    failed = bool(workloads and workloads.failed)
    if args.json:
        print(json.dumps({**report.to_json(), "workloads": workloads.to_json() if workloads else None}, indent=2))
    else:
        print(report.message)
        if not report.noop:
            print(f"  digest before install {str(report.digest_expected)[:16]}, after rollback "
                  f"{str(report.digest_after)[:16]}")
        for line in report.difference():
            print(f"  {line}")
        if report.residue:
            print(f"  residue left by the candidate ({len(report.residue)}):")
            for line in report.residue[:50]:
                print(f"    {line}")
        if workloads is not None:
            print_workloads(workloads)
    return 0 if report.restored and not failed else 1
