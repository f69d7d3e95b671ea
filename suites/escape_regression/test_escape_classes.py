"""One test per container-escape class, run against the sandbox with host-side proof.

Classes: runc-style ``/proc/self/exe`` overwrite, leaked file descriptors / working directory into the host,
symlinks in mount paths, and ``core_pattern`` / ``uevent_helper`` from a privileged workload. Inside a VM a
privileged workload may change these — in the guest; the host's must stay as they were.
"""

from __future__ import annotations

import os

import pytest

from pytest_kata.sandbox import Workload, checks
from pytest_kata.sandbox.base import Mount

pytestmark = pytest.mark.vm  # every escape class is tried in a running sandbox


def handler_of(sandbox) -> str:
    return getattr(sandbox, "handler", sandbox.name)


@pytest.mark.kata_advisory("CVE-2019-5736")
@pytest.mark.kata_check("KATA-ESC-101", severity="high", title="the workload cannot overwrite a host binary through "
                        "/proc/self/exe")
def test_proc_self_exe_overwrite(kata_sandbox, kata_probe, kata_host_baseline, kata_result):
    facts = kata_probe(privileged=True)
    attempt = facts.get("proc_self_exe_write")
    diff = kata_host_baseline.diff()
    ev = {"proc_self_exe_write": attempt, "host_diff": diff}
    if attempt == "ok":
        return checks.Outcome("fail", "/proc/self/exe opened for writing from the workload", ev).apply(kata_result)
    checks.host_unchanged(diff, what="a /proc/self/exe write attempt").apply(kata_result)


HOST_ONLY_PREFIXES = ("/var/lib/containerd", "/run/containerd", "/var/cache/pytest-kata", "/var/tmp/pytest-kata",
                      "/opt/kata", "/work", "/root", "/home")


@pytest.mark.kata_advisory("CVE-2024-21626")
@pytest.mark.kata_check("KATA-ESC-102", severity="high", title="no host file descriptor or directory leaks into the "
                        "workload")
@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_leaked_fds_and_cwd(privileged, kata_probe, kata_result):
    facts = kata_probe(privileged=privileged)
    fds = facts.get("fds", [])
    leaked = [f for f in fds if len(f.split(" ", 1)) == 2 and f.split(" ", 1)[1].startswith(HOST_ONLY_PREFIXES)]
    cwd = facts.get("cwd")
    ev = {"fds": fds, "cwd": cwd}
    if leaked or (cwd or "/").startswith(HOST_ONLY_PREFIXES):
        return checks.Outcome("fail", f"host paths reachable through fds/cwd: {leaked or cwd}", ev).apply(kata_result)
    checks.Outcome("pass", f"{len(fds)} open fds and cwd {cwd!r} point inside the sandbox", ev).apply(kata_result)


@pytest.mark.kata_advisory("CVE-2021-30465")
@pytest.mark.kata_check("KATA-ESC-103", severity="high", title="a symlink in a mount source resolves inside the "
                        "sandbox, never on the host")
def test_symlink_in_mount_path(kata_sandbox, kata_host_marker, kata_host_baseline, kata_result, tmp_path):
    if kata_sandbox.name == "direct":
        pytest.skip("dynamic: the direct driver mounts no host directory into the guest; see the static checks of "
                    "CVE-2020-2026 and GHSA-7fhf")
    volume = tmp_path / "volume"
    volume.mkdir()
    os.symlink(os.path.dirname(kata_host_marker), volume / "link")
    seen_through = f"/volume/link/{os.path.basename(kata_host_marker)}"
    facts = kata_sandbox.probe(Workload(mounts=[Mount(str(volume), "/volume")], host_paths=[seen_through]))
    visible = facts.get("host_paths", {}).get(seen_through)
    ev = {"symlink": f"{volume}/link -> {os.path.dirname(kata_host_marker)}", "marker_through_link": visible,
          "host_diff": kata_host_baseline.diff()}
    if visible:
        return checks.Outcome("fail", "a symlink in the volume resolved on the host: the host marker is visible",
                              ev).apply(kata_result)
    checks.host_unchanged(ev["host_diff"], what="a volume with a host-pointing symlink").apply(kata_result)


@pytest.mark.kata_check("KATA-ESC-104", severity="critical", title="a privileged workload's core_pattern stays in the "
                        "guest")
def test_core_pattern_stays_in_guest(kata_sandbox, kata_probe, kata_host_baseline, kata_result):
    facts = kata_probe(privileged=True, writes=True)
    writes = facts.get("writes") or {}
    diff = kata_host_baseline.diff()
    kata_result.record(core_pattern_write=writes.get("core_pattern"),
                       core_pattern_inside_after=writes.get("core_pattern_after"),
                       host_core_pattern=kata_host_baseline.sysctls.get("/proc/sys/kernel/core_pattern"))
    if not kata_sandbox.is_vm:
        writable = (facts.get("writable_paths") or {}).get("/proc/sys/kernel/core_pattern")
        return checks.Outcome("fail", f"{handler_of(kata_sandbox)} is no VM: a privileged workload's core_pattern is "
                              f"the host's (writable from inside: {writable}; not written)").apply(kata_result)
    checks.host_unchanged(diff, what="a privileged core_pattern write").apply(kata_result)


@pytest.mark.kata_check("KATA-ESC-105", severity="critical", title="a privileged workload's uevent_helper stays in the "
                        "guest")
def test_uevent_helper_stays_in_guest(kata_sandbox, kata_probe, kata_host_baseline, kata_result):
    facts = kata_probe(privileged=True, writes=True)
    writes = facts.get("writes") or {}
    kata_result.record(uevent_helper_write=writes.get("uevent_helper"))
    if not kata_sandbox.is_vm:
        return checks.Outcome("fail", f"{handler_of(kata_sandbox)} is no VM: a privileged workload's uevent_helper is "
                              "the host's (not written)").apply(kata_result)
    checks.host_unchanged(kata_host_baseline.diff(), what="a privileged uevent_helper write").apply(kata_result)
