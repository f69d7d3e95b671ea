"""The README's ways to run the shipped suites work as written, from any directory: ``pytest-kata run SUITE --
ARGS``, ``pytest --pyargs pytest_kata.suites`` (here from the editable install; tests/test_packaging.py does the
same from a wheel), the space form ``--kata-candidate PATH`` (the rootdir stays the user's project), and
``-m "not vm"`` selecting the static checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kata.cli import main

PYTEST_KATA = Path(sys.executable).with_name("pytest-kata")


def candidate_tree(where: Path, version: str) -> Path:
    """A minimal unpacked candidate: enough for the advisory gate (3.2.0 is affected, 4.1.0 is not)."""
    tree = where / "candidate" / "opt" / "kata"
    tree.mkdir(parents=True)
    (tree / "VERSION").write_text(f"{version}\n")
    return tree.parent.parent


def user_project(tmp_path: Path, ini: str = "") -> Path:
    project = tmp_path / "user-project"
    project.mkdir()
    (project / "pytest.ini").write_text(f"[pytest]\n{ini}")
    return project


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTEST_KATA_QUIET": "1", "PYTEST_KATA_NO_SWEEP": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("version,status,verdict", [("3.2.0", 1, "reject"), ("4.1.0", 0, "accept")])
def test_run_passes_everything_after_the_double_dash_to_pytest(tmp_path: Path, version: str, status: int,
                                                               verdict: str) -> None:
    project = user_project(tmp_path)
    cand = candidate_tree(tmp_path, version)
    proc = run([str(PYTEST_KATA), "run", "advisories", "--", "--kata-candidate", str(cand),
                "--kata-report", "v.json", "-q"], project)
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads((project / "v.json").read_text())["verdict"] == verdict
    assert "no suite" not in proc.stderr


def test_run_names_an_unknown_suite_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "hardening", "nosuch", "--", "--kata-candidate", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no suite 'nosuch'; known suites: advisories, escape_regression, hardening" in err


def test_pyargs_from_another_directory_and_the_space_form_keeps_the_users_rootdir(tmp_path: Path) -> None:
    """Without the rootdir correction pytest takes the candidate's directory (``tmp_path``) as its rootdir and
    ignores the project's pytest.ini (here: ``kata_fail_on = critical``)."""
    project = user_project(tmp_path, "kata_fail_on = critical\n")
    cand = candidate_tree(tmp_path, "3.2.0")
    proc = run([sys.executable, "-m", "pytest", "--pyargs", "pytest_kata.suites.advisories",
                "--kata-candidate", str(cand), "--kata-report", "v.json"], project)
    assert f"rootdir: {project}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((project / "v.json").read_text())
    assert report["fail_on"] == "critical", "the project's pytest.ini applies"
    assert report["totals"]["pass"] + report["totals"]["fail"] > 0
    assert not (tmp_path / "candidate" / ".pytest_cache").exists() and not (tmp_path / ".pytest_cache").exists()


def test_not_vm_selects_the_static_checks_and_vm_the_rest(tmp_path: Path) -> None:
    project = user_project(tmp_path)
    cand = candidate_tree(tmp_path, "4.1.0")
    ids = {}
    for expr in ("not vm", "vm"):
        proc = run([sys.executable, "-m", "pytest", "--pyargs", "pytest_kata.suites", "--collect-only", "-q",
                    "--strict-markers", "-m", expr, f"--kata-candidate={cand}"], project)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        ids[expr] = [line for line in proc.stdout.splitlines() if "::" in line]
    static, booting = ids["not vm"], ids["vm"]
    assert static and booting and not set(static) & set(booting)
    assert not [i for i in static if "isolation/" in i or "rollback/" in i or "test_escape_classes" in i
                or "[dynamic" in i], "nothing that boots a VM or starts a container is static"
    assert all(("isolation/" in i or "rollback/" in i or "test_escape_classes" in i or "[dynamic" in i
                or "test_boot_sysctls_read_back" in i) for i in booting)
    assert any("hardening/" in i for i in static) and any("escape_regression/" in i and "[static" in i
                                                          for i in static)
