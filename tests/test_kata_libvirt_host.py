"""Real Kata pods on a libvirt staging host (``--kata-host-provider libvirt``): the isolation suite and the
rollback sequence, with Kata 1.11.0 and 1.11.5 built from upstream source (cached).

The host VM runs under TCG here with ``<cpu mode='maximum'/>``, so KVM works inside it and the pods are KVM
guests of the host. The candidate is installed there by the recorded installer; the host boots with systemd's
hybrid cgroup hierarchy (Kata 1.x knows only cgroup v1) and memory for two sandbox VMs. Kata's argv keeps
``accel=kvm`` and ``-cpu host``: the only change is the spelling of its bare boolean ``-machine`` flags, which
the bundle's qemu 7.2 refuses bare, and every result says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.bundle import open_bundle
from pytest_kata.hosts.libvirt import HostSpec
from pytest_kata.install.workloads import MARKER
from pytest_kata.kata_build.build import build_bundle
from pytest_kata.kata_build.sources import discover
from pytest_kata.kataconfig import KataConfig
from pytest_kata.sandbox.containerd import LEGACY_CGROUPS, staging_host_changes
from tests.test_isolation_controls import run_suites, statuses
from tests.test_rollback_kata import SEQUENCE
from tests.test_sandbox_kata import KATA_SRC, VERSIONS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.timeout(2000),  # a host boot, an install and a dozen nested pods: beyond CI's 900 s default
    # the worker of the other libvirt host tests, never beside test_sweep's frozen-libvirtd test, whose
    # 30-s freeze would outlast libvirt's keepalive on these hosts' console streams
    pytest.mark.xdist_group("kata-hosts"),
    pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("go") or not shutil.which("libvirtd"),
                       reason="needs root, Go (real Kata is built) and libvirt (the staging host is a VM)"),
]
SPELLED = "hypervisor argv spelled for qemu 7+"


@pytest.fixture(scope="module")
def releases() -> dict[str, Any]:
    return {v: open_bundle(build_bundle(discover(KATA_SRC, v)).tarball) for v in VERSIONS}


def test_a_staging_host_for_kata_1_gets_cgroup_v1_and_room_for_two_sandboxes(tmp_path: Path) -> None:
    cmdline = "root=/dev/vda rw console=ttyS0"
    spec = HostSpec(image=tmp_path / "host.img", kernel=tmp_path / "vmlinuz", initrd=None, cmdline=cmdline)
    config = KataConfig(tmp_path / "configuration-qemu.toml", {"hypervisor": {"qemu": {"default_memory": 2048}}})
    assert staging_host_changes(spec, "1.11.5", config) == {
        "memory_mib": 5120, "cmdline": f"{cmdline} {LEGACY_CGROUPS}"}
    roomy = spec.with_changes(memory_mib=8192, cmdline=f"{cmdline} {LEGACY_CGROUPS}")
    assert staging_host_changes(roomy, "1.11.0", config) == {"memory_mib": 8192}
    assert staging_host_changes(spec, "3.2.0", config) == {"memory_mib": 5120}  # 2.x+ knows cgroup v2


def test_isolation_suite_with_real_kata_pods_on_a_libvirt_host_with_nested_kvm(pytester: pytest.Pytester,
                                                                                releases: Any) -> None:
    bundle = releases["1.11.5"]
    result, verdict = run_suites(pytester, f"--kata-candidate={bundle.sources[0]}", "--kata-runtime", "kata",
                                 "--kata-host-provider", "libvirt", "-k", "not cpu_quota and not memory_limit",
                                 timeout=1800)
    seen = statuses(verdict)
    tail = result.outlines[-40:]
    boundary = {"KATA-ISO-001", "KATA-ISO-002", "KATA-ISO-003", "KATA-ISO-005", "KATA-ISO-006", "KATA-ISO-011",
                "KATA-ISO-012"}
    assert {k: v for k, v in seen.items() if k in boundary} == {k: {"pass"} for k in boundary}, tail
    assert "error" not in set().union(*seen.values()), tail
    for r in verdict["results"]:  # KVM inside the host: nothing of Kata's argv but the spelling of two flags
        note = r["evidence"].get("hypervisor_rewrite", "")
        assert note.startswith(SPELLED) and "KVM works here" in note, r["evidence"]
    (kernel,) = [r for r in verdict["results"] if r["id"] == "KATA-ISO-001"]
    assert "6.1.192" in str(kernel["evidence"]), kernel["evidence"]


def test_rollback_with_real_kata_pods_on_a_libvirt_host(pytester: pytest.Pytester, releases: Any) -> None:
    """Install 1.11.0 on a libvirt host, plant real Kata pods (KVM inside the host) and leave one running,
    upgrade to 1.11.5 (the running pod keeps running on its shim and is deleted after the switch), roll back:
    the pods that ran on 1.11.0 start again and the state digest is equal."""
    baseline, candidate = releases["1.11.0"], releases["1.11.5"]
    result, verdict = run_suites(pytester, f"--kata-baseline={baseline.sources[0]}",
                                 f"--kata-candidate={candidate.sources[0]}", "--kata-host-provider", "libvirt",
                                 "-k", SEQUENCE, suites=("rollback",), timeout=1800)
    by_id = {r["id"]: r for r in verdict.get("results", [])}
    tail = result.outlines[-40:]
    assert {k: r["status"] for k, r in by_id.items()} == {
        k: "pass" for k in ("KATA-RB-001", "KATA-RB-002", "KATA-RB-003", "KATA-RB-004", "KATA-RB-008",
                            "KATA-RB-009")}, tail
    assert "libvirt host" in str(by_id["KATA-RB-001"]["evidence"]) or "libvirt host" in str(by_id["KATA-RB-001"])
    workloads = by_id["KATA-RB-008"]["evidence"]
    planted = {w["handler"]: w for w in workloads["workloads"]["planted"]}
    results = {r["handler"]: r for r in workloads["workloads"]["results"]}
    assert planted["kata-qemu"]["ran_before"] and "/opt/kata-releases/1.11.0-" in planted["kata-qemu"]["shim_label"]
    assert results["kata-qemu"]["status"] == "pass" and f"{MARKER} again" in results["kata-qemu"]["detail"]
    pod = by_id["KATA-RB-009"]["evidence"]
    assert pod["steps"]["status after the switch"].startswith("RUNNING")
    assert "/opt/kata-releases/1.11.0-" in pod["steps"]["shim after the switch"]
    assert pod["steps"]["deleted"] == "task and record deleted, no process left"
    for r in (by_id["KATA-RB-008"], by_id["KATA-RB-009"]):
        assert r["evidence"].get("hypervisor_rewrite", "").startswith(SPELLED), r["evidence"]
    assert verdict["verdict"] == "accept"
