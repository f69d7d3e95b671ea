"""``scripts/demo`` (the main job) fails loudly: a validation run that breaks exits non-zero with one line, and
"accept"/"reject" is printed only from a verdict this run wrote.

The real script runs in a scratch checkout whose setup and reference build are stand-ins (they are tested
elsewhere) and whose ``suites/`` hold the case; pytest and the plugin are the real ones of this venv.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = ('import pytest\n\n@pytest.mark.kata_check("KATA-T-1", severity="high", title="t")\n'
         'def test_check():\n    assert {ok}\n')


def run_demo(tmp_path: Path, files: dict[str, str],
             stale_verdict: str | None = None) -> subprocess.CompletedProcess[str]:
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts/demo", checkout / "scripts/demo")
    (checkout / "scripts/setup").write_text("#!/bin/sh\nexit 0\n")
    (checkout / "scripts/setup").chmod(0o755)
    (checkout / "fixtures").mkdir()
    candidate = tmp_path / "candidate"
    candidate.mkdir()
    (checkout / "fixtures/build-reference").write_text(
        f"import sys\nif '--print' in sys.argv:\n    print({str(candidate)!r})\n")
    (checkout / ".venv").symlink_to(sys.prefix)
    for name, text in files.items():
        (checkout / "suites" / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / "suites" / name).write_text(text)
    (checkout / "pytest.ini").write_text("[pytest]\n")  # rootdir here, not the project's own configuration
    if stale_verdict is not None:
        (checkout / "verdict.json").write_text(json.dumps({"verdict": stale_verdict}))
    env = {**os.environ, "PYTEST_KATA_NO_SWEEP": "1"}
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    return subprocess.run([str(checkout / "scripts/demo")], cwd=checkout, capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[demo] error:")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "[demo] verdict:" not in proc.stdout
    return lines[0]


def test_accept_and_reject_come_from_this_runs_verdict(tmp_path: Path) -> None:
    ok = run_demo(tmp_path / "a", {"test_a.py": CHECK.format(ok=True)}, stale_verdict="reject")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "[demo] verdict: accept (verdict.json)" in ok.stdout
    bad = run_demo(tmp_path / "r", {"test_r.py": CHECK.format(ok=False)}, stale_verdict="accept")
    assert bad.returncode == 0 and "[demo] verdict: reject (verdict.json)" in bad.stdout


@pytest.mark.parametrize("case,files,status,needle", [
    ("collection error", {"test_x.py": "def test_x(:\n"}, 2, "could not collect"),
    ("conftest raises", {"conftest.py": "raise RuntimeError('broken conftest')\n",
                         "test_x.py": CHECK.format(ok=True)}, 4, "stopped before it began"),
    ("plugin raises", {"conftest.py": "def pytest_runtest_logreport(report):\n    raise RuntimeError('boom')\n",
                       "test_x.py": CHECK.format(ok=True)}, 3, "broke inside pytest or the plugin"),
    ("no tests", {"test_x.py": "x = 1\n"}, 5, "collected no tests"),
    ("verdict unwritable", {"conftest.py": "import os\ndef pytest_sessionstart(session):\n"
                            "    os.makedirs('verdict.json/x', exist_ok=True)\n",
                            "test_x.py": CHECK.format(ok=True)}, 3, "broke inside pytest or the plugin"),
    ("no verdict written", {"conftest.py": "import os\ndef pytest_unconfigure(config):\n"
                            "    os.remove('verdict.json')\n",
                            "test_x.py": CHECK.format(ok=True)}, 3, "wrote no readable verdict"),
])
def test_a_broken_validation_run_exits_non_zero_with_one_line(tmp_path: Path, case: str, files: dict[str, str],
                                                              status: int, needle: str) -> None:
    proc = run_demo(tmp_path, files, stale_verdict="accept")
    assert proc.returncode == status, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert needle in error_line(proc)


def test_plugin_fails_the_run_when_the_verdict_cannot_be_written(pytester: pytest.Pytester) -> None:
    # The path is checked before the run (a directory there is a usage error); one that turns into a
    # directory during the run is only found when the verdict is written.
    pytester.makepyfile(test_a="import os\n" + CHECK.format(ok=True)
                        + "\n\ndef test_takes_the_path():\n    os.mkdir('verdict.json')\n")
    result = pytester.runpytest_subprocess("--kata-report", "verdict.json", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(["ERROR: cannot write the verdict to *verdict.json: Is a directory"])
