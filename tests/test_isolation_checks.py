"""The device-cgroup, CPU-quota and memory-limit isolation checks decided from probe facts: each can pass,
fail and say that it cannot observe its effect (skipped, never pass). The facts are shaped as the probe prints
them; the real runs are in tests/test_isolation_controls.py (runc) and tests/test_sandbox_kata.py (Kata)."""

from __future__ import annotations

from typing import Any

from pytest_kata.sandbox import checks

CAPS_WITH_MKNOD = "00000000a80425fb"  # containerd's default capability set (CAP_MKNOD is bit 27)
CAPS_WITHOUT_MKNOD = "00000000a00425fb"
HOST_BLOCKS = [{"name": "vda", "dev": "254:0", "ro": 0, "size": 536870912}]


def facts(mknod_root: dict[str, Any], *, root_param: str = "/dev/pmem0p1", caps: str = CAPS_WITH_MKNOD) -> dict:
    return {"mknod_root": mknod_root, "root_param": root_param, "status": {"CapEff": caps}}


PMEM = {"device": "pmem0p1", "source": "root=", "dev": "259:1", "size": 262144}


def device(f: dict, *, is_vm: bool = True) -> checks.Outcome:
    return checks.device_cgroup_root(f, HOST_BLOCKS, is_vm=is_vm, handler="kata" if is_vm else "runc")


def test_device_cgroup_refusing_the_open_of_the_guest_root_passes() -> None:
    out = device(facts({**PMEM, "mknod": "ok", "open_read": "dd: can't open '/dev/x': Operation not permitted"}))
    assert out.status == "pass" and "pmem0p1" in out.message and "at open" in out.message


def test_device_cgroup_refusing_the_mknod_passes() -> None:
    out = device(facts({**PMEM, "mknod": "mknod: /dev/x: Operation not permitted"}))
    assert out.status == "pass" and "at mknod" in out.message


def test_a_workload_that_opens_the_guest_root_device_fails() -> None:
    out = device(facts({**PMEM, "mknod": "ok", "open_read": "ok"}))
    assert out.status == "fail" and "opened the guest's root device pmem0p1" in out.message


def test_an_initrd_guest_has_no_root_device_and_the_check_skips_with_that_reason() -> None:
    out = device(facts({"device": "", "source": "first disk"}, root_param=""))
    assert out.status == "skipped" and "booted from an initrd" in out.message


def test_a_disk_that_is_not_the_guests_root_proves_nothing() -> None:
    out = device(facts({"device": "vdb", "source": "first disk", "dev": "253:16", "size": 8, "mknod": "ok",
                        "open_read": "dd: Operation not permitted"}, root_param=""))
    assert out.status == "skipped" and "the disk vdb is not its root" in out.message


def test_without_cap_mknod_a_refusal_proves_nothing() -> None:
    out = device(facts({**PMEM, "mknod": "mknod: Operation not permitted"}, caps=CAPS_WITHOUT_MKNOD))
    assert out.status == "skipped" and "lacks CAP_MKNOD" in out.message


def test_an_unexplained_open_error_is_not_a_pass() -> None:
    out = device(facts({**PMEM, "mknod": "ok", "open_read": "dd: can't open: Permission denied"}))
    assert out.status == "skipped" and "cannot tell" in out.message


def test_runc_names_the_hosts_own_disk_and_fails_for_that_reason() -> None:
    """Even when runc's device cgroup refuses the open, the disk is the host's: no VM stands in between."""
    host_disk = {"device": "vda", "source": "first disk", "dev": "254:0", "size": 536870912, "mknod": "ok",
                 "open_read": "dd: can't open '/dev/x': Operation not permitted"}
    out = device(facts(host_disk, root_param=""), is_vm=False)
    assert out.status == "fail"
    assert out.message.startswith("runc is no VM: the block device the workload can name, vda (254:0), is the "
                                  "host's own disk")


def burn(ticks: int, seconds: float = 6.0, workers: int = 2) -> dict:
    return {"cpu_burn": {"workers": workers, "seconds": int(seconds), "ticks": ticks, "hz": 100,
                         "uptime_before": "100.00", "uptime_after": f"{100 + seconds:.2f}", "cpu_max": "50000 100000",
                         "cpus": 2}}


def test_cpu_use_within_the_quota_passes() -> None:
    out = checks.cpu_limited(burn(ticks=300), quota_cpus=0.5, handler="kata")  # 3 CPU-s in 6 s: 0.5 CPUs
    assert out.status == "pass" and out.evidence["used_cpus"] == 0.5


def test_cpu_use_above_the_quota_fails() -> None:
    out = checks.cpu_limited(burn(ticks=1100), quota_cpus=0.5, handler="kata")  # 1.83 CPUs
    assert out.status == "fail" and "used 1.83 CPUs with a quota of 0.5" in out.message


def test_a_load_that_got_almost_no_cpu_cannot_show_the_quota() -> None:
    out = checks.cpu_limited(burn(ticks=30), quota_cpus=0.5, handler="kata")
    assert out.status == "skipped" and "too little" in out.message


def test_no_quota_or_no_measurement_is_never_a_pass() -> None:
    assert checks.cpu_limited(burn(ticks=300), quota_cpus=0, handler="kata").status == "notapplicable"
    assert checks.cpu_limited({}, quota_cpus=0.5, handler="kata").status == "error"


def fill(*, rc: int, reached_mb: int, held: bool, asked: int = 192) -> dict:
    return {"mem_fill": {"asked_mb": asked, "rc": rc, "reached_bytes": reached_mb << 20, "held": held,
                         "limit": "67108864"}}


def test_a_process_killed_below_the_memory_limit_passes() -> None:
    out = checks.memory_limited(fill(rc=137, reached_mb=32, held=False), limit_mb=64, handler="kata")
    assert out.status == "pass" and "killed at 32 MiB" in out.message


def test_a_process_holding_more_than_the_memory_limit_fails() -> None:
    out = checks.memory_limited(fill(rc=0, reached_mb=256, held=True), limit_mb=64, handler="kata")
    assert out.status == "fail" and "held 256 MiB in a container limited to 64 MiB" in out.message


def test_an_allocation_that_stopped_for_another_reason_is_not_a_pass() -> None:
    out = checks.memory_limited(fill(rc=2, reached_mb=16, held=False), limit_mb=64, handler="kata")
    assert out.status == "skipped" and "not the OOM killer" in out.message
    assert checks.memory_limited({}, limit_mb=64, handler="kata").status == "error"
    assert checks.memory_limited(fill(rc=0, reached_mb=256, held=True), limit_mb=0, handler="kata").status \
        == "notapplicable"
