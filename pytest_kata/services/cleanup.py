"""Clean-up of what containerd, its shims and Kata leave on the machine, shared by a run's end and the sweep:
processes holding a run's socket, mounts below a work directory, cgroups and runc/Kata state named after a
run, and the empty ``/run`` directories the shims create."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from pytest_kata import runid
from pytest_kata.processes import cmdlines, reap, send_signal, start_time

RUNC_STATE_ROOT = Path("/run/containerd/runc")
MNT_DETACH = 2


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
    send_signal(pid, signal.SIGKILL)
    reap(pid)
    deadline = time.monotonic() + 5
    while start_time(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
        reap(pid)
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
    for pid, argv in cmdlines():
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
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.umount2(point.encode(), MNT_DETACH) == 0


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
            send_signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(start_time(p) is not None for p in pids) and time.monotonic() < deadline:
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
    for pid, argv in cmdlines():
        if argv and os.path.basename(argv[0]).startswith("containerd") and start_time(pid) is not None:
            return
    for d in (RUNC_STATE_ROOT, RUNC_STATE_ROOT.parent / "s", RUNC_STATE_ROOT.parent / "fifo", RUNC_STATE_ROOT.parent):
        with contextlib.suppress(OSError):
            d.rmdir()


# Where a Kata 1.x/2.x shim keeps per-sandbox state on the host (named after the sandbox id, which carries the
# run id): a SIGKILLed shim leaves them behind, with the network namespace file it created (named by Kata).
KATA_SHARED_SANDBOXES = Path("/run/kata-containers/shared/sandboxes")  # a sandbox's host side of its share
KATA_STATE_DIRS = (Path("/run/vc/sbs"), Path("/run/vc/vm"), KATA_SHARED_SANDBOXES, Path("/run/kata-containers"))


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


def prune_kata_run_dirs() -> None:
    """Remove the empty ``/run/vc`` and ``/run/kata-containers`` trees Kata shims create, when none runs: like
    :func:`prune_containerd_run_dirs`, they would be a trace of the run (only empty directories go)."""
    for _pid, argv in cmdlines():
        if argv and os.path.basename(argv[0]).startswith("containerd-shim-kata"):
            return
    for d in (*KATA_STATE_DIRS[:3], Path("/run/vc"), Path("/run/kata-containers/shared"), KATA_STATE_DIRS[3]):
        with contextlib.suppress(OSError):
            d.rmdir()
