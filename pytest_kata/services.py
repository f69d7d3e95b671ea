"""Daemons a run needs (libvirtd + virtlogd, containerd), started by hand and stopped by PID.

The machines pytest-kata runs on often have no systemd (CI containers, Firecracker VMs), so the harness
starts what it needs itself — and must then be the one that stops it, even after a crash. Every daemon the
harness starts is recorded in ``<state_dir>/<run-id>/daemons/<name>-<pid>.json`` with its pid, its kernel
start time (so a recycled pid is never killed) and the run id; :mod:`pytest_kata.sweep` stops the recorded
daemons of dead runs, and the end of a run stops its own.

- :func:`ensure_libvirtd`: if a libvirtd already answers on ``/run/libvirt/libvirt-sock`` (a user's machine,
  or another run's daemon) it is used and marked *external*: never stopped by this run. Otherwise
  ``virtlogd -d`` and ``libvirtd -d`` are started in the root network namespace (never ``-l``: no TCP, no
  TLS), so that hosts can attach to the run's bridges (see :mod:`pytest_kata.network`). There is one
  libvirtd per machine (its socket path is fixed), so when the owning run ends while another live run
  still uses the daemon, ownership is handed over to that run instead of pulling the daemon from under it.
- :func:`start_containerd`: a private containerd (own root, state, socket and config under a work
  directory), so tests never touch a system containerd or its images.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.progress import step, timed

LIBVIRT_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD_PIDFILE = Path("/run/libvirtd.pid")
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")
LIBVIRT_AUTOSTART_NETWORKS = Path("/etc/libvirt/qemu/networks/autostart")
LIBVIRT_USER_MARK = "uses-libvirtd"  # in a run's dir: this run relies on the libvirtd with that pid
LIBVIRT_USED_MARK = "used-libvirt"  # in a run's dir: this run asked for the local libvirtd (whoever started it)
DEFAULT_URI = "qemu:///system"
RUNC_STATE_ROOT = Path("/run/containerd/runc")


class ServiceError(KataError):
    """A daemon the run needs cannot be started or does not answer."""


# --------------------------------------------------------------------------------------------------------
# Daemon records (pid files labelled with the run id)


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
        return process_starttime(self.pid) == self.starttime


def process_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone
    or a zombie (a daemon whose parent died is reaped by pid 1, which may never happen in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else int(fields[19])
    except (IndexError, ValueError):
        return None


def daemons_dir(run_id: str) -> Path:
    path = runid.run_dir(run_id) / "daemons"
    path.mkdir(exist_ok=True)
    return path


def register_daemon(run_id: str, name: str, pid: int) -> DaemonRecord:
    """Record a process this run started, so that the end of the run (or a later sweep) stops it."""
    start = process_starttime(pid)
    if start is None:
        raise ServiceError(f"cannot register {name}: process {pid} is not running", path=name)
    path = daemons_dir(run_id) / f"{name}-{pid}.json"
    record = DaemonRecord(name, pid, start, run_id, path)
    _write_record(record)
    return record


def _write_record(record: DaemonRecord) -> None:
    tmp = record.path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"name": record.name, "pid": record.pid, "starttime": record.starttime,
                               "run_id": record.run_id}))
    tmp.replace(record.path)


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
        _signal(record.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while record.matches() and time.monotonic() < deadline:
            _reap(record.pid)
            time.sleep(0.05)
        if record.matches():
            _signal(record.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while record.matches() and time.monotonic() < deadline:
                _reap(record.pid)
                time.sleep(0.05)
    record.path.unlink(missing_ok=True)
    return was_running


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own child (a daemon started with Popen) so that it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """A lock shared by every run on the machine (xdist workers start the same daemon at once)."""
    with open(runid.state_dir() / f"{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------
# libvirtd


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
    import libvirt

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
    with _machine_lock("libvirtd"):
        if libvirt_answers(uri):
            pid = _pid_from(LIBVIRTD_PIDFILE, "libvirtd")
            if pid:
                (runid.run_dir(run_id) / LIBVIRT_USER_MARK).write_text(f"{pid} {process_starttime(pid)}\n")
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
            deadline = time.monotonic() + timeout
            while not libvirt_answers(uri):
                if not records[-1].matches():
                    daemon.stop()
                    raise ServiceError(f"libvirtd exited right after start; last log lines: {_tail(log)}",
                                       path=log)
                if time.monotonic() > deadline:
                    daemon.stop()
                    raise ServiceError(f"libvirtd did not answer within {timeout:g} s; last log lines: "
                                       f"{_tail(log)}", path=uri)
                time.sleep(0.25)
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
                _move_record(record, run_id)
                adopted.append(DaemonRecord(record.name, record.pid, record.starttime, run_id,
                                            daemons_dir(run_id) / path.name))
    return adopted


def _start_forking(name: str, argv: list[str], pidfile: Path, run_id: str, env: dict[str, str]) -> DaemonRecord:
    """Start a daemon that forks into the background (``-d``) and find its pid in its pid file."""
    started = time.monotonic()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"{' '.join(argv)} failed with exit {proc.returncode}: {_one_line(proc.stderr)}",
                           path=name)
    deadline = time.monotonic() + 10
    while (pid := _pid_from(pidfile, name)) is None:
        if time.monotonic() > deadline:
            raise ServiceError(f"{name} started but wrote no pid to {pidfile}", path=name)
        time.sleep(0.05)
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
    _move_record(record, heir)
    (runid.state_dir() / heir / LIBVIRT_USER_MARK).unlink(missing_ok=True)
    for other in daemon_records(record.run_id):  # virtlogd goes with it: libvirtd needs it for every domain
        if other.name == "virtlogd" and other.matches():
            _move_record(other, heir)
    step("libvirt", f"libvirtd (pid {record.pid}) is still used by run {heir}: handed over, not stopped")
    return True


def _move_record(record: DaemonRecord, heir: str) -> None:
    _write_record(DaemonRecord(record.name, record.pid, record.starttime, heir, daemons_dir(heir) / record.path.name))
    record.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------
# containerd

_DISABLED_PLUGINS = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                     "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                     "io.containerd.snapshotter.v1.zfs"]


@dataclass
class Containerd:
    """A private containerd: ``.ctr(...)`` drives it with its own socket and namespace."""

    workdir: Path
    socket: Path
    namespace: str
    run_id: str
    record: DaemonRecord
    log: Path
    owns_workdir: bool = False

    @property
    def pid(self) -> int:
        return self.record.pid

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS...``; a failure raises :class:`ServiceError` when ``check``."""
        argv = ["ctr", "-a", str(self.socket), "-n", self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ServiceError(f"ctr {' '.join(args)} failed with exit {proc.returncode}: "
                               f"{_one_line(proc.stderr or proc.stdout)}", path=str(self.socket))
        return proc

    def import_image(self, tar: str | Path, *, base_name: str | None = None) -> list[str]:
        """Import an OCI/docker archive; returns the image names containerd now knows."""
        args = ["images", "import"]
        if base_name:
            args += ["--base-name", base_name]
        before = set(self.images())
        self.ctr(*args, str(tar))
        return sorted(set(self.images()) - before) or self.images()

    def images(self) -> list[str]:
        return [line for line in self.ctr("images", "ls", "-q").stdout.split() if line]

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop containerd and its shims by pid, unmount what it left, and remove its work directory."""
        for task in self._tasks():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
            self.ctr("tasks", "delete", task, check=False, timeout=30)
        stop_process(self.record, timeout=timeout)
        kill_processes_mentioning(str(self.socket))
        if runid.run_id_of(self.namespace):
            kill_cgroup_processes(self.namespace)
        unmount_under(self.workdir)
        remove_cgroups(self.namespace)
        remove_runc_state(self.namespace)
        prune_containerd_run_dirs()
        if self.owns_workdir and not mounts_under(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _tasks(self) -> list[str]:
        if not self.record.matches():
            return []
        proc = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
        return proc.stdout.split() if proc.returncode == 0 else []

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def containerd_config(workdir: Path) -> dict:
    """``containerd config default`` with every path moved under ``workdir`` (nothing in /var, /run, /opt)."""
    import tomllib

    proc = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"containerd config default failed: {_one_line(proc.stderr)}", path="containerd")
    config = tomllib.loads(proc.stdout)
    config["root"] = str(workdir / "root")
    config["state"] = str(workdir / "state")
    config["grpc"]["address"] = str(workdir / "containerd.sock")
    config.setdefault("ttrpc", {})["address"] = ""
    config.setdefault("debug", {})["address"] = ""
    config.setdefault("metrics", {})["address"] = ""
    config["disabled_plugins"] = sorted(set(config.get("disabled_plugins", [])) | set(_DISABLED_PLUGINS))
    config["plugins"].pop("io.containerd.grpc.v1.cri", None)
    config["plugins"].setdefault("io.containerd.internal.v1.opt", {})["path"] = str(workdir / "opt")
    return config


# containerd in a mount namespace of its own whose mounts are shared among themselves (what Kata's shim needs
# of ``/``) and with the host's in neither direction: private first cuts the copies off the host's peer groups
PRIVATE_MOUNTS_ARGV = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --make-rshared / && exec "$0" "$@"']


def start_containerd(workdir: str | Path | None = None, run_id: str | None = None, *,
                     namespace: str | None = None, timeout: float = 60.0, private_mounts: bool = False,
                     path: Sequence[str | Path] = (), env: dict[str, str] | None = None) -> Containerd:
    """Start a private containerd under ``workdir`` (default ``cache_dir()/runs/<run-id>/containerd-N``).

    The namespace defaults to the run id, so that the cgroups of its containers (``/<namespace>/<id>``)
    carry the run id too and a sweep can find them. ``path``: directories put before ``$PATH`` for it (where
    it finds a shim such as ``containerd-shim-kata-v2``); ``env``: variables for it and its shims (e.g. Kata's
    ``KATA_CONF_FILE``). ``private_mounts``: run it (and so its shims and
    their VMs) in its own mount namespace with ``/`` shared inside it, which Kata's shim needs to share the
    container rootfs; the host's propagation is never changed, and every mount made in there goes away with
    the last process of the namespace.
    """
    import tomli_w

    from pytest_kata.resources import cache_dir

    run_id = run_id or runid.current_run_id()
    for tool in ("containerd", "ctr"):
        if not shutil.which(tool):
            raise ServiceError(f"{tool} is not installed", path=tool, hint="apt-get install containerd runc")
    owns = workdir is None
    if workdir is None:
        base = cache_dir() / "runs" / run_id
        base.mkdir(parents=True, exist_ok=True)
        workdir = Path(_unique_dir(base, "containerd"))
    workdir = Path(workdir).resolve()
    if not workdir.exists():
        owns = True
    workdir.mkdir(parents=True, exist_ok=True)
    socket = workdir / "containerd.sock"
    if len(str(socket)) > 100:
        raise ServiceError("work directory path too long for a unix socket (over 100 characters)", path=workdir,
                           hint="use a shorter work directory")
    config = containerd_config(workdir)
    (workdir / "config.toml").write_text(tomli_w.dumps(config))
    log = workdir / "containerd.log"
    environ = {**os.environ, **(env or {})}
    if path:
        environ["PATH"] = os.pathsep.join([*(str(p) for p in path), environ.get("PATH", os.defpath)])
    argv = [*(PRIVATE_MOUNTS_ARGV if private_mounts else []), "containerd", "--config", str(workdir / "config.toml")]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=environ)
    record = register_daemon(run_id, "containerd", proc.pid)
    ctd = Containerd(workdir, socket, namespace or run_id, run_id, record, log, owns_workdir=owns)
    with timed("containerd", f"starting containerd (pid {proc.pid}) on {socket}"):
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                record.path.unlink(missing_ok=True)
                raise ServiceError(f"containerd exited with {proc.returncode}; last log lines: {_tail(log)}",
                                   path=log)
            if socket.exists() and ctd.ctr("version", check=False, timeout=10).returncode == 0:
                break
            if time.monotonic() > deadline:
                ctd.stop()
                raise ServiceError(f"containerd did not answer within {timeout:g} s; last log lines: "
                                   f"{_tail(log)}", path=socket)
            time.sleep(0.1)
    return ctd


# --------------------------------------------------------------------------------------------------------
# A syslog socket for Kata shims, lent to the runs that need one

DEVLOG = Path("/dev/log")
SYSLOG_LEASE = "syslog-lease.json"  # in the state dir: the listener and the runs that use it


def _read_lease(path: Path) -> dict:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


def lend_syslog(run_id: str, *, devlog: Path = DEVLOG, timeout: float = 10.0) -> Path | None:
    """Make sure a syslog socket answers at ``devlog`` while ``run_id`` lives (Kata's shim refuses to start
    without one); returns the file the lent listener writes to, or None when the machine has its own socket.

    The first run that needs it starts a listener (``socat``) and every later run joins the lease; the last
    user's :func:`return_syslog` (or a sweep of the dead users) stops it and removes the socket it created,
    so the machine is left as it was found."""
    with _machine_lock("syslog"):
        lease_path = runid.state_dir() / SYSLOG_LEASE
        lease = _read_lease(lease_path)
        users = {run_id}
        if lease:
            if process_starttime(int(lease["pid"])) == lease["starttime"] and devlog.is_socket():
                lease["users"] = sorted(set(lease["users"]) | users)
                lease_path.write_text(json.dumps(lease))
                return Path(lease["log"])
            with contextlib.suppress(OSError):  # the listener died: its socket file answers no one
                if devlog.is_socket() and devlog.stat().st_ino == lease["inode"]:
                    devlog.unlink()
            users |= {u for u in lease.get("users", []) if runid.is_alive(u)}
        if devlog.exists() or devlog.is_symlink():
            return None  # the machine's own syslog: nothing to lend
        if not shutil.which("socat"):
            raise ServiceError("no syslog socket and no socat to provide one", path=str(devlog),
                               hint="apt-get install socat")
        log = runid.state_dir() / f"syslog-{os.getpid()}.log"
        proc = subprocess.Popen(["socat", "-u", f"UNIX-RECV:{devlog},mode=666", f"OPEN:{log},creat,append"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not devlog.is_socket():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise ServiceError("the syslog listener did not create its socket", path=str(devlog))
            time.sleep(0.02)
        lease = {"pid": proc.pid, "starttime": process_starttime(proc.pid), "inode": devlog.stat().st_ino,
                 "devlog": str(devlog), "log": str(log), "users": sorted(users)}
        lease_path.write_text(json.dumps(lease))
        return log


def return_syslog(run_id: str, *, dry_run: bool = False) -> list[str]:
    """``run_id`` no longer needs the lent syslog socket; the last live user takes it away. Returns what was
    (or, in a dry run, would be) removed, for a sweep's report."""
    with _machine_lock("syslog"):
        lease_path = runid.state_dir() / SYSLOG_LEASE
        lease = _read_lease(lease_path)
        if not lease or run_id not in lease.get("users", []):
            return []
        users = [u for u in lease["users"] if u != run_id and runid.is_alive(u)]
        if users:
            if not dry_run:
                lease["users"] = users
                lease_path.write_text(json.dumps(lease))
            return []
        removed = []
        pid = int(lease["pid"])
        if process_starttime(pid) == lease["starttime"]:
            if not dry_run:
                _signal(pid, signal.SIGKILL)
                _reap(pid)
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
    return list(_read_lease(runid.state_dir() / SYSLOG_LEASE).get("users", []))


def _unique_dir(base: Path, stem: str) -> Path:
    for n in range(1000):
        candidate = base / f"{stem}-{os.getpid()}-{n}"
        if not candidate.exists():
            return candidate
    raise ServiceError("no free work directory name", path=base)


def build_busybox_oci(out: str | Path, *, name: str = "docker.io/pytest-kata/busybox:1",
                      busybox: str | Path = "/bin/busybox") -> Path:
    """Write an OCI-layout tar with one layer: static busybox and its applet links (no registry needed)."""
    busybox = Path(busybox)
    if not busybox.is_file():
        raise ServiceError("static busybox not found", path=busybox, hint="apt-get install busybox-static")
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer_tar:
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer_tar.addfile(info)
        layer_tar.add(str(busybox), arcname="bin/busybox")
        for applet in ("sh", "uname", "cat", "ls", "id", "hostname", "ps", "mount", "echo", "sleep", "ip",
                       "ping", "wget", "nc", "grep", "true", "false"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            layer_tar.addfile(info)
        for fname, data in (("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", b"root:x:0:\n")):
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            layer_tar.addfile(info, io.BytesIO(data))
    layer = layer_buf.getvalue()
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return "sha256:" + digest, len(data)

    layer_digest, layer_size = blob(gzip.compress(layer, mtime=0))
    config = {"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    config_digest, config_size = blob(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                            "size": layer_size}]}
    manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
    ref = name.split("/", 1)[-1]
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": name}}]}
    out = Path(out)
    with tarfile.open(out, "w") as oci:
        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            oci.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest}", data)
    return out


# --------------------------------------------------------------------------------------------------------
# Process, mount and cgroup helpers shared with the sweep


def process_cmdlines() -> Iterator[tuple[int, list[str]]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            yield int(entry.name), raw.rstrip(b"\0").decode(errors="replace").split("\0")


def shim_files(pid: int) -> list[Path]:
    """The socket (``/run/containerd/s/<hash>``) and fifo dirs (``/run/containerd/fifo/<n>``) a containerd
    shim holds open: a SIGKILLed shim leaves them behind, and their names do not carry the run id."""
    base = RUNC_STATE_ROOT.parent
    inodes: set[str] = set()
    files: set[Path] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
                elif target.startswith(f"{base}/fifo/"):
                    files.add(Path(target).parent)
    if inodes:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 8 and fields[6] in inodes and fields[7].startswith(f"{base}/s/"):
                    files.add(Path(fields[7]))
    return sorted(files)


def kill_with_files(pid: int) -> None:
    """SIGKILL a process, wait for it, then remove the containerd files it held (see :func:`shim_files`)."""
    files = shim_files(pid)
    _signal(pid, signal.SIGKILL)
    _reap(pid)
    deadline = time.monotonic() + 5
    while process_starttime(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        _reap(pid)
    for path in files:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def kill_processes_mentioning(text: str, *, programs: Sequence[str] = ("containerd-shim",),
                              dry_run: bool = False) -> list[str]:
    """SIGKILL processes of the given programs whose command line contains ``text`` (e.g. a run's socket)."""
    killed = []
    for pid, argv in process_cmdlines():
        if pid == os.getpid() or not argv:
            continue
        prog = os.path.basename(argv[0])
        if any(prog.startswith(p) for p in programs) and any(text in arg for arg in argv):
            killed.append(f"process {pid} {prog}")
            if not dry_run:
                kill_with_files(pid)
    return killed


def mountpoints() -> list[str]:
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                points.append(fields[4].encode().decode("unicode_escape"))
    return points


def mounts_under(directory: str | Path) -> list[str]:
    base = str(Path(directory)).rstrip("/") + "/"
    return [m for m in mountpoints() if (m + "/").startswith(base)]


def unmount(point: str) -> bool:
    """Lazily unmount one mount point (MNT_DETACH: a busy mount must not block the clean-up)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return libc.umount2(point.encode(), 2) == 0  # 2 = MNT_DETACH


def unmount_under(directory: str | Path, *, dry_run: bool = False) -> list[str]:
    """Unmount everything mounted at or below ``directory``, deepest first."""
    done = []
    for point in sorted(set(mounts_under(directory)), key=len, reverse=True):
        if dry_run or unmount(point):
            done.append(f"mount {point}")
    return done


def _cgroups_named(name: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [g for g in (root / name, *root.glob(f"*/{name}")) if g.is_dir()]


def kill_cgroup_processes(name: str, *, dry_run: bool = False) -> list[str]:
    """SIGKILL every process in the cgroups ``/sys/fs/cgroup/*/<name>/...``: a container outlives a killed
    shim, but not its cgroup's clean-up."""
    pids: set[int] = set()
    for group in _cgroups_named(name):
        for procs in group.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids |= {int(p) for p in procs.read_text().split()}
    pids.discard(os.getpid())
    if not dry_run:
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(process_starttime(p) is not None for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
    return [f"process {pid} (cgroup {name})" for pid in sorted(pids)]


def remove_cgroups(name: str, *, dry_run: bool = False) -> list[str]:
    """Remove the (empty) cgroups ``/sys/fs/cgroup/*/<name>`` that containerd made for a run's namespace."""
    removed = []
    for group in _cgroups_named(name):
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not dry_run:
                with contextlib.suppress(OSError):
                    sub.rmdir()
        if dry_run:
            removed.append(f"cgroup {group}")
            continue
        try:
            group.rmdir()
            removed.append(f"cgroup {group}")
        except OSError:
            pass
    return removed


def remove_runc_state(namespace: str, *, dry_run: bool = False) -> list[str]:
    """The runc shim keeps its state in ``/run/containerd/runc/<namespace>`` whatever the config says."""
    if not runid.run_id_of(namespace):
        return []  # only namespaces named after a run are ours to remove
    state = RUNC_STATE_ROOT / namespace
    if not state.is_dir():
        return []
    if not dry_run:
        shutil.rmtree(state, ignore_errors=True)
    return [f"runc state {state}"]


def prune_containerd_run_dirs() -> None:
    """Remove the empty ``/run/containerd/{s,fifo,runc}`` dirs the shims and ctr create, when no containerd runs.

    They are created whatever the private config says; leaving them would be a trace of the run. A system
    containerd keeps its socket there, so the directory is never empty (nor touched) while one runs.
    """
    for pid, argv in process_cmdlines():
        if argv and os.path.basename(argv[0]).startswith("containerd") and process_starttime(pid) is not None:
            return
    for d in (RUNC_STATE_ROOT, RUNC_STATE_ROOT.parent / "s", RUNC_STATE_ROOT.parent / "fifo", RUNC_STATE_ROOT.parent):
        with contextlib.suppress(OSError):
            d.rmdir()


# Where a Kata 1.x/2.x shim keeps per-sandbox state on the host (named after the sandbox id, which carries the
# run id): a SIGKILLed shim leaves them behind, with the network namespace file it created (named by Kata).
KATA_STATE_DIRS = (Path("/run/vc/sbs"), Path("/run/vc/vm"), Path("/run/kata-containers/shared/sandboxes"),
                   Path("/run/kata-containers"))


def kata_state_dirs(run_id: str | None = None) -> list[Path]:
    """Kata sandbox state directories named after ``run_id`` (None: after any run)."""
    found = []
    for base in KATA_STATE_DIRS:
        with contextlib.suppress(OSError):
            found += [d for d in base.iterdir() if d.is_dir() and runid.run_id_of(d.name) is not None
                      and (run_id is None or runid.run_id_of(d.name) == run_id)]
    return found


def remove_kata_state(run_id: str, *, dry_run: bool = False) -> list[str]:
    """Remove the Kata state of the run's sandboxes and the network namespace files Kata made for them (only
    when nothing is mounted there any more: a live sandbox's namespace is in use)."""
    removed = []
    for directory in kata_state_dirs(run_id):
        for persist in directory.rglob("persist.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
                netns = Path(json.loads(persist.read_text())["Network"]["NetNsPath"])
                if netns.is_file() and str(netns.resolve()) not in mountpoints():
                    if not dry_run:
                        netns.unlink()
                    removed.append(f"kata netns file {netns}")
        if mounts_under(directory):
            continue
        if not dry_run:
            shutil.rmtree(directory, ignore_errors=True)
        removed.append(f"kata state {directory}")
    return removed


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "(no output)"
