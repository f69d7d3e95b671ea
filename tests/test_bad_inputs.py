"""Every bad input a release engineer can give gets one line naming it and the problem, and the right exit
status: 2 for the CLI, pytest's usage error (4) for a validation run; never a traceback or a verdict."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_kata.cli import main

REPO = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/pytest-kata-nowhere/out.json"  # a parent no one can create, even root


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pytest-kata: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


def _suites(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The suites as a user runs them (a subprocess: usage errors end the session)."""
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTEST_KATA_NO_SWEEP": "1"})


def _usage_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    out = proc.stdout + proc.stderr
    errors = [line for line in out.splitlines() if line.startswith("ERROR: ")]
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, out[-3000:]
    assert len(errors) == 1 and "Traceback" not in out and "VERDICT" not in out, out[-3000:]
    assert all(n in errors[0] for n in needles), errors[0]


# ------------------------------------------------------------------------------------ validation runs


@pytest.mark.parametrize("where", ["dir", "unwritable"])
def test_kata_report_that_cannot_be_written(pytester: pytest.Pytester, where: str) -> None:
    pytester.makepyfile(test_c="def test_c(kata_result):\n    kata_result.conclude('pass', 'ok')\n")
    target = str(pytester.mkdir("out")) if where == "dir" else UNWRITABLE
    result = pytester.runpytest("--kata-report", target)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {target}: --kata-report*"])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_no_candidate_for_the_suites_is_a_usage_error(tmp_path: Path) -> None:
    _usage_error(_suites(str(REPO / "suites/hardening"), str(REPO / "suites/advisories"), cwd=tmp_path),
                 "--kata-candidate")
    _usage_error(_suites(str(REPO / "suites/advisories"), "-n", "2", cwd=tmp_path), "--kata-candidate")


def test_own_tests_need_no_candidate(pytester: pytest.Pytester) -> None:
    """Outside the suites, a test that asks for the candidate still skips with the reason."""
    pytester.makepyfile(test_c="def test_c(kata_candidate):\n    pass\n")
    result = pytester.runpytest("-rs")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*no candidate given*"])


@pytest.mark.parametrize("xdist", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_corrupt_baseline_is_a_usage_error(tmp_path: Path, xdist: tuple[str, ...],
                                           reference_bundle: Callable[[str], Path]) -> None:
    corrupt = tmp_path / "kata-static-3.30.0-amd64.tar.zst"
    corrupt.write_bytes(reference_bundle("baseline").read_bytes()[:4096])
    proc = _suites(str(REPO / "suites/hardening"), "-k", "surface", *xdist, "--kata-candidate",
                   str(reference_bundle("candidate")), "--kata-baseline", str(corrupt), cwd=tmp_path)
    _usage_error(proc, "--kata-baseline", str(corrupt))


def test_expired_waiver_on_a_medium_rule_rejects(tmp_path: Path, reference_bundle: Callable[[str], Path]) -> None:
    """KATA-KCONF-002 (medium) fails on the reference candidate's Debian kernel; its waiver expired: below
    --kata-fail-on high, yet the candidate is rejected, with the reason."""
    waivers = tmp_path / "waivers.toml"
    waivers.write_text('[[waiver]]\nrule = "KATA-KCONF-002"\njustification = "Debian signs its own modules"\n'
                       "expires = 2020-01-01\n")
    proc = _suites(str(REPO / "suites/hardening"), "-k", "KCONF-002", "--kata-candidate",
                   str(reference_bundle("candidate")), "--kata-waivers", str(waivers), "--kata-report", "v.json",
                   cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:]
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["verdict"] == "reject"
    assert len(verdict["reasons"]) == 1, verdict["reasons"]
    assert re.fullmatch(r"KATA-KCONF-002\[config-[^]]+\] \[medium\] error: Modules are signed with all of them "
                        r"and a strong hash \(its waiver expired: rejects at any severity\)", verdict["reasons"][0])
    assert "expired on 2020-01-01" in proc.stdout


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("flag", ["--sbom", "--json"])
@pytest.mark.parametrize("where", ["dir", "unwritable"])
def test_scan_outputs_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str,
                                            where: str) -> None:
    target = str(tmp_path) if where == "dir" else UNWRITABLE
    assert main(["scan", str(REPO / "fixtures"), "--feed", str(tmp_path), flag, target]) == 2
    _one_error_line(capsys, target, flag)


@pytest.mark.parametrize("flag", ["--state", "--sbom"])
def test_rebuild_and_scan_outputs_that_cannot_be_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        flag: str) -> None:
    assert main(["images", "rebuild-and-scan", "minimal", "--feed", str(tmp_path), flag, str(tmp_path)]) == 2
    _one_error_line(capsys, str(tmp_path), flag, "directory")


def test_scan_of_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "tracker.json"
    feed.write_text(json.dumps({"openssl": {"CVE-2099-0001": {"releases": {}}}}))  # Debian tracker shape
    (tmp_path / "rootfs").mkdir()
    assert main(["scan", str(tmp_path / "rootfs"), "--feed", str(feed)]) == 2
    _one_error_line(capsys, str(tmp_path / "rootfs"), "empty directory")


def test_scan_of_a_bundle_tarball_scans_its_guest_image(shared_dir: Path, capsys: pytest.CaptureFixture[str],
                                                       reference_bundle: Callable[[str], Path]) -> None:
    feed = shared_dir / "data/vuln-fixtures/feeds/debian-tracker-bookworm-subset.json"
    assert main(["scan", str(reference_bundle("candidate")), "--feed", str(feed), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["target"].endswith("share/kata-containers/kata-debian-12-ref.image")
    assert result["package_db"] == "dpkg" and result["summary"]["packages"] > 0


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_state_sysroot_must_be_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str) -> None:
    sysroot = tmp_path / "sysroot"
    if kind == "file":
        sysroot.write_text("not a tree")
    assert main(["state", "--sysroot", str(sysroot)]) == 2
    _one_error_line(capsys, str(sysroot), "no such sysroot directory")
    assert main(["rollback", "--sysroot", str(sysroot)]) == 2  # the same refusal as rollback
    _one_error_line(capsys, str(sysroot), "no such sysroot directory")


@pytest.mark.parametrize("version, reason", [("4.1", "not a full release number"),
                                             ("latest", "not a Kata release number")])
def test_advisories_version_must_be_a_full_release(capsys: pytest.CaptureFixture[str], version: str,
                                                   reason: str) -> None:
    assert main(["advisories", "--version", version]) == 2
    _one_error_line(capsys, repr(version), reason, "X.Y.Z")


def test_advisories_accepts_a_full_release(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["advisories", "--version", "v4.1.0"]) == 0
    assert "not affected" in capsys.readouterr().out


@pytest.mark.parametrize("content, reason", [("", "empty file"), ("x = 1\n", "no [hypervisor.<name>] table")])
def test_rules_check_of_a_file_with_nothing_to_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     content: str, reason: str) -> None:
    config = tmp_path / "configuration-qemu.toml"
    config.write_text(content)
    assert main(["rules", "check", str(config)]) == 2
    _one_error_line(capsys, str(config), reason)


def test_rules_check_waiver_for_an_unknown_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    waivers = tmp_path / "w.toml"
    waivers.write_text('[[waiver]]\nrule = "KATA-NOPE-999"\njustification = "typo"\nexpires = 2999-01-01\n')
    config = REPO / "fixtures/configs/hardened/configuration-qemu.toml"
    assert main(["rules", "check", str(config), "--waivers", str(waivers)]) == 2
    _one_error_line(capsys, str(waivers), "unknown rule 'KATA-NOPE-999'")


def test_hosts_list_hint_names_its_own_flag(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("libvirt", reason="the libvirt Python binding is part of the dev install")
    assert main(["hosts", "list", "--uri", "qemu:///pytest-kata-nonexistent"]) == 2
    line = _one_error_line(capsys, "qemu:///pytest-kata-nonexistent", "pass --uri")
    assert "--kata-libvirt-uri" not in line
