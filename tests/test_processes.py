"""Process start times decide whether a recorded daemon or a run's owner still runs: a recycled pid has
another start time, and a zombie runs nothing any more (its parent may never reap it)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_kata import runid
from pytest_kata.processes import EXITED, READY, TIMEOUT, parent_pid, poll_until, start_time


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def zombie() -> object:
    """A child that has exited and is not reaped yet."""
    proc = subprocess.Popen(["true"])
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "Z":
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    yield proc
    proc.wait()


def test_a_running_process_has_a_start_time_and_a_zombie_has_none(zombie: subprocess.Popen) -> None:
    assert isinstance(start_time(os.getpid()), int)
    assert parent_pid(zombie.pid) == os.getpid()
    assert start_time(zombie.pid) is None
    zombie.wait()
    assert start_time(zombie.pid) is None and parent_pid(zombie.pid) is None


def test_a_run_whose_owner_is_a_zombie_is_dead(zombie: subprocess.Popen, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_KATA_STATE", str(tmp_path))
    alive_run, zombie_run = runid.new_run_id(), runid.new_run_id()
    runid.register(alive_run)  # this process: the negative control
    (tmp_path / f"{zombie_run}.pid").write_text(f"{zombie.pid} \n")  # no start time recorded: pid alone
    assert runid.is_alive(alive_run)
    assert not runid.is_alive(zombie_run)
    assert runid.is_alive(alive_run) and (tmp_path / f"{alive_run}.pid").read_text().split()[1] == \
        str(start_time(os.getpid()))


def test_poll_until_says_ready_exited_or_timeout() -> None:
    assert poll_until(lambda: True, timeout=1) == READY
    assert poll_until(lambda: False, timeout=0.2, interval=0.05) == TIMEOUT
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert poll_until(lambda: False, timeout=5, alive=lambda: proc.poll() is None) == EXITED
