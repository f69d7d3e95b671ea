"""The shipped vulnerability suite (suites/hardening/test_guest_vulns.py) run as a user runs it, on bundles
whose guest image is the real fixture rootfs in an ext4 disk: stale packages and an affected, built kernel
CVE fail; the same image with the fixes passes; a malformed feed is an error, in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kata.images.common import make_ext4_disk
from pytest_kata.resources import suites_dir

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vuln-fixtures"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/data/vuln-fixtures is absent")
FEEDS = [FIXTURE / "feeds/debian-tracker-bookworm-subset.json", FIXTURE / "feeds/linux-cve"]


def make_bundle(root: Path, rootfs: Path, kernel_version: str) -> Path:
    share = root / "opt/kata/share/kata-containers"
    share.mkdir(parents=True)
    make_ext4_disk(rootfs, share / "kata-fixture.img")
    os.symlink("kata-fixture.img", share / "kata-containers.img")
    config = share / "config-fixture"
    config.write_text("".join(p.read_text() for p in sorted((FIXTURE / "kernel").glob("*.conf"))))
    (root / "opt/kata/VERSION").write_text("4.1.0\n")
    (root / "opt/kata/versions.yaml").write_text(f"assets:\n  kernel:\n    version: v{kernel_version}\n")
    return root


def run_suite(bundle: Path, feeds: list[Path], cwd: Path) -> dict[str, dict]:
    report = cwd / f"verdict-{bundle.name}.json"
    args = [a for f in feeds for a in ("--kata-vulns", str(f))]
    proc = subprocess.run([sys.executable, "-m", "pytest", str(suites_dir() / "hardening" / "test_guest_vulns.py"),
                           "-p", "no:cacheprovider", "-q", "--kata-candidate", str(bundle), "--kata-report",
                           str(report), *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300,
                          env={**os.environ, "PYTEST_KATA_QUIET": "1"})
    assert report.is_file(), proc.stdout[-3000:] + proc.stderr[-2000:]
    return {r["id"]: r for r in json.loads(report.read_text())["results"]}


def test_stale_image_and_affected_kernel_fail(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "stale", FIXTURE / "debian12-rootfs", "6.6.10")
    results = run_suite(bundle, FEEDS, tmp_path)
    assert results["KATA-VULN-001"]["status"] == "fail"
    assert "CVE-2026-28387" in json.dumps(results["KATA-VULN-001"]["evidence"])
    assert results["KATA-VULN-002"]["status"] == "fail" and results["KATA-VULN-002"]["severity"] == "high"
    assert results["KATA-VULN-003"]["status"] == "pass"


def test_patched_image_and_fixed_kernel_pass(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    shutil.copytree(FIXTURE / "debian12-rootfs", rootfs)
    status = rootfs / "var/lib/dpkg/status"
    status.write_text(status.read_text().replace("3.0.18-1~deb12u2", "3.0.19-1~deb12u2")
                      .replace("Version: 2.5.0-1\n", "Version: 2.5.0-1+deb12u1\n"))
    results = run_suite(make_bundle(tmp_path / "fixed", rootfs, "6.6.17"), FEEDS, tmp_path)
    assert {k: r["status"] for k, r in results.items()} == dict.fromkeys(
        ("KATA-VULN-001", "KATA-VULN-002", "KATA-VULN-003"), "pass")


def test_malformed_feed_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    results = run_suite(make_bundle(tmp_path / "b", FIXTURE / "debian12-rootfs", "6.6.10"), [bad], tmp_path)
    assert results["KATA-VULN-001"]["status"] == "error"
    assert "invalid JSON" in json.dumps(results["KATA-VULN-001"]["evidence"])
