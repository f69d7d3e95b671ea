"""Real Kata pods in the rollback sequence: what an installed Kata 1.x shim needs to run on this host, and a
pod left running across the upgrade.

A release installed below a local sysroot keeps upstream's configuration files untouched, and those name
``/opt/kata/...`` paths of a real install and ask for KVM and vhost devices. :class:`RunnableKataConfigs` is
the ``kata_args`` of :class:`~pytest_kata.install.workloads.WorkloadProbe`: for each ``kata-*`` handler it
writes a runnable copy of the configuration the handler names (with
:func:`~pytest_kata.sandbox.shimconfig.write_shim_config`: ``/opt/kata`` mapped to the sysroot's
``/opt/kata`` link, so the copy follows the installed release as the original does; what the host lacks and
the TCG wrapper, each with its reason) and pins it in the container record with Kata 1.x's
``io.katacontainers.config_path`` annotation (ctr 1.6 sends ``--runtime-config-path`` in an options type
Kata 1.x shims cannot decode). A copy is keyed by the configuration's bytes, so the candidate's smoke run
never rewrites the baseline's. :class:`StagingKataConfigs` does the same for a release installed on a staging
host (a libvirt host): the copy is written there, keeps ``/opt/kata``, and handlers whose hypervisor, kernel
or guest the release lacks on that host are not run.

:class:`RunningPod` is the pod started on the baseline and left running while the candidate is installed:
afterwards it must still run on the baseline's shim (same task pid, the shim process still executing the
baseline's binary), answer an exec and be deleted with nothing of it left on the host.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.hosts.accel import detect_on
from pytest_kata.install.workloads import Workload, WorkloadProbe
from pytest_kata.kataconfig import load_config
from pytest_kata.resources import sandbox_dir
from pytest_kata.sandbox.base import SandboxError
from pytest_kata.sandbox.containerd import read_processes, write_shim_config_on
from pytest_kata.sandbox.direct import detect_accel, map_path
from pytest_kata.sandbox.shimconfig import CONFIG_PATH_ANNOTATION, ShimConfig, write_shim_config


class RunnableKataConfigs:
    """``kata_args`` for a local sysroot install: a runnable copy of each handler's installed configuration."""

    def __init__(self, sysroot: str | Path, out_dir: Path, *, accel: str = "auto") -> None:
        self.prefix = Path(sysroot) / "opt" / "kata"
        self.out_dir = out_dir
        self.accel, self.accel_reason = detect_accel(accel)
        self.written: dict[str, ShimConfig] = {}  # copy path -> what was written and why

    def __call__(self, handler: str, spec: dict[str, str]) -> list[str]:
        source = Path(spec.get("config_path") or "")
        if not source.is_file():
            raise KataError(f"{handler} names no configuration file on this host", path=str(source))
        data = source.read_bytes()
        out = self.out_dir / f"{handler}-{hashlib.sha256(data).hexdigest()[:12]}"
        copy = out / source.name
        if not copy.is_file():  # a copy in use (its TCG wrapper may be running) is never rewritten
            config = load_config(source)
            if config.get("hypervisor.*.shared_fs", "") == "virtio-fs":
                daemon = str(config.get("hypervisor.*.virtio_fs_daemon", "") or "")
                if not map_path(self.prefix, daemon).exists():
                    raise KataError(f"{handler} cannot run on this host: its shared file system is virtio-fs "
                                    f"and the release ships no {daemon or 'virtiofsd'}")
            try:
                shim = write_shim_config(config, self.prefix, out, accel=self.accel,
                                         vhost_net=Path("/dev/vhost-net").exists(),
                                         vhost_vsock=Path("/dev/vhost-vsock").exists())
            except SandboxError as exc:
                raise KataError(f"{handler} cannot run on this host: {exc}") from None
            shim.changes.setdefault("accel", f"{self.accel} ({self.accel_reason})")
            self.written[str(shim.path)] = shim
        return ["--annotation", f"{CONFIG_PATH_ANNOTATION}={copy}"]

    def evidence(self) -> dict[str, Any]:
        """What every result that ran these pods carries: how each configuration copy differs, and whether
        qemu's argv was rewritten for TCG."""
        notes = sorted({s.rewrite_note for s in self.written.values() if s.rewrite_note})
        out: dict[str, Any] = {"kata_config_copies": {p: s.changes for p, s in sorted(self.written.items())}}
        if notes:
            out["hypervisor_rewrite"] = notes[0]
        return out


class StagingKataConfigs:
    """``kata_args`` for a release installed on a staging host (a libvirt host with nested KVM, an SSH host):
    a copy of each handler's installed configuration, written on the host under the sandbox directory, that
    differs only where the host lacks a device or KVM, or where its qemu refuses Kata 1.x's bare ``-machine``
    flags (:func:`~pytest_kata.sandbox.shimconfig.write_shim_config` with ``place``). Its ``/opt/kata`` paths
    are kept, so it follows the installed release as the original does."""

    def __init__(self, host: Any, out_dir: Path, *, accel: str = "auto") -> None:
        self.host = host
        self.out_dir = out_dir
        self.accel = detect_on(host, accel)
        self.written: dict[str, ShimConfig] = {}  # path on the host -> what was written and why

    def __call__(self, handler: str, spec: dict[str, str]) -> list[str]:
        source = spec.get("config_path") or ""
        text = self.host.run(["cat", source], timeout=60)
        if not source or not text.ok:
            raise KataError(f"{handler} names no configuration file on {self.host.name}", path=source)
        digest = hashlib.sha256(text.stdout.encode()).hexdigest()[:12]
        place = Path(sandbox_dir()) / f"{runid.current_run_id()}-{handler}-{digest}"
        runs_at = place / Path(source).name
        if str(runs_at) not in self.written:  # a copy in use is never rewritten
            local = self.out_dir / f"{handler}-{digest}"
            original = local / "installed" / Path(source).name
            original.parent.mkdir(parents=True, exist_ok=True)
            original.write_text(text.stdout)
            config = load_config(original, dropins=False)
            missing = self.missing_on_host(config)
            if missing:
                raise KataError(f"{handler} cannot run on {self.host.name}: the release installed there has no "
                                f"{', '.join(missing)}")
            try:
                shim = write_shim_config_on(self.host, config, None, local / "copy", place, accel=self.accel)
            except SandboxError as exc:
                raise KataError(f"{handler} cannot run on {self.host.name}: {exc}") from None
            self.written[str(runs_at)] = shim
        return ["--annotation", f"{CONFIG_PATH_ANNOTATION}={runs_at}"]

    def missing_on_host(self, config: Any) -> list[str]:
        """The hypervisor, kernel, guest and (for virtio-fs) daemon files ``config`` names that the host lacks:
        a handler whose release does not ship its hypervisor (acrn, clh, fc from a qemu-only build) cannot run."""
        keys = ["path", "kernel", "image", "initrd"]
        if config.get("hypervisor.*.shared_fs", "") == "virtio-fs":
            keys.append("virtio_fs_daemon")
        paths = [str(v) for v in (config.get(f"hypervisor.*.{k}", "") for k in keys) if v]
        if not paths:
            return []
        script = 'for p in "$@"; do test -e "$p" || echo "$p"; done'
        return self.host.run(["sh", "-c", script, "sh", *paths], timeout=60).stdout.split()

    def evidence(self) -> dict[str, Any]:
        """As :meth:`RunnableKataConfigs.evidence`: how each copy differs and how qemu's argv was changed."""
        notes = sorted({s.rewrite_note for s in self.written.values() if s.rewrite_note})
        out: dict[str, Any] = {"kata_config_copies": {p: s.changes for p, s in sorted(self.written.items())}}
        if notes:
            out["hypervisor_rewrite"] = notes[0]
        return out


@dataclass
class RunningPod:
    """A Kata pod started on the baseline through a planted workload's handler and left running."""

    probe: WorkloadProbe
    workload: Workload
    task_pid: int = 0
    shim_pid: int = 0
    shim_exe: str = ""
    steps: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, probe: WorkloadProbe, planted: Workload) -> RunningPod:
        """Create and start (detached) a pod with the same runtime, configuration and arguments as ``planted``."""
        workload = Workload(f"{planted.container}-running", planted.handler, planted.runtime, planted.config_path,
                            planted.config_sha256, create_args=list(planted.create_args),
                            shim_sha256=planted.shim_sha256, shim_label=planted.shim_label)
        pod = cls(probe, workload)
        created = probe.create(workload, ["sh", "-c", "echo running > /tmp/running; exec sleep 3600"])
        if not created.ok:
            raise KataError(f"the running pod was not created: {_tail(created)}", path=workload.container)
        started = probe.start_task(workload.container, detach=True)
        if not started.ok:
            pod.delete()
            raise KataError(f"the running pod did not start: {_tail(started)}", path=workload.container)
        pod.task_pid = pod.status()[1]
        shims = [p for p in pod.processes() if p.argv and Path(p.argv[0]).name.startswith("containerd-shim")]
        if shims:
            pod.shim_pid = shims[0].pid
            pod.shim_exe = probe.host.run(f"readlink /proc/{pod.shim_pid}/exe", timeout=30).stdout.strip()
        pod.steps["started"] = (f"task pid {pod.task_pid}, shim pid {pod.shim_pid} executing {pod.shim_exe} "
                                f"({planted.shim_label})")
        return pod

    def status(self) -> tuple[str, int]:
        """(task status, task pid) as containerd reports them ("" and 0 when there is no task)."""
        listed = self.probe.ctr("tasks", "ls", timeout=60)
        for line in listed.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] == self.workload.container:
                return fields[2], int(fields[1]) if fields[1].isdigit() else 0
        return "", 0

    def processes(self) -> list[Any]:
        """The host processes of this pod (its shim, qemu, proxy), found by its id in their argv."""
        return read_processes(self.probe.host, [], self.workload.container, {})

    def problems_after_switch(self) -> list[str]:
        """Why the pod did not survive the switch to the candidate (empty: it ran on, answered an exec on the
        baseline's shim, and was deleted without leftovers)."""
        problems: list[str] = []
        status, pid = self.status()
        self.steps["status after the switch"] = f"{status or 'no task'} (pid {pid})"
        if status != "RUNNING" or pid != self.task_pid:
            problems.append(f"the pod no longer runs after the switch: task {status or 'gone'} (pid {pid}, "
                            f"before {self.task_pid})")
        if self.shim_pid:
            exe = self.probe.host.run(f"readlink /proc/{self.shim_pid}/exe", timeout=30).stdout.strip()
            self.steps["shim after the switch"] = exe or "gone"
            if exe != self.shim_exe:
                problems.append(f"the pod's shim (pid {self.shim_pid}) is not the baseline's any more: {exe or 'gone'}"
                                f", before {self.shim_exe}")
        else:
            problems.append("no shim process of the pod was found on the host when it started")
        seen = self.probe.ctr("tasks", "exec", "--exec-id", f"probe{int(time.time()) % 100000}",
                              self.workload.container, "sh", "-c", "cat /tmp/running; uname -r", timeout=180)
        self.steps["exec after the switch"] = seen.stdout.strip().replace("\n", " | ") or _tail(seen)
        if not seen.ok or "running" not in seen.stdout:
            problems.append(f"exec into the running pod failed after the switch: {_tail(seen)}")
        problems += self.delete()
        return problems

    def delete(self) -> list[str]:
        """Kill and delete the pod; the problems if containerd refuses or its processes stay behind."""
        probe, cid = self.probe, self.workload.container
        problems = []
        probe.ctr("tasks", "kill", "-s", "SIGKILL", cid, timeout=60)
        deleted = None
        for _ in range(60):
            deleted = probe.ctr("tasks", "delete", cid, timeout=120)
            if deleted.ok or not self.status()[0]:
                break
            time.sleep(0.5)
        if self.status()[0]:
            problems.append(f"the pod's task cannot be deleted: {_tail(deleted)}")
        removed = probe.ctr("containers", "delete", cid, timeout=60)
        if not removed.ok:
            problems.append(f"the pod's container record cannot be deleted: {_tail(removed)}")
        left: list[Any] = []
        for _ in range(40):
            left = self.processes()
            if not left:
                break
            time.sleep(0.5)
        if left:
            problems.append("processes of the deleted pod remain on the host: "
                            + ", ".join(f"{p.pid} {shlex.join(p.argv[:1])}" for p in left))
        self.steps["deleted"] = "; ".join(problems) or "task and record deleted, no process left"
        return problems


def _tail(result: Any) -> str:
    if result is None:
        return "not run"
    text = (result.stderr or result.stdout or "").strip()
    return " | ".join(text.splitlines()[-2:])[-300:] or f"exit {result.rc}"
