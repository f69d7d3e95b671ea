"""Real hosts: libvirt domains (TCG here) booted from the cached host image, through the real fixtures.

One host is booted per session (``kata_host``) and reverted before each test, so the whole module costs one
boot plus a few reverts; the boot-failure test spends a few seconds on a host that cannot make its deadline.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kata.hosts.base import HostError
from pytest_kata.services import ensure_libvirtd

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vm,
    pytest.mark.xdist_group("kata-hosts"),  # one worker, one session host (with -n 2 --dist loadgroup)
    pytest.mark.skipif(os.geteuid() != 0, reason="libvirt's system URI and image builds need root"),
    pytest.mark.skipif(not shutil.which("libvirtd") or not shutil.which("mmdebstrap"),
                       reason="libvirtd/mmdebstrap not installed (scripts/setup installs them)"),
    pytest.mark.skipif(not list(Path("/boot").glob("vmlinuz-*")), reason="no Debian kernel in /boot"),
]


def _random_file(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_boot_and_run(kata_host) -> None:
    from pytest_kata.images.common import host_kernel

    assert kata_host.run("uname -r").stdout.strip() == host_kernel().release
    result = kata_host.run("echo out; echo err >&2; exit 7")
    assert (result.rc, result.stdout, result.stderr) == (7, "out\n", "err\n")
    with pytest.raises(HostError, match="exit 7"):
        kata_host.run("exit 7", check=True)
    assert kata_host.run("cat", stdin=b"line1\nline2").stdout == "line1\nline2"
    assert kata_host.run("for i in 1 2; do\n  echo \"n=$i 'q'\"\ndone").stdout == "n=1 'q'\nn=2 'q'\n"
    slow = kata_host.run("echo started; sleep 30", timeout=2)
    assert slow.rc == 124 and slow.stdout == "started\n"
    assert kata_host.run("echo alive").stdout == "alive\n", "the console resynchronises after a timeout"
    assert kata_host.run("systemctl is-active containerd").stdout.strip() == "active"


def test_domain_is_labelled_and_uses_the_detected_accelerator(kata_host) -> None:
    from pytest_kata.hosts.accel import detect_accel

    root = ET.fromstring(kata_host.dom.XMLDesc(0))
    accel, _ = detect_accel("auto")
    assert root.get("type") == ("kvm" if accel == "kvm" else "qemu")
    if accel == "tcg":
        assert root.find("cpu").get("mode") == "maximum"
    assert kata_host.run_id in kata_host.name and kata_host.run_id in ET.tostring(root.find("metadata"), "unicode")
    assert os.environ.get("PYTEST_XDIST_WORKER", "main") in kata_host.name


def test_put_and_get_small_and_large_files(kata_host, tmp_path: Path) -> None:
    small_sum = _random_file(tmp_path / "small", 10_000)
    kata_host.put(tmp_path / "small", "/root/in/small", mode=0o640)
    assert kata_host.run("stat -c %a /root/in/small; sha256sum < /root/in/small").stdout.split()[:2] == \
        ["640", small_sum]
    large_sum = _random_file(tmp_path / "large", 300_000)  # above the console limit: a transfer disk
    kata_host.put(tmp_path / "large", "/root/in/large")
    assert kata_host.run("sha256sum < /root/in/large").stdout.split()[0] == large_sum
    assert kata_host.run("lsblk -dno NAME").stdout.split() == ["vda"], "the transfer disk is detached"
    kata_host.get("/root/in/large", tmp_path / "large.back")
    kata_host.get("/root/in/small", tmp_path / "small.back")
    assert (tmp_path / "large.back").read_bytes() == (tmp_path / "large").read_bytes()
    assert (tmp_path / "small.back").read_bytes() == (tmp_path / "small").read_bytes()
    with pytest.raises(HostError, match="cannot read /nonexistent"):
        kata_host.get("/nonexistent", tmp_path / "x")
    with pytest.raises(HostError, match="no such local file"):
        kata_host.put(tmp_path / "missing", "/root/x")


def test_snapshot_change_revert(kata_host) -> None:
    kata_host.run("echo v1 > /root/state", check=True)
    kata_host.snapshot("before-change")
    kata_host.run("echo v2 > /root/state; touch /root/new; modprobe -r vhost_vsock", check=True)
    assert "vhost_vsock" not in kata_host.run("lsmod").stdout
    kata_host.revert("before-change")
    assert kata_host.run("cat /root/state").stdout == "v1\n"
    assert kata_host.run("test -e /root/new").rc == 1
    assert "vhost_vsock" in kata_host.run("lsmod").stdout, "loaded modules come back with the snapshot"
    with pytest.raises(HostError, match="cannot revert to snapshot 'nope'"):
        kata_host.revert("nope")


def test_revert_between_tests_part_1(kata_host) -> None:
    kata_host.run("touch /root/leak", check=True)


def test_revert_between_tests_part_2(kata_host) -> None:
    assert kata_host.run("test -e /root/leak").rc == 1, "the previous test's file survived the revert"


L2_INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo "L2-READY $(/bin/busybox uname -r) $(/bin/busybox dmesg | /bin/busybox grep -o 'Hypervisor detected: [A-Za-z]*')"
/bin/busybox poweroff -f
"""
L2_QEMU = ("timeout 240 qemu-system-x86_64 -enable-kvm -cpu host -m 256 -smp 1 -kernel /root/vmlinuz "
           "-initrd /root/l2.cpio.gz -append 'console=ttyS0 quiet panic=-1' -nographic -no-reboot")


def test_nested_kvm_sandbox_vm_starts_inside_the_host(kata_host, tmp_path: Path) -> None:
    from pytest_kata.images.common import host_kernel

    kernel = host_kernel()
    kata_host.run("grep -qw svm /proc/cpuinfo && modprobe kvm_amd || modprobe kvm_intel", check=True)
    assert kata_host.run("test -c /dev/kvm").ok, "/dev/kvm exists inside the host"
    kata_host.put(kernel.vmlinuz, "/root/vmlinuz")
    (tmp_path / "init").write_text(L2_INIT)
    kata_host.put(tmp_path / "init", "/root/l2/init", mode=0o755)
    kata_host.run("mkdir -p /root/l2/bin /root/l2/proc && cp /bin/busybox /root/l2/bin/ && cd /root/l2 && "
                  "find . | cpio -o -H newc 2>/dev/null | gzip -1 > /root/l2.cpio.gz", check=True)
    booted = kata_host.run(L2_QEMU, timeout=300)
    assert f"L2-READY {kernel.release} Hypervisor detected: KVM" in booted.stdout, booted.stdout[-2000:]
    # negative control: without the KVM module the same VM cannot start
    kata_host.run("rmmod kvm_amd kvm_intel 2>/dev/null; true")
    refused = kata_host.run(L2_QEMU.replace("timeout 240", "timeout 60"), timeout=90)
    assert refused.rc != 0 and "kvm" in (refused.stderr + refused.stdout).lower()


@pytest.mark.kata_hosts(2)
def test_two_hosts_on_a_test_network_ping_each_other(kata_hosts, kata_network) -> None:
    first, second = kata_hosts
    assert first.name != second.name
    ip_first, ip_second = first.attach_network(kata_network), second.attach_network(kata_network)
    assert first.run(f"ping -n -c 2 -W 3 {ip_second}").ok
    assert second.run(f"ping -n -c 2 -W 3 {ip_first}").ok
    peer = kata_network.add_peer("probe")
    assert peer.ping(ip_first) and peer.ping(ip_second)
    nobody = kata_network.allocate_ip("nobody")  # negative control: an address no one holds stays silent
    assert not first.run(f"ping -n -c 1 -W 1 {nobody}").ok


def test_unreachable_host_fails_with_console_attached(pytester: pytest.Pytester) -> None:
    import libvirt

    ensure_libvirtd()  # this run's libvirtd, so the inner run's end (which removes what it started) leaves it up
    pytester.makepyfile("def test_needs_host(kata_host):\n    kata_host.run('true')\n")
    # 30 s: the kernel has printed by then even on a loaded machine; a host is ready only after 35-70 s
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--kata-boot-timeout=30", "-rA")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    match = re.search(r"host (kt-[0-9a-f]{8})-\S+ unreachable after \d+ s, last console lines: (.*)", out)
    assert match, out[-3000:]
    assert "(nothing printed)" not in match.group(2)
    assert "kata host console (boot failure)" in out
    inner_run = match.group(1)
    conn = libvirt.open("qemu:///system")
    try:
        assert not [d.name() for d in conn.listAllDomains(0) if inner_run in d.name()]
        assert not [p.name() for p in conn.listAllStoragePools(0) if inner_run in p.name()]
    finally:
        conn.close()
    from pytest_kata.resources import cache_dir

    assert not (cache_dir() / "runs" / inner_run).exists()
    assert not [p for p in Path("/proc").glob("[0-9]*/cmdline") if inner_run.encode() in _read(p)], \
        "a qemu of the failed host still runs"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
