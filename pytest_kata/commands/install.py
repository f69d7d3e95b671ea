"""``pytest-kata install``: install a Kata bundle on a host, atomically and journaled (rolls back on failure).

Exit status: 0 installed; 2 bad input or a failed install (which was rolled back; the message says whether
the host state is restored).
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host, LocalHost


def add_host_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="local", metavar="HOST",
                   help="where to act: 'local' (this machine; default), a staging host over SSH: "
                        "ssh://[user@]host[:port] or user@host (system ssh, BatchMode; $PYTEST_KATA_SSH_CONFIG "
                        "names an ssh_config for keys/known_hosts), or a KVM host by its libvirt URI: "
                        "qemu+ssh://[user@]host[:port]/system[?keyfile=K] (reached over SSH like libvirt does; "
                        "libvirt there is checked to be the same machine) or qemu:///system (this machine)")
    p.add_argument("--sysroot", default="/", metavar="DIR",
                   help="act below DIR instead of / (a scratch root: nothing outside it is touched)")
    p.add_argument("--containerd", choices=("auto", "systemd", "private", "none"), default="auto",
                   help="how to restart containerd and verify the handlers: systemd (the host's service), "
                        "private (a containerd started for DIR/etc/containerd/config.toml and stopped after), "
                        "none (skip, with the reason in the journal); auto: systemd for /, none for a sysroot")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def resolve_host(spec: str) -> Host:
    """``local``; an :class:`SshHost` for ``ssh://[user@]host[:port]``/``user@host``; or, for a libvirt URI
    (``qemu+ssh://[user@]host[:port]/system``, ``qemu:///system``), the machine that hypervisor runs on, after
    checking that libvirt there is the same machine and saying whether it has usable KVM
    (:mod:`pytest_kata.hosts.hypervisor`)."""
    from pytest_kata.hosts.hypervisor import is_libvirt_uri, open_hypervisor_host

    if spec in ("local", "localhost"):
        return LocalHost()
    if is_libvirt_uri(spec):
        return open_hypervisor_host(spec)
    if spec.startswith("ssh://") or "@" in spec:
        from pytest_kata.hosts.ssh import SshHost

        return SshHost(spec)
    raise KataError(f"--host {spec!r}: not a host; use local, ssh://[user@]host[:port], user@host or a libvirt "
                    "URI qemu+ssh://[user@]host[:port]/system")


def containerd_for(args: argparse.Namespace, host: Host) -> Any:
    from pytest_kata.install.installer import NoContainerd, SysrootContainerd, SystemdContainerd

    mode = args.containerd
    sysroot = str(args.sysroot)
    if mode == "auto":
        mode = "systemd" if sysroot.rstrip("/") == "" else "none"
    if mode == "systemd":
        systemd = SystemdContainerd(host)
        reason = systemd.unavailable()
        return systemd if reason is None else NoContainerd(reason)
    if mode == "private":
        config = Path(sysroot) / "etc/containerd/config.toml"
        if not config.is_file():
            raise KataError("no containerd config to start a private containerd with", path=config)
        private = SysrootContainerd(sysroot)
        private.start()
        return private
    return NoContainerd("--containerd none" if args.containerd == "none" else
                        "a sysroot has no containerd of its own (pass --containerd private to start one)")


def installer_for(args: argparse.Namespace, *, layout: str = "versioned") -> Any:
    from pytest_kata.install.installer import Installer

    host = resolve_host(args.host)
    check_sysroot(host, args.sysroot)
    return Installer(host, str(args.sysroot), containerd=containerd_for(args, host), layout=layout)


def check_sysroot(host: Any, sysroot: str | Path) -> None:
    """``--sysroot`` must be a directory on the host: a file or a typo would otherwise yield an empty state."""
    if str(sysroot) != "/" and not host.run(f"test -d {shlex.quote(str(sysroot))}", timeout=60).ok:
        raise KataError("no such sysroot directory",
                        path=sysroot if isinstance(host, LocalHost) else f"{host.name}:{sysroot}")


def stop_private(installer: Any) -> None:
    stop = getattr(installer.containerd, "stop", None)
    if stop is not None:
        stop()
    installer.host.close()  # an SshHost ends its shared connection


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


def workloads_path(installer: Any, tx: str | None) -> str:
    """Where the workloads planted for install ``tx`` are recorded (``None``: planted, install not committed)."""
    from pytest_kata.install.workloads import WORKLOADS_FILE

    if tx is None:
        return f"{installer.journal.dir}/workloads-pending.json"
    return f"{installer.journal.tx_dir(tx)}/{WORKLOADS_FILE}"


def plant_workloads(installer: Any) -> tuple[Any, str]:
    """Workloads on the release being replaced (None and the reason when there is nothing to plant on).

    Any workloads of earlier installs go first: a committed install's are superseded, and an interrupted
    install's were never recorded against a transaction (the namespace is ours alone, so it is emptied)."""
    from pytest_kata.install.state import PREFIX
    from pytest_kata.install.workloads import CLI_NAMESPACE, WorkloadProbe

    probe = WorkloadProbe(installer, namespace=CLI_NAMESPACE)
    if probe.unavailable:
        return None, f"no workloads planted: {probe.unavailable}"
    probe.clear_namespace()
    last = installer.journal.last("install")
    stale = [workloads_path(installer, None)] + ([workloads_path(installer, last.id)] if last else [])
    installer.host.run("rm -f " + " ".join(shlex.quote(p) for p in stale), timeout=60)
    if not installer.exists(installer.p(PREFIX)):
        return None, f"no previous Kata release under {installer.p(PREFIX)}: no workloads to keep"
    try:
        probe.plant()
        probe.save(workloads_path(installer, None))
    except KataError as exc:
        probe.cleanup()
        return None, f"no workloads planted: {exc}"
    ran = [w.handler for w in probe.report.planted if w.ran_before]
    count = len(probe.report.planted)
    return probe, f"planted {count} workloads (ran on the previous release: {', '.join(ran) or 'none'})"


def print_workloads(report: Any, *, indent: str = "  ") -> None:
    for result in report.results:
        print(f"{indent}workload {result.handler}: {result.status.upper()} {result.detail}")


def _install(args: argparse.Namespace) -> int:
    from pytest_kata.bundle import open_bundle
    from pytest_kata.install.installer import InstallError

    if not args.bundle:
        raise KataError("--bundle is required (a kata-static tarball or an /opt/kata tree)")
    installer = installer_for(args, layout=args.layout)  # the host first: a wrong --host fails before unpacking
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
        stop_private(installer)
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
