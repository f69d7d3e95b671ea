"""Daemon records: the pid files, labelled with the run id, of every process a run started and must stop.

A record is ``<state_dir>/<run-id>/daemons/<name>-<pid>.json`` with the pid, the kernel start time (so a
recycled pid is never killed) and the run id; :mod:`pytest_kata.sweep` stops the recorded daemons of dead
runs, and the end of a run stops its own.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.locking import exclusive
from pytest_kata.processes import EXITED, TIMEOUT, poll_until, reap, send_signal, start_time


class ServiceError(KataError):
    """A daemon the run needs cannot be started or does not answer."""


@dataclass
class DaemonRecord:
    """One process a run started and must stop: what ``<state>/<run-id>/daemons/*.json`` holds."""

    name: str
    pid: int
    starttime: int
    run_id: str
    path: Path

    def matches(self) -> bool:
        """Whether the recorded process still runs (same pid *and* same start time: pids are recycled)."""
        return start_time(self.pid) == self.starttime


def daemons_dir(run_id: str) -> Path:
    path = runid.run_dir(run_id) / "daemons"
    path.mkdir(exist_ok=True)
    return path


def register_daemon(run_id: str, name: str, pid: int) -> DaemonRecord:
    """Record a process this run started, so that the end of the run (or a later sweep) stops it."""
    start = start_time(pid)
    if start is None:
        raise ServiceError(f"cannot register {name}: process {pid} is not running", path=name)
    path = daemons_dir(run_id) / f"{name}-{pid}.json"
    record = DaemonRecord(name, pid, start, run_id, path)
    write_record(record)
    return record


def write_record(record: DaemonRecord) -> None:
    tmp = record.path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": record.name, "pid": record.pid, "starttime": record.starttime,
                               "run_id": record.run_id}))
    tmp.replace(record.path)


def move_record(record: DaemonRecord, heir: str) -> DaemonRecord:
    """Give a record to another run (it stops the daemon at its end); returns the heir's record."""
    moved = DaemonRecord(record.name, record.pid, record.starttime, heir, daemons_dir(heir) / record.path.name)
    write_record(moved)
    record.path.unlink(missing_ok=True)
    return moved


def daemon_records(run_id: str) -> list[DaemonRecord]:
    """The daemons recorded for ``run_id`` (without creating its state directory)."""
    directory = runid.state_dir() / run_id / "daemons"
    records = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            data = json.loads(path.read_text())
            records.append(DaemonRecord(data["name"], int(data["pid"]), int(data["starttime"]),
                                        data.get("run_id", run_id), path))
        except (OSError, ValueError, KeyError):
            continue
    return records


def stop_process(record: DaemonRecord, *, timeout: float = 15.0) -> bool:
    """SIGTERM the recorded process, SIGKILL it after ``timeout``; True if it was running. Removes the record."""
    was_running = record.matches()
    if was_running:
        send_signal(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while record.matches() and time.monotonic() < deadline:
            reap(record.pid)
            time.sleep(0.05)
        if record.matches():
            send_signal(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while record.matches() and time.monotonic() < deadline:
                reap(record.pid)
                time.sleep(0.05)
    record.path.unlink(missing_ok=True)
    return was_running


@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """A lock shared by every run on the machine (xdist workers start the same daemon at once)."""
    with exclusive(runid.state_dir() / f"{name}.lock"):
        yield


def spawn_daemon(name: str, argv: Sequence[str], *, run_id: str, log: Path, env: dict[str, str] | None = None
                 ) -> tuple[subprocess.Popen[bytes], DaemonRecord]:
    """Start a foreground daemon in a session of its own (output appended to ``log``) and record it for the
    run, so that the end of the run or a sweep stops it even when the caller never gets to."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)
    return proc, register_daemon(run_id, name, proc.pid)


def await_daemon(name: str, proc: subprocess.Popen[bytes], record: DaemonRecord, *, log: Path,
                 ready: Callable[[], bool], timeout: float, on_timeout: Callable[[], object],
                 interval: float = 0.1) -> None:
    """Wait until a daemon from :func:`spawn_daemon` answers (``ready()``). One that exits first loses its
    record; one silent for ``timeout`` seconds is taken down by ``on_timeout()``; both raise
    :class:`ServiceError` with the last lines of its log."""
    outcome = poll_until(ready, timeout=timeout, alive=lambda: proc.poll() is None, interval=interval)
    if outcome == EXITED:
        record.path.unlink(missing_ok=True)
        raise ServiceError(f"{name} exited with {proc.returncode}; last log lines: {log_tail(log)}", path=log)
    if outcome == TIMEOUT:
        on_timeout()
        raise ServiceError(f"{name} did not answer within {timeout:g} s; last log lines: {log_tail(log)}",
                           path=log)


def log_tail(path: Path, lines: int = 3) -> str:
    """The last lines of a daemon's log, on one line (for an error message)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def one_line(text: str) -> str:
    """A command's output, its last three non-empty lines, on one line (for an error message)."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "(no output)"
