"""Workloads that ran before an upgrade must start again after its rollback.

Why a check of its own: the state digest proves that the files an install touches are back; it does not
prove that containerd can still run what it ran. Container records, images and snapshots live in containerd's
root (outside the Kata prefix), and a rollback can restore every byte of the configuration while a container
record still points at a shim path or configuration that is gone or different.

So, after the baseline install, :meth:`WorkloadProbe.plant` creates one container per runtime handler that
containerd reports (``kata-*`` handlers pinned to the handler's ``runtime_path`` and ``ConfigPath``, exactly
as CRI would run them, plus ``runc`` as a control when the host has it) and starts each once. Each workload
writes a marker into its own writable layer, so that a later start can tell "the same container again" from
"a fresh one". After the rollback, :meth:`WorkloadProbe.verify` starts every container that ran before from
the same record and requires the marker, and checks that every ``kata-*`` handler still resolves to the same
shim binary (by sha256; named by its ``--version`` or resolved path) and the same configuration bytes as before
the upgrade. A workload that did not run before the upgrade (no executable shim on the host, or a handler this
host cannot run) is reported as not run, with the reason, never as passed.

Where a Kata shim needs help to run on the host (a sysroot whose configuration names ``/opt/kata`` paths, a
machine without KVM), the caller passes ``kata_args``: per handler, extra ``ctr containers create``
arguments (e.g. Kata 1.x's ``io.katacontainers.config_path`` annotation naming a runnable copy of the
handler's configuration), kept in the container record like everything else the workload runs with.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_kata import progress, runid
from pytest_kata.errors import KataError
from pytest_kata.hosts.base import TIMED_OUT, LocalHost
from pytest_kata.install.state import PREFIX
from pytest_kata.sandbox.containerd import NESTED_POD_DEADLINE, POD_RETRIES
from pytest_kata.sandbox.probe import IMAGE_REPO, build_oci_image

MARKER = "KATA-WORKLOAD"
# first start: leave a marker in the container's own writable layer; any later start: find it
WORKLOAD_SCRIPT = (f"if test -e /var/ran-before; then echo {MARKER} again $(cat /var/ran-before); "
                   f"else mkdir -p /var && echo $$ > /var/ran-before && echo {MARKER} first; fi")
CONTROL_RUNTIMES = {"runc": ("io.containerd.runc.v2", ("runc", "containerd-shim-runc-v2"))}
SYSTEM_SOCKET = "/run/containerd/containerd.sock"


@dataclass
class Workload:
    """One container record planted before the upgrade."""

    container: str
    handler: str
    runtime: str  # what the container record pins: a runtime type or the shim's absolute path
    config_path: str | None = None
    config_sha256: str | None = None
    ran_before: bool = False
    before: str = ""  # output of the first start, or why it did not run
    runnable: bool = True  # False: its shim is not on the host (a start cannot be expected to work)
    create_args: list[str] = field(default_factory=list)  # extra `ctr containers create` arguments (kata_args)
    shim_sha256: str | None = None  # the shim binary the handler resolved to when the workload was planted
    shim_label: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkloadResult:
    container: str
    handler: str
    status: str  # pass | fail | notrun
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WorkloadReport:
    planted: list[Workload] = field(default_factory=list)
    results: list[WorkloadResult] = field(default_factory=list)

    @property
    def failed(self) -> list[WorkloadResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def passed(self) -> list[WorkloadResult]:
        return [r for r in self.results if r.status == "pass"]

    def broken_at_plant(self) -> list[Workload]:
        """Workloads whose runtime is on the host yet did not run: a smoke failure."""
        return [w for w in self.planted if w.runnable and not w.ran_before and not w.before.startswith("not planted")]

    def to_json(self) -> dict[str, Any]:
        return {"planted": [w.to_json() for w in self.planted], "results": [r.to_json() for r in self.results]}


def containerd_address(containerd: Any) -> str | None:
    """The socket of an installer's containerd service: private (sysroot) or the host's own."""
    socket = getattr(containerd, "socket", None)
    if callable(socket):
        return str(socket())
    if getattr(containerd, "unavailable", lambda: "none")() is None:
        return SYSTEM_SOCKET
    return None


class WorkloadProbe:
    """Plant workloads through an :class:`~pytest_kata.install.installer.Installer`'s containerd, then verify."""

    def __init__(self, installer: Any, *, tag: str | None = None, namespace: str | None = None,
                 kata_args: KataArgs | None = None) -> None:
        self.installer = installer
        # an installer carries the kata_args of its host (so that a smoke gate's probe runs Kata there too)
        self.kata_args = kata_args or installer.kata_args
        self.host = installer.host
        self.stalled_starts = 0  # Kata task starts on a remote host stopped at NESTED_POD_DEADLINE and started again
        self.address = containerd_address(installer.containerd)
        where = f"{self.host.name}:{installer.sysroot}"
        # runc's state directory is per namespace and shared by every containerd: ids must be unique per target
        self.tag = tag or hashlib.sha256(f"{where}:{os.getpid()}".encode()).hexdigest()[:8]
        # in a test run: the run id (a sweep finds containerd cgroups by it); the CLI passes a stable name
        self.namespace = namespace or runid.current_run_id()
        if namespace is None and self.kata_args is not None:
            # Kata 1.x shims refuse a namespace whose dash-separated parts do not start with a letter (a run id's
            # hex part may not): a fixed name, and the run id in every container id (a sweep finds their
            # processes by it)
            self.namespace = KATA_TEST_NAMESPACE
            self.tag = f"{runid.current_run_id()}-{self.tag}"
        self.image = ""
        self.image_was_present = False
        self.remote_tar = ""
        self.report = WorkloadReport()

    @property
    def unavailable(self) -> str | None:
        reason = self.installer.containerd.unavailable()
        if reason:
            return reason
        if self.address is None:
            return "no containerd socket to drive"
        return None

    def start_task(self, container: str, *, detach: bool = False, timeout: float = 300.0) -> Any:
        """``ctr tasks start`` of a created container. On a remote host a Kata pod that has not finished
        starting after :data:`NESTED_POD_DEADLINE` s (nested KVM guests of a TCG host VM stall now and then) is
        killed and started again, at most :data:`POD_RETRIES` times, each counted in ``stalled_starts``."""
        remote = not isinstance(self.host, LocalHost)
        for attempt in range(POD_RETRIES + 1):
            last = attempt == POD_RETRIES or not remote
            result = self.ctr("tasks", "start", *(["-d"] if detach else []), container,
                              timeout=timeout if last else min(timeout, NESTED_POD_DEADLINE))
            if last or result.rc != TIMED_OUT:
                return result
            self.stalled_starts += 1
            progress.step("workloads", f"{container} did not start within {NESTED_POD_DEADLINE:g} s on "
                                       f"{self.host.name}: starting it again ({self.stalled_starts})")
            self.ctr("tasks", "kill", "-s", "SIGKILL", container, timeout=60)
            self.ctr("tasks", "delete", "-f", container, timeout=120)
        return result

    def ctr(self, *args: str, timeout: float = 180.0) -> Any:
        assert self.address is not None
        return self.host.run(["ctr", "-a", self.address, "-n", self.namespace, *args], timeout=timeout)

    # -------------------------------------------------------------------------------------------- plant

    def plant(self) -> WorkloadReport:
        """Create and start once one workload per handler containerd reports (and a runc control)."""
        reason = self.unavailable
        if reason:
            raise KataError(f"no workloads can be planted: {reason}", path=self.host.name)
        self._import_image()
        handlers = self.installer.containerd.handlers()
        for handler, spec in sorted(handlers.items()):
            if not handler.startswith("kata"):
                continue
            runtime = spec.get("runtime_path") or spec.get("runtime_type", "")
            config = spec.get("config_path")
            self._plant_one(handler, runtime, config)
        for handler, (runtime, tools) in CONTROL_RUNTIMES.items():
            missing = [t for t in tools if not self.host.run(f"command -v {t}", timeout=30).ok]
            if missing:
                self.report.planted.append(Workload(self._id(handler), handler, runtime,
                                                    before=f"not planted: {', '.join(missing)} not installed"))
                continue
            self._plant_one(handler, runtime, None)
        ran = [w.handler for w in self.report.planted if w.ran_before]
        progress.step("workloads", f"{self.host.name}: planted {len(self.report.planted)} workloads; ran before "
                                   f"the upgrade: {', '.join(ran) or 'none'}")
        return self.report

    def _id(self, handler: str) -> str:
        return f"{self.namespace}-wl-{self.tag}-{handler}"

    def _import_image(self) -> None:
        tar, self.image = build_oci_image()
        listed = self.ctr("images", "ls", "-q", timeout=60)
        self.image_was_present = listed.ok and self.image in listed.stdout.split()
        source = str(tar)
        if not isinstance(self.host, LocalHost):
            source = self.remote_tar = f"/var/tmp/{self.namespace}-workload-{self.tag}.tar"
            self.host.put(tar, source)
        result = self.ctr("images", "import", source)
        if self.remote_tar:
            self.host.run(f"rm -f {shlex.quote(self.remote_tar)}", timeout=60)
        if not result.ok:
            raise KataError(f"containerd could not import the workload image: {_tail(result)}",
                            path=f"{self.host.name}:{self.address}")

    def _config_digest(self, path: str | None) -> str | None:
        if not path:
            return None
        result = self.host.run(f"sha256sum {shlex.quote(path)}", timeout=60)
        return result.stdout.split()[0] if result.ok and result.stdout.split() else None

    def shim_identity(self, runtime: str) -> tuple[str | None, str]:
        """(sha256, label) of the shim binary an absolute runtime path resolves to; the label is what the shim
        says of itself (``--version``), or, for a shim without a version flag (Kata 1.x), its resolved path."""
        if not runtime.startswith("/"):
            return None, ""
        path = shlex.quote(runtime)
        digest = self.host.run(f"sha256sum \"$(readlink -f {path})\"", timeout=60)
        label = self.host.run(f"{path} --version 2>/dev/null | head -n 1 | grep . || readlink -f {path}", timeout=60)
        return (digest.stdout.split()[0] if digest.ok and digest.stdout.split() else None,
                label.stdout.strip() if label.ok else "")

    def create(self, workload: Workload, command: list[str]) -> Any:
        """``ctr containers create`` of ``workload``'s record (runtime, configuration, extra arguments)."""
        args = ["containers", "create", "--runtime", workload.runtime]
        if workload.config_path:
            args += ["--runtime-config-path", workload.config_path]
        return self.ctr(*args, *workload.create_args, self.image, workload.container, "--", *command)

    def _plant_one(self, handler: str, runtime: str, config: str | None) -> None:
        workload = Workload(self._id(handler), handler, runtime, config, self._config_digest(config))
        if runtime.startswith("/"):
            workload.runnable = self.host.run(f"test -x {shlex.quote(runtime)}", timeout=30).ok
        self.report.planted.append(workload)
        if not workload.runnable:  # containerd would only say the same, slowly (seconds per handler under TCG)
            workload.before = f"did not run before the upgrade: no executable shim at {runtime} on {self.host.name}"
            return
        if handler.startswith("kata"):
            workload.shim_sha256, workload.shim_label = self.shim_identity(runtime)
            if self.kata_args is not None:
                try:
                    workload.create_args = list(self.kata_args(handler, {"runtime": runtime,
                                                                         "config_path": config or ""}))
                except KataError as exc:
                    workload.runnable = False
                    workload.before = f"did not run before the upgrade: {exc}"
                    return
        created = self.create(workload, ["sh", "-c", WORKLOAD_SCRIPT])
        if not created.ok:
            workload.before = f"not created: {_tail(created)}"
            return
        started = self.start_task(workload.container)
        output = started.stdout.strip()
        workload.ran_before = started.ok and f"{MARKER} first" in output
        workload.before = output if workload.ran_before else f"did not run before the upgrade: {_tail(started)}"

    # ------------------------------------------------------------------------------------------- verify

    def verify(self) -> WorkloadReport:
        """Start every workload that ran before again, from the same record; re-resolve every handler."""
        reason = self.unavailable
        results: list[WorkloadResult] = []
        handlers = self.installer.containerd.handlers() if reason is None else {}
        for workload in self.report.planted:
            results.append(self._verify_one(workload, handlers, reason))
        self.report.results = results
        bad = [r.handler for r in results if r.status == "fail"]
        progress.step("workloads", f"{self.host.name}: {sum(r.status == 'pass' for r in results)} workloads start "
                                   f"again" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
        return self.report

    def _verify_one(self, workload: Workload, handlers: dict[str, dict[str, str]], reason: str | None
                    ) -> WorkloadResult:
        def result(status: str, detail: str) -> WorkloadResult:
            return WorkloadResult(workload.container, workload.handler, status, detail)

        if reason:
            return result("fail", f"containerd is unavailable after the rollback: {reason}")
        problems = []
        if workload.handler.startswith("kata"):
            problems += self._resolution_problems(workload, handlers.get(workload.handler))
        if not workload.ran_before:
            if problems:
                return result("fail", "; ".join(problems))
            return result("notrun", f"{workload.before} (handler still resolves to the same shim path and "
                                    "configuration bytes)" if workload.handler.startswith("kata")
                          else workload.before)
        info = self.ctr("containers", "info", workload.container, timeout=60)
        if not info.ok:
            problems.append(f"the container record is gone after the rollback: {_tail(info)}")
            return result("fail", "; ".join(problems))
        started = self.start_task(workload.container)
        output = started.stdout.strip()
        if not started.ok:
            problems.append(f"does not start again: {_tail(started)}")
        elif f"{MARKER} again" not in output:
            problems.append(f"started, but not as the same container (its writable layer lost the marker): "
                            f"{output[-200:]!r}")
        if problems:
            return result("fail", "; ".join(problems))
        return result("pass", f"started again from the same record through {workload.runtime}: {output[-120:]}")

    def _resolution_problems(self, workload: Workload, spec: dict[str, str] | None) -> list[str]:
        if spec is None:
            return [f"containerd no longer reports handler {workload.handler}"]
        problems = []
        runtime = spec.get("runtime_path") or spec.get("runtime_type", "")
        if runtime != workload.runtime:
            problems.append(f"handler {workload.handler} now runs {runtime}, before the upgrade {workload.runtime}")
        if spec.get("config_path") != workload.config_path:
            problems.append(f"handler {workload.handler} ConfigPath is now {spec.get('config_path')}, before "
                            f"the upgrade {workload.config_path}")
        if workload.config_path:
            digest = self._config_digest(workload.config_path)
            if digest is None:
                problems.append(f"ConfigPath {workload.config_path} is missing after the rollback")
            elif workload.config_sha256 and digest != workload.config_sha256:
                problems.append(f"ConfigPath {workload.config_path} differs from before the upgrade "
                                f"(sha256 {workload.config_sha256[:12]} -> {digest[:12]})")
        if workload.shim_sha256 and runtime == workload.runtime:
            shim, label = self.shim_identity(runtime)
            if shim != workload.shim_sha256:
                problems.append(f"handler {workload.handler} resolves to another shim binary than before the "
                                f"upgrade: sha256 {(shim or 'missing')[:12]} ({label or runtime}), before sha256 "
                                f"{workload.shim_sha256[:12]} ({workload.shim_label or runtime})")
        return problems

    # ---------------------------------------------------------------------------------------- persistence

    def to_json(self) -> dict[str, Any]:
        return {"namespace": self.namespace, "tag": self.tag, "image": self.image,
                "image_was_present": self.image_was_present, "remote_tar": self.remote_tar,
                "planted": [w.to_json() for w in self.report.planted]}

    def save(self, path: str) -> None:
        """Keep the planted workloads on the host (next to the install journal) for a later rollback."""
        result = self.host.run(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)}",
                               stdin=json.dumps(self.to_json(), indent=1).encode(), timeout=60)
        if not result.ok:
            raise KataError(f"cannot record the planted workloads: {_tail(result)}", path=f"{self.host.name}:{path}")

    @classmethod
    def load(cls, installer: Any, path: str) -> WorkloadProbe | None:
        """The workloads saved at ``path`` on the installer's host, or None when there are none."""
        result = installer.host.run(f"cat {shlex.quote(path)}", timeout=60)
        if not result.ok:
            return None
        try:
            data = json.loads(result.stdout)
            probe = cls(installer, tag=data["tag"], namespace=data["namespace"])
            probe.image, probe.remote_tar = data["image"], data["remote_tar"]
            probe.image_was_present = bool(data["image_was_present"])
            probe.report.planted = [Workload(**w) for w in data["planted"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise KataError(f"unreadable workload record ({exc}); delete it to roll back without the workload "
                            "check", path=f"{installer.host.name}:{path}") from None
        return probe

    # ------------------------------------------------------------------------------------------ cleanup

    def clear_namespace(self) -> None:
        """Remove every container and probe image in this probe's namespace (only for a namespace of ours
        alone, like the CLI's: what an interrupted run planted there was never recorded)."""
        if self.unavailable:
            return
        listed = self.ctr("containers", "ls", "-q", timeout=60)
        for container in listed.stdout.split() if listed.ok else []:
            self._remove(container)
        images = self.ctr("images", "ls", "-q", timeout=60)
        for image in images.stdout.split() if images.ok else []:
            if image.startswith(IMAGE_REPO + ":"):
                self.ctr("images", "rm", image, timeout=60)

    def _remove(self, container: str) -> None:
        self.ctr("tasks", "delete", "-f", container, timeout=60)
        self.ctr("containers", "delete", container, timeout=60)

    def discard(self, record: str) -> None:
        """Remove the planted workloads and their record on the host (they have served their purpose)."""
        self.cleanup()
        self.host.run(f"rm -f {shlex.quote(record)}", timeout=60)

    def cleanup(self) -> None:
        """Remove the planted containers and the image (a pool host is reverted anyway; a staging host is not)."""
        if self.address is None or self.installer.containerd.unavailable():
            return
        for workload in self.report.planted:
            self._remove(workload.container)
        if self.image and not self.image_was_present:
            self.ctr("images", "rm", self.image, timeout=60)


def _tail(result: Any) -> str:
    text = (result.stderr or result.stdout or "").strip()
    return " | ".join(text.splitlines()[-2:])[-300:] or f"exit {result.rc}"


# per kata-* handler: extra `ctr containers create` arguments, or a KataError saying why it cannot run here
KataArgs = Callable[[str, dict[str, str]], list[str]]
CLI_NAMESPACE = "pytest-kata-workloads"  # workloads planted by ``pytest-kata install`` live until its rollback
KATA_TEST_NAMESPACE = "kata-rb"  # a test run's real Kata workloads (short: the shim socket path holds it twice)
WORKLOADS_FILE = "workloads.json"



def workloads_path(installer: Any, tx: str | None) -> str:
    """Where the workloads planted for install ``tx`` are recorded (``None``: planted, install not committed)."""
    if tx is None:
        return f"{installer.journal.dir}/workloads-pending.json"
    return f"{installer.journal.tx_dir(tx)}/{WORKLOADS_FILE}"


def plant_workloads(installer: Any) -> tuple[WorkloadProbe | None, str]:
    """Workloads on the release being replaced (None and the reason when there is nothing to plant on).

    Any workloads of earlier installs go first: a committed install's are superseded, and an interrupted
    install's were never recorded against a transaction (the namespace is ours alone, so it is emptied)."""
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


__all__ = ["CLI_NAMESPACE", "KATA_TEST_NAMESPACE", "MARKER", "WORKLOADS_FILE", "KataArgs", "Workload",
           "WorkloadProbe", "WorkloadReport", "WorkloadResult", "containerd_address", "plant_workloads",
           "workloads_path"]
