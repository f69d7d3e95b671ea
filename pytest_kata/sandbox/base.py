"""The sandbox driver interface: start a sandbox from the candidate, run the probe, read facts, stop.

Suites never care how a sandbox is made. A driver turns a :class:`Workload` (privileged or not, annotations,
mounts, devices, targets to reach) into :class:`ProbeFacts` (the probe's JSON, seen from inside) and offers
the host-side view of what it started (:class:`HostProcess`: argv, seccomp mode, cgroups, open files), which
is where escape-regression tests look for proof that nothing crossed the boundary.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.hashing import sha256_file
from pytest_kata.hosts.base import LocalHost
from pytest_kata.runid import RUN_ID_RE, current_run_id
from pytest_kata.services.cleanup import KATA_SHARED_SANDBOXES


class SandboxError(KataError):
    """A sandbox cannot be started, driven or probed."""


class SandboxUnavailable(SandboxError):
    """This driver cannot run here or for this candidate (no shim, no runtime handler): a reason to skip."""


@dataclass(frozen=True)
class Mount:
    source: str
    destination: str
    read_only: bool = True


@dataclass
class Workload:
    """What to run in the sandbox: the probe as an (un)privileged container with these parameters."""

    privileged: bool = False
    # capabilities added to the default set: what a hostile container needs without --privileged, which
    # also hands it every host device (a Kata runtime then tries to hot-plug them all)
    capabilities: list[str] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    mounts: list[Mount] = field(default_factory=list)
    devices: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # "ip:port" (tcp) or "ip" (icmp)
    host_paths: list[str] = field(default_factory=list)  # host markers whose visibility is reported
    writes: bool = False  # attempt core_pattern/uevent_helper/root-device writes (only inside a VM)
    volume_write: str = ""  # a read-only volume's mount point that the workload tries to make writable
    # privileged on a VM runtime: also hand every host device to the pod (ctr's --privileged does; Kata's
    # deployments set containerd's privileged_without_host_devices, which is the default here)
    host_devices: bool = False
    mark: str = "kata-probe"
    cpus: float = 0.0  # a CPU quota (CFS, in CPUs) for the workload's container; 0: none
    cpu_burn: int = 0  # seconds of busy loops whose CPU time the probe measures; 0: none
    memory_mb: int = 0  # a memory limit (MiB) for the workload's container; 0: none
    mem_fill_mb: int = 0  # MiB a process of the probe tries to hold; 0: none

    def env(self) -> dict[str, str]:
        env = {"KATA_PROBE_MARK": self.mark}
        if self.targets:
            env["KATA_PROBE_TARGETS"] = " ".join(self.targets)
        if self.host_paths:
            env["KATA_PROBE_HOST_PATHS"] = " ".join(self.host_paths)
        if self.writes:
            env["KATA_PROBE_WRITES"] = "1"
        if self.volume_write:
            env["KATA_PROBE_VOLUME_WRITE"] = self.volume_write
        if self.cpu_burn:
            env["KATA_PROBE_CPU_BURN"] = str(self.cpu_burn)
        if self.mem_fill_mb:
            env["KATA_PROBE_MEM_FILL"] = str(self.mem_fill_mb)
        return env


class ProbeFacts(dict[str, Any]):
    """The probe's JSON object, plus the raw output it came from and who ran it."""

    raw: str = ""
    driver: str = ""
    workload: Workload | None = None

    @property
    def capeff(self) -> int:
        return int(str(self.get("status", {}).get("CapEff") or "0"), 16)

    def mount_points(self) -> list[str]:
        return [line.split()[1] for line in self.get("mounts", []) if len(line.split()) > 1]

    def pids(self) -> list[int]:
        return [int(p.split()[0]) for p in self.get("processes", []) if p.split() and p.split()[0].isdigit()]


@dataclass
class HostProcess:
    """One host process the sandbox consists of (the VMM, a shim, virtiofsd, or a runc container's init)."""

    pid: int
    role: str  # vmm | shim | virtiofsd | container
    argv: list[str]
    seccomp: int | None
    uid: int | None
    cgroups: list[str]
    open_files: list[str]

    @classmethod
    def read(cls, pid: int, role: str) -> HostProcess:
        proc = Path(f"/proc/{pid}")
        try:
            argv = [a for a in (proc / "cmdline").read_bytes().decode(errors="replace").split("\0") if a]
            status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
            cgroups = (proc / "cgroup").read_text().splitlines()
        except OSError as exc:
            raise SandboxError(f"process {pid} ({role}) vanished: {exc}") from None
        files: list[str] = []
        try:
            for fd in sorted((proc / "fd").iterdir(), key=lambda p: int(p.name)):
                try:
                    files.append(os.readlink(fd))
                except OSError:
                    continue
        except OSError:
            pass
        seccomp = status.get("Seccomp", "").strip()
        uid = status.get("Uid", "").split()
        return cls(pid, role, argv, int(seccomp) if seccomp.isdigit() else None,
                   int(uid[0]) if uid else None, cgroups, files)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "role": self.role, "argv": self.argv, "seccomp": self.seccomp, "uid": self.uid,
                "cgroups": self.cgroups, "open_files": self.open_files}


@dataclass
class HostView:
    """The host side of one sandbox: whether it is a VM at all, and the processes it consists of."""

    is_vm: bool
    processes: list[HostProcess] = field(default_factory=list)
    note: str = ""

    def vmm(self) -> list[HostProcess]:
        return [p for p in self.processes if p.role == "vmm"]

    def to_json(self) -> dict[str, Any]:
        return {"is_vm": self.is_vm, "note": self.note, "processes": [p.to_json() for p in self.processes]}


class SandboxDriver:
    """Base of every driver. Subclasses implement ``start``, ``probe``, ``host_view`` and ``stop``."""

    name = "abstract"
    #: whether the workload runs behind a VM boundary; the suites' runc control relies on this being honest
    is_vm = True

    def start(self) -> None:
        """Bring the sandbox up (boot the VM, start the runtime): expensive, done once per session."""
        raise NotImplementedError

    def probe(self, workload: Workload | None = None) -> ProbeFacts:
        """Run the probe as ``workload`` in the running sandbox and return its facts."""
        raise NotImplementedError

    def host_view(self) -> HostView:
        """The processes that make up the sandbox on the host, read from /proc."""
        raise NotImplementedError

    def stop(self) -> None:
        """Tear everything down; idempotent, never leaves a process or a file behind."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What this sandbox is made of (kernel, image, hypervisor, handler), for evidence."""
        return {"driver": self.name, "is_vm": self.is_vm}

    def guest_kernel_release(self) -> str | None:
        """The kernel release the candidate ships (what ``uname -r`` must say inside), if known."""
        return None

    def evidence(self) -> dict[str, Any]:
        """What every result that used this sandbox carries (e.g. a rewrite of the candidate's hypervisor
        argv); empty when the candidate runs as it is."""
        return {}

    def __enter__(self) -> SandboxDriver:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- host-side invariants: what must be unchanged after a hostile workload -------------------------------


def _run(host: Any, command: str, *, stdin: bytes | None = None) -> str:
    result = host.run(command, timeout=120, stdin=stdin)
    return str(result.stdout)


def _host(host: Any) -> Any:
    if host is None:
        return LocalHost()
    return host


def host_mounts(exclude: Iterable[str] = (), host: Any = None) -> list[str]:
    """The host mount table as "mountpoint fstype source" lines, minus mounts under ``exclude`` prefixes."""
    text = Path("/proc/self/mountinfo").read_text() if host is None else _run(host, "cat /proc/self/mountinfo")
    prefixes = tuple(p.rstrip("/") + "/" for p in exclude)
    own = current_run_id()
    lines = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        point, fstype, source = fields[4], fields[sep + 1], fields[sep + 2]
        if prefixes and (point + "/").startswith(prefixes):
            continue
        if any(rid != own for rid in RUN_ID_RE.findall(point)):
            continue  # another run's resource (a concurrent run on the same machine), not this sandbox's doing
        if point.startswith(f"{KATA_SHARED_SANDBOXES}/{own}-"):
            continue  # the runtime's own share of a pod of this run (seen where containerd runs in the host's
            # mount namespace, a staging host): what a pod is; a mount redirected out of it still shows
        lines.append(f"{point} {fstype} {source}")
    return sorted(lines)


@dataclass
class HostInvariants:
    """A snapshot of host state a sandbox must never change: file hashes, mount table, sysctls, markers.

    ``host`` is any Host (None: this machine), so the same invariants hold for a remote staging host.
    """

    files: dict[str, str]
    mounts: list[str]
    sysctls: dict[str, str]
    exclude: tuple[str, ...] = ()
    host: Any = None

    SYSCTLS = ("/proc/sys/kernel/core_pattern", "/sys/kernel/uevent_helper", "/proc/sys/kernel/hostname")

    @classmethod
    def capture(cls, files: Iterable[str | Path] = (), exclude: Iterable[str] = (), host: Any = None
                ) -> HostInvariants:
        exclude = tuple(exclude)
        paths = [str(p) for p in files]
        sysctls: dict[str, str] = {}
        hashes: dict[str, str] = {}
        if host is None:
            hashes = {p: sha256_file(p) for p in paths if Path(p).is_file()}
            for path in cls.SYSCTLS:
                try:
                    sysctls[path] = Path(path).read_text().strip()
                except OSError:
                    continue
        else:
            quoted = " ".join(f"'{p}'" for p in paths)
            if paths:
                for line in _run(host, f"sha256sum {quoted} 2>/dev/null").splitlines():
                    digest, _, name = line.partition("  ")
                    hashes[name.strip()] = digest
            for path in cls.SYSCTLS:
                result = host.run(f"cat {path}", timeout=60)
                if result.rc == 0:
                    sysctls[path] = result.stdout.strip()
        return cls(hashes, host_mounts(exclude, host), sysctls, exclude, host)

    def diff(self, after: HostInvariants | None = None) -> dict[str, Any]:
        """What changed since this snapshot (empty dict: nothing)."""
        after = after or HostInvariants.capture(self.files, self.exclude, self.host)
        changes: dict[str, Any] = {}
        files = {p: [h, after.files.get(p)] for p, h in self.files.items() if after.files.get(p) != h}
        if files:
            changes["files"] = files
        added = sorted(set(after.mounts) - set(self.mounts))
        removed = sorted(set(self.mounts) - set(after.mounts))
        if added or removed:
            changes["mounts"] = {"added": added, "removed": removed}
        sysctls = {k: [v, after.sysctls.get(k)] for k, v in self.sysctls.items() if after.sysctls.get(k) != v}
        if sysctls:
            changes["sysctls"] = sysctls
        return changes
