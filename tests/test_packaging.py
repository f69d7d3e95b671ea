"""The wheel ships the suites, rule data, profiles, advisory feed and image recipes: an installed
pytest-kata runs its suites from any directory with ``pytest --pyargs pytest_kata.suites``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(REPO)], check=True, capture_output=True)
    return next(out.glob("pytest_kata-*.whl"))


def test_wheel_contains_runtime_data(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "pytest_kata/suites/__init__.py" in names
    assert any(n.startswith("pytest_kata/suites/hardening/") for n in names)
    assert any(n.startswith("pytest_kata/data/rules/") and n.endswith(".toml") for n in names)
    assert any(n.startswith("pytest_kata/data/advisories/") for n in names)
    assert any(n.startswith("pytest_kata/vm_images/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "pytest11" in text and "pytest_kata.plugin" in text and "pytest-kata = pytest_kata.cli:main" in text


@pytest.mark.slow
def test_installed_wheel_runs_shipped_suites_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    tree = tmp_path / "candidate" / "opt" / "kata"
    tree.mkdir(parents=True)
    (tree / "VERSION").write_text("3.2.0\n")
    user_repo = tmp_path / "user-repo"
    user_repo.mkdir()
    env = os.environ | {"PYTHONPATH": str(target), "PYTEST_KATA_QUIET": "1"}
    where = subprocess.run([sys.executable, "-c", "import pytest_kata.suites as s; print(s.__file__)"], cwd=user_repo,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), f"the suites were not imported from the installed wheel: {where}"
    (user_repo / "pytest.ini").write_text("[pytest]\nkata_fail_on = critical\n")
    # the space form: pytest must not take the candidate's directory for its rootdir (and miss pytest.ini)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--pyargs", "pytest_kata.suites.advisories",
                           "--kata-candidate", str(tree.parent.parent), "--kata-report", "v.json"],
                          cwd=user_repo, env=env, capture_output=True, text=True)
    # 3.2.0 is affected by known advisories (rejected whatever fail-on); the verdict's fail_on shows pytest.ini applied
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"rootdir: {user_repo}" in proc.stdout
    report = json.loads((user_repo / "v.json").read_text())
    assert report["verdict"] == "reject" and report["fail_on"] == "critical" and report["totals"]["fail"]
    assert not (tmp_path / "candidate" / ".pytest_cache").exists()
    run = subprocess.run([sys.executable, "-m", "pytest_kata.cli", "run", "advisories", "--", "--kata-candidate",
                          str(tree.parent.parent), "--kata-report", "run.json", "--kata-fail-on", "high", "-q"],
                         cwd=user_repo, env=env, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert json.loads((user_repo / "run.json").read_text())["verdict"] == "reject"
