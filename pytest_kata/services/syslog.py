"""A syslog socket for Kata shims (they refuse to start without ``/dev/log``), lent to the runs that need one
and taken away by the last of them, so the machine is left as it was found."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from pytest_kata import runid
from pytest_kata.processes import READY, poll_until, reap, send_signal, start_time
from pytest_kata.services.records import ServiceError, machine_lock

DEVLOG = Path("/dev/log")
SYSLOG_LEASE = "syslog-lease.json"  # in the state dir: the listener and the runs that use it


def _read_lease(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def _holder(run_id: str) -> str:
    """One process of a run: a run's xdist workers and the drivers of one process each hold the socket."""
    return f"{run_id}@{os.getpid()}"


def _run_of(holder: str) -> str:
    return holder.rpartition("@")[0] or holder


def _alive(holder: str) -> bool:
    run, _, pid = holder.rpartition("@")
    return runid.is_alive(run) and (not pid.isdigit() or start_time(int(pid)) is not None)


def _holders(lease: dict) -> dict[str, int]:
    """Who holds the lent socket, and how many times (a process may run several Kata drivers at once)."""
    return {str(k): int(v) for k, v in dict(lease.get("holders", {})).items()}


def lend_syslog(run_id: str, *, devlog: Path = DEVLOG, timeout: float = 10.0) -> Path | None:
    """Make sure a syslog socket answers at ``devlog`` while ``run_id`` lives (Kata's shim refuses to start
    without one); returns the file the lent listener writes to, or None when the machine has its own socket.

    The first holder starts a listener (``socat``) and every later one joins the lease, counted per process
    of a run (each :func:`return_syslog` gives one back); the last holder's return (or a sweep of the dead
    runs) stops it and removes the socket it created, so the machine is left as it was found."""
    with machine_lock("syslog"):
        lease_path = runid.state_dir() / SYSLOG_LEASE
        lease = _read_lease(lease_path)
        me = _holder(run_id)
        holders: dict[str, int] = {}
        if lease:
            holders = _holders(lease)
            if start_time(int(lease["pid"])) == lease["starttime"] and devlog.is_socket():
                holders[me] = holders.get(me, 0) + 1
                lease["holders"] = holders
                lease_path.write_text(json.dumps(lease))
                return Path(lease["log"])
            with contextlib.suppress(OSError):  # the listener died: its socket file answers no one
                if devlog.is_socket() and devlog.stat().st_ino == lease["inode"]:
                    devlog.unlink()
            holders = {h: n for h, n in holders.items() if _alive(h)}
        if devlog.exists() or devlog.is_symlink():
            return None  # the machine's own syslog: nothing to lend
        if not shutil.which("socat"):
            raise ServiceError("no syslog socket and no socat to provide one", path=str(devlog),
                               hint="apt-get install socat")
        log = runid.state_dir() / f"syslog-{os.getpid()}.log"
        proc = subprocess.Popen(["socat", "-u", f"UNIX-RECV:{devlog},mode=666", f"OPEN:{log},creat,append"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        if poll_until(devlog.is_socket, timeout=timeout, alive=lambda: proc.poll() is None, interval=0.02) != READY:
            proc.kill()
            raise ServiceError("the syslog listener did not create its socket", path=str(devlog))
        holders[me] = holders.get(me, 0) + 1
        lease = {"pid": proc.pid, "starttime": start_time(proc.pid), "inode": devlog.stat().st_ino,
                 "devlog": str(devlog), "log": str(log), "holders": holders}
        lease_path.write_text(json.dumps(lease))
        return log


def return_syslog(run_id: str, *, dry_run: bool = False, whole_run: bool = False) -> list[str]:
    """This process of ``run_id`` gives back one hold on the lent syslog socket (``whole_run``: every hold of
    the run, as a sweep of a finished or dead run does); when no live holder is left the socket is taken away.
    Returns what was (or, in a dry run, would be) removed, for a sweep's report."""
    with machine_lock("syslog"):
        lease_path = runid.state_dir() / SYSLOG_LEASE
        lease = _read_lease(lease_path)
        holders = _holders(lease)
        if not lease or run_id not in {_run_of(h) for h in holders}:
            return []
        if whole_run:
            holders = {h: n for h, n in holders.items() if _run_of(h) != run_id}
        elif _holder(run_id) in holders:
            me = _holder(run_id)
            holders[me] -= 1
            if holders[me] <= 0:
                del holders[me]
        live = {h: n for h, n in holders.items() if _alive(h)}
        if live:
            if not dry_run:
                lease["holders"] = live
                lease_path.write_text(json.dumps(lease))
            return []
        removed = []
        pid = int(lease["pid"])
        if start_time(pid) == lease["starttime"]:
            if not dry_run:
                send_signal(pid, signal.SIGKILL)
                reap(pid)
            removed.append(f"process {pid} socat (syslog listener)")
        devlog = Path(lease["devlog"])
        with contextlib.suppress(OSError):
            if devlog.is_socket() and devlog.stat().st_ino == lease["inode"]:
                if not dry_run:
                    devlog.unlink()
                removed.append(f"socket {devlog}")
        if not dry_run:
            Path(lease["log"]).unlink(missing_ok=True)
            lease_path.unlink(missing_ok=True)
        return removed


def syslog_users() -> list[str]:
    """The runs holding the lent syslog socket (empty: none lent)."""
    return sorted({_run_of(h) for h in _holders(_read_lease(runid.state_dir() / SYSLOG_LEASE))})
