"""Upgrade and rollback suite: baseline install -> workloads -> capture -> candidate install -> smoke ->
rollback -> verify (digest, residue, workloads start again).

With a real Kata release (a bundle that ships ``containerd-shim-kata-v2``) on a local sysroot, the workloads
planted on the baseline are real Kata pods (each handler's configuration made runnable here, see
``kata_pods``), and one pod is left running through the upgrade: it must run on, answer an exec and be
deleted after the switch (``KATA-RB-009``), while the pods that ran on the baseline start again after the
rollback from the same records, on the same shim binary (``KATA-RB-008``).

Run: ``pytest suites/rollback --kata-baseline OLD --kata-candidate NEW [--kata-hosts N]``. The scenario runs
once per module on a fresh target (a libvirt pool host, or a scratch sysroot with a private containerd; see
``pytest_kata.plugins.install``); each check below reads one property of it, so a failure names the property,
with the exact state difference as evidence. Failure injection (corrupt archive, killed containerd, full disk),
the no-previous-release case and the rolling update use targets of their own."""

from __future__ import annotations

import contextlib
import shlex
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_kata import runid, services
from pytest_kata.bundle import Bundle
from pytest_kata.install.installer import (
    Installer,
    InstallError,
    NoContainerd,
    SysrootContainerd,
    SystemdContainerd,
)
from pytest_kata.install.rollout import rolling_update, smoke_gate, target_name
from pytest_kata.install.state import RELEASES, State
from pytest_kata.install.workloads import WorkloadProbe
from pytest_kata.options import KataSettings
from pytest_kata.plugins.install import InstallTargets
from pytest_kata.plugins.recorder import CheckRecorder

from .kata_pods import RunnableKataConfigs, RunningPod, StagingKataConfigs

KataConfigs = RunnableKataConfigs | StagingKataConfigs

pytestmark = pytest.mark.vm  # installs on hosts (libvirt VMs or a sysroot) and runs containerd workloads


@dataclass
class Scenario:
    installer: Installer
    results: dict[str, Any] = field(default_factory=dict)
    workloads: WorkloadProbe | None = None
    kata: KataConfigs | None = None  # real Kata pods: their runnable configurations
    pod: RunningPod | None = None
    pod_note: str = ""  # why no pod was left running through the upgrade
    errors: dict[str, str] = field(default_factory=dict)
    blocking: list[str] = field(default_factory=list)

    def run(self, name: str, action: Callable[[], Any], *, blocks: bool = True) -> Any:
        """Run one step; after a failed blocking step the rest is not run (it would prove nothing)."""
        if self.blocking:
            self.errors.setdefault(name, f"not run: {self.blocking[0]} failed")
            return None
        try:
            self.results[name] = action()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"
            if blocks:
                self.blocking.append(name)
        return self.results.get(name)

    def need(self, kata_result: CheckRecorder, *names: str) -> list[Any]:
        for name in names:
            if name in self.errors:
                kata_result.conclude("error", f"step {name} failed: {self.errors[name]}")
        return [self.results[n] for n in names]


@contextlib.contextmanager
def real_kata_on(inst: Installer, baseline: Any, scratch: Any) -> Iterator[KataConfigs | None]:
    """With a baseline that ships a Kata shim, the installer's ``kata_args`` for the sequence: on a staging
    host (systemd's containerd, the release installed at /opt/kata) runnable copies written there; on a local
    sysroot runnable copies here and the ``/dev/log`` Kata's shim insists on. Else None."""
    if baseline.ships_shim() and isinstance(inst.containerd, SystemdContainerd):
        inst.kata_args = StagingKataConfigs(inst.host, scratch)
        yield inst.kata_args
        return
    if not (isinstance(inst.containerd, SysrootContainerd) and baseline.ships_shim()):
        yield None
        return
    kata = RunnableKataConfigs(inst.sysroot, scratch)
    run = runid.current_run_id()
    services.lend_syslog(run)
    # the installer carries them, so that the smoke gate's probe runs Kata the same way
    inst.kata_args = kata
    try:
        yield kata
    finally:
        services.return_syslog(run)


@pytest.fixture(scope="module")
def upgrade(kata_baseline: Bundle, kata_candidate: Bundle, make_kata_install_target: InstallTargets,
            tmp_path_factory: pytest.TempPathFactory) -> Generator[Scenario, None, None]:
    """The whole upgrade-and-rollback sequence, once."""
    scenario = Scenario(make_kata_install_target.one("upgrade", runs=kata_baseline))
    inst = scenario.installer
    with real_kata_on(inst, kata_baseline, tmp_path_factory.mktemp("kata-configs")) as kata:
        scenario.kata = kata
        workloads = WorkloadProbe(inst, kata_args=kata)
        scenario.run("baseline", lambda: inst.install(kata_baseline))
        if workloads.unavailable is None:  # workloads are extra evidence: their failure does not stop the upgrade
            scenario.run("workloads-planted", workloads.plant, blocks=False)
        ran = [w for w in workloads.report.planted if w.handler.startswith("kata") and w.ran_before]
        if ran:
            scenario.pod = scenario.run("pod-started", lambda: RunningPod.start(workloads, ran[0]), blocks=False)
        else:
            scenario.pod_note = "no Kata pod ran on the baseline: " + ("; ".join(
                f"{w.handler}: {w.before}" for w in workloads.report.planted if w.handler.startswith("kata"))
                or "no kata-* handler was planted")
        scenario.run("state-before", inst.capture)
        candidate = scenario.run("candidate", lambda: inst.install(kata_candidate))
        scenario.run("smoke", lambda: smoke_gate(inst.host.name, inst, candidate))
        if scenario.pod is not None:
            scenario.run("pod-after-switch", scenario.pod.problems_after_switch, blocks=False)
        scenario.run("rollback", inst.rollback)
        if "workloads-planted" in scenario.results:
            scenario.run("workloads-after", workloads.verify, blocks=False)
        scenario.run("second-rollback", inst.rollback)
        scenario.run("state-after", inst.capture)
        scenario.workloads = workloads
        try:
            if scenario.pod is not None and "pod-after-switch" not in scenario.results:
                scenario.pod.delete()
            workloads.cleanup()
        except Exception as exc:  # a pool host is reverted anyway; a staging host keeps a note
            scenario.errors["workloads-cleanup"] = f"{type(exc).__name__}: {exc}"
        yield scenario


def _identity(kata_result: CheckRecorder, check_id: str, severity: str, title: str, inst: Installer) -> None:
    kata_result.record(id=check_id, severity=severity, title=title, suite="rollback",
                       target=getattr(inst, "target_description", inst.host.name))


def test_baseline_installs_and_registers_handlers(upgrade: Scenario, kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-001", "high", "the baseline installs and containerd reports its handlers",
              upgrade.installer)
    (report,) = upgrade.need(kata_result, "baseline")
    kata_result.record(release=report.release, handlers=sorted(report.handlers), mode=report.containerd_mode,
                       notes=report.notes, timings=report.timings)
    if not report.handlers:
        kata_result.conclude("fail", "no kata-* handler registered with containerd")
    kata_result.conclude("pass", f"{report.release} installed; handlers {', '.join(sorted(report.handlers))}")


def test_candidate_upgrade_is_atomic_and_passes_the_smoke_gate(upgrade: Scenario,
                                                               kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-002", "high", "the candidate replaces the baseline atomically and the "
              "handlers answer with a smoke workload", upgrade.installer)
    report, gate, before = upgrade.need(kata_result, "candidate", "smoke", "state-before")
    kata_result.record(release=report.release, previous=before.release, gate=gate.detail, notes=report.notes)
    target = report.release
    if report.digest_before != before.digest:
        kata_result.conclude("fail", "the state captured by the install differs from the one just before it")
    if not gate.ok:
        kata_result.conclude("fail", f"health gate after the upgrade: {gate.detail}")
    kata_result.conclude("pass", f"/opt/kata switched from {before.release} to {target}; {gate.detail}")


def test_rollback_restores_the_previous_state_byte_for_byte(upgrade: Scenario, kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-003", "critical", "rollback restores the previous state byte for byte",
              upgrade.installer)
    rollback, before, after = upgrade.need(kata_result, "rollback", "state-before", "state-after")
    kata_result.record(digest_before=before.digest, digest_after_rollback=rollback.digest_after,
                       residue=rollback.residue, timings=rollback.timings)
    if rollback.difference():
        kata_result.attach("state difference after rollback", "\n".join(rollback.difference()), "text/x-diff")
    if not rollback.restored or after.digest != before.digest:
        kata_result.conclude("fail", "state after rollback differs from before the upgrade: "
                             + "; ".join(rollback.difference()[:5]))
    kata_result.conclude("pass", f"digest {before.digest[:16]} restored; no residue")


def test_second_rollback_is_a_noop(upgrade: Scenario, kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-004", "medium", "a second rollback changes nothing", upgrade.installer)
    second, before, after = upgrade.need(kata_result, "second-rollback", "state-before", "state-after")
    kata_result.record(message=second.message)
    if not second.noop or after.digest != before.digest:
        kata_result.conclude("fail", f"second rollback was not a no-op: {second.message}")
    kata_result.conclude("pass", second.message)


def test_workloads_that_ran_before_start_again_after_rollback(upgrade: Scenario,
                                                             kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-008", "high", "workloads that ran before the upgrade start again after the "
              "rollback", upgrade.installer)
    probe = upgrade.workloads
    if probe is None or probe.unavailable is not None:
        reason = probe.unavailable if probe is not None else "the scenario did not run"
        kata_result.conclude("notapplicable", f"no containerd to run workloads with: {reason}")
    report, _ = upgrade.need(kata_result, "workloads-planted", "workloads-after")
    kata_result.record(workloads=report.to_json(), **(upgrade.kata.evidence() if upgrade.kata else {}))
    if upgrade.workloads is not None and upgrade.workloads.stalled_starts:
        kata_result.record(stalled_task_starts=upgrade.workloads.stalled_starts)
    kata_result.attach("workloads before the upgrade and after the rollback",
                       "\n".join(f"{w.handler:12} {w.container}\n  before: {w.before}" for w in report.planted)
                       + "\n" + "\n".join(f"{r.handler:12} {r.status}: {r.detail}" for r in report.results),
                       "text/plain")
    if report.failed:
        kata_result.conclude("fail", "; ".join(f"{r.handler}: {r.detail}" for r in report.failed))
    if not report.passed:
        kata_result.conclude("notapplicable", "no workload could run before the upgrade: "
                             + "; ".join(f"{r.handler}: {r.detail}" for r in report.results))
    not_run = [r for r in report.results if r.status == "notrun"]
    kata_result.conclude("pass", f"{', '.join(r.handler for r in report.passed)} started again from the same "
                         "record after the rollback"
                         + (f"; not run before the upgrade: {'; '.join(f'{r.handler}: {r.detail}' for r in not_run)}"
                            if not_run else ""))


def test_a_pod_running_on_the_baseline_survives_the_upgrade(upgrade: Scenario, kata_result: CheckRecorder) -> None:
    _identity(kata_result, "KATA-RB-009", "high", "a pod running on the baseline keeps running through the upgrade, "
              "answers an exec and is deleted after the switch", upgrade.installer)
    if upgrade.pod is None and "pod-started" not in upgrade.errors:
        kata_result.conclude("notapplicable", upgrade.pod_note or "no pod was left running")
    upgrade.need(kata_result, "pod-started")
    pod = upgrade.pod
    assert pod is not None
    kata_result.record(handler=pod.workload.handler, container=pod.workload.container, steps=pod.steps,
                       shim_before=pod.workload.shim_label, **(upgrade.kata.evidence() if upgrade.kata else {}))
    (problems,) = upgrade.need(kata_result, "pod-after-switch")
    if problems:
        kata_result.conclude("fail", "; ".join(problems))
    started_on = pod.workload.shim_label or "the baseline"
    kata_result.conclude("pass", f"{pod.workload.handler}: the pod started on {started_on}"
                         f" ran on through the switch (task pid {pod.task_pid}, shim {pod.shim_exe}), answered an "
                         "exec and was deleted with nothing left")


def _corrupt_archive(step: str, installer: Installer) -> None:
    """Truncate the staged archive on the host and append garbage (works on any host, through ``run``)."""
    if step == "unpack":
        last = installer.journal.last("install")
        stage = last.step("stage") if last else None
        if stage is not None:
            staged = shlex.quote(stage.data["staged"])
            installer.host.run(f"size=$(stat -c %s {staged}) && truncate -s $((size / 2)) {staged} && "
                               f"head -c 4096 /dev/zero | tr '\\0' '\\377' >> {staged}", check=True)


def _kill_containerd(step: str, installer: Installer) -> None:
    if step == "verify-handlers":
        installer.containerd.kill()  # type: ignore[attr-defined]


@contextlib.contextmanager
def _small_releases_filesystem(installer: Installer, size: int) -> Iterator[str | None]:
    """A tmpfs of ``size`` bytes mounted on the releases directory for the test (a disk that fills up);
    yields why it cannot be done (not root, no tmpfs), or None. Unmounted after, whatever happened."""
    releases = installer.p(RELEASES)
    mounted = installer.host.run(f"mkdir -p {shlex.quote(releases)} && mount -t tmpfs -o size={size},mode=0755 "
                                 f"kt-full-disk {shlex.quote(releases)}", timeout=60)
    try:
        yield None if mounted.ok else f"cannot mount a tmpfs on {releases}: {mounted.stderr.strip()[-200:]}"
    finally:
        if mounted.ok:
            installer.host.run(f"umount {shlex.quote(releases)}", timeout=60)


@pytest.mark.parametrize("fault", ["corrupt-archive", "killed-containerd", "full-disk"])
def test_failed_install_rolls_back_by_itself(fault: str, kata_baseline: Bundle, kata_candidate: Bundle,
                                             make_kata_install_target: InstallTargets,
                                             kata_result: CheckRecorder) -> None:
    inst = make_kata_install_target.one(f"fault-{fault}")
    _identity(kata_result, f"KATA-RB-005-{fault}", "high", f"an install that fails mid-way ({fault}) leaves "
              "the host as it was", inst)
    if fault == "killed-containerd" and isinstance(inst.containerd, NoContainerd):
        kata_result.conclude("notapplicable", f"no containerd to kill: {inst.containerd.reason}")
    roomy = 2 * kata_baseline.total_size + (16 << 20)
    with _small_releases_filesystem(inst, roomy) if fault == "full-disk" else contextlib.nullcontext() as refused:
        if refused:
            kata_result.conclude("notapplicable", refused)
        inst.install(kata_baseline)
        if fault == "full-disk":  # the filesystem now holds the baseline and half the candidate, no more
            releases = shlex.quote(inst.p(RELEASES))
            inst.host.run(f"mount -o remount,size=$(( $(df --output=used -B1 {releases} | tail -1) + "
                          f"{kata_candidate.total_size // 2} )) {releases}", timeout=60, check=True)
        before: State = inst.capture()
        inst.inject = {"corrupt-archive": _corrupt_archive, "killed-containerd": _kill_containerd}.get(fault)
        try:
            inst.install(kata_candidate)
        except InstallError as exc:
            message = str(exc)
        else:
            kata_result.conclude("error", f"the injected fault ({fault}) did not make the install fail")
        inst.inject = None
        after = inst.capture()
    if fault == "full-disk" and "No space left on device" not in message:
        kata_result.conclude("error", f"the install failed, but not for lack of space: {message[:200]}")
    kata_result.record(error=message, digest_before=before.digest, digest_after=after.digest)
    if after.digest != before.digest:
        from pytest_kata.install.state import diff_states

        kata_result.conclude("fail", "state differs after the automatic rollback: "
                             + "; ".join(diff_states(before, after).lines()[:5]))
    kata_result.conclude("pass", f"install failed ({message[:120]}...) and the state is unchanged")


def test_rollback_without_a_previous_release_says_so(kata_baseline: Bundle, kata_candidate: Bundle,
                                                     make_kata_install_target: InstallTargets,
                                                     kata_result: CheckRecorder) -> None:
    inst = make_kata_install_target.one("first-install")
    _identity(kata_result, "KATA-RB-006", "medium", "rollback without a previous release says so", inst)
    inst.install(kata_candidate)
    try:
        inst.rollback()
    except InstallError as exc:
        message = str(exc)
    else:
        kata_result.conclude("fail", "rollback of a first install silently removed Kata instead of saying so")
    kata_result.record(message=message)
    if "no previous release" not in message:
        kata_result.conclude("fail", f"unexpected error: {message}")
    kata_result.conclude("pass", message)


def test_rolling_update_is_gated_and_a_failing_gate_rolls_every_updated_host_back(
        kata_baseline: Bundle, kata_candidate: Bundle, kata_settings: KataSettings,
        make_kata_install_target: InstallTargets, kata_result: CheckRecorder) -> None:
    """Across ``--kata-hosts`` hosts (at least 2 local sysroots): all gates pass -> updated; then the same
    rollout with the gate failing on the last host -> every updated host is rolled back, digests equal."""
    count = int(kata_settings.hosts or 1)
    if make_kata_install_target.provider == "local":
        count = max(count, 2)  # sysroots are cheap
    targets = make_kata_install_target.many(count, "fleet") if count >= 2 else []
    _identity(kata_result, "KATA-RB-007", "high", "a rolling update is gated, and a failing gate rolls every "
              "updated host back", targets[0] if targets else make_kata_install_target.one("fleet"))
    if count < 2:
        kata_result.conclude("notapplicable", "a rolling update needs 2 or more hosts: pass --kata-hosts 2")
    for target in targets:
        target.install(kata_baseline)
    baseline_digests = [t.capture().digest for t in targets]
    good = rolling_update(targets, kata_candidate, gate=smoke_gate)
    for target in targets:  # back to the baseline for the second rollout
        target.rollback()
    last = target_name(targets[-1])

    def failing_last(name: str, target: Any, report: Any) -> Any:
        return (False, "injected: smoke failed") if name == last else smoke_gate(name, target, report)

    bad = rolling_update(targets, kata_candidate, gate=failing_last)
    digests = [t.capture().digest for t in targets]
    kata_result.record(good=good, bad=bad, hosts=count)
    if good["result"] != "updated":
        kata_result.conclude("fail", f"the rollout with passing gates did not complete: {good['failed']}")
    if bad["result"] != "rolled-back" or bad["rolled_back"] != [target_name(t) for t in reversed(targets)]:
        kata_result.conclude("fail", f"a failing gate on {last} did not roll back every updated host: "
                             f"{bad['result']}, rolled back {bad['rolled_back']}")
    if digests != baseline_digests:
        changed = [target_name(t) for t, a, b in zip(targets, digests, baseline_digests, strict=True) if a != b]
        kata_result.conclude("fail", f"hosts not restored after the gated rollback: {', '.join(changed)}")
    kata_result.conclude("pass", f"{count} hosts: gated rollout completed; a failing gate on {last} rolled "
                         f"{', '.join(bad['rolled_back'])} back, every digest equal to the baseline's")
