"""``scripts/setup`` makes ``.venv`` with Debian's own ``/usr/bin/python3`` unless ``PYTHON`` says otherwise, and
remakes a ``.venv`` that another interpreter made (a pyenv python first on PATH gave CI a newer Python than
users have). The real script runs in a scratch checkout; the interpreters are stand-ins that say who they are
(the real setup, end to end, is tests/test_debian_root.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_kata.resources import cache_dir

REPO = Path(__file__).resolve().parents[1]
SYSTEM = os.path.realpath("/usr/bin/python3")
# An interpreter as setup sees it: `-c ...` prints its real base executable, `-m venv .venv` makes a venv of
# stand-ins that print the same, `--version` answers; its pytest-kata names the real cache, where setup already put
# the allure command line.
FAKE_PYTHON = """#!/bin/sh
case "$1" in
  -c) echo "{base}" ;;
  --version) echo "Python 3 ({base})" ;;
  -m) mkdir -p .venv/bin
      printf '#!/bin/sh\\necho "{base}"\\n' > .venv/bin/python
      printf '#!/bin/sh\\nexit 0\\n' > .venv/bin/pip
      printf '#!/bin/sh\\necho "{cache}"\\n' > .venv/bin/pytest-kata
      chmod +x .venv/bin/python .venv/bin/pip .venv/bin/pytest-kata ;;
esac
"""


def interpreter(where: Path, base: str) -> Path:
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(FAKE_PYTHON.format(base=base, cache=cache_dir()))
    where.chmod(0o755)
    return where


def setup(checkout: Path, python: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    if python is not None:
        env["PYTHON"] = str(python)
    return subprocess.run([str(checkout / "scripts/setup")], cwd=checkout, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    missing = subprocess.run(["bash", "-c", "source <(sed -n '/^APT_PACKAGES=(/,/^)/p' scripts/setup); "
                              "for p in \"${APT_PACKAGES[@]}\"; do dpkg-query -W -f='${Status}' $p 2>/dev/null "
                              "| grep -q 'install ok installed' || echo $p; done"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    if missing:
        pytest.skip(f"setup would install Debian packages on this machine: {' '.join(missing)}")
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts/setup", root / "scripts/setup")
    return root


def test_a_venv_made_by_another_interpreter_is_remade(checkout: Path, tmp_path: Path) -> None:
    interpreter(checkout / ".venv/bin/python", "/root/.pyenv/versions/3.11.7/bin/python3.11")
    (checkout / ".venv/made-by-pyenv").write_text("")
    wanted = interpreter(tmp_path / "debian/python3", "/usr/bin/python3.11")
    first = setup(checkout, wanted)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "recreating .venv: it was made by /root/.pyenv/versions/3.11.7/bin/python3.11, not /usr/bin/python3.11" \
        in first.stdout
    assert not (checkout / ".venv/made-by-pyenv").exists()
    assert subprocess.run([str(checkout / ".venv/bin/python")], capture_output=True, text=True).stdout.strip() \
        == "/usr/bin/python3.11"
    again = setup(checkout, wanted)
    assert again.returncode == 0 and "creating .venv" not in again.stdout, "a right venv is kept"


def test_debians_python_is_the_default(checkout: Path, tmp_path: Path) -> None:
    """With PYTHON unset, a venv made by /usr/bin/python3 is the right one (kept, not remade)."""
    made = interpreter(tmp_path / "made-by-system", SYSTEM)
    subprocess.run([str(made), "-m", "venv", ".venv"], cwd=checkout, check=True)
    kept = setup(checkout, None)
    assert kept.returncode == 0 and "creating .venv" not in kept.stdout, kept.stdout + kept.stderr
