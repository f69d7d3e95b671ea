"""Workloads that ran before an upgrade start again after its rollback: real containers (runc through a private
containerd) planted on the baseline, the candidate installed, rolled back, and the same container records
started again. The negative controls are rollbacks that look fine by the state digest's account of the Kata
files but break workloads: one that wipes containerd's metadata, one that leaves a handler's configuration
different from before."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pytest_kata import runid
from pytest_kata.hosts.base import LocalHost
from pytest_kata.install import Installer, SysrootContainerd
from pytest_kata.install.workloads import MARKER, WorkloadProbe
from tests.test_install import make_bundle

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("containerd", "ctr", "runc", "containerd-shim-runc-v2"))
    or not Path("/bin/busybox").is_file(),
    reason="needs root, containerd, ctr, runc and busybox-static (real containers are run)")


@pytest.fixture
def target(tmp_path: Path) -> Any:
    sysroot = tmp_path / "root"
    sysroot.mkdir()
    service = SysrootContainerd.prepare(sysroot)
    service.start()
    installer = Installer(LocalHost(), str(sysroot), containerd=service)
    baseline = make_bundle(tmp_path / "baseline", "3.30.0")
    candidate = make_bundle(tmp_path / "candidate", "3.31.0", shims=("qemu", "clh"),
                            extra={"share/defaults/kata-containers/configuration-qemu.toml": "# candidate\n"})
    installer.install(baseline)
    probe = WorkloadProbe(installer)
    yield installer, probe, candidate
    probe.cleanup()
    service.stop()


def by_handler(report: Any) -> dict[str, Any]:
    return {r.handler: r for r in report.results}


def test_workloads_that_ran_before_the_upgrade_start_again_after_rollback(target: Any) -> None:
    installer, probe, candidate = target
    planted = {w.handler: w for w in probe.plant().planted}
    assert set(planted) == {"kata-qemu", "runc"}
    assert planted["runc"].ran_before and planted["runc"].before == f"{MARKER} first"
    # the test bundle's shim is a placeholder script: containerd cannot start it, and says why
    assert not planted["kata-qemu"].ran_before and "did not run before the upgrade" in planted["kata-qemu"].before
    assert planted["kata-qemu"].runtime == f"{installer.sysroot}/opt/kata/bin/containerd-shim-kata-v2"
    assert planted["kata-qemu"].config_sha256

    installer.install(candidate)
    assert installer.rollback().restored
    results = by_handler(probe.verify())
    assert results["runc"].status == "pass", results["runc"].detail
    assert f"{MARKER} again" in results["runc"].detail, "the same container (its own writable layer) ran again"
    assert results["kata-qemu"].status == "notrun"
    assert "still resolves to the same shim path and configuration bytes" in results["kata-qemu"].detail
    assert probe.report.failed == []


class ContainerdWipingInstaller(Installer):
    """A rollback that also resets containerd's metadata (a 'reinstall containerd' rollback): every file the
    install touched is restored, yet containerd forgets the containers it had."""

    def _undo_containerd_config(self, tx: Any, data: dict[str, Any]) -> None:
        super()._undo_containerd_config(tx, data)
        self.run(f"rm -f {self.sysroot}/var/lib/containerd/root/io.containerd.metadata.v1.bolt/meta.db")


def test_negative_control_rollback_that_loses_containerd_state_is_caught(target: Any) -> None:
    installer, probe, candidate = target
    probe.plant()
    wiping = ContainerdWipingInstaller(installer.host, installer.sysroot, containerd=installer.containerd)
    wiping.install(candidate)
    rollback = wiping.rollback()
    assert rollback.restored, "the state digest alone does not see this: the Kata files are all back"
    results = by_handler(probe.verify())
    assert results["runc"].status == "fail"
    assert "the container record is gone after the rollback" in results["runc"].detail
    assert [r.handler for r in probe.report.failed] == ["runc"]


def test_negative_control_handler_configuration_changed_by_the_rollback_is_caught(target: Any) -> None:
    installer, probe, candidate = target
    probe.plant()
    installer.install(candidate)
    installer.rollback()
    config = Path(installer.sysroot) / "opt/kata/share/defaults/kata-containers/configuration-qemu.toml"
    config.write_text(config.read_text() + "# left behind by the candidate\n")
    results = by_handler(probe.verify())
    assert results["kata-qemu"].status == "fail"
    assert "differs from before the upgrade (sha256" in results["kata-qemu"].detail
    assert results["runc"].status == "pass"
    config.unlink()
    assert "is missing after the rollback" in by_handler(probe.verify())["kata-qemu"].detail


@pytest.mark.parametrize("lose_state", [False, True], ids=["restored", "containerd-state-lost"])
def test_cli_install_plants_workloads_and_rollback_proves_they_start_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], lose_state: bool) -> None:
    """The CLI path a staging user takes: install (plants on the release it replaces), rollback (verifies)."""
    from pytest_kata.cli import main

    sysroot = tmp_path / "root"
    SysrootContainerd.prepare(sysroot)  # its config only: each CLI call starts and stops it (--containerd private)
    common = ["--sysroot", str(sysroot), "--containerd", "private"]
    baseline = make_bundle(tmp_path / "baseline", "3.30.0")
    candidate = make_bundle(tmp_path / "candidate", "3.31.0", shims=("qemu", "clh"))
    assert main(["install", *common, "--bundle", str(baseline.root)]) == 0
    assert "workloads: no previous Kata release" in capsys.readouterr().out
    assert main(["install", *common, "--bundle", str(candidate.root)]) == 0
    assert "workloads: planted 2 workloads (ran on the previous release: runc)" in capsys.readouterr().out
    if lose_state:  # containerd forgets its containers while the candidate runs (a reinstall, a wiped disk)
        (sysroot / "var/lib/containerd/root/io.containerd.metadata.v1.bolt/meta.db").unlink()
    code = main(["rollback", *common])
    out = capsys.readouterr().out
    assert "state digest equals the one before the install" in out, "the Kata files are restored either way"
    if lose_state:
        assert code == 1 and "workload runc: FAIL the container record is gone after the rollback" in out
    else:
        assert code == 0 and "workload runc: PASS started again from the same record" in out
        assert "workload kata-qemu: NOTRUN did not run before the upgrade" in out
    with SysrootContainerd(sysroot) as service:  # the rollback removed what the install planted
        service.start()
        left = subprocess.run(["ctr", "-a", service.socket(), "-n", "pytest-kata-workloads", "containers", "ls",
                               "-q"], capture_output=True, text=True, check=True).stdout.split()
    assert left == []


@pytest.mark.parametrize("shim", ["absent", "broken"])
def test_smoke_gate_runs_a_workload_per_handler_and_fails_on_a_broken_shim(tmp_path: Path, shim: str) -> None:
    """The rollout's default gate. A candidate without a shim (the reference candidate) passes on the runc
    control and says which handlers have no shim; a shim that is there but cannot start a workload fails it."""
    from pytest_kata.install.rollout import smoke_gate

    sysroot = tmp_path / "root"
    sysroot.mkdir()
    with SysrootContainerd.prepare(sysroot) as service:
        service.start()
        installer = Installer(LocalHost(), str(sysroot), containerd=service)
        report = installer.install(make_bundle(tmp_path / "c", "3.31.0", shim_binary=shim == "broken"))
        gate = smoke_gate("local", installer, report)
        left = subprocess.run(["ctr", "-a", service.socket(), "-n", runid.current_run_id(), "containers", "ls", "-q"],
                              capture_output=True, text=True).stdout
    if shim == "absent":
        assert gate.ok, gate.detail
        assert "smoke ran through runc; no shim on the host for kata-qemu" in gate.detail
    else:
        assert not gate.ok
        assert "smoke failed: kata-qemu does not run a workload: ctr: failed to start shim" in gate.detail
    assert left.strip() == "", "the smoke workloads are removed"


def test_cli_workloads_of_an_interrupted_install_are_cleared_by_the_next_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``install`` killed after planting (the record is still pending): the next install empties the CLI's
    namespace first, so nothing planted is left behind or collides."""
    from pytest_kata.cli import main
    from pytest_kata.install.workloads import plant_workloads, workloads_path

    sysroot = tmp_path / "root"
    SysrootContainerd.prepare(sysroot)
    common = ["--sysroot", str(sysroot), "--containerd", "private"]
    assert main(["install", *common, "--bundle", str(make_bundle(tmp_path / "b", "3.30.0").root)]) == 0
    with SysrootContainerd(sysroot) as service:  # what an install killed right after planting leaves
        service.start()
        installer = Installer(LocalHost(), str(sysroot), containerd=service)
        probe, _ = plant_workloads(installer)
        assert probe is not None and Path(workloads_path(installer, None)).is_file()
        probe.ctr("containers", "create", probe.image, "pytest-kata-workloads-orphan", "--", "true")
    capsys.readouterr()
    assert main(["install", *common, "--bundle", str(make_bundle(tmp_path / "c", "3.31.0").root)]) == 0
    assert "planted 2 workloads (ran on the previous release: runc)" in capsys.readouterr().out
    with SysrootContainerd(sysroot) as service:
        service.start()
        left = subprocess.run(["ctr", "-a", service.socket(), "-n", "pytest-kata-workloads", "containers", "ls",
                               "-q"], capture_output=True, text=True, check=True).stdout.split()
    assert len(left) == 2 and "pytest-kata-workloads-orphan" not in left
    assert not Path(workloads_path(installer, None)).exists(), "the pending record became the install's"
