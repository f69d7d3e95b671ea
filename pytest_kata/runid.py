"""Run ids: every VM, snapshot, overlay, netns, mount and daemon a run creates carries one.

A run id looks like ``kt-1a2b3c4d``. The owning process records itself in ``/run/pytest-kata/<id>.pid``
(or ``$PYTEST_KATA_STATE/<id>.pid``); a sweep treats a run as dead when that pid no longer exists, and
removes the run's resources. Workers of one xdist run share the controller's id (via the environment).

An id can be reserved (:func:`reserve`) without a trace on the machine: the pid file is written when
something first uses it (:func:`current_run_id`), with the reserving process as owner, so that an xdist
worker that starts the run keeps it alive for as long as its controller lives.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from pytest_kata.processes import start_time

PREFIX = "kt-"
RUN_ID_RE = re.compile(r"kt-[0-9a-f]{8}")
ENV = "PYTEST_KATA_RUN_ID"
OWNER_ENV = "PYTEST_KATA_RUN_OWNER"  # "<run id>:<pid>": the process whose life is the run's (see reserve)
XDIST_WORKER_ENV = "PYTEST_XDIST_WORKER"

_claimed: set[str] = set()
_first_use: list[Callable[[str], None]] = []


def _default_state_base() -> Path:
    return Path("/run/pytest-kata" if os.geteuid() == 0 else f"/tmp/pytest-kata-{os.getuid()}")


def _state_base() -> Path:
    return Path(os.environ.get("PYTEST_KATA_STATE") or _default_state_base())


def state_dir() -> Path:
    path = _state_base()
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
    """The run id of this process tree, created on first use; its pid file is written then (see :func:`claim`)."""
    run_id = os.environ.get(ENV)
    if not run_id:
        run_id = new_run_id()
        os.environ[ENV] = run_id
    if run_id not in _claimed:
        _claimed.add(run_id)
        if claim(run_id):
            for callback in list(_first_use):
                callback(run_id)
    return run_id


def reserve(owner_pid: int | None = None) -> str:
    """A fresh id for this process tree (inherited through the environment), not yet on the machine."""
    run_id = new_run_id()
    os.environ[ENV] = run_id
    os.environ[OWNER_ENV] = f"{run_id}:{owner_pid or os.getpid()}"
    return run_id


def claim(run_id: str) -> bool:
    """Write the run's pid file unless it exists; ``True`` when this call wrote it (the run starts here).

    The owner is the process that reserved the id, if it did, else this one.
    """
    recorded_id, _, pid = os.environ.get(OWNER_ENV, "").partition(":")
    owner = int(pid) if recorded_id == run_id and pid.isdigit() else os.getpid()
    try:
        fd = os.open(state_dir() / f"{run_id}.pid", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(_pid_line(owner))
    return True


def in_use(run_id: str) -> bool:
    """Whether the run has started (its pid file exists)."""
    return (_state_base() / f"{run_id}.pid").exists()


def on_first_use(callback: Callable[[str], None]) -> None:
    """Call ``callback(run_id)`` in the process that starts a run (writes its pid file); once per callback."""
    if callback not in _first_use:
        _first_use.append(callback)


def worker_id() -> str:
    """``gw0``... under xdist, ``main`` otherwise: part of every name a worker makes, so workers never collide."""
    return os.environ.get(XDIST_WORKER_ENV) or "main"


def _pid_line(pid: int) -> str:
    started = start_time(pid)
    return f"{pid} {'' if started is None else started}\n"


def register(run_id: str, pid: int | None = None) -> None:
    (state_dir() / f"{run_id}.pid").write_text(_pid_line(pid or os.getpid()))


def unregister(run_id: str) -> None:
    (state_dir() / f"{run_id}.pid").unlink(missing_ok=True)


def is_alive(run_id: str) -> bool:
    """Whether the process that owns ``run_id`` still runs (unknown ids count as dead). The machine's default
    state directory is asked too when ``$PYTEST_KATA_STATE`` points elsewhere: resources (domains, daemons,
    mounts) are the machine's, so a run registered there is never swept from another state directory."""
    bases = dict.fromkeys([_state_base(), _default_state_base()])
    return any(_owner_runs(base / f"{run_id}.pid") for base in bases)


def _owner_runs(pidfile: Path) -> bool:
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
    started = start_time(pid)  # None: gone or a zombie, which runs nothing: the run is dead
    if started is None:
        return False
    return recorded is None or recorded == str(started)  # same pid, other process: the run is dead


def run_id_of(name: str) -> str | None:
    """The run id embedded in a resource name, if any."""
    m = RUN_ID_RE.search(name)
    return m.group(0) if m else None


def dead_run_ids(names: list[str]) -> set[str]:
    return {rid for rid in (run_id_of(n) for n in names) if rid and not is_alive(rid)}
