"""The direct driver for real: boot a guest kernel + image under QEMU (TCG here), probe it, read the host side,
stop without leftovers. One boot of a small stand-in candidate (busybox image) for the whole module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_kata.bundle import open_bundle
from pytest_kata.sandbox import SandboxError, Workload
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec
from pytest_kata.sandbox.variants import stand_in_tree

REPO = Path(__file__).resolve().parents[1]
HARDENED = REPO / "fixtures" / "configs" / "hardened" / "configuration-qemu.toml"

pytestmark = pytest.mark.skipif(not Path("/usr/bin/qemu-system-x86_64").exists(), reason="qemu is not installed")


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    if not HARDENED.is_file():
        pytest.skip(f"{HARDENED} is missing")
    tree = stand_in_tree(tmp_path_factory.mktemp("cand"), HARDENED, version="4.1.0", image=True)
    driver = DirectDriver(GuestSpec.from_bundle(open_bundle(tree)))
    driver.start()
    yield driver
    driver.stop()


@pytest.mark.slow
def test_direct_sandbox_runs_the_guest_kernel_and_drops_privileges(booted):
    root = booted.probe(Workload(privileged=True))
    user = booted.probe(Workload(privileged=False))
    assert root["kernel_release"] == booted.guest_kernel_release()
    assert root["boot_id"] != Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert root["uid"] == 0 and root.capeff != 0
    assert user["uid"] == 65534 and user.capeff == 0
    assert "/dev/vda1 / ext4 ro" in " ".join(root["mounts"])  # the image, read-only, as Kata mounts it
    assert root["interfaces"] == ["lo"]  # no NIC: networks are unreachable by construction


@pytest.mark.slow
def test_direct_sandbox_host_view_and_readonly_image(booted):
    view = booted.host_view()
    assert view.is_vm and [p.role for p in view.processes] == ["vmm"]
    argv = " ".join(view.vmm()[0].argv)
    assert "-accel tcg" in argv or "-accel kvm" in argv
    assert f"file={booted.image_path}" in argv and "readonly=on" in argv
    assert any(str(booted.spec.kernel) in f or "kata" in f for f in view.vmm()[0].open_files)
    facts = booted.probe(Workload(privileged=True, writes=True, mark="kt-test"))
    assert facts["writes"]["disk_write"] != "ok" and facts["writes"]["core_pattern"] == "ok"
    assert booted.image_sha256() == booted.image_sha_at_start


@pytest.mark.slow
def test_direct_sandbox_stops_without_leftovers(tmp_path):
    if not HARDENED.is_file():
        pytest.skip(f"{HARDENED} is missing")
    tree = stand_in_tree(tmp_path / "c", HARDENED)
    driver = DirectDriver(GuestSpec.from_bundle(open_bundle(tree)))
    driver.start()
    pid, workdir = driver.child.pid, driver.workdir
    assert driver.probe()["kernel_release"]
    driver.stop()
    driver.stop()  # idempotent
    assert not Path(f"/proc/{pid}").exists() and not workdir.exists()


def test_a_guest_that_never_boots_fails_fast_with_the_console_tail(tmp_path):
    """Negative control: a 'kernel' that is not one must give a clear error, and no QEMU is left running."""
    if not HARDENED.is_file():
        pytest.skip(f"{HARDENED} is missing")
    tree = stand_in_tree(tmp_path / "c", HARDENED)
    kernel = tree / "share/kata-containers/vmlinuz-stand-in"
    kernel.write_bytes(b"not a kernel" * 100)
    driver = DirectDriver(GuestSpec.from_bundle(open_bundle(tree)), boot_timeout=30)
    with pytest.raises(SandboxError, match="did not reach its console"):
        driver.start()
    assert driver.child is None
    assert not any(driver.vm_name in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                   for p in os.listdir("/proc") if p.isdigit() and Path(f"/proc/{p}/cmdline").exists())
