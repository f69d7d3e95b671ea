"""Run ids: every VM, snapshot, overlay, netns, mount and daemon a run creates carries one.

A run id looks like ``kt-1a2b3c4d``. The owning process records itself in ``/run/pytest-kata/<id>.pid``
(or ``$PYTEST_KATA_STATE/<id>.pid``); a sweep treats a run as dead when that pid no longer exists, and
removes the run's resources. Workers of one xdist run share the controller's id (via the environment).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

PREFIX = "kt-"
RUN_ID_RE = re.compile(r"kt-[0-9a-f]{8}")
ENV = "PYTEST_KATA_RUN_ID"


def state_dir() -> Path:
    base = os.environ.get("PYTEST_KATA_STATE") or ("/run/pytest-kata" if os.geteuid() == 0 else
                                                   f"/tmp/pytest-kata-{os.getuid()}")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_dir(run_id: str) -> Path:
    """The run's own state directory (its daemons' pid files, its link-name map); the sweep removes it."""
    path = state_dir() / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_run_id() -> str:
    return PREFIX + secrets.token_hex(4)


def current_run_id() -> str:
    """The run id of this process tree, created (and registered) on first use."""
    run_id = os.environ.get(ENV)
    if not run_id:
        run_id = new_run_id()
        os.environ[ENV] = run_id
        register(run_id)
    return run_id


def _start_time(pid: int) -> str | None:
    """The process start time (clock ticks since boot): a reused pid has another one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def register(run_id: str, pid: int | None = None) -> None:
    pid = pid or os.getpid()
    (state_dir() / f"{run_id}.pid").write_text(f"{pid} {_start_time(pid) or ''}\n")


def unregister(run_id: str) -> None:
    (state_dir() / f"{run_id}.pid").unlink(missing_ok=True)


def is_alive(run_id: str) -> bool:
    """Whether the process that owns ``run_id`` still runs (unknown ids count as dead)."""
    pidfile = state_dir() / f"{run_id}.pid"
    try:
        fields = pidfile.read_text().split()
        pid = int(fields[0])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    recorded = fields[1] if len(fields) > 1 else None
    return recorded is None or recorded == _start_time(pid)  # same pid, other process: the run is dead


def run_id_of(name: str) -> str | None:
    """The run id embedded in a resource name, if any."""
    m = RUN_ID_RE.search(name)
    return m.group(0) if m else None


def dead_run_ids(names: list[str]) -> set[str]:
    return {rid for rid in (run_id_of(n) for n in names) if rid and not is_alive(rid)}
