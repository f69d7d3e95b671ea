"""libvirtd (with virtlogd) for the run: the running one, or one started by hand and recorded.

If a libvirtd already answers on ``/run/libvirt/libvirt-sock`` (a user's machine, or another run's daemon) it
is used and marked *external*: never stopped by this run. Otherwise ``virtlogd -d`` and ``libvirtd -d`` are
started in the root network namespace (never ``-l``: no TCP, no TLS), so that hosts can attach to the run's
bridges (see :mod:`pytest_kata.network`). There is one libvirtd per machine (its socket path is fixed), so
when the owning run ends while another live run still uses the daemon, ownership is handed over to that run
instead of pulling the daemon from under it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.processes import EXITED, READY, poll_until, start_time
from pytest_kata.progress import step, timed
from pytest_kata.resources import LOCAL_LIBVIRT_URI
from pytest_kata.services.records import (
    DaemonRecord,
    ServiceError,
    daemon_records,
    log_tail,
    machine_lock,
    move_record,
    one_line,
    register_daemon,
    stop_process,
)

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
LIBVIRT_AUTOSTART_NETWORKS = Path("/etc/libvirt/qemu/networks/autostart")
LIBVIRT_USER_MARK = "uses-libvirtd"  # in a run's dir: this run relies on the libvirtd with that pid
LIBVIRT_USED_MARK = "used-libvirt"  # in a run's dir: this run asked for the local libvirtd (whoever started it)
DEFAULT_URI = LOCAL_LIBVIRT_URI


@dataclass
class Daemon:
    """A daemon the run uses; ``external`` ones (found running) are never stopped by the run."""

    name: str
    run_id: str
    external: bool
    pid: int | None = None
    uri: str = DEFAULT_URI
    records: list[DaemonRecord] = field(default_factory=list)
    log: Path | None = None

    def stop(self) -> None:
        """Stop the processes this run started (reverse order), unless another live run still uses them."""
        if self.external:
            return
        handed_over = False
        for record in reversed(self.records):  # libvirtd before the virtlogd it needs
            if record.name == "libvirtd" and hand_over_libvirtd(record):
                handed_over = True  # virtlogd went to the heir with it
                continue
            if handed_over and record.name == "virtlogd":
                continue
            stop_process(record)


def _quiet_libvirt() -> Any:
    import libvirt  # a C binding that costs ~80 ms to load: only when a libvirtd is asked for

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # no "libvirt: error" lines on stderr
    return libvirt


def libvirt_answers(uri: str = DEFAULT_URI) -> bool:
    """Whether a libvirtd accepts a connection on ``uri`` (checks the socket first: no autostart attempts)."""
    if uri.startswith("qemu:///") and not LIBVIRT_SOCKET.exists():
        return False
    libvirt = _quiet_libvirt()
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _pid_from(pidfile: Path, comm: str) -> int | None:
    """The pid in a daemon's pid file if that process runs and is the named program."""
    try:
        pid = int(pidfile.read_text().split()[0])
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
            return pid
    except (OSError, ValueError, IndexError):
        pass
    return None


def serving_libvirtd_pid() -> int | None:
    """The pid of the libvirtd that owns ``/run/libvirt`` (the one a local connection reaches)."""
    return _pid_from(LIBVIRTD_PIDFILE, "libvirtd")


def ensure_libvirtd(run_id: str | None = None, *, uri: str = DEFAULT_URI, timeout: float = 90.0) -> Daemon:
    """A libvirtd that answers on ``uri``: the running one (external), or one this run starts and records.

    The first connection to a freshly started libvirtd takes ~8 s (it probes qemu's capabilities), so the
    wait is here, once per run, rather than in the first test.
    """
    run_id = run_id or runid.current_run_id()
    if not uri.startswith("qemu:///"):
        return Daemon("libvirtd", run_id, external=True, uri=uri)  # remote: never ours to start
    (runid.run_dir(run_id) / LIBVIRT_USED_MARK).touch()  # the end of the run sweeps libvirt (and only then)
    with machine_lock("libvirtd"):
        if libvirt_answers(uri):
            pid = _pid_from(LIBVIRTD_PIDFILE, "libvirtd")
            if pid:
                (runid.run_dir(run_id) / LIBVIRT_USER_MARK).write_text(f"{pid} {start_time(pid)}\n")
            step("libvirt", f"using the running libvirtd (pid {pid}); it is not this run's to stop")
            return Daemon("libvirtd", run_id, external=True, pid=pid, uri=uri)
        for tool in ("libvirtd", "virtlogd"):
            if not shutil.which(tool):
                raise ServiceError(f"{tool} is not installed and no libvirtd answers on {LIBVIRT_SOCKET}",
                                   path=uri, hint="apt-get install libvirt-daemon-system, or start libvirtd")
        autostart = sorted(p.stem for p in LIBVIRT_AUTOSTART_NETWORKS.glob("*.xml"))
        if autostart:
            raise ServiceError(f"libvirt network(s) {', '.join(autostart)} are marked autostart: a libvirtd "
                               "started by the harness would bring them up (bridge, NAT, dnsmasq) in the root "
                               "network namespace", path=LIBVIRT_AUTOSTART_NETWORKS,
                               hint=f"virsh net-autostart --disable {autostart[0]}, or start libvirtd yourself")
        # Not in the run's directory: a libvirtd can outlive its run (handed over to another live run), and it
        # opens this log again for every child it spawns (qemu-img, qemu); one libvirtd per machine, one log.
        log = runid.state_dir() / "libvirtd.log"
        env = {**os.environ, "LIBVIRT_LOG_OUTPUTS": f"3:file:{log}"}
        records: list[DaemonRecord] = []
        virtlogd = _pid_from(VIRTLOGD_PIDFILE, "virtlogd")
        if virtlogd is None:
            records.append(_start_forking("virtlogd", ["virtlogd", "-d"], VIRTLOGD_PIDFILE, run_id, env))
        else:
            records += _adopt(run_id, "virtlogd", virtlogd)
        records.append(_start_forking("libvirtd", ["libvirtd", "-d"], LIBVIRTD_PIDFILE, run_id, env))
        daemon = Daemon("libvirtd", run_id, external=False, pid=records[-1].pid, uri=uri, records=records,
                        log=log)
        with timed("libvirt", f"waiting for libvirtd (pid {daemon.pid}) to answer on {uri}"):
            outcome = poll_until(lambda: libvirt_answers(uri), timeout=timeout, alive=records[-1].matches,
                                 interval=0.25)
            if outcome != READY:
                daemon.stop()
                if outcome == EXITED:
                    raise ServiceError(f"libvirtd exited right after start; last log lines: {log_tail(log)}",
                                       path=log)
                raise ServiceError(f"libvirtd did not answer within {timeout:g} s; last log lines: "
                                   f"{log_tail(log)}", path=uri)
        return daemon


def _adopt(run_id: str, name: str, pid: int) -> list[DaemonRecord]:
    """Take over the record of a daemon a dead run started and this run now relies on (so that it is
    stopped together with the daemon that needs it, not by the dead run's sweep)."""
    adopted = []
    for path in runid.state_dir().glob(f"kt-*/daemons/{name}-{pid}.json"):
        owner = path.parent.parent.name
        if owner == run_id or runid.is_alive(owner):
            continue
        for record in daemon_records(owner):
            if record.path == path and record.matches():
                adopted.append(move_record(record, run_id))
    return adopted


def _start_forking(name: str, argv: list[str], pidfile: Path, run_id: str, env: dict[str, str]) -> DaemonRecord:
    """Start a daemon that forks into the background (``-d``) and find its pid in its pid file."""
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed with exit {proc.returncode}: {one_line(proc.stderr)}",
                           path=name)
    found: list[int] = []

    def pid_written() -> bool:
        pid = _pid_from(pidfile, name)
        found.extend([] if pid is None else [pid])
        return pid is not None

    if poll_until(pid_written, timeout=10, interval=0.05) != READY:
        raise ServiceError(f"{name} started but wrote no pid to {pidfile}", path=name)
    pid = found[0]
    record = register_daemon(run_id, name, pid)
    step("libvirt", f"started {name} (pid {pid}) for run {run_id} in {time.monotonic() - started:.1f}s")
    return record


def libvirt_users(pid: int, starttime: int | None, *, exclude: str) -> list[str]:
    """Live runs (other than ``exclude``) that marked themselves as users of the libvirtd with this pid."""
    users = []
    for mark in runid.state_dir().glob(f"kt-*/{LIBVIRT_USER_MARK}"):
        other = mark.parent.name
        if other == exclude or not runid.is_alive(other):
            continue
        try:
            mpid, mstart = mark.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if int(mpid) == pid and (starttime is None or mstart == str(starttime)):
            users.append(other)
    return sorted(users)


def hand_over_libvirtd(record: DaemonRecord, heir: str | None = None) -> bool:
    """Give a libvirtd still used by another live run to that run (it stops it at its end); True if so."""
    if not record.matches():
        return False
    if heir is None:
        users = libvirt_users(record.pid, record.starttime, exclude=record.run_id)
        if not users:
            return False
        heir = users[0]
    move_record(record, heir)
    (runid.state_dir() / heir / LIBVIRT_USER_MARK).unlink(missing_ok=True)
    for other in daemon_records(record.run_id):  # virtlogd goes with it: libvirtd needs it for every domain
        if other.name == "virtlogd" and other.matches():
            move_record(other, heir)
    step("libvirt", f"libvirtd (pid {record.pid}) is still used by run {heir}: handed over, not stopped")
    return True


