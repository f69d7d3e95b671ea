"""Daemons started by hand and stopped by pid: a private containerd running a busybox OCI image with runc,
libvirtd (started only when none answers), and the pid-reuse guard of the daemon records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_kata import runid, services
from pytest_kata.services import ServiceError, libvirtd

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


START_STOP = """
import json, os, sys
os.environ["PYTEST_KATA_QUIET"] = "1"
from pytest_kata import runid, services
rid = runid.current_run_id()
out = {"answered_before": services.libvirt_answers()}
daemon = services.ensure_libvirtd(rid)
out.update(external=daemon.external, pids={r.name: [r.pid, r.starttime] for r in daemon.records},
           answers=services.libvirt_answers(), recorded=sorted(r.name for r in services.daemon_records(rid)))
open(sys.argv[1], "w").write(json.dumps(out))
daemon.stop()
out.update(answers_after=services.libvirt_answers(), alive_after=[r.name for r in daemon.records if r.matches()],
           recorded_after=[r.name for r in services.daemon_records(rid)])
open(sys.argv[1], "w").write(json.dumps(out))
"""


@root_only
@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("libvirtd") and shutil.which("unshare")), reason="libvirtd/unshare absent")
def test_ensure_libvirtd_starts_and_stops_its_own_daemons_by_pid(tmp_path: Path) -> None:
    """The CI path, where no libvirtd runs: proven in a private mount namespace with an empty /run, so that
    a libvirtd already running on this machine (a user's, another run's) neither answers nor is disturbed."""
    script, result = tmp_path / "start_stop.py", tmp_path / "result.json"
    script.write_text(START_STOP)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f"mount -t tmpfs pytest-kata-run /run && exec {sys.executable} {script} {result}"],
                          capture_output=True, text=True, timeout=180)
    out = json.loads(result.read_text()) if result.exists() else {}
    for pid, start in out.get("pids", {}).values():  # whatever happened, nothing may outlive the test
        if services.process_starttime(pid) == start:
            os.kill(pid, 9)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out["answered_before"] is False
    assert out["external"] is False and set(out["pids"]) == {"libvirtd", "virtlogd"}
    assert out["answers"] is True and out["recorded"] == ["libvirtd", "virtlogd"]
    assert out["answers_after"] is False and out["alive_after"] == [] and out["recorded_after"] == []


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


def test_a_libvirtd_another_live_run_uses_is_handed_over_not_stopped() -> None:
    """One libvirtd serves the machine: when its owner ends while another run relies on it, that run
    inherits it (and stops it at its own end). A `sleep` stands in for libvirtd. The owner is a private run
    id, not this session's: another xdist worker may have real daemons recorded under the session's id."""
    kata_run_id = runid.new_run_id()
    runid.register(kata_run_id)
    user = runid.new_run_id()
    runid.register(user)
    proc, logd = _sleeper(), _sleeper()
    try:
        logd_record = services.register_daemon(kata_run_id, "virtlogd", logd.pid)
        record = services.register_daemon(kata_run_id, "libvirtd", proc.pid)
        daemon = services.Daemon("libvirtd", kata_run_id, external=False, pid=proc.pid,
                                 records=[logd_record, record])
        (runid.run_dir(user) / services.LIBVIRT_USER_MARK).write_text(f"{proc.pid} {record.starttime}\n")
        daemon.stop()
        assert proc.poll() is None and logd.poll() is None, "daemons another live run uses keep running"
        inherited = sorted(services.daemon_records(user), key=lambda r: r.name)
        assert [(r.name, r.pid) for r in inherited] == [("libvirtd", proc.pid), ("virtlogd", logd.pid)]
        assert not any(r.pid in (proc.pid, logd.pid) for r in services.daemon_records(kata_run_id))
        # negative control: with no other user left, the heir's end stops both
        heir = services.Daemon("libvirtd", user, external=False, pid=proc.pid, records=inherited[::-1])
        heir.stop()
        assert proc.wait(timeout=10) is not None and logd.wait(timeout=10) is not None
    finally:
        for p in (proc, logd):
            if p.poll() is None:
                p.kill()
                p.wait()
        for rid in (user, kata_run_id):
            runid.unregister(rid)
            shutil.rmtree(runid.state_dir() / rid, ignore_errors=True)


@root_only
def test_autostart_libvirt_networks_block_starting_libvirtd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            kata_run_id: str) -> None:
    """A harness-started libvirtd must not bring up a NAT network in the root netns: refuse, clearly."""
    autostart = tmp_path / "autostart"
    autostart.mkdir()
    (autostart / "default.xml").write_text("<network/>")
    monkeypatch.setattr(libvirtd, "LIBVIRT_AUTOSTART_NETWORKS", autostart)
    monkeypatch.setattr(libvirtd, "libvirt_answers", lambda uri=services.DEFAULT_URI: False)
    with pytest.raises(ServiceError, match="default are marked autostart"):
        services.ensure_libvirtd(kata_run_id)
