"""Processes by pid: start times (pids are recycled), signals, reaping, command lines, and the one
start-and-poll loop every daemon the harness starts waits in.

Only the standard library: :mod:`pytest_kata.runid` and the services below it build on this.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None when it is gone
    or a zombie: a zombie runs nothing any more, and its parent may never reap it (pid 1 in a container), so
    a run or daemon whose process is a zombie is dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` (field 4 of /proc/PID/stat); None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def send_signal(pid: int, sig: int) -> None:
    """Signal ``pid``; a process that is already gone is no error."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def reap(pid: int) -> None:
    """Collect our own child (a daemon started with Popen) so that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def cmdlines() -> Iterator[tuple[int, list[str]]]:
    """(pid, argv) of every process with a command line (kernel threads have none)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry.name), raw.rstrip(b"\0").decode(errors="replace").split("\0")


READY, EXITED, TIMEOUT = "ready", "exited", "timeout"


def poll_until(ready: Callable[[], bool], *, timeout: float, alive: Callable[[], bool] | None = None,
               interval: float = 0.1) -> str:
    """Wait for a process just started to answer: :data:`READY` once ``ready()`` holds, :data:`EXITED` when
    ``alive()`` says it died first, :data:`TIMEOUT` after ``timeout`` seconds. The caller says what failed."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            return EXITED
        if ready():
            return READY
        if time.monotonic() > deadline:
            return TIMEOUT
        time.sleep(interval)
