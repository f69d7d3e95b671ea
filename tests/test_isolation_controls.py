"""Positive and negative controls of the isolation and escape-regression suites, run with pytester.

- runc (a real containerd + runc) must make the isolation suite FAIL, for the right reason;
- the direct driver on the reference candidate must make it PASS;
- a variant whose configuration asks for a writable guest root must be caught by the static image checks,
  and the direct driver must say that it cannot observe runtime flaws (skipped, never pass);
- a configuration that opens the virtio_fs_extra_args / kernel_params annotations, and a version the feed
  lists as affected, must be flagged by the escape-regression suite's static checks.
VM boots are few: one per direct run, every probe reuses it (session fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.hosts.base import LocalHost
from pytest_kata.sandbox import Workload, checks
from pytest_kata.sandbox.containerd import ContainerdDriver
from pytest_kata.sandbox.probe import host_facts, parse_output, script_text
from pytest_kata.sandbox.variants import stand_in_tree, variant_tree

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"
HARDENED = REPO / "fixtures" / "configs" / "hardened" / "configuration-qemu.toml"
SUITE_ARGS = ("-p", "no:cacheprovider", "-p", "no:randomly", f"--rootdir={REPO}")


def run_suites(pytester: pytest.Pytester, *args: str, suites: tuple[str, ...] = ("isolation",),
               timeout: float = 900) -> tuple[pytest.RunResult, dict]:
    report = pytester.path / "verdict.json"
    result = pytester.runpytest_subprocess(*(str(SUITES / s) for s in suites), *SUITE_ARGS,
                                           f"--kata-report={report}", *args, timeout=timeout)
    verdict = json.loads(report.read_text()) if report.exists() else {}
    return result, verdict


def base_id(result: dict) -> str:
    """The check id without its variant suffix (``KATA-ISO-006[privileged]`` -> ``KATA-ISO-006``)."""
    return result["id"].split("[", 1)[0]


def statuses(verdict: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in verdict.get("results", []):
        out.setdefault(base_id(r), set()).add(r["status"])
    return out


def by_nodeid(verdict: dict, fragment: str) -> list[dict]:
    return [r for r in verdict.get("results", []) if fragment in r["nodeid"]]


@pytest.fixture(scope="module")
def reference() -> Path:
    """The reference candidate, the positive control's subject."""
    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from reference import ensure_reference  # type: ignore[import-not-found]
    except ImportError as exc:
        pytest.skip(f"fixtures/reference.py not importable: {exc}")
    finally:
        sys.path.pop(0)
    return Path(ensure_reference("candidate", "hardened")) / "opt" / "kata"


def needs_runc() -> None:
    if os.geteuid() != 0 or not (shutil.which("containerd") and shutil.which("runc")):
        pytest.skip("the runc control needs root, containerd and runc")


def test_runc_control_fails_the_isolation_suite_for_the_right_reasons(pytester):
    """Negative control: with runc the workload runs on the host kernel, and the suite must say so."""
    needs_runc()
    result, verdict = run_suites(pytester, "--kata-runtime", "runc")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*_ test_kernel_is_the_guest_kernel _*",
                                 "runc is no VM: the workload runs on the host kernel (*); workload boot id equals*"])
    seen = statuses(verdict)
    assert verdict["verdict"] == "reject"
    assert seen["KATA-ISO-001"] == {"fail"}  # kernel identity
    assert seen["KATA-ISO-009"] == {"fail"}  # the host's memory
    assert seen["KATA-ISO-011"] == {"fail"}  # privileged writes would land on the host
    assert "fail" in seen["KATA-ISO-006"]  # host devices (sysfs, privileged /dev)
    assert seen["KATA-ISO-012"] == {"fail"}  # the block device it can name is the host's own disk
    # what runc does isolate is reported as passing: the suite does not fail blindly (CPU and memory limits are
    # cgroups' job, which runc does; a machine too busy to give the load a quarter of the quota cannot show it)
    assert seen["KATA-ISO-002"] == {"pass"} and seen["KATA-ISO-005"] == {"pass"}
    assert seen["KATA-ISO-013"] <= {"pass", "skipped"}
    assert seen["KATA-ISO-014"] == {"pass"}  # runc's memory cgroup OOM-kills the process below its limit


def runc_probes(*workloads: Workload) -> list[Any]:
    driver = ContainerdDriver("runc")
    try:
        driver.start()
        return [driver.probe(w) for w in workloads]
    finally:
        driver.stop()


def test_device_cgroup_check_on_a_real_runc_container():
    """The device-cgroup check by effect on runc (a real device cgroup, on the host's kernel): the cgroup
    refuses opening the host's disk (EPERM), and the check still fails, because that disk is the host's."""
    needs_runc()
    (plain,) = runc_probes(Workload())
    if not plain["mknod_root"].get("device"):
        pytest.skip("this host shows no whole disk to its containers")
    assert "Operation not permitted" in plain["mknod_root"]["open_read"], plain["mknod_root"]
    refused = checks.device_cgroup_root(plain, host_facts()["block_devices"], is_vm=False, handler="runc")
    assert refused.status == "fail" and "is the host's own disk, (the open: " in refused.message, refused.message


def test_device_cgroup_check_sees_a_privileged_runc_container_open_the_disk():
    """Privileged (every device allowed), the workload opens the disk and the check says so, where this
    machine lets its own root open it (a machine that is itself inside a device cgroup does not)."""
    needs_runc()
    host = parse_output(LocalHost().run("cd / && sh -s", stdin=script_text().encode(), timeout=180).stdout)
    if host["mknod_root"].get("open_read") != "ok":
        pytest.skip(f"this machine's own root cannot open its disk: {host['mknod_root'].get('open_read')}")
    (privileged,) = runc_probes(Workload(privileged=True))
    assert privileged["mknod_root"]["open_read"] == "ok", privileged["mknod_root"]
    opened = checks.device_cgroup_root(privileged, host_facts()["block_devices"], is_vm=False, handler="runc")
    assert opened.status == "fail" and "is the host's own disk, and opened it" in opened.message


@pytest.mark.slow
def test_direct_driver_on_the_reference_candidate_passes(pytester, reference):
    """Positive control: the reference candidate's guest kernel + image, booted as its config says, passes."""
    result, verdict = run_suites(pytester, "--kata-candidate", str(reference), "--kata-driver", "direct")
    seen = statuses(verdict)
    failed = {k: v for k, v in seen.items() if v & {"fail", "error"}}
    assert not failed, result.stdout.str()[-3000:]
    assert result.ret == 0
    assert seen["KATA-ISO-001"] == {"pass"} and seen["KATA-ISO-011"] == {"pass"}
    kernel = by_nodeid(verdict, "test_kernel_is_the_guest_kernel")[0]["evidence"]
    assert kernel["workload_kernel"] == kernel["candidate_kernel"] != kernel["host_kernel"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A small fixed candidate (4.1.0, hardened config, busybox image) for the escape-suite controls."""
    if not HARDENED.is_file():
        pytest.skip(f"{HARDENED} is missing")
    return stand_in_tree(tmp_path_factory.mktemp("good"), HARDENED, version="4.1.0", image=True)


IMAGE_TESTS = "2020_2023 or 2020_2025 or wwj6"


def test_writable_guest_image_is_caught_statically(pytester, stand_in, tmp_path):
    """A variant whose configuration asks for a writable guest root ('rw' in kernel_params) fails the static
    image checks; the same candidate without it passes them (no VM: the dynamic root-device checks need the
    candidate's own runtime, see tests/test_escape_exploits.py)."""
    params = "cgroup_no_v1=all systemd.unified_cgroup_hierarchy=1"
    writable = variant_tree(stand_in, tmp_path / "rw", {"hypervisor.qemu.kernel_params": params + " rw"})
    for candidate, expected in ((stand_in, "pass"), (writable, "fail")):
        result, verdict = run_suites(pytester, "--kata-candidate", str(candidate), "-k", f"({IMAGE_TESTS}) and static",
                                     suites=("escape_regression",))
        got = {base_id(r): r["status"] for r in verdict["results"]}
        assert got["KATA-ESC-003"] == got["KATA-ESC-007"] == expected, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*kernel_params ask for a read-write guest root*"])


@pytest.mark.slow
def test_direct_driver_says_it_cannot_observe_runtime_flaws(pytester, reference):
    """The direct driver is a guest-boot smoke test: every dynamic escape check that needs the candidate's
    runtime is skipped with that reason, none passes, and each result carries advisory, mode and effect."""
    _, verdict = run_suites(pytester, "--kata-candidate", str(reference), "--kata-driver", "direct",
                            "-k", "dynamic and not 2gv2", suites=("escape_regression",))
    dynamic = [r for r in verdict["results"] if "[dynamic" in r["nodeid"]]
    assert len(dynamic) >= 12
    for r in dynamic:
        assert r["status"] == "skipped", r
        assert r["evidence"]["mode"] == "dynamic" and r["evidence"]["advisory"]
        assert r["evidence"]["effect"].startswith("not tried")
    assert any("guest-boot smoke test" in r["evidence"]["effect"] for r in dynamic)


def test_open_annotations_are_flagged(pytester, stand_in, tmp_path):
    """A configuration that lets pods set virtio_fs_extra_args and kernel_params fails GHSA-rr59's checks;
    the same candidate without them passes (static mode: no VM needed)."""
    opened = variant_tree(stand_in, tmp_path / "open", {"hypervisor.qemu.enable_annotations": [
        "enable_iommu", "virtio_fs_extra_args", "kernel_params"]})
    for candidate, expected in ((stand_in, "pass"), (opened, "fail")):
        result, verdict = run_suites(pytester, "--kata-candidate", str(candidate), "-k", "rr59 and static",
                                     suites=("escape_regression",))
        got = {base_id(r): r["status"] for r in verdict["results"]}
        assert got == {"KATA-ESC-009": expected, "KATA-ESC-010": expected}, result.stdout.str()[-2000:]
    result.stdout.fnmatch_lines(["*let a pod set virtio_fs_extra_args*"])


def test_version_gates_decide_from_the_advisory_feed(pytester, stand_in, tmp_path):
    """Static modes read the feed's ranges, like the advisory gate: 1.10.5 carries the backported
    CVE-2020-2023 fix and passes, 1.11.0 fails, 1.11.5 passes; 3.28.0 is affected by GHSA-q49m and 4.1.0 is
    not; an advisory the feed lacks (GHSA-mp2j) is skipped with that reason rather than judged by a number
    written in a test."""
    def labelled(version: str) -> Path:
        tree = variant_tree(stand_in, tmp_path / version, {})
        (tree / "VERSION").unlink()
        (tree / "VERSION").write_text(version + "\n")
        return tree

    expected = {"1.10.5": "pass", "1.11.0": "fail", "1.11.5": "pass"}
    for version, status in expected.items():
        _, verdict = run_suites(pytester, "--kata-candidate", str(labelled(version)), "-k", "2020_2023 and static",
                                suites=("escape_regression",))
        [result] = verdict["results"]
        assert result["status"] == status, result
        assert result["evidence"]["mode"] == "static" and result["evidence"]["advisory"] == "CVE-2020-2023"
        assert result["evidence"]["decided_by"]
    for version, status in (("3.28.0", "fail"), ("4.1.0", "pass")):
        _, verdict = run_suites(pytester, "--kata-candidate", str(labelled(version)), "-k", "q49m or (mp2j and static)",
                                suites=("escape_regression",))
        got = {base_id(r): r for r in verdict["results"]}
        assert got["KATA-ESC-014"]["status"] == status
        mp2j = got["KATA-ESC-012"]
        if mp2j["status"] == "skipped":  # until the feed carries GHSA-mp2j
            assert mp2j["evidence"]["feed_record"] is None


@pytest.mark.slow
def test_runc_control_on_a_libvirt_staging_host(pytester):
    """The containerd driver on a real staging host (a libvirt host of the pool): the workload's kernel is the
    *staging host's*, and the suite says runc is no VM there too. One host boot, one probe."""
    needs_runc()
    if not shutil.which("virsh"):
        pytest.skip("libvirt is not installed")
    result, verdict = run_suites(pytester, "--kata-runtime", "runc", "--kata-host-provider", "libvirt",
                                 "-k", "kernel_is_the_guest_kernel")
    kernel = by_nodeid(verdict, "test_kernel_is_the_guest_kernel")
    if not kernel or kernel[0]["status"] == "error":
        pytest.skip(f"no staging host could be booted: {result.stdout.str()[-500:]}")
    evidence = kernel[0]["evidence"]
    assert kernel[0]["status"] == "fail"
    assert evidence["sandbox"]["host"] != "local" and evidence["sandbox"]["handler"] == "runc"
    assert evidence["workload_boot_id"] == evidence["host_boot_id"]  # the staging host's boot, not ours
    assert evidence["host_boot_id"] != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    result.stdout.fnmatch_lines(["runc is no VM: the workload runs on the host kernel (*)*"])
