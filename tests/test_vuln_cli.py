"""``pytest-kata scan`` end to end as a user runs it: exit codes, SBOM/JSON files, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vuln-fixtures"
ROOTFS = FIXTURE / "debian12-rootfs"
TRACKER = FIXTURE / "feeds/debian-tracker-bookworm-subset.json"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/data/vuln-fixtures is absent")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_KATA_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "pytest_kata.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, check=False)


@needs_fixture
def test_scan_gates_on_severity_and_writes_outputs(tmp_path: Path) -> None:
    sbom, out = tmp_path / "sbom.cdx.json", tmp_path / "findings.json"
    proc = cli("scan", str(ROOTFS), "--feed", str(TRACKER), "--feed", str(FIXTURE / "feeds/linux-cve"),
               "--kernel-version", "6.6.10", "--kernel-config",
               str(FIXTURE / "kernel/kata-4.1.0-fragment-common-network.conf"),
               "--sbom", str(sbom), "--json", str(out), "--fail-on", "high")
    assert proc.returncode == 1, proc.stderr  # the kernel CVE is ranked high (NF_TABLES built)
    assert "CVE-2024-26581" in proc.stdout and "CONFIG_NF_TABLES" in proc.stdout
    assert "CVE-2026-28387" in proc.stdout and "libssl3" in proc.stdout
    assert json.loads(sbom.read_text())["bomFormat"] == "CycloneDX"
    data = json.loads(out.read_text())
    assert {(f["id"], f["package"]) for f in data["findings"]} == {
        ("CVE-2024-45490", "libexpat1"), ("CVE-2024-45491", "libexpat1"), ("CVE-2024-45492", "libexpat1"),
        ("CVE-2026-28387", "libssl3"), ("CVE-2026-28387", "openssl")}
    ok = cli("scan", str(ROOTFS), "--feed", str(TRACKER), "--fail-on", "critical")
    assert ok.returncode == 0, ok.stderr


@needs_fixture
def test_scan_json_to_stdout() -> None:
    proc = cli("scan", str(ROOTFS / "var/lib/dpkg/status"), "--feed", str(FIXTURE / "feeds/debsecan"),
               "--suite", "bookworm", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["summary"]["cves"] == 4


@pytest.mark.parametrize("case", ["corrupt-image", "rpm-db", "malformed-feed", "no-release"])
def test_bad_input_is_one_line(tmp_path: Path, case: str) -> None:
    feed = tmp_path / "feed.json"
    feed.write_text(json.dumps({"x": {"CVE-1": {"releases": {}}}}))
    target = tmp_path / "target"
    if case == "corrupt-image":
        target = tmp_path / "guest.img"
        target.write_bytes(b"\0" * 1080 + b"\x53\xef" + b"\0" * 4000)  # ext magic, garbage superblock
        expect = "not a readable ext4 filesystem"
    elif case == "rpm-db":
        (target / "var/lib/rpm").mkdir(parents=True)
        (target / "var/lib/rpm/rpmdb.sqlite").write_bytes(b"SQLite format 3\0")
        expect = "rpm database"
    elif case == "malformed-feed":
        target.mkdir()
        feed.write_text("{broken")
        expect = "invalid JSON"
    else:
        (target / "var/lib/dpkg").mkdir(parents=True)
        (target / "var/lib/dpkg/status").write_text("Package: a\nStatus: install ok installed\nVersion: 1\n")
        expect = "cannot tell the guest's distribution release"
    proc = cli("scan", str(target), "--feed", str(feed))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pytest-kata: error:") and expect in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@needs_fixture
def test_scan_of_a_kata_tree(tmp_path: Path) -> None:
    """A Kata tree as target: its image is scanned, its versions.yaml kernel version and shipped config used."""
    from pytest_kata.images.common import make_ext4_disk

    share = tmp_path / "opt/kata/share/kata-containers"
    (tmp_path / "opt/kata/share/defaults/kata-containers").mkdir(parents=True)
    share.mkdir(parents=True)
    make_ext4_disk(ROOTFS, share / "kata-containers.img")
    (share / "config-6.6.10-kata").write_text((FIXTURE / "kernel/kata-4.1.0-fragment-common-network.conf").read_text())
    (tmp_path / "opt/kata/versions.yaml").write_text("assets:\n  kernel:\n    version: v6.6.10\n")
    proc = cli("scan", str(tmp_path), "--feed", str(TRACKER), "--feed", str(FIXTURE / "feeds/linux-cve"),
               "--json")
    data = json.loads(proc.stdout)
    assert proc.returncode == 0 and data["target"].endswith("kata-containers.img")
    assert [(k["id"], k["kernel"], k["config_reachability"]) for k in data["kernel"]] == \
        [("CVE-2024-26581", "6.6.10", "built")]
    assert len(data["findings"]) == 5
