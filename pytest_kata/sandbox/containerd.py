"""The ``containerd`` driver: run the probe with ``ctr`` through a runtime handler on a host.

``kata-<shim>`` runs the candidate (it needs the bundle's ``containerd-shim-kata-v2``: a bundle without one,
like the reference candidate, makes this driver unavailable with the bundle's own reason); ``runc`` and
``runsc`` are controls: the suites must fail on them, because a runc workload runs on the host kernel. The
containerd is private to the run (own root/state/socket, helper F's :func:`pytest_kata.services.start_containerd`),
so no system containerd or image store is touched. Annotations, privileged mode, mounts and devices are
workload parameters because most escape regressions need one of them.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.progress import step, timed
from pytest_kata.sandbox.base import (
    HostProcess,
    HostView,
    ProbeFacts,
    SandboxDriver,
    SandboxError,
    SandboxUnavailable,
    Workload,
)
from pytest_kata.sandbox.probe import build_oci_image, parse_output

CONTROL_HANDLERS = {"runc": "io.containerd.runc.v2", "runsc": "io.containerd.runsc.v1"}
CONTROL_SHIMS = {"runc": ("containerd-shim-runc-v2", "runc"), "runsc": ("containerd-shim-runsc-v1", "runsc")}
VMM_NAMES = ("qemu", "cloud-hypervisor", "firecracker", "dragonball", "stratovirt")


def runtime_type(handler: str) -> str:
    """``runc`` → ``io.containerd.runc.v2``; ``kata-qemu`` → ``io.containerd.kata-qemu.v2``."""
    if handler in CONTROL_HANDLERS:
        return CONTROL_HANDLERS[handler]
    if handler == "kata" or handler.startswith("kata-"):
        return f"io.containerd.{handler}.v2"
    raise SandboxError(f"unknown runtime handler {handler!r}: use kata-<shim> (candidate), runc or runsc (controls)",
                       path="--kata-runtime")


HOST_VIEW_SCRIPT = r"""
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  match=0
  for want in $PIDS; do [ "$pid" = "$want" ] && match=1; done
  cmd=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
  case $cmd in *@@PID*) continue;; esac  # this very script
  if [ $match = 0 ] && [ -n "$PATTERN" ]; then case $cmd in *"$PATTERN"*) match=1;; esac; fi
  [ $match = 1 ] || continue
  echo "@@PID $pid"
  tr '\0' '\037' < $d/cmdline 2>/dev/null; echo
  grep -E '^(Seccomp|Uid):' $d/status 2>/dev/null
  echo "@@CG"; cat $d/cgroup 2>/dev/null
  echo "@@FD"; for f in $d/fd/*; do readlink "$f" 2>/dev/null; done
done
"""


def read_processes(host: Any, pids: list[int], pattern: str, roles: dict[int, str]) -> list[HostProcess]:
    """Read argv, seccomp, uid, cgroups and open files of processes on ``host`` (local or remote) via sh."""
    env = f"PIDS='{' '.join(map(str, pids))}' PATTERN='{pattern}'"
    out = host.run(f"{env}; export PIDS PATTERN; {HOST_VIEW_SCRIPT}", timeout=60).stdout
    processes = []
    for block in out.split("@@PID ")[1:]:
        head, _, rest = block.partition("\n")
        argv_line, _, rest = rest.partition("\n")
        status, _, rest = rest.partition("@@CG\n")
        cgroups, _, fds = rest.partition("@@FD\n")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(head.strip())
        argv = [a for a in argv_line.split("\x1f") if a]
        exe = Path(argv[0]).name if argv else ""
        role = roles.get(pid) or ("vmm" if exe.startswith(VMM_NAMES) else "virtiofsd" if "virtiofsd" in exe
                                  else "shim")
        seccomp = fields.get("Seccomp", "").strip()
        uid = fields.get("Uid", "").split()
        processes.append(HostProcess(pid, role, argv, int(seccomp) if seccomp.isdigit() else None,
                                     int(uid[0]) if uid else None, cgroups.splitlines(), fds.splitlines()))
    return processes


class ContainerdDriver(SandboxDriver):
    """One containerd, the probe image imported once, one ``ctr run --rm`` per probe.

    Without a ``host`` it starts a private containerd on this machine (helper F's) and drives it through
    :class:`~pytest_kata.hosts.base.LocalHost`; with a ``host`` (any :class:`~pytest_kata.hosts.base.Host`,
    e.g. a libvirt staging host) it drives that host's containerd at ``address`` in a namespace named after
    the run. Every ``ctr`` call and the host-side view go through ``host.run``, so both paths are the same code.
    """

    name = "containerd"
    _instances = 0

    def __init__(self, handler: str = "runc", *, bundle: Any = None, shim: str | None = None,
                 containerd: Any = None, host: Any = None, address: str = "/run/containerd/containerd.sock") -> None:
        self.handler = handler
        self.runtime = runtime_type(handler)
        self.is_vm = handler.startswith("kata")
        self.bundle = bundle
        self.shim = shim
        self.ctd = containerd
        self._own_ctd = containerd is None and host is None
        self.host = host
        self.address = address
        self.namespace = runid.current_run_id()
        self.image = ""
        self.holder = ""
        self.remote_tar = ""
        self.runtime_args: list[str] = []
        self.run_id = runid.current_run_id()
        self._counter = 0
        ContainerdDriver._instances += 1
        self.instance = ContainerdDriver._instances  # runc's state dir is per namespace, shared by containerds
        self.last_seconds: float | None = None

    def _on(self) -> Any:
        if self.host is None:
            from pytest_kata.hosts.base import LocalHost

            self.host = LocalHost()
        return self.host

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0) -> Any:
        """``ctr -a ADDRESS -n NAMESPACE ARGS`` on the sandbox's host; a failure raises when ``check``."""
        result = self._on().run(["ctr", "-a", self.address, "-n", self.namespace, *args], timeout=timeout)
        if check and result.rc != 0:
            tail = (result.stderr or result.stdout).strip()[-300:]
            raise SandboxError(f"ctr {' '.join(args[:3])} failed with exit {result.rc}: {tail}",
                               path=f"{getattr(self.host, 'name', 'host')}:{self.address}")
        return result

    # availability --------------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise :class:`SandboxUnavailable` (a skip reason) when this handler cannot run on the host."""
        host = self._on()
        tools = ["ctr"] + (["containerd"] if self._own_ctd else [])
        if self.handler in CONTROL_SHIMS:
            tools += list(CONTROL_SHIMS[self.handler])
        missing = [t for t in tools if host.run(f"command -v {t}", timeout=30).rc != 0]
        if missing:
            raise SandboxUnavailable(f"{', '.join(missing)} not installed", path=getattr(host, "name", "host"))
        if self.handler in CONTROL_SHIMS:
            return
        if self.bundle is None:
            raise SandboxUnavailable("a kata-* handler needs a candidate (--kata-candidate)", path=self.handler)
        shim = self.bundle.shim(self.shim)
        if not shim.binary:
            reason = getattr(self.bundle, "missing", {}).get("containerd-shim-kata-v2", "the bundle has no shim")
            raise SandboxUnavailable(f"no containerd-shim-kata-v2 in the candidate: {reason}",
                                     path=str(self.bundle.root))
        if host.run("test -e /dev/vhost-vsock", timeout=30).rc != 0 and not os.environ.get("PYTEST_KATA_ASSUME_VSOCK"):
            raise SandboxUnavailable("the host has no /dev/vhost-vsock: a Kata shim cannot reach its agent; "
                                     "run on a KVM host (--kata-host-provider libvirt)", path="/dev/vhost-vsock")
        self.runtime_args = ["--runtime-config-path", str(shim.config_path)]
        if self._own_ctd:
            os.environ["PATH"] = f"{(Path(self.bundle.root) / shim.binary).parent}:{os.environ.get('PATH', '')}"

    # lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.image:
            return
        self.check_available()
        tar, name = build_oci_image()
        if self._own_ctd:
            from pytest_kata.services import start_containerd

            self.ctd = start_containerd(run_id=self.run_id)
            self.address, self.namespace = str(self.ctd.socket), self.ctd.namespace
            source = str(tar)
        else:
            if self.ctr("version", check=False, timeout=30).rc != 0:
                raise SandboxUnavailable("containerd does not answer", path=f"{self.host.name}:{self.address}")
            source = self.remote_tar = f"/var/tmp/{self.run_id}-probe-oci-{self.instance}.tar"
            self.host.put(tar, source)
        with timed("sandbox", f"importing the probe image {name}"):
            self.ctr("images", "import", source)
        self.image = name
        # a long-lived container of the same kind, so that the host-side view has something to read
        self.holder = f"{self.run_id}-hold-{os.getpid()}-{self.instance}"
        self.ctr("run", "-d", "--runtime", self.runtime, *self.runtime_args, self.image, self.holder,
                 "sleep", "3600", timeout=120)

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "is_vm": self.is_vm, "handler": self.handler, "runtime_type": self.runtime,
                "host": getattr(self.host, "name", None), "containerd": self.address, "namespace": self.namespace,
                "image": self.image}

    def guest_kernel_release(self) -> str | None:
        if self.is_vm and self.bundle is not None:
            from pytest_kata.sandbox.direct import kernel_release_of, map_path

            kernel = self.bundle.shim(self.shim).config.get("hypervisor.*.kernel", "")
            return kernel_release_of(map_path(Path(self.bundle.root), str(kernel))) if kernel else None
        return None

    def probe(self, workload: Workload | None = None) -> ProbeFacts:
        workload = workload or Workload()
        refused = ""
        if workload.writes and not self.is_vm:
            refused = (f"{self.handler} is no VM: host-kernel writes (core_pattern, uevent_helper, block "
                       "devices) were not attempted")
            workload = dataclasses.replace(workload, writes=False)
        self._counter += 1
        cid = f"{self.run_id}-probe-{os.getpid()}-{self.instance}-{self._counter}"
        args = ["run", "--rm", "--runtime", self.runtime, *self.runtime_args]
        if workload.privileged:
            args.append("--privileged")
        for key, value in workload.annotations.items():
            args += ["--annotation", f"{key}={value}"]
        for m in workload.mounts:
            mode = "ro" if m.read_only else "rw"
            args += ["--mount", f"type=bind,src={m.source},dst={m.destination},options=rbind:{mode}"]
        for dev in workload.devices:
            args += ["--device", dev]
        for key, value in workload.env().items():
            args += ["--env", f"{key}={value}"]
        args += [self.image, cid, "sh", "/probe.sh"]
        start = time.monotonic()
        result = self.ctr(*args, check=False, timeout=300)
        self.last_seconds = time.monotonic() - start
        if result.rc != 0 and "KATA-PROBE-END" not in result.stdout:
            raise SandboxError(f"ctr run through {self.handler} failed with exit {result.rc}: "
                               f"{(result.stderr or result.stdout).strip()[-300:]}",
                               path=f"{getattr(self.host, 'name', 'host')}:{self.address}")
        facts = parse_output(result.stdout, source=f"ctr run {cid}")
        facts.driver, facts.workload = f"{self.name}/{self.handler}", workload
        if refused:
            facts["writes_refused"] = refused
        return facts

    def host_view(self) -> HostView:
        tasks = self.ctr("tasks", "ls", check=False, timeout=30).stdout
        task_pids = [int(f[1]) for f in (line.split() for line in tasks.splitlines()[1:])
                     if len(f) >= 2 and f[0] == self.holder and f[1].isdigit()]
        processes = read_processes(self._on(), task_pids, self.holder, {p: "container" for p in task_pids})
        note = "" if self.is_vm else f"{self.handler} is no VM: the workload runs on the host kernel"
        return HostView(is_vm=self.is_vm and any(p.role == "vmm" for p in processes), processes=processes, note=note)

    def stop(self) -> None:
        if self.host is None and self.ctd is None:
            return
        if self.holder:
            self.ctr("tasks", "kill", "-s", "SIGKILL", self.holder, check=False, timeout=30)
            for _ in range(50):
                if self.ctr("tasks", "delete", self.holder, check=False, timeout=30).rc == 0:
                    break
                time.sleep(0.1)
            self.ctr("containers", "delete", self.holder, check=False, timeout=30)
            self.holder = ""
        if self._own_ctd and self.ctd is not None:
            self.ctd.stop()
            step("sandbox", f"stopped the private containerd for {self.handler}")
            self.ctd = None
        elif not self._own_ctd:
            if self.image:
                self.ctr("images", "rm", "--sync", self.image, check=False, timeout=60)
            gone = self.ctr("namespaces", "rm", self.namespace, check=False, timeout=30)
            if gone.rc != 0:
                step("sandbox", f"namespace {self.namespace} left on {self.host.name}: "
                                f"{(gone.stderr or gone.stdout).strip()[-200:]}")
            if self.remote_tar:
                self.host.run(["rm", "-f", self.remote_tar], timeout=30)
        self.image = ""
