"""Install, upgrade and rollback on real libvirt hosts (TCG here), with the host's own systemd containerd.

The rollback is checked two ways in one test: the state digest against the one captured before the upgrade,
and a libvirt snapshot taken before the upgrade — after the rollback the state is captured, the host is
reverted to the snapshot, captured again, and the two must not differ. A runc workload planted on the
baseline starts again, from the same container record, after the rollback. Then two hosts: a health gate
failing on host 2 rolls back hosts 2 and 1.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

from pytest_kata.install import Installer, SystemdContainerd, diff_states
from pytest_kata.install.rollout import handlers_gate, rolling_update
from pytest_kata.install.workloads import WorkloadProbe
from tests.test_install import make_bundle

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.xdist_group("kata-hosts"),  # share the worker (and its booted hosts) with tests/test_hosts_libvirt.py
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirt's system URI and image builds need root"),
    pytest.mark.skipif(not shutil.which("libvirtd") or not shutil.which("mmdebstrap"),
                       reason="libvirtd/mmdebstrap not installed (scripts/setup installs them)"),
]
# what the snapshot comparison covers: everything an install may touch, plus the rest of /etc and /usr/local
WIDE = ("/opt", "/etc", "/usr/local")


def host_installer(host: Any) -> Installer:
    containerd = SystemdContainerd(host)
    reason = containerd.unavailable()
    if reason:
        pytest.skip(f"host image has no containerd under systemd: {reason}")
    return Installer(host, "/", containerd=containerd)


@pytest.fixture(scope="module")
def small_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    tmp = tmp_path_factory.mktemp("vm-bundles")
    baseline = make_bundle(tmp / "b", "3.30.0", extra={"share/kata-containers/vmlinuz-6.1-a": "A"})
    candidate = make_bundle(tmp / "c", "3.31.0", shims=("qemu", "clh"),
                            extra={"share/kata-containers/vmlinuz-6.2-b": "B"})
    return baseline, candidate


def test_upgrade_rollback_on_a_libvirt_host_digest_and_snapshot_agree(kata_host: Any,
                                                                      small_bundles: tuple[Any, Any]) -> None:
    baseline, candidate = small_bundles
    installer = host_installer(kata_host)
    installer.install(baseline)
    assert "kata-qemu" in installer.containerd.handlers(), "the host's containerd reports the handler"
    workloads = WorkloadProbe(installer)
    planted = {w.handler: w for w in workloads.plant().planted}
    assert planted["runc"].ran_before, planted["runc"].before
    before = installer.capture()
    kata_host.snapshot("kt-before-upgrade")
    upgrade = installer.install(candidate)
    assert set(upgrade.handlers) >= {"kata-qemu", "kata-clh"}
    assert kata_host.run("readlink /opt/kata").stdout.strip() == f"kata-releases/{upgrade.release}"
    report = installer.rollback()
    assert report.restored, report.difference()  # way 1: the digest
    results = {r.handler: r for r in workloads.verify().results}  # and what ran before runs again
    assert results["runc"].status == "pass" and "KATA-WORKLOAD again" in results["runc"].detail, results
    assert results["kata-qemu"].status == "notrun"
    rolled_back = capture_wide(kata_host)
    kata_host.revert("kt-before-upgrade")
    snapshot = capture_wide(kata_host)
    assert diff_states(snapshot, rolled_back).lines() == []  # way 2: the snapshot
    assert installer.capture().digest == before.digest


def capture_wide(host: Any) -> Any:
    from pytest_kata.install.state import capture_state

    state = capture_state(host, "/", trees=WIDE)
    # files that change on a live host whatever we do
    for path in [p for p in state.entries if p.startswith(("/etc/ld.so.cache", "/etc/machine-id"))]:
        state.entries.pop(path)
    return state


@pytest.mark.kata_hosts(2)
def test_gate_failing_on_host_2_rolls_back_hosts_1_and_2(kata_hosts: Any, small_bundles: tuple[Any, Any]) -> None:
    baseline, candidate = small_bundles
    installers = [host_installer(h) for h in kata_hosts(2)]
    for installer in installers:
        installer.install(baseline)
    before = [i.capture().digest for i in installers]
    second = installers[1].host.name

    def gate(name: str, installer: Any, report: Any) -> Any:
        if name == second:
            return False, "smoke failed on host 2 (injected)"
        return handlers_gate(name, installer, report)

    report = rolling_update(installers, candidate, gate=gate)
    assert report["gates"][installers[0].host.name]["ok"]
    assert report["rolled_back"] == [second, installers[0].host.name]
    assert all(r["restored"] for r in report["rollbacks"].values())
    assert [i.capture().digest for i in installers] == before
