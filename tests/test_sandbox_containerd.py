"""The containerd driver for real, with runc as the runtime handler (the negative control of the suites)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pytest_kata.sandbox import Mount, Workload
from pytest_kata.sandbox.containerd import ContainerdDriver

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("containerd") and shutil.which("runc")),
                                reason="needs root, containerd and runc")


@pytest.fixture(scope="module")
def runc():
    driver = ContainerdDriver("runc")
    driver.start()
    yield driver
    driver.stop()


def test_runc_workload_runs_on_the_host_kernel(runc):
    facts = runc.probe()
    assert runc.is_vm is False
    assert facts["kernel_release"] == os.uname().release
    assert facts["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert facts["uid"] == 0 and facts["interfaces"] == ["lo"]


def test_workload_parameters_reach_the_container(runc, tmp_path):
    (tmp_path / "data").write_text("x")
    plain = runc.probe(Workload(mounts=[Mount(str(tmp_path), "/volume")], host_paths=["/volume/data"]))
    privileged = runc.probe(Workload(privileged=True))
    assert plain["host_paths"] == {"/volume/data": True}
    assert any(" /volume " in m and m.split()[3].startswith("ro") for m in plain["mounts"])
    assert privileged.capeff > plain.capeff and privileged.capeff & (1 << 21)


def test_writes_are_refused_outside_a_vm(runc):
    facts = runc.probe(Workload(privileged=True, writes=True))
    assert "writes" not in facts and "runc is no VM" in facts["writes_refused"]
    assert Path("/proc/sys/kernel/core_pattern").read_text().strip() != "|/kata-escape-kata-probe"


def test_host_view_shows_a_container_not_a_vm(runc):
    view = runc.host_view()
    assert not view.is_vm and "runc is no VM" in view.note
    assert [p.argv for p in view.processes if p.role == "container"] == [["sleep", "3600"]]


def test_stop_leaves_no_daemon():
    driver = ContainerdDriver("runc")
    driver.start()
    pid, workdir = driver.ctd.pid, driver.ctd.workdir
    driver.stop()
    assert not running(pid) and not workdir.exists()


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_driving_a_hosts_containerd_through_the_host_protocol():
    """The staging-host path (``host=``): the same driver on a Host's existing containerd. Here the Host is the
    LocalHost provider and the containerd a private one, so the path runs for real without a VM."""
    from pytest_kata.hosts.base import LocalHost
    from pytest_kata.services import start_containerd

    ctd = start_containerd()
    try:
        driver = ContainerdDriver("runc", host=LocalHost("staging"), address=str(ctd.socket))
        driver.start()
        try:
            assert Path(driver.remote_tar).is_file()  # the image went over host.put
            assert driver.probe()["kernel_release"] == os.uname().release
            assert driver.describe()["host"] == "staging"
            assert any(p.role == "container" for p in driver.host_view().processes)
        finally:
            driver.stop()
        assert not Path(driver.remote_tar).exists()
        assert driver.namespace not in ctd.ctr("namespaces", "ls", "-q", check=False).stdout.split()
    finally:
        ctd.stop()


def test_a_host_without_containerd_is_unavailable():
    from pytest_kata.hosts.base import LocalHost
    from pytest_kata.sandbox import SandboxUnavailable

    driver = ContainerdDriver("runc", host=LocalHost("staging"), address="/nonexistent/containerd.sock")
    with pytest.raises(SandboxUnavailable, match="containerd does not answer"):
        driver.start()
