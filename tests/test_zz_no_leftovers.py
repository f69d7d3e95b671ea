"""No leftovers: a whole pytest-kata run leaves no domain, netns, link, process, daemon, mount or file behind.

Named ``zz`` to run last. A run's own session-scoped resources (hosts, networks) legitimately exist until
its session ends, so the check runs a complete child session — one that builds every kind of resource the
harness makes — and inspects the machine after the child has exited. It also checks that no *dead* run left
anything (the child's start sweep must have removed it); resources of other live runs are never flagged.
``PYTEST_KATA_LEFTOVER_TARGETS="tests/ suites/"`` makes the child run those paths instead of the sample.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_kata import runid, services
from pytest_kata.sweep import leftovers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the resources checked need root")

SAMPLE = textwrap.dedent("""
    import os, shutil, subprocess, pathlib
    import pytest
    from pytest_kata import services
    from pytest_kata.resources import cache_dir

    def test_network(kata_network):
        a, b = kata_network.add_peer("a"), kata_network.add_peer("b")
        assert kata_network.ping(a, b.ip)
        kata_network.attach_tap("h0")

    def test_daemon_and_scratch(kata_run_id):
        fake = subprocess.Popen(["sleep", "600"], start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        services.register_daemon(kata_run_id, "fake-daemon", fake.pid)
        scratch = cache_dir() / "runs" / kata_run_id
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "overlay.qcow2").write_bytes(b"x")

    @pytest.mark.skipif(not shutil.which("libvirtd"), reason="no libvirtd")
    def test_libvirt_domain_left_running(kata_libvirtd, kata_run_id):
        import libvirt
        disk = cache_dir() / "runs" / kata_run_id / "left.qcow2"
        disk.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        conn = libvirt.open(kata_libvirtd.uri)
        dom = conn.defineXML(f'''<domain type="qemu"><name>{kata_run_id}-left</name>
            <memory unit="MiB">32</memory><vcpu>1</vcpu><os><type arch="x86_64">hvm</type></os>
            <devices><disk type="file" device="disk"><driver name="qemu" type="qcow2"/>
            <source file="{disk}"/><target dev="vda" bus="virtio"/></disk>
            <memballoon model="none"/></devices></domain>''')
        dom.create()  # deliberately neither destroyed nor undefined: the run's end must do it
        dom.snapshotCreateXML("<domainsnapshot><name>clean</name></domainsnapshot>", 0)

    @pytest.mark.skipif(not shutil.which("containerd"), reason="no containerd")
    def test_containerd_left_running(kata_run_id, tmp_path):
        ctd = services.start_containerd(None, kata_run_id)  # deliberately not stopped: the run's end must
        image = services.build_busybox_oci(tmp_path / "bb.tar")
        ctd.import_image(image)
        ctd.ctr("run", "-d", "--runtime", "io.containerd.runc.v2", "docker.io/pytest-kata/busybox:1",
                f"{kata_run_id}-bg", "sleep", "600")
""")


def test_a_finished_run_leaves_nothing_and_no_dead_run_left_anything(pytester: pytest.Pytester) -> None:
    started = time.time()
    containerd_run_dir = Path("/run/containerd")
    had_containerd_run_dir = containerd_run_dir.exists()
    targets = os.environ.get("PYTEST_KATA_LEFTOVER_TARGETS", "").split()
    if not targets:
        pytester.makepyfile(test_sample=SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != runid.ENV}
    child = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", *targets],
                           cwd=pytester.path if not targets else None, env=env, capture_output=True, text=True,
                           timeout=3600)
    match = re.search(r"kata run: (kt-[0-9a-f]{8})", child.stdout)
    assert match, child.stdout[-2000:] + child.stderr[-2000:]
    child_run = match.group(1)
    if not targets:
        assert child.returncode == 0, child.stdout[-3000:]
    assert not runid.is_alive(child_run)
    assert leftovers(child_run) == [], "the run's end must remove everything it made"
    assert not [p for p, argv in services.process_cmdlines() if any(child_run in a for a in argv)]
    containerd_running = any(os.path.basename(argv[0]).startswith("containerd")
                             for _pid, argv in services.process_cmdlines() if argv)
    if not had_containerd_run_dir and not containerd_running:
        assert not containerd_run_dir.exists(), "shim sockets and fifos of killed shims are removed too"

    def died_before_check(line: str) -> bool:
        """Leftovers of a run that died while this test ran are the next run's to sweep, not a failure."""
        rid = line.split(":", 1)[0]
        pidfile = runid.state_dir() / f"{rid}.pid"
        try:
            return pidfile.stat().st_mtime < started
        except OSError:
            return True  # no pid file at all: nobody owns it

    stale = [line for line in leftovers() if died_before_check(line)]
    assert stale == [], "leftovers of dead runs survived a run's start sweep"


def test_the_check_sees_a_leftover(pytester: pytest.Pytester) -> None:
    """Negative control: the same check flags a run that did leave something."""
    if not shutil.which("sleep"):
        pytest.skip("no sleep")
    rid = runid.new_run_id()
    runid.register(rid)
    fake = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        services.register_daemon(rid, "fake-daemon", fake.pid)
        dead = subprocess.Popen(["true"])
        dead.wait()
        runid.register(rid, pid=dead.pid)
        assert any(f"daemon fake-daemon (pid {fake.pid})" in line for line in leftovers(rid))
    finally:
        fake.kill()
        fake.wait()
        from pytest_kata.sweep import sweep

        sweep(dead_only=True, run_id=rid)
    assert leftovers(rid) == []
