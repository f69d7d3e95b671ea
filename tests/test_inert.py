"""An installed plugin is inert until asked: pytest loads it in every project of the venv, so a session that
sets no ``--kata-*`` option and uses no Kata fixture must not sweep, probe libvirt, start a run (pid file) or
print a Kata header. A session that asks (options, or a fixture that creates resources) does all that."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_kata import runid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the run's pid files live in /run/pytest-kata (root)")

# Records what the plugin does, by wrapping the functions it calls: sweeps, libvirt/KVM probes, and at the
# end (before the plugin's own clean-up) the run id reserved for the session and whether it started.
SPY = textwrap.dedent("""
    import json, os, pathlib
    import pytest
    from pytest_kata import runid
    from pytest_kata.hosts import accel
    from pytest_kata.plugins import lifecycle

    SEEN = {"sweeps": [], "probes": 0, "started_during_test": None}
    real_sweep, real_probe = lifecycle.sweep, accel.detect_accel_description

    def spy_sweep(*args, **kwargs):
        SEEN["sweeps"].append(kwargs.get("run_id"))
        return real_sweep(*args, **kwargs)

    def spy_probe(*args, **kwargs):
        SEEN["probes"] += 1
        return real_probe(*args, **kwargs)

    lifecycle.sweep, accel.detect_accel_description = spy_sweep, spy_probe

    @pytest.hookimpl(tryfirst=True)
    def pytest_unconfigure(config):
        rid = os.environ.get(runid.ENV)
        SEEN.update(run_id=rid, pid_file=bool(rid) and runid.in_use(rid))
        pathlib.Path("spy.json").write_text(json.dumps(SEEN))
""")


def dead_run() -> str:
    """A dead run's leftover (state dir and pid file of a finished process): what a start sweep removes."""
    rid = runid.new_run_id()
    gone = subprocess.Popen(["true"])
    gone.wait()
    runid.register(rid, pid=gone.pid)
    (runid.run_dir(rid) / "marker").write_text("left by a dead run\n")
    return rid


def run(pytester: pytest.Pytester, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    pytester.makeconftest(SPY)
    env = {k: v for k, v in os.environ.items() if k not in (runid.ENV, runid.OWNER_ENV, "PYTEST_KATA_NO_SWEEP")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=pytester.path,
                          env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads((pytester.path / "spy.json").read_text())


def kata_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("kata", "[kata"))]


@pytest.mark.parametrize("args", [["--help"], []], ids=["help", "plain-project"])
def test_a_session_that_does_not_ask_leaves_no_trace(pytester: pytest.Pytester, args: list[str]) -> None:
    pytester.makepyfile(test_plain="def test_plain(tmp_path):\n    assert tmp_path.is_dir()\n")
    proc, seen = run(pytester, *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seen["sweeps"] == [] and seen["probes"] == 0, seen
    assert not seen["pid_file"] and not runid.in_use(seen["run_id"]), "the run never started"
    assert not (runid.state_dir() / seen["run_id"]).exists()
    assert kata_lines(proc.stdout) == [] and "kata" not in proc.stderr.lower(), proc.stdout + proc.stderr
    if args == ["--help"]:
        assert "Kata Containers release validation" in proc.stdout  # the options are still offered


def test_a_session_with_kata_options_starts_the_run_and_sweeps(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    rid = dead_run()
    proc, seen = run(pytester, "--kata-candidate", str(tmp_path / "candidate-tree"))
    assert seen["sweeps"] == [None], "the start sweep (dead runs only)"
    assert seen["pid_file"]
    assert not runid.in_use(rid) and not (runid.state_dir() / rid).exists(), "the dead run was swept"
    # (a concurrent run's start sweep may have removed it first: the spy above shows that this one swept)
    assert f"kata run: {seen['run_id']}" in proc.stdout and "kata: --kata-candidate=" in proc.stdout
    assert seen["probes"] == 1 and "kata hosts: libvirt" in proc.stdout
    assert not runid.in_use(seen["run_id"]), "unregistered at the end"


def test_a_kata_fixture_starts_the_run_lazily_and_the_controller_ends_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_uses=textwrap.dedent("""
        import os
        from pytest_kata import runid

        def test_uses(kata_run_id):
            assert kata_run_id == os.environ[runid.ENV] and runid.in_use(kata_run_id)
            owner = int((runid.state_dir() / f"{kata_run_id}.pid").read_text().split()[0])
            assert owner == os.getppid() != os.getpid() and runid.is_alive(kata_run_id)
    """))
    proc, seen = run(pytester, "-n", "1")  # in an xdist worker: the pid file names the controller
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert seen["pid_file"], "started by the fixture"
    assert f"kata run: {seen['run_id']} (started on first use by a Kata fixture)" in proc.stdout
    assert not runid.in_use(seen["run_id"]), "the controller ended the run the worker started"
