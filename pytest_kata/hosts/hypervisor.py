"""A libvirt URI as the host of a CLI command: the KVM machine the hypervisor runs on.

``pytest-kata install --host qemu+ssh://stage-1/system`` — Kata runs on KVM hosts, and operators know a staging
KVM host by its libvirt URI. The URI names the machine (``stage-1``) and how to reach it (``ssh``, with user,
port and ``keyfile``); the install needs a root shell there, so the machine is reached the way libvirt reaches
it: SSH with the same user, port and key (or this machine itself for ``qemu:///system``). The libvirt connection
is opened too, for two reasons: to prove that the URI and the shell are the same machine (libvirt's hostname
equals the shell's — a port forward or a jump host can make them differ), and to tell the user, before anything
is installed, whether that hypervisor has usable KVM (Kata's sandboxes need it).

Not accepted, each with the reason: ``/session`` URIs (an unprivileged per-user hypervisor: installing Kata needs
root), ``tcp``/``tls`` transports (they carry the libvirt API but no shell), drivers other than ``qemu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from pytest_kata import progress
from pytest_kata.errors import KataError
from pytest_kata.hosts.accel import detect_from_capabilities
from pytest_kata.hosts.base import Host, LocalHost
from pytest_kata.hosts.ssh import SshHost

SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")
SHELL_LESS = ("tcp", "tls")
LIBVIRT_SCHEMES = ("qemu", "libvirt")


@dataclass
class LibvirtTarget:
    uri: str
    driver: str
    transport: str  # "" for local
    user: str | None
    hostname: str | None
    port: int | None
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def ssh_target(self) -> str:
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port else ""
        return f"ssh://{user}{self.hostname}{port}"


def is_libvirt_uri(spec: str) -> bool:
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    return scheme.split("+", 1)[0] in LIBVIRT_SCHEMES


def parse_libvirt_uri(uri: str) -> LibvirtTarget:
    """Split a libvirt URI into what a host needs; a one-line error for every URI that cannot be a Kata host."""
    where = f"--host {uri}"
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu":
        raise KataError(f"libvirt driver {driver!r} does not run Kata's hypervisors here; use a qemu:// URI",
                        path=where)
    if parts.path != "/system":
        raise KataError(f"{parts.path or 'no path'}: a Kata install needs root on the host; use the /system "
                        "hypervisor (qemu:///system, qemu+ssh://[user@]host[:port]/system)", path=where)
    if transport in SHELL_LESS or (parts.hostname and not transport):
        raise KataError(f"the {transport or 'tls'} transport carries libvirt's API but no shell to install with; "
                        "use qemu+ssh://[user@]host[:port]/system (or ssh://[user@]host)", path=where)
    if transport and transport not in (*SSH_TRANSPORTS, "unix"):
        raise KataError(f"unknown libvirt transport {transport!r}", path=where)
    if transport in SSH_TRANSPORTS and not parts.hostname:
        raise KataError("an ssh URI names no host", path=where)
    try:
        port = parts.port
    except ValueError:
        raise KataError("the port is not a number", path=where) from None
    params = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    return LibvirtTarget(uri, driver, transport if transport in SSH_TRANSPORTS else "", parts.username,
                         parts.hostname, port, parts.path, params)


def open_hypervisor_host(uri: str, *, check: bool = True) -> Host:
    """The host behind a libvirt URI, after checking (when ``check``) that libvirt there is the same machine."""
    target = parse_libvirt_uri(uri)
    host: Host = SshHost(target.ssh_target, identity=target.params.get("keyfile")) if target.transport else LocalHost()
    if check:
        try:
            describe_hypervisor(target, host)
        except BaseException:
            host.close()
            raise
    return host


def describe_hypervisor(target: LibvirtTarget, host: Host) -> str:
    """Open libvirt read-only at the URI: same machine as the shell? usable KVM? One line, also shown as progress."""
    try:
        import libvirt
    except ImportError:
        raise KataError("libvirt-python is not installed: cannot check the hypervisor; use ssh:// instead",
                        path=target.uri) from None

    libvirt.registerErrorHandler(lambda *_: None, None)  # the error is raised; do not also print it
    try:
        conn = libvirt.openReadOnly(target.uri)
    except libvirt.libvirtError as exc:
        raise KataError(f"libvirt does not answer: {str(exc).strip().splitlines()[-1][:200]}; check libvirtd on "
                        "that host, or use --host ssh://... to skip the hypervisor check", path=target.uri) from None
    try:
        libvirt_name = conn.getHostname()
        version = conn.getVersion()
        accel, why = detect_from_capabilities(conn.getCapabilities())
    finally:
        conn.close()
    shell_name = host.run("hostname", timeout=60).stdout.strip()
    if shell_name.split(".")[0] != libvirt_name.split(".")[0]:
        raise KataError(f"the libvirt URI reaches {libvirt_name!r} but the shell reaches {shell_name!r}: not the "
                        "same machine (a port forward or jump host?); name the host with ssh:// instead",
                        path=target.uri)
    if accel == "kvm" and host.run("test -e /sys/module/kvm_pvm", timeout=60).ok:
        accel, why = "tcg", "/dev/kvm is PVM (kvm_pvm): stock guests cannot run on it"
    major, minor = version // 1_000_000, version // 1000 % 1000
    line = (f"{shell_name}: qemu {major}.{minor} via {target.uri}; "
            + ("KVM usable" if accel == "kvm" else f"NO usable KVM ({why}): Kata sandboxes will not start there"))
    progress.step("hosts", line)
    return line


__all__ = ["LibvirtTarget", "describe_hypervisor", "is_libvirt_uri", "open_hypervisor_host", "parse_libvirt_uri"]
