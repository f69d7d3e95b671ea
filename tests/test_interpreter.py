"""CI runs the project's tests with Debian's own ``/usr/bin/python3`` (3.11.2 on Debian 12), the interpreter
users have: APIs newer than it (``tarfile.data_filter`` is 3.11.4+) then fail here, not on a user's machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEM_PYTHON = Path("/usr/bin/python3")


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
                    reason="CI only (CI=true): a developer may run the tests with another interpreter")
def test_ci_runs_the_tests_with_debians_own_python() -> None:
    assert SYSTEM_PYTHON.exists(), "CI machines are Debian 12: /usr/bin/python3 must exist"
    system = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version, sys.base_prefix)"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert f"{sys.version} {sys.base_prefix}" == system, \
        f"tests run on {sys.version} from {sys.base_prefix} ({sys.executable}), not on {SYSTEM_PYTHON}: {system}"
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    assert base == os.path.realpath(SYSTEM_PYTHON)
