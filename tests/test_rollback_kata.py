"""Rollback with real Kata on a local sysroot: Kata 1.11.0 and 1.11.5 built from upstream source (cached).

The rollback suite installs 1.11.0 below a scratch sysroot with a private containerd, plants real Kata pods
(and a runc control) and leaves one pod running, installs 1.11.5 (the running pod runs on, answers an exec
and is deleted after the switch), rolls back, and the pods that ran on 1.11.0 start again from the same
records on the same shim; the state digest is equal. The negative control is a rollback that puts every
link and configuration back but leaves 1.11.5's shim binary at the shim path: the workload check must fail
because the handler resolves to another shim than the pods ran on, and the digest must differ.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pytest_kata import runid, services
from pytest_kata.bundle import open_bundle
from pytest_kata.hashing import sha256_file
from pytest_kata.hosts.base import LocalHost
from pytest_kata.install import Installer, SysrootContainerd
from pytest_kata.install.installer import SHIM_GO
from pytest_kata.install.workloads import MARKER, WorkloadProbe
from pytest_kata.kata_build.build import build_bundle
from pytest_kata.kata_build.sources import discover
from suites.rollback.kata_pods import RunnableKataConfigs
from tests.test_isolation_controls import run_suites
from tests.test_sandbox_kata import KATA_SRC, VERSIONS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("containerd") and shutil.which("go")),
                       reason="needs root, containerd and Go (real Kata pods are run)"),
]
SEQUENCE = ("baseline_installs or candidate_upgrade or byte_for_byte or second_rollback or workloads_that_ran "
            "or survives")
TCG = Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists()


@pytest.fixture(scope="module")
def releases() -> dict[str, Any]:
    """Kata 1.11.0 and 1.11.5 built from ../shared/kata-src (``pytest-kata build``'s library, cached)."""
    return {v: open_bundle(build_bundle(discover(KATA_SRC, v)).tarball) for v in VERSIONS}


def test_rollback_suite_with_real_kata_pods_on_a_local_sysroot(pytester: pytest.Pytester, releases: Any) -> None:
    baseline, candidate = releases["1.11.0"], releases["1.11.5"]
    result, verdict = run_suites(pytester, f"--kata-baseline={baseline.sources[0]}",
                                 f"--kata-candidate={candidate.sources[0]}", "--kata-host-provider", "local",
                                 "-k", SEQUENCE, suites=("rollback",))
    by_id = {r["id"]: r for r in verdict["results"]}
    tail = result.outlines[-40:]
    assert {k: r["status"] for k, r in by_id.items()} == {
        k: "pass" for k in ("KATA-RB-001", "KATA-RB-002", "KATA-RB-003", "KATA-RB-004", "KATA-RB-008",
                            "KATA-RB-009")}, tail
    assert "smoke ran through kata-qemu, runc" in by_id["KATA-RB-002"]["evidence"]["gate"]
    workloads = by_id["KATA-RB-008"]["evidence"]
    planted = {w["handler"]: w for w in workloads["workloads"]["planted"]}
    results = {r["handler"]: r for r in workloads["workloads"]["results"]}
    assert planted["kata-qemu"]["ran_before"] and "/opt/kata-releases/1.11.0-" in planted["kata-qemu"]["shim_label"]
    assert results["kata-qemu"]["status"] == "pass" and f"{MARKER} again" in results["kata-qemu"]["detail"]
    assert results["runc"]["status"] == "pass"
    # handlers this machine cannot run are not run, and say why (never passed)
    assert results["kata-fc"]["status"] == "notrun" and "cannot run on this host" in results["kata-fc"]["detail"]
    pod = by_id["KATA-RB-009"]["evidence"]
    assert pod["steps"]["status after the switch"].startswith("RUNNING")
    assert "/opt/kata-releases/1.11.0-" in pod["steps"]["shim after the switch"]
    assert pod["steps"]["exec after the switch"].startswith("running")
    assert pod["steps"]["deleted"] == "task and record deleted, no process left"
    for r in (by_id["KATA-RB-008"], by_id["KATA-RB-009"]):
        assert r["evidence"].get("hypervisor_rewrite", "").startswith("hypervisor argv rewritten for TCG") == TCG
    assert verdict["verdict"] == "accept"


class LeavesCandidateShim(Installer):
    """A rollback that switches ``/opt/kata`` back and restores the containerd configuration, but first
    copies the candidate's shim binary over the baseline's (a botched restore of one file)."""

    def _undo_unpack(self, tx: Any, data: dict[str, Any]) -> None:
        if data.get("dest"):
            self.run(f"cp -f {data['dest']}/{SHIM_GO} {self.p('/opt/kata')}/{SHIM_GO}")
        super()._undo_unpack(tx, data)


def test_negative_control_a_rollback_that_leaves_the_candidates_shim_fails_the_workload_check(
        releases: Any, tmp_path: Path) -> None:
    sysroot = tmp_path / "root"
    sysroot.mkdir()
    service = SysrootContainerd.prepare(sysroot, private_mounts=True)
    service.start()
    run = runid.current_run_id()
    services.lend_syslog(run)
    installer = LeavesCandidateShim(LocalHost(), str(sysroot), containerd=service)
    probe = WorkloadProbe(installer, kata_args=RunnableKataConfigs(sysroot, tmp_path / "configs"))
    try:
        installer.install(releases["1.11.0"])
        planted = {w.handler: w for w in probe.plant().planted}
        assert planted["kata-qemu"].ran_before, planted["kata-qemu"].before
        installer.install(releases["1.11.5"])
        rollback = installer.rollback()
        results = {r.handler: r for r in probe.verify().results}
    finally:
        probe.cleanup()
        service.stop()
        services.return_syslog(run)
    assert not rollback.restored
    assert any(SHIM_GO in line for line in rollback.difference()), rollback.difference()
    assert results["kata-qemu"].status == "fail"
    candidate_shim = sha256_file(Path(releases["1.11.5"].root) / SHIM_GO)[:12]
    baseline_shim = sha256_file(Path(releases["1.11.0"].root) / SHIM_GO)[:12]
    detail = results["kata-qemu"].detail
    assert f"resolves to another shim binary than before the upgrade: sha256 {candidate_shim}" in detail, detail
    assert f"before sha256 {baseline_shim}" in detail
    assert results["runc"].status == "pass"  # the rest of the rollback is sound: the check names the one fault
