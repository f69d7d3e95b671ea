"""``suites/rollback`` driven with pytester: a real upgrade and rollback of two small bundles on a scratch
sysroot (with a private containerd when available), the verdict report, and the missing-baseline case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_install import make_bundle

REPO = Path(__file__).resolve().parents[1]


def test_rollback_suite_accepts_a_clean_upgrade_and_rollback(pytester: pytest.Pytester, tmp_path: Path) -> None:
    # no shim binary, like the reference candidate (a placeholder shim would fail the smoke gate, rightly)
    baseline = make_bundle(tmp_path / "b", "3.30.0", extra={"share/kata-containers/vmlinuz-6.1-a": "A"},
                           shim_binary=False)
    candidate = make_bundle(tmp_path / "c", "3.31.0", shims=("qemu", "clh"),
                            extra={"share/kata-containers/vmlinuz-6.2-b": "B"}, shim_binary=False)
    report = pytester.path / "verdict.json"
    result = pytester.runpytest_subprocess(str(REPO / "suites" / "rollback"), "--kata-baseline", str(baseline.root),
                                           "--kata-candidate", str(candidate.root), "--kata-report", str(report),
                                           "--kata-host-provider", "local", "-p", "no:randomly")
    assert result.ret == 0, result.stdout.str()
    verdict = json.loads(report.read_text())
    by_id = {r["id"]: r for r in verdict["results"]}
    assert set(by_id) == {"KATA-RB-001", "KATA-RB-002", "KATA-RB-003", "KATA-RB-004", "KATA-RB-005-corrupt-archive",
                          "KATA-RB-005-killed-containerd", "KATA-RB-005-full-disk", "KATA-RB-006", "KATA-RB-007",
                          "KATA-RB-008", "KATA-RB-009"}
    assert by_id["KATA-RB-003"]["status"] == "pass" and by_id["KATA-RB-003"]["severity"] == "critical"
    evidence = by_id["KATA-RB-003"]["evidence"]
    assert evidence["digest_before"] == evidence["digest_after_rollback"] and evidence["residue"] == []
    assert by_id["KATA-RB-001"]["evidence"]["handlers"] == ["kata-qemu"]
    assert "no previous release" in by_id["KATA-RB-006"]["evidence"]["message"]
    rollout = by_id["KATA-RB-007"]["evidence"]
    assert rollout["good"]["result"] == "updated" and rollout["bad"]["result"] == "rolled-back"
    assert rollout["bad"]["rolled_back"] == ["local-fleet-1", "local-fleet-0"]
    full = by_id["KATA-RB-005-full-disk"]
    assert full["status"] == "pass" and "No space left on device" in full["evidence"]["error"], full
    workloads = by_id["KATA-RB-008"]
    assert workloads["status"] == "pass", workloads
    results = {r["handler"]: r for r in workloads["evidence"]["workloads"]["results"]}
    assert results["runc"]["status"] == "pass" and "KATA-WORKLOAD again" in results["runc"]["detail"]
    assert results["kata-qemu"]["status"] == "notrun"
    # no shim, so no Kata pod ran on the baseline and none was left running through the upgrade
    assert by_id["KATA-RB-009"]["status"] == "notapplicable"
    assert verdict["verdict"] == "accept"


def test_rollback_suite_without_a_baseline_skips_saying_what_to_pass(pytester: pytest.Pytester,
                                                                     tmp_path: Path) -> None:
    candidate = make_bundle(tmp_path / "c", "3.31.0")
    result = pytester.runpytest_subprocess(str(REPO / "suites" / "rollback"), "--kata-candidate",
                                           str(candidate.root), "-rs", "-k", "baseline_installs",
                                           "--kata-host-provider", "local")
    result.stdout.fnmatch_lines(["*no baseline given: pass --kata-baseline PATH*"])


@pytest.mark.slow
def test_reference_upgrade_and_rollback_restore_the_digest(tmp_path: Path) -> None:
    """The project's reference baseline (3.30.0) and candidate (4.1.0): real kernel, image, qemu, configs."""
    import os
    import shutil
    import sys

    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from reference import ensure_reference  # type: ignore[import-not-found]
    except ImportError as exc:
        pytest.skip(f"reference candidate builder unavailable: {exc}")
    from pytest_kata.bundle import open_bundle
    from pytest_kata.hosts.base import LocalHost
    from pytest_kata.install import Installer, SysrootContainerd

    baseline = open_bundle(ensure_reference("baseline", "hardened"))
    candidate = open_bundle(ensure_reference("candidate", "hardened"))
    assert (baseline.version, candidate.version) == ("3.30.0", "4.1.0")
    service = None
    if shutil.which("containerd") and os.geteuid() == 0:
        service = SysrootContainerd.prepare(tmp_path)
        service.start()
    try:
        installer = Installer(LocalHost(), str(tmp_path), containerd=service)
        installer.install(baseline)
        before = installer.capture()
        upgrade = installer.install(candidate)
        assert upgrade.digest_before == before.digest and upgrade.digest_after != before.digest
        kernel = tmp_path / "opt/kata" / candidate.kernels[0]
        assert kernel.is_file() and kernel.stat().st_size > 1_000_000
        report = installer.rollback()
        assert report.restored and report.residue == [], report.difference()
        assert installer.capture().digest == before.digest
    finally:
        if service is not None:
            service.stop()
