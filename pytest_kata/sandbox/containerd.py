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
import shutil
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


class ContainerdDriver(SandboxDriver):
    """One private containerd, the probe image imported once, one ``ctr run --rm`` per probe."""

    name = "containerd"
    _instances = 0

    def __init__(self, handler: str = "runc", *, bundle: Any = None, shim: str | None = None,
                 containerd: Any = None) -> None:
        self.handler = handler
        self.runtime = runtime_type(handler)
        self.is_vm = handler.startswith("kata")
        self.bundle = bundle
        self.shim = shim
        self.ctd = containerd
        self._own_ctd = containerd is None
        self.image = ""
        self.holder = ""
        self.runtime_args: list[str] = []
        self.run_id = runid.current_run_id()
        self._counter = 0
        ContainerdDriver._instances += 1
        self.instance = ContainerdDriver._instances  # runc's state dir is per namespace, shared by containerds
        self.last_seconds: float | None = None

    # availability --------------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise :class:`SandboxUnavailable` (a skip reason) when this handler cannot run here."""
        for tool in ("containerd", "ctr"):
            if not shutil.which(tool):
                raise SandboxUnavailable(f"{tool} is not installed", path=tool, hint="apt-get install containerd")
        if self.handler in CONTROL_SHIMS:
            missing = [b for b in CONTROL_SHIMS[self.handler] if not shutil.which(b)]
            if missing:
                raise SandboxUnavailable(f"{', '.join(missing)} not installed", path=self.handler)
            return
        if self.bundle is None:
            raise SandboxUnavailable("a kata-* handler needs a candidate (--kata-candidate)", path=self.handler)
        shim = self.bundle.shim(self.shim)
        binary = shim.binary
        if not binary:
            reason = getattr(self.bundle, "missing", {}).get("containerd-shim-kata-v2", "the bundle has no shim")
            raise SandboxUnavailable(f"no containerd-shim-kata-v2 in the candidate: {reason}",
                                     path=str(self.bundle.root))
        if not Path("/dev/vhost-vsock").exists() and not os.environ.get("PYTEST_KATA_ASSUME_VSOCK"):
            raise SandboxUnavailable("this host has no /dev/vhost-vsock: a Kata shim cannot reach its agent; "
                                     "run on a KVM host (--kata-host-provider libvirt)", path="/dev/vhost-vsock")
        shim_path = Path(self.bundle.root) / binary
        self.runtime_args = ["--runtime-config-path", str(shim.config_path)]
        os.environ["PATH"] = f"{shim_path.parent}:{os.environ.get('PATH', '')}"

    # lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.image:
            return
        self.check_available()
        if self.ctd is None:
            from pytest_kata.services import start_containerd

            self.ctd = start_containerd(run_id=self.run_id)
        tar, name = build_oci_image()
        with timed("sandbox", f"importing the probe image {name}"):
            self.ctd.ctr("images", "import", str(tar))
        self.image = name
        # a long-lived container of the same kind, so that the host-side view has something to read
        self.holder = f"{self.run_id}-hold-{os.getpid()}-{self.instance}"
        self.ctd.ctr("run", "-d", "--runtime", self.runtime, *self.runtime_args, self.image, self.holder,
                     "sleep", "3600", timeout=120)

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "is_vm": self.is_vm, "handler": self.handler, "runtime_type": self.runtime,
                "containerd_socket": str(getattr(self.ctd, "socket", "")), "image": self.image}

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
            args += ["--mount", f"type=bind,src={m.source},dst={m.destination},options=rbind:{'ro' if m.read_only else 'rw'}"]
        for dev in workload.devices:
            args += ["--device", dev]
        for key, value in workload.env().items():
            args += ["--env", f"{key}={value}"]
        args += [self.image, cid, "sh", "/probe.sh"]
        start = time.monotonic()
        proc = self.ctd.ctr(*args, check=False, timeout=300)
        self.last_seconds = time.monotonic() - start
        if proc.returncode != 0 and "KATA-PROBE-END" not in proc.stdout:
            raise SandboxError(f"ctr run through {self.handler} failed with exit {proc.returncode}: "
                               f"{(proc.stderr or proc.stdout).strip()[-300:]}", path=str(self.ctd.socket))
        facts = parse_output(proc.stdout, source=f"ctr run {cid}")
        facts.driver, facts.workload = f"{self.name}/{self.handler}", workload
        if refused:
            facts["writes_refused"] = refused
        return facts

    def host_view(self) -> HostView:
        processes: list[HostProcess] = []
        proc = self.ctd.ctr("tasks", "ls", check=False, timeout=30)
        for line in proc.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == self.holder and fields[1].isdigit():
                processes.append(HostProcess.read(int(fields[1]), "container"))
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            exe = Path(argv[0].decode(errors="replace")).name if argv and argv[0] else ""
            joined = b" ".join(argv).decode(errors="replace")
            if self.holder and self.holder in joined and int(pid_dir.name) not in {p.pid for p in processes}:
                role = "vmm" if exe.startswith(VMM_NAMES) else "virtiofsd" if "virtiofsd" in exe else "shim"
                try:
                    processes.append(HostProcess.read(int(pid_dir.name), role))
                except SandboxError:
                    continue
        note = "" if self.is_vm else f"{self.handler} is no VM: the workload runs on the host kernel"
        return HostView(is_vm=self.is_vm and any(p.role == "vmm" for p in processes), processes=processes, note=note)

    def stop(self) -> None:
        if self.ctd is None:
            return
        if self.holder:
            self.ctd.ctr("tasks", "kill", "-s", "SIGKILL", self.holder, check=False, timeout=30)
            for _ in range(50):
                if self.ctd.ctr("tasks", "delete", self.holder, check=False, timeout=30).returncode == 0:
                    break
                time.sleep(0.1)
            self.ctd.ctr("containers", "delete", self.holder, check=False, timeout=30)
            self.holder = ""
        if self._own_ctd:
            self.ctd.stop()
            step("sandbox", f"stopped the private containerd for {self.handler}")
            self.ctd = None
        self.image = ""
