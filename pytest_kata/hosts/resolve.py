"""A host named on the command line (``--host``): this machine, a staging host over SSH, or the machine a
libvirt URI's hypervisor runs on."""

from __future__ import annotations

import shlex
from pathlib import Path

from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host, LocalHost
from pytest_kata.hosts.hypervisor import is_libvirt_uri, open_hypervisor_host
from pytest_kata.hosts.ssh import SshHost


def resolve_host(spec: str) -> Host:
    """``local``; an :class:`SshHost` for ``ssh://[user@]host[:port]``/``user@host``; or, for a libvirt URI
    (``qemu+ssh://[user@]host[:port]/system``, ``qemu:///system``), the machine that hypervisor runs on, after
    checking that libvirt there is the same machine and saying whether it has usable KVM
    (:mod:`pytest_kata.hosts.hypervisor`)."""
    if spec in ("local", "localhost"):
        return LocalHost()
    if is_libvirt_uri(spec):
        return open_hypervisor_host(spec)
    if spec.startswith("ssh://") or "@" in spec:
        return SshHost(spec)
    raise KataError(f"--host {spec!r}: not a host; use local, ssh://[user@]host[:port], user@host or a libvirt "
                    "URI qemu+ssh://[user@]host[:port]/system")


def check_sysroot(host: Host, sysroot: str | Path) -> None:
    """``--sysroot`` must be a directory on the host: a file or a typo would otherwise yield an empty state."""
    if str(sysroot) != "/" and not host.run(f"test -d {shlex.quote(str(sysroot))}", timeout=60).ok:
        raise KataError("no such sysroot directory",
                        path=sysroot if isinstance(host, LocalHost) else f"{host.name}:{sysroot}")
