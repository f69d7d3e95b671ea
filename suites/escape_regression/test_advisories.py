"""One test per known Kata advisory (kata-reference §7), each in two modes.

``dynamic`` tries the exploit for real where the session's driver can (a real Kata pod through the
containerd driver) and judges by an effect the test observes on the host itself (a marker a host program
wrote, a host file's sha256, a host file that appeared). Where the driver cannot produce or see the effect
(the direct driver is a guest-boot smoke test without shim or agent; runc has no Kata runtime) the result is
``skipped`` with the reason. ``static`` decides from the candidate's configuration and from the advisory
feed's ranges (the same decision as ``suites/advisories``), never from a fixed version written here.
Every result carries ``advisory``, ``mode`` and ``effect`` (and the hypervisor wrapper note where the
driver rewrote the hypervisor's argv).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_kata.runid import current_run_id
from pytest_kata.sandbox import checks, escape, exploits
from pytest_kata.sandbox.checks import Outcome

MODES = [pytest.param("dynamic", marks=pytest.mark.vm), "static"]  # dynamic: tried in a running sandbox


def finish(kata_result: Any, outcome: Outcome, sandbox: Any = None) -> None:
    """Record ``outcome`` with the evidence every escape result carries, and end the test with it."""
    outcome.evidence.setdefault("mode", "static" if sandbox is None else "dynamic")
    outcome.evidence.setdefault("effect", outcome.message)
    if sandbox is not None:
        described = sandbox.describe()
        if described.get("scope"):
            outcome.evidence["driver_scope"] = described["scope"]
        note = exploits.wrapper_note(sandbox)
        if note:
            outcome.evidence["hypervisor_rewrite"] = note
    outcome.apply(kata_result)


def static(request: pytest.FixtureRequest, kata_result: Any, check: Callable[..., Outcome], *args: Any) -> None:
    """``check(config, version, *args, feed)`` on the candidate, or skipped when there is no candidate."""
    config = request.getfixturevalue("kata_sandbox_config")
    if config is None:
        return finish(kata_result, Outcome("skipped", "mode: static: no candidate configuration to check (pass "
                                           "--kata-candidate)", {"mode": "static", "effect": "not tried"}))
    version = request.getfixturevalue("kata_sandbox_version")
    finish(kata_result, check(config, version, *args, request.getfixturevalue("kata_advisory_feed")))


def feed_only(advisory: str) -> Callable[..., Outcome]:
    """A static check that is the feed's decision alone (the flaw has no configuration switch)."""
    return lambda config, version, feed: escape.advisory_decision(feed, advisory, version)


def image_unchanged(request: pytest.FixtureRequest, sandbox: Any, facts: dict[str, Any], advisory: str) -> Outcome:
    """After root-device writes from the guest, the candidate's image and hypervisor files on the host kept
    their sha256 (the baseline is taken before any sandbox starts)."""
    writes = facts.get("writes") or {}
    diff = request.getfixturevalue("kata_host_baseline").diff()
    tried = (f"a privileged container wrote its guest root device /dev/{writes.get('disk')} (mknod "
             f"{writes.get('mknod')}, open {writes.get('open_write')}, write {writes.get('disk_write')})")
    ev = {"writes": writes, "host_diff": diff}
    if diff.get("files"):
        changed = ", ".join(f"{p} {h[0][:12]}→{str(h[1])[:12]}" for p, h in diff["files"].items())
        return exploits.dynamic("fail", f"{advisory}: guest writes to its root device reached the host: {changed}",
                                f"{tried}; on the host: {changed}", **ev)
    return exploits.dynamic("pass", "guest writes to its root device did not reach the host image",
                            f"{tried}; on the host: the image's sha256 is unchanged", **ev)


def root_device_facts(request: pytest.FixtureRequest, kata_result: Any, *, privileged: bool
                      ) -> tuple[Any, dict[str, Any] | None]:
    """The session sandbox and the probe's root-device write attempts, or (sandbox, None) after concluding
    skipped when this driver cannot show the effect."""
    sandbox = request.getfixturevalue("kata_sandbox")
    why = exploits.root_device_missing(sandbox)
    facts = None
    if why is None:
        facts = request.getfixturevalue("kata_probe")(privileged=privileged, writes=True)
        why = exploits.root_device_missing(sandbox, facts)
    if why:
        finish(kata_result, exploits.cannot_observe(why), sandbox)
    return sandbox, facts


@pytest.fixture(scope="module")
def guest_root_attempt(request: pytest.FixtureRequest) -> exploits.RootDeviceAttempt:
    """One CAP_MKNOD container in a real pod tries the guest root device; CVE-2020-2023 and CVE-2020-2025
    judge the same attempt (one pod for both)."""
    return exploits.guest_root_attempt(request.getfixturevalue("kata_sandbox"), current_run_id())


# ---- 2020 advisories (the 1.x releases the project builds) -------------------------------------------------


@pytest.mark.kata_advisory("CVE-2020-2023")
@pytest.mark.kata_check("KATA-ESC-001", severity="critical", title="the workload cannot write the guest root device")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2023_root_device(mode, request, kata_result):
    """A CAP_MKNOD (unprivileged) container makes a node for the guest root device (the partition the guest's
    ``/`` is mounted from, pmem0p1 in image mode) and opens it for writing: the guest's device cgroup must
    deny it, and the host image must keep its sha256."""
    if mode == "static":
        return static(request, kata_result, feed_only("CVE-2020-2023"))
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.root_device_cgroup(request.getfixturevalue("guest_root_attempt")), sandbox)


@pytest.mark.kata_check("KATA-ESC-017", severity="medium", title="the workload cannot write the disk holding the "
                        "guest root filesystem")
@pytest.mark.parametrize("mode", [pytest.param("dynamic", marks=pytest.mark.vm)])  # no static half of its own
def test_guest_root_disk_write(mode, request, kata_result):
    """The same CAP_MKNOD container opens the whole disk around the guest root partition (pmem0) for writing.
    No advisory covers it: the CVE-2020-2023 fix denies only the partition ``/`` is on."""
    kata_result.record(advisory="none (the disk around the partition CVE-2020-2023's fix guards)")
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.root_disk_cgroup(request.getfixturevalue("guest_root_attempt")), sandbox)


def hostile_pod(request: pytest.FixtureRequest, kata_result: Any) -> tuple[Any, Any]:
    """The session sandbox and its hostile pod (a privileged container acting as the guest's root), or
    (sandbox, None) after concluding skipped when this driver cannot run the shared-directory exploits."""
    sandbox = request.getfixturevalue("kata_sandbox")
    pod = request.getfixturevalue("kata_hostile_pod")
    if isinstance(pod, str):
        finish(kata_result, exploits.cannot_observe(pod), sandbox)
        return sandbox, None
    return sandbox, pod


@pytest.mark.kata_advisory("CVE-2020-2026")
@pytest.mark.kata_check("KATA-ESC-016", severity="critical", title="the guest cannot write the host's shared "
                        "directory")
@pytest.mark.parametrize("mode", [pytest.param("dynamic", marks=pytest.mark.vm)])  # no static half of its own
def test_cve_2020_2026_guest_writes_share(mode, request, kata_result):
    """The step CVE-2020-2024 and CVE-2020-2026 stand on, a boundary of its own: the guest's root (a privileged
    container through the guest kernel's core_pattern helper) writes a file into the shared directory; it must
    not appear in the sandbox's shared directory on the host (1.11.1+ shares a read-only bind)."""
    sandbox, pod = hostile_pod(request, kata_result)
    if pod is not None:
        finish(kata_result, exploits.guest_writes_share(pod, current_run_id()), sandbox)


@pytest.mark.kata_advisory("CVE-2020-2024")
@pytest.mark.kata_check("KATA-ESC-002", severity="high", title="teardown never unmounts a host path")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2024_teardown_unmount(mode, request, kata_result, kata_escape_scratch):
    """A host mount (tmpfs in the runtime's mount namespace) under a host directory; a container of the pod
    runs; the guest's root swaps that container's directory in the share for a symlink to the host directory;
    removing the container must leave the host mount mounted."""
    if mode == "static":
        return static(request, kata_result, feed_only("CVE-2020-2024"))
    sandbox, pod = hostile_pod(request, kata_result)
    if pod is not None:
        finish(kata_result, exploits.symlink_redirects_unmount(pod, kata_escape_scratch), sandbox)


@pytest.mark.kata_advisory("CVE-2020-2025")
@pytest.mark.kata_check("KATA-ESC-003", severity="critical", title="guest writes never persist into the host image")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2025_image_writes(mode, request, kata_candidate_image, kata_result):
    """A guest write to its root device (the container's marker, read back inside) must not reach the host
    image file the pod's hypervisor maps: its sha256 around the write says whether it did."""
    if mode == "static":
        return static(request, kata_result, lambda c, v, f: checks.combine(
            escape.advisory_decision(f, "CVE-2020-2025", v), escape.writable_image(c, v, kata_candidate_image, f)))
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.root_device_host_image(request.getfixturevalue("guest_root_attempt")), sandbox)


@pytest.mark.kata_advisory("CVE-2020-2026")
@pytest.mark.kata_check("KATA-ESC-004", severity="critical", title="a guest symlink never redirects a host bind mount")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2026_symlink_bind(mode, request, kata_result, kata_escape_scratch):
    """The guest's root plants ``<share>/<id of the next container>`` → a host directory, then that container
    is started in the pod: the runtime must not bind-mount its rootfs there (judged by the runtime's host mount
    table and by ``<host directory>/rootfs`` appearing)."""
    if mode == "static":
        return static(request, kata_result, feed_only("CVE-2020-2026"))
    sandbox, pod = hostile_pod(request, kata_result)
    if pod is not None:
        finish(kata_result, exploits.symlink_redirects_mount(pod, kata_escape_scratch), sandbox)


ROUTES = [pytest.param("static", None, id="static")] + [
    pytest.param("dynamic", route, id=f"dynamic-{route.name}", marks=pytest.mark.vm)
    for route in exploits.ANNOTATION_EXEC_ROUTES]


@pytest.mark.kata_advisory("CVE-2020-27151")
@pytest.mark.kata_check("KATA-ESC-005", severity="critical", title="annotations cannot make the runtime execute host "
                        "binaries")
@pytest.mark.parametrize(("mode", "route"), ROUTES)
def test_cve_2020_27151_annotation_exec(mode, route, request, kata_result, kata_escape_scratch):
    """A pod annotation names a host program (virtio_fs_daemon with shared_fs=virtio-fs, the hypervisor path,
    jailer_path, ctlpath): the runtime must refuse it or never run it; a marker that program writes on the
    host says whether it ran."""
    if mode == "static":
        return static(request, kata_result, escape.annotation_exec)
    sandbox = request.getfixturevalue("kata_sandbox")
    config = request.getfixturevalue("kata_sandbox_config")
    hypervisor = str(getattr(config, "hypervisor", "") or "")
    finish(kata_result, exploits.annotation_exec(sandbox, route, kata_escape_scratch, hypervisor=hypervisor), sandbox)


@pytest.mark.kata_check("KATA-ESC-015", severity="high", title="annotations cannot hand host files to the "
                        "hypervisor as guest assets")
@pytest.mark.vm
@pytest.mark.parametrize("route", exploits.ANNOTATION_ASSET_ROUTES, ids=lambda r: f"dynamic-{r.name}")
def test_annotation_asset_paths(route, request, kata_result, kata_escape_scratch):
    """A pod annotation names a decoy host file as the guest's kernel, initrd or firmware: the runtime must
    refuse it; Kata's hypervisor argv, logged on the host, shows whether the hypervisor was given the file
    (any host file: a guest that boots from it reads it). No published advisory: the asset half of the
    path-type annotations whose executable half is CVE-2020-27151."""
    kata_result.record(advisory="none (asset annotations of the CVE-2020-27151 family)")
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.annotation_exec(sandbox, route, kata_escape_scratch), sandbox)


@pytest.mark.kata_advisory("CVE-2020-28914")
@pytest.mark.kata_check("KATA-ESC-006", severity="high", title="a read-only volume stays read-only in the guest")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_28914_readonly_volume(mode, request, kata_result, kata_escape_scratch):
    """A container with CAP_SYS_ADMIN writes a host directory mounted read-only (directly, then after
    remounting it read-write); the host directory's files must keep their sha256 and no file may appear."""
    if mode == "static":
        return static(request, kata_result, feed_only("CVE-2020-28914"))
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.readonly_volume(sandbox, kata_escape_scratch), sandbox)


# ---- 2026 advisories -------------------------------------------------------------------------------------


@pytest.mark.kata_advisory("GHSA-wwj6-vghv-5p64")
@pytest.mark.kata_check("KATA-ESC-007", severity="high", title="the guest image (or pmem window) is read-only")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_wwj6_writable_guest_image(mode, request, kata_candidate_image, kata_result):
    """From guest root: the root device is read-only, a write to it fails, and the host image hash holds."""
    if mode == "static":
        return static(request, kata_result, escape.writable_image, kata_candidate_image)
    sandbox, facts = root_device_facts(request, kata_result, privileged=True)
    facts = facts or {}
    outcome = image_unchanged(request, sandbox, facts, "GHSA-wwj6-vghv-5p64")
    disk = (facts.get("writes") or {}).get("disk")
    ro = {b["name"]: b.get("ro") for b in facts.get("block_devices", [])}
    outcome.evidence.update(disk=disk, disk_read_only_inside=ro.get(disk))
    if outcome.status == "pass" and (facts.get("writes") or {}).get("disk_write") == "ok":
        outcome = exploits.dynamic("fail", f"GHSA-wwj6-vghv-5p64: the guest root device {disk} is writable from "
                                   f"inside (ro={ro.get(disk)}); the write did not reach the host image",
                                   outcome.evidence["effect"], **outcome.evidence)
    finish(kata_result, outcome, sandbox)


@pytest.mark.kata_advisory("GHSA-5fc8-gg7w-3g5c")
@pytest.mark.kata_check("KATA-ESC-008", severity="critical", title="no host block device is hot-plugged into the "
                        "guest")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_5fc8_block_hotplug(mode, request, kata_result):
    if mode == "static":
        return static(request, kata_result, escape.block_hotplug)
    sandbox = request.getfixturevalue("kata_sandbox")
    why = exploits.kata_runtime_missing(sandbox, "block-device hot-plug of a container rootfs")
    if why:
        return finish(kata_result, exploits.cannot_observe(why), sandbox)
    host = request.getfixturevalue("kata_host_facts")
    facts = request.getfixturevalue("kata_probe")(privileged=True)
    outcome = checks.host_devices(facts, host["block_devices"], host["dev_nodes"])
    outcome.evidence["effect"] = (f"a privileged container listed the guest's block devices "
                                  f"{outcome.evidence['workload_block_devices']}; host devices among them: "
                                  f"{outcome.evidence['leaked_block_devices'] or 'none'}")
    finish(kata_result, outcome, sandbox)


@pytest.mark.kata_advisory("GHSA-rr59-xxvx-96qr")
@pytest.mark.kata_check("KATA-ESC-009", severity="high", title="virtio_fs_extra_args cannot be set by annotation")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_rr59_virtiofs_extra_args(mode, request, kata_result):
    if mode == "static":
        return static(request, kata_result, escape.virtiofs_extra_args_annotation)
    sandbox = request.getfixturevalue("kata_sandbox")
    why = exploits.kata_runtime_missing(sandbox, "the virtio_fs_extra_args annotation") or (
        "its effect (virtiofsd serving the host's / to the guest) shows only in a running virtiofsd's argv and "
        "shares while the annotated pod lives; the containerd driver's probe pods run to completion")
    finish(kata_result, exploits.cannot_observe(why), sandbox)


@pytest.mark.kata_advisory("GHSA-rr59-xxvx-96qr")
@pytest.mark.kata_check("KATA-ESC-010", severity="medium", title="a pod cannot put the agent debug console on the "
                        "guest command line")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_rr59_debug_console(mode, request, kata_result):
    """The kernel_params annotation (agent.debug_console plus a run token) must not reach the guest's
    /proc/cmdline, which the runtime builds."""
    if mode == "static":
        return static(request, kata_result, escape.kernel_params_annotation)
    sandbox = request.getfixturevalue("kata_sandbox")
    finish(kata_result, exploits.kernel_params_annotation(sandbox, current_run_id()), sandbox)


@pytest.mark.kata_advisory("GHSA-2gv2-cffp-j227")
@pytest.mark.kata_check("KATA-ESC-011", severity="high", title="virtiofsd runs sandboxed with seccomp")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_2gv2_virtiofsd_sandbox(mode, request, kata_result):
    if mode == "static":
        return static(request, kata_result, escape.virtiofsd_sandbox)
    sandbox = request.getfixturevalue("kata_sandbox")
    why = exploits.kata_runtime_missing(sandbox, "virtiofsd's sandbox and seccomp")
    daemons = [] if why else [p for p in sandbox.host_view().processes if p.role == "virtiofsd"]
    if not why and not daemons:
        why = "no virtiofsd runs for this sandbox (shared_fs is not virtio-fs)"
    if why:
        return finish(kata_result, exploits.cannot_observe(why), sandbox)
    bad = [p.pid for p in daemons if p.seccomp != 2 or "none" in " ".join(p.argv)]
    effect = "host /proc of the pod's virtiofsd: " + "; ".join(f"pid {p.pid} Seccomp {p.seccomp} argv "
                                                                 f"{' '.join(p.argv)}" for p in daemons)
    ev = {"virtiofsd": [p.to_json() for p in daemons]}
    outcome = exploits.dynamic("fail", f"virtiofsd without sandbox/seccomp: pids {bad}", effect, **ev) if bad else \
        exploits.dynamic("pass", "every virtiofsd runs with Seccomp: 2 and its sandbox", effect, **ev)
    finish(kata_result, outcome, sandbox)


@pytest.mark.kata_advisory("GHSA-mp2j-xm59-qfgw")
@pytest.mark.kata_check("KATA-ESC-012", severity="critical", title="the config_path annotation cannot load a host file")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_mp2j_config_path(mode, request, kata_result, kata_escape_scratch):
    if mode == "static":
        return static(request, kata_result, feed_only("GHSA-mp2j-xm59-qfgw"))
    sandbox = request.getfixturevalue("kata_sandbox")
    config = request.getfixturevalue("kata_sandbox_config")
    hypervisor = str(getattr(config, "hypervisor", "") or "qemu")
    finish(kata_result, exploits.config_path_exec(sandbox, kata_escape_scratch, hypervisor=hypervisor), sandbox)


@pytest.mark.kata_advisory("GHSA-7fhf-v3p3-rp56")
@pytest.mark.kata_check("KATA-ESC-013", severity="high", title="no host path is bind-mounted into the guest share")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_7fhf_sandbox_bind_mounts(mode, request, kata_result):
    if mode == "static":
        return static(request, kata_result, escape.sandbox_bind_mounts)
    sandbox = request.getfixturevalue("kata_sandbox")
    why = exploits.kata_runtime_missing(sandbox, "the sandbox_bind_mounts annotation") or (
        "its effect (a host path bind-mounted into the pod's share) shows only in the host mount table while "
        "the annotated pod lives; the containerd driver's probe pods run to completion")
    finish(kata_result, exploits.cannot_observe(why), sandbox)


@pytest.mark.kata_advisory("GHSA-q49m-57vm-c8cc")
@pytest.mark.kata_check("KATA-ESC-014", severity="high", title="CopyFile cannot plant symlinks outside the share")
def test_ghsa_q49m_copyfile_policy(request, kata_result):
    """Static only: a raw CopyFile request needs kata-agent-ctl and a genpolicy policy, neither of which a
    candidate bundle ships, so no dynamic attempt exists."""
    static(request, kata_result, feed_only("GHSA-q49m-57vm-c8cc"))
