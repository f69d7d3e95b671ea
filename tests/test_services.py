"""Daemons started by hand and stopped by pid: a private containerd running a busybox OCI image with runc,
libvirtd (started only when none answers), and the pid-reuse guard of the daemon records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_kata import runid, services
from pytest_kata.services import ServiceError

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "300"], start_new_session=True)


def test_a_registered_daemon_is_stopped_by_pid(kata_run_id: str) -> None:
    proc = _sleeper()
    record = services.register_daemon(kata_run_id, "fake", proc.pid)
    assert record.path.parent == runid.state_dir() / kata_run_id / "daemons"
    assert json.loads(record.path.read_text())["run_id"] == kata_run_id
    assert [r.pid for r in services.daemon_records(kata_run_id)].count(proc.pid) == 1
    assert services.stop_process(record, timeout=5)
    assert proc.wait(timeout=5) is not None
    assert not record.path.exists()
    assert not services.stop_process(record), "stopping twice is a no-op"


def test_a_recycled_pid_is_never_killed(kata_run_id: str) -> None:
    proc = _sleeper()
    try:
        record = services.register_daemon(kata_run_id, "fake", proc.pid)
        record.starttime += 1  # as if the pid now belonged to another process
        assert not record.matches()
        assert not services.stop_process(record, timeout=1)
        assert proc.poll() is None, "a process that is not the recorded one must survive"
    finally:
        proc.kill()
        proc.wait()


def test_registering_a_dead_process_is_an_error(kata_run_id: str) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(ServiceError, match="not running"):
        services.register_daemon(kata_run_id, "gone", proc.pid)


def test_busybox_oci_archive_is_a_valid_layout(tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static is not installed")
    out = services.build_busybox_oci(tmp_path / "bb.tar")
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    assert {"oci-layout", "index.json"} <= names
    manifest = index["manifests"][0]
    assert manifest["annotations"]["io.containerd.image.name"] == "docker.io/pytest-kata/busybox:1"
    assert f"blobs/sha256/{manifest['digest'].split(':')[1]}" in names
    with pytest.raises(ServiceError, match="busybox"):
        services.build_busybox_oci(tmp_path / "x.tar", busybox=tmp_path / "missing")


@root_only
@pytest.mark.skipif(not (shutil.which("containerd") and shutil.which("runc")), reason="containerd/runc absent")
def test_private_containerd_runs_a_container_with_runc_and_leaves_nothing(kata_run_id: str,
                                                                        tmp_path: Path) -> None:
    if not Path("/bin/busybox").is_file():
        pytest.skip("busybox-static is not installed")
    image = services.build_busybox_oci(tmp_path / "bb.tar")
    workdir = tmp_path / "ctd"
    ctd = services.start_containerd(workdir, kata_run_id)
    try:
        assert ctd.socket == workdir / "containerd.sock" and ctd.socket.is_socket()
        assert ctd.namespace == kata_run_id
        assert any(r.pid == ctd.pid for r in services.daemon_records(kata_run_id))
        assert ctd.import_image(image) == ["docker.io/pytest-kata/busybox:1"]
        run = ctd.ctr("run", "--rm", "--runtime", "io.containerd.runc.v2", "docker.io/pytest-kata/busybox:1",
                      f"{kata_run_id}-c1", "sh", "-c", "echo hello-$((6*7)); cat /proc/1/cgroup")
        assert "hello-42" in run.stdout
        assert f"/{kata_run_id}/{kata_run_id}-c1" in run.stdout, "the container's cgroup carries the run id"
        with pytest.raises(ServiceError, match="ctr run"):
            ctd.ctr("run", "--rm", "docker.io/pytest-kata/absent:1", f"{kata_run_id}-c2", "true")
    finally:
        ctd.stop()
    assert not ctd.record.matches(), "containerd is stopped by its pid"
    assert not services.kill_processes_mentioning(str(ctd.socket), dry_run=True), "no shim is left"
    assert not services.mounts_under(tmp_path)
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{kata_run_id}"))
    assert not (services.RUNC_STATE_ROOT / kata_run_id).exists()
    assert not any(r.pid == ctd.pid for r in services.daemon_records(kata_run_id))
    assert not workdir.exists(), "a work directory the harness created is removed"


@root_only
def test_containerd_with_a_bad_work_directory_is_a_clear_error(kata_run_id: str, tmp_path: Path) -> None:
    too_long = tmp_path / ("x" * 120)
    with pytest.raises(ServiceError, match="too long"):
        services.start_containerd(too_long, kata_run_id)


@root_only
@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("libvirtd"), reason="libvirtd is not installed")
def test_ensure_libvirtd_starts_and_stops_by_pid_or_uses_the_running_one(kata_run_id: str) -> None:
    """Passes either way: a libvirtd someone else started is used and left running; otherwise ours is
    started, answers, and is stopped by its recorded pid."""
    already = services.libvirt_answers()
    daemon = services.ensure_libvirtd(kata_run_id)
    assert services.libvirt_answers()
    if already:
        assert daemon.external and not daemon.records
        daemon.stop()
        assert services.libvirt_answers(), "an external libvirtd is never stopped"
        if daemon.pid:
            assert (runid.state_dir() / kata_run_id / services.LIBVIRT_USER_MARK).exists()
        return
    assert not daemon.external and daemon.pid
    names = {r.name for r in daemon.records}
    assert "libvirtd" in names
    recorded = {r.pid for r in services.daemon_records(kata_run_id)}
    assert {r.pid for r in daemon.records} <= recorded
    again = services.ensure_libvirtd(kata_run_id)
    assert again.external and again.pid == daemon.pid, "a second call reuses the daemon"
    daemon.stop()
    handed_over = [r for r in daemon.records if r.matches()]
    if handed_over:  # another live run started to use it meanwhile: that run owns it now
        owners = {p.parent.parent.name for p in runid.state_dir().glob("kt-*/daemons/libvirtd-*.json")
                  if json.loads(p.read_text())["pid"] == daemon.pid}
        assert owners and kata_run_id not in owners
    else:
        assert not services.libvirt_answers()
        assert not any(r.matches() for r in daemon.records)
