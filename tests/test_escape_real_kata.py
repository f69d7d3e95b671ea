"""Real Kata 1.11.0 and 1.11.5, built from ``../shared/kata-src``, through the escape suite's exploits.

Each release runs real pods (containerd + the release's own ``containerd-shim-kata-v2``, TCG here) and the
dynamic checks judge by what the host shows:

- CVE-2020-27151: pod annotations ``shared_fs=virtio-fs`` + ``virtio_fs_daemon=<host program>``. The 1.11.0
  shim runs the program as root (its marker appears on the host): fail, naming the CVE and the marker;
  1.11.5 refuses the pod ("virtiofs daemon ... required from annotation is not valid"): pass.
- CVE-2020-28914: a host directory mounted read-only; a privileged container remounts it read-write and
  writes. On 1.11.0 the host file's sha256 changes and a planted file appears: fail; 1.11.5 shares the
  volume read-only on the host side: pass.

The negative control of each on 1.11.5 is a mutated configuration that re-opens the hole: the annotation
enabled with the marker program allowed (the 1.11.5 shim then runs it too).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_isolation_controls import REPO, run_suites

from pytest_kata.kata_build.build import build_bundle
from pytest_kata.kata_build.sources import discover
from pytest_kata.sandbox.variants import variant_tree

KATA_SRC = REPO.parent / "shared" / "kata-src"
EXPLOITS = "dynamic-virtio_fs_daemon or dynamic-kernel or (28914 and dynamic)"  # 3 pods per release

pytestmark = pytest.mark.slow


def kata_tree(version: str) -> Path:
    """The /opt/kata tree of ``version`` built from ../shared/kata-src (cached by content hash)."""
    if not KATA_SRC.is_dir():
        pytest.skip(f"{KATA_SRC} is missing")
    return build_bundle(discover(KATA_SRC, version)).root / "opt" / "kata"


def exploits_on(pytester, tree: Path, selection: str = EXPLOITS) -> tuple[str, dict, dict[str, dict]]:
    """Run the selected escape checks on real pods of ``tree``: (pytest output, verdict, results by id)."""
    result, verdict = run_suites(pytester, "--kata-candidate", str(tree), "--kata-runtime", "kata", "-k", selection,
                                 suites=("escape_regression",))
    return result.stdout.str(), verdict, {r["id"]: r for r in verdict.get("results", [])}


@pytest.fixture(scope="module")
def kata_1_11_0() -> Path:
    return kata_tree("1.11.0")


@pytest.fixture(scope="module")
def kata_1_11_5() -> Path:
    return kata_tree("1.11.5")


def test_1_11_0_is_rejected_by_the_effects_of_its_escapes(pytester, kata_1_11_0):
    output, verdict, got = exploits_on(pytester, kata_1_11_0)
    exec_route = got["KATA-ESC-005[dynamic-virtio_fs_daemon]"]
    assert exec_route["status"] == "fail", output[-3000:]
    assert exec_route["evidence"]["advisory"] == "CVE-2020-27151" and exec_route["evidence"]["mode"] == "dynamic"
    assert "appeared: uid=0" in exec_route["evidence"]["effect"]
    assert exec_route["evidence"].get("hypervisor_rewrite") or Path("/dev/kvm").exists()
    asset = got["KATA-ESC-015[dynamic-kernel]"]  # the pod's decoy kernel reached Kata's qemu command line
    assert asset["status"] == "fail" and "argv names the decoy" in asset["evidence"]["effect"]
    volume = got["KATA-ESC-006[dynamic]"]
    assert volume["status"] == "fail", volume
    assert volume["evidence"]["advisory"] == "CVE-2020-28914" and "keep" in volume["evidence"]["host_files_changed"]
    assert verdict["verdict"] == "reject"
    assert "CVE-2020-27151: the runtime executed the host program named by the virtio_fs_daemon annotation" in output


def test_1_11_5_refuses_the_same_exploits(pytester, kata_1_11_5):
    output, verdict, got = exploits_on(pytester, kata_1_11_5)
    exec_route = got["KATA-ESC-005[dynamic-virtio_fs_daemon]"]
    assert exec_route["status"] == "pass", output[-3000:]
    # upstream 1.11.5 enables every annotation name by default and refuses by the valid_*_paths allowlist
    assert "required from annotation is not valid" in exec_route["evidence"]["refused"]
    assert "no host marker appeared" in exec_route["evidence"]["effect"]
    # upstream 1.11.5 still honours the asset annotations (enable_annotations = [".*"], no kernel allowlist)
    assert got["KATA-ESC-015[dynamic-kernel]"]["status"] == "fail"
    volume = got["KATA-ESC-006[dynamic]"]
    assert volume["status"] == "pass", volume
    assert volume["evidence"]["host_files_after"] == volume["evidence"]["host_files_before"]
    assert not {r["status"] for r in verdict["results"] if "ESC-015" not in r["id"]} & {"fail", "error"}


def test_1_11_5_with_the_annotation_reopened_is_caught(pytester, kata_1_11_5, tmp_path):
    """Negative control on the fixed release: enable the annotations and allow any daemon path, and the
    1.11.5 shim runs the pod's host program; the same check must now fail by its marker."""
    opened = variant_tree(kata_1_11_5, tmp_path / "opened", {
        "hypervisor.qemu.enable_annotations": [".*"],
        "hypervisor.qemu.valid_virtio_fs_daemon_paths": ["/var/cache/pytest-kata/runs/*/*/*/*"]})
    output, _, got = exploits_on(pytester, opened, "27151 and dynamic-virtio_fs_daemon")
    exec_route = got["KATA-ESC-005[dynamic-virtio_fs_daemon]"]
    assert exec_route["status"] == "fail", output[-3000:]
    assert "appeared: uid=0" in exec_route["evidence"]["effect"]
