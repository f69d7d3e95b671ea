"""Daemons a run needs (libvirtd + virtlogd, containerd, a syslog socket), started by hand and stopped by PID.

The machines pytest-kata runs on often have no systemd (CI containers, Firecracker VMs), so the harness
starts what it needs itself — and must then be the one that stops it, even after a crash.

- :mod:`.records`: the pid files labelled with the run id of every daemon a run starts, and the one way to
  start one and wait until it answers;
- :mod:`.libvirtd`: :func:`ensure_libvirtd` (the running one, or one started and recorded);
- :mod:`.containerd`: :func:`start_containerd`, a private containerd that never touches a system one;
- :mod:`.syslog`: ``/dev/log`` lent to the runs whose Kata shims need it;
- :mod:`.cleanup`: what containerd, shims and Kata leave behind, for a run's end and the sweep.
"""

from __future__ import annotations

from pytest_kata.processes import cmdlines as process_cmdlines
from pytest_kata.processes import start_time as process_starttime
from pytest_kata.services.cleanup import (
    KATA_STATE_DIRS,
    RUNC_STATE_ROOT,
    kata_state_dirs,
    kill_cgroup_processes,
    kill_processes_mentioning,
    kill_with_files,
    mountpoints,
    mounts_under,
    prune_containerd_run_dirs,
    prune_kata_run_dirs,
    remove_cgroups,
    remove_kata_state,
    remove_runc_state,
    shim_files,
    unmount,
    unmount_under,
)
from pytest_kata.services.containerd import (
    PRIVATE_MOUNTS_ARGV,
    Containerd,
    build_busybox_oci,
    containerd_config,
    ctr_answers,
    launch_containerd,
    start_containerd,
    unique_dir,
)
from pytest_kata.services.libvirtd import (
    DEFAULT_URI,
    LIBVIRT_AUTOSTART_NETWORKS,
    LIBVIRT_SOCKET,
    LIBVIRT_USED_MARK,
    LIBVIRT_USER_MARK,
    LIBVIRTD_PIDFILE,
    VIRTLOGD_PIDFILE,
    Daemon,
    ensure_libvirtd,
    hand_over_libvirtd,
    libvirt_answers,
    libvirt_users,
    serving_libvirtd_pid,
)
from pytest_kata.services.records import (
    DaemonRecord,
    ServiceError,
    daemon_records,
    daemons_dir,
    register_daemon,
    stop_process,
)
from pytest_kata.services.syslog import DEVLOG, SYSLOG_LEASE, lend_syslog, return_syslog, syslog_users

__all__ = [
    "DEFAULT_URI", "DEVLOG", "KATA_STATE_DIRS", "LIBVIRTD_PIDFILE", "LIBVIRT_AUTOSTART_NETWORKS", "LIBVIRT_SOCKET",
    "LIBVIRT_USED_MARK", "LIBVIRT_USER_MARK", "PRIVATE_MOUNTS_ARGV", "RUNC_STATE_ROOT", "SYSLOG_LEASE",
    "VIRTLOGD_PIDFILE", "Containerd", "Daemon", "DaemonRecord", "ServiceError", "build_busybox_oci",
    "containerd_config", "ctr_answers", "daemon_records", "daemons_dir", "ensure_libvirtd", "hand_over_libvirtd",
    "kata_state_dirs", "kill_cgroup_processes", "kill_processes_mentioning", "kill_with_files",
    "launch_containerd", "lend_syslog", "libvirt_answers", "libvirt_users", "mountpoints", "mounts_under",
    "process_cmdlines", "process_starttime", "prune_containerd_run_dirs", "prune_kata_run_dirs",
    "register_daemon", "remove_cgroups", "remove_kata_state", "remove_runc_state", "return_syslog",
    "serving_libvirtd_pid", "shim_files", "start_containerd", "stop_process", "syslog_users", "unique_dir",
    "unmount", "unmount_under",
]
