"""One test per known Kata advisory (kata-reference §7), each in two modes.

``dynamic`` tries the exploit's precondition for real where the session's driver allows it and asserts the
host-side proof that nothing escaped; where the driver cannot (the direct driver has no shim, agent or
shared filesystem; runc has no Kata at all) it is skipped with the precise reason. ``static`` always runs
and decides from the candidate's configuration and version (evidence ``mode: static``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kata.sandbox import SandboxError, Workload, checks, escape
from pytest_kata.sandbox.base import Mount

MODES = [pytest.param("dynamic", marks=pytest.mark.vm), "static"]  # dynamic: tried in a running sandbox


def handler_of(sandbox) -> str:
    return getattr(sandbox, "handler", sandbox.name)


def sandbox_for(request, what: str, *, needs_shim: bool = False):
    """The session sandbox for a dynamic test, or a skip saying exactly why this driver cannot run it."""
    sandbox = request.getfixturevalue("kata_sandbox")
    if needs_shim and sandbox.name == "direct":
        pytest.skip(f"dynamic: {what} needs the Kata shim and agent; the direct driver boots the guest without "
                    "them (the static check runs instead)")
    if needs_shim and not sandbox.is_vm:
        pytest.skip(f"dynamic: {what} is a Kata shim flaw; {handler_of(sandbox)} has no Kata shim")
    return sandbox


def static(config, version, check, *args):
    if config is None:
        pytest.skip("mode: static: no candidate configuration to check (pass --kata-candidate)")
    return check(config, version, *args)


def hostile_writes(request, kata_result, what: str) -> tuple[object, dict]:
    """Run the privileged hostile workload (core_pattern, uevent_helper, root-device writes) once per session."""
    sandbox = sandbox_for(request, what)
    facts = request.getfixturevalue("kata_probe")(privileged=True, writes=True)
    writes = facts.get("writes") or {}
    kata_result.record(writes=writes, writes_refused=facts.get("writes_refused"), root_device=facts.get("root_device"),
                       block_devices=facts.get("block_devices"))
    return sandbox, facts


def no_vm_fail(sandbox, what: str) -> checks.Outcome:
    return checks.Outcome("fail", f"{handler_of(sandbox)} is no VM: the workload runs on the host kernel, so {what} "
                          "would act on the host (not attempted)")


def image_unchanged(request, sandbox) -> checks.Outcome:
    """The candidate's image and the file the VMM attached (a private copy when writable) kept their hashes."""
    baseline = request.getfixturevalue("kata_host_baseline")
    diff = baseline.diff()
    outcome = checks.host_unchanged(diff, what="guest writes to its root device")
    before, after = getattr(sandbox, "image_sha_at_start", None), None
    if before and hasattr(sandbox, "image_sha256"):
        after = sandbox.image_sha256()
        if after != before:
            return checks.Outcome("fail", f"guest writes reached the VMM's backing image on the host "
                                  f"({sandbox.image_path}: sha256 {before[:12]} → {after[:12]})",
                                  {"attached_image": str(sandbox.image_path), "sha256_before": before,
                                   "sha256_after": after, **outcome.evidence})
    outcome.evidence.update(attached_image_sha256_before=before, attached_image_sha256_after=after)
    return outcome


def annotation_inert(request, kata_result, what: str, annotations: dict[str, str], marker: Path | None = None
                     ) -> checks.Outcome:
    """A hostile annotation must be rejected (sandbox creation fails) or have no effect on the host."""
    sandbox = sandbox_for(request, what, needs_shim=True)
    if marker is not None:
        marker.unlink(missing_ok=True)
    try:
        facts = sandbox.probe(Workload(annotations=annotations, host_paths=["/etc/shadow"]))
    except SandboxError as exc:
        text = str(exc)
        if any(word in text for word in ("not enabled", "not valid", "annotation", "not allowed")):
            return checks.Outcome("pass", f"the runtime rejected the annotation: {text[-200:]}", {"rejected": text})
        raise
    view = sandbox.host_view().to_json()
    ran = marker is not None and marker.exists()
    argv_hit = [p["argv"] for p in view["processes"] if any(v in " ".join(p["argv"]) for v in annotations.values())]
    ev = {"annotations": annotations, "host_view": view, "marker_ran": ran, "argv_with_value": argv_hit,
          "host_root_visible": facts.get("host_paths")}
    if ran or argv_hit:
        return checks.Outcome("fail", f"the annotation took effect on the host: marker ran={ran}, argv={argv_hit}", ev)
    return checks.Outcome("pass", "the annotation was accepted but had no effect on the host", ev)


# ---- 2020 advisories -------------------------------------------------------------------------------------


@pytest.mark.kata_advisory("CVE-2020-2023")
@pytest.mark.kata_check("KATA-ESC-001", severity="critical", title="the workload cannot write the guest root device")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2023_root_device(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    """CAP_MKNOD + /sys/dev/block → mknod the root device, open it for writing: must fail; host image unchanged."""
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "1.11.1", "CVE-2020-2023")).apply(kata_result)
    sandbox, facts = hostile_writes(request, kata_result, "mknod of the root device")
    if not sandbox.is_vm:
        return no_vm_fail(sandbox, "opening the root block device").apply(kata_result)
    writes = facts.get("writes") or {}
    if not writes.get("disk"):
        pytest.skip("dynamic: the guest has no root block device (initrd-only guest)")
    outcome = image_unchanged(request, sandbox)
    if writes.get("open_write") == "ok" and sandbox.name != "direct":
        outcome = checks.Outcome("fail", "the container opened the guest root device for writing (device cgroup "
                                 "does not deny it)", outcome.evidence)
    outcome.apply(kata_result)


@pytest.mark.kata_advisory("CVE-2020-2024")
@pytest.mark.kata_check("KATA-ESC-002", severity="high", title="teardown never unmounts a host path")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2024_teardown_unmount(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "1.11.0", "CVE-2020-2024")).apply(kata_result)
    sandbox_for(request, "a guest-planted rootfs symlink at teardown", needs_shim=True)
    request.getfixturevalue("kata_probe")(privileged=True)
    checks.host_unchanged(request.getfixturevalue("kata_host_baseline").diff(), what="container teardown") \
        .apply(kata_result)


@pytest.mark.kata_advisory("CVE-2020-2025")
@pytest.mark.kata_check("KATA-ESC-003", severity="critical", title="guest writes never persist into the host image")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2025_image_writes(mode, request, kata_sandbox_config, kata_sandbox_version,
                                    kata_candidate_image, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.combine(checks.static_version(v, "1.11.0", "CVE-2020-2025"),
                                                  escape.writable_image(c, v, kata_candidate_image))
                      ).apply(kata_result)
    sandbox, facts = hostile_writes(request, kata_result, "writes to the guest root device")
    if not sandbox.is_vm:
        return no_vm_fail(sandbox, "a root-device write").apply(kata_result)
    if not (facts.get("writes") or {}).get("disk"):
        pytest.skip("dynamic: the guest has no root block device (initrd-only guest)")
    image_unchanged(request, sandbox).apply(kata_result)


@pytest.mark.kata_advisory("CVE-2020-2026")
@pytest.mark.kata_check("KATA-ESC-004", severity="critical", title="a guest symlink never redirects a host bind mount")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_2026_symlink_bind(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "1.11.1", "CVE-2020-2026")).apply(kata_result)
    sandbox_for(request, "a symlink planted in the shared directory", needs_shim=True)
    request.getfixturevalue("kata_probe")(privileged=True)
    checks.host_unchanged(request.getfixturevalue("kata_host_baseline").diff(), what="container creation") \
        .apply(kata_result)


@pytest.mark.kata_advisory("CVE-2020-27151")
@pytest.mark.kata_check("KATA-ESC-005", severity="critical", title="annotations cannot make the runtime execute host "
                        "binaries")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_27151_annotation_exec(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result,
                                        tmp_path):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.annotation_exec).apply(kata_result)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.sh"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    annotation_inert(request, kata_result, "annotation-driven binary paths",
                     {"io.katacontainers.config.hypervisor.virtio_fs_daemon": str(evil),
                      "io.katacontainers.config.hypervisor.path": str(evil)}, marker).apply(kata_result)


@pytest.mark.kata_advisory("CVE-2020-28914")
@pytest.mark.kata_check("KATA-ESC-006", severity="high", title="a read-only volume stays read-only in the guest")
@pytest.mark.parametrize("mode", MODES)
def test_cve_2020_28914_readonly_volume(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result,
                                        tmp_path):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "1.11.5", "CVE-2020-28914")).apply(kata_result)
    sandbox = sandbox_for(request, "a read-only host volume", needs_shim=True)
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "keep").write_text("unchanged\n")
    facts = sandbox.probe(Workload(privileged=True, mounts=[Mount(str(volume), "/volume", read_only=True)]))
    changed = (volume / "keep").read_text() != "unchanged\n" or len(list(volume.iterdir())) != 1
    ev = {"mounts_inside": [m for m in facts.get("mounts", []) if "/volume" in m]}
    rw_inside = any(" /volume " in m and " rw," in f" {m.split()[3]}," for m in facts.get("mounts", []))
    if changed or rw_inside:
        return checks.Outcome("fail", f"read-only volume writable: host changed={changed}, rw inside={rw_inside}",
                              ev).apply(kata_result)
    checks.Outcome("pass", "the read-only volume is read-only inside and unchanged on the host", ev).apply(kata_result)


# ---- 2026 advisories -------------------------------------------------------------------------------------


@pytest.mark.kata_advisory("GHSA-wwj6-vghv-5p64")
@pytest.mark.kata_check("KATA-ESC-007", severity="high", title="the guest image (or pmem window) is read-only")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_wwj6_writable_guest_image(mode, request, kata_sandbox_config, kata_sandbox_version,
                                        kata_candidate_image, kata_result):
    """From guest root: the root device is read-only, a remount rw fails, and the host image hash holds."""
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.writable_image,
                      kata_candidate_image).apply(kata_result)
    sandbox, facts = hostile_writes(request, kata_result, "writes to the guest image")
    if not sandbox.is_vm:
        return no_vm_fail(sandbox, "a guest-image write").apply(kata_result)
    writes = facts.get("writes") or {}
    disk = writes.get("disk")
    if not disk:
        pytest.skip("dynamic: the guest has no root block device (initrd-only guest)")
    ro = {b["name"]: b.get("ro") for b in facts.get("block_devices", [])}
    outcome = image_unchanged(request, sandbox)
    outcome.evidence.update(disk=disk, disk_read_only_inside=ro.get(disk), disk_write=writes.get("disk_write"),
                            remount_rw=writes.get("remount_rw"))
    if outcome.status == "pass" and (ro.get(disk) != 1 or writes.get("disk_write") == "ok"):
        outcome = checks.Outcome("fail", f"the guest root device {disk} is writable from inside (ro={ro.get(disk)}, "
                                 f"write: {writes.get('disk_write')})", outcome.evidence)
    outcome.apply(kata_result)


@pytest.mark.kata_advisory("GHSA-5fc8-gg7w-3g5c")
@pytest.mark.kata_check("KATA-ESC-008", severity="critical", title="no host block device is hot-plugged into the "
                        "guest")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_5fc8_block_hotplug(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.block_hotplug).apply(kata_result)
    sandbox_for(request, "host block devices in the guest")
    host = request.getfixturevalue("kata_host_facts")
    facts = request.getfixturevalue("kata_probe")(privileged=True)
    checks.host_devices(facts, host["block_devices"], host["dev_nodes"]).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-rr59-xxvx-96qr")
@pytest.mark.kata_check("KATA-ESC-009", severity="high", title="virtio_fs_extra_args cannot be set by annotation")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_rr59_virtiofs_extra_args(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      escape.virtiofs_extra_args_annotation).apply(kata_result)
    annotation_inert(request, kata_result, "the virtio_fs_extra_args annotation",
                     {"io.katacontainers.config.hypervisor.virtio_fs_extra_args":
                      '["--sandbox=none","--seccomp=none","-o","source=/"]'}).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-rr59-xxvx-96qr")
@pytest.mark.kata_check("KATA-ESC-010", severity="medium", title="no agent debug console in the guest")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_rr59_debug_console(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    """The running guest's cmdline has no agent.debug_console and port 1026 does not answer."""
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.kernel_params_annotation).apply(kata_result)
    sandbox = sandbox_for(request, "the guest kernel command line")
    if not sandbox.is_vm:
        return no_vm_fail(sandbox, "reading the guest cmdline").apply(kata_result)
    facts = request.getfixturevalue("kata_probe")(privileged=True)
    cmdline = facts.get("cmdline", "")
    vsock = checks.vsock_ports(facts)
    if "agent.debug_console" in cmdline or "agent.devmode" in cmdline:
        return checks.Outcome("fail", f"the guest booted with the debug console: {cmdline}", {"cmdline": cmdline}) \
            .apply(kata_result)
    checks.combine(checks.Outcome("pass", "no agent.debug_console/devmode on the guest cmdline", {"cmdline": cmdline}),
                   vsock).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-2gv2-cffp-j227")
@pytest.mark.kata_check("KATA-ESC-011", severity="high", title="virtiofsd runs sandboxed with seccomp")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_2gv2_virtiofsd_sandbox(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.virtiofsd_sandbox).apply(kata_result)
    sandbox = sandbox_for(request, "virtiofsd's sandbox and seccomp", needs_shim=True)
    view = sandbox.host_view()
    daemons = [p for p in view.processes if p.role == "virtiofsd"]
    ev = {"virtiofsd": [p.to_json() for p in daemons]}
    if not daemons:
        pytest.skip("dynamic: no virtiofsd runs for this sandbox (shared_fs is not virtio-fs)")
    bad = [p.pid for p in daemons if p.seccomp != 2 or "none" in " ".join(p.argv)]
    if bad:
        return checks.Outcome("fail", f"virtiofsd without sandbox/seccomp: pids {bad}", ev).apply(kata_result)
    checks.Outcome("pass", "every virtiofsd runs with Seccomp: 2 and its sandbox", ev).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-mp2j-xm59-qfgw")
@pytest.mark.kata_check("KATA-ESC-012", severity="critical", title="the config_path annotation cannot load a host file")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_mp2j_config_path(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result, tmp_path):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "4.0.0", "GHSA-mp2j-xm59-qfgw")).apply(kata_result)
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.toml"
    evil.write_text(f'[hypervisor.qemu]\npath = "{tmp_path}/evil.sh"\n')
    (tmp_path / "evil.sh").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (tmp_path / "evil.sh").chmod(0o755)
    annotation_inert(request, kata_result, "the config_path annotation",
                     {"io.katacontainers.config_path": str(evil)}, marker).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-7fhf-v3p3-rp56")
@pytest.mark.kata_check("KATA-ESC-013", severity="high", title="no host path is bind-mounted into the guest share")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_7fhf_sandbox_bind_mounts(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version, escape.sandbox_bind_mounts).apply(kata_result)
    annotation_inert(request, kata_result, "the sandbox_bind_mounts annotation",
                     {"io.katacontainers.config.runtime.sandbox_bind_mounts": "/etc"}).apply(kata_result)


@pytest.mark.kata_advisory("GHSA-q49m-57vm-c8cc")
@pytest.mark.kata_check("KATA-ESC-014", severity="high", title="CopyFile cannot plant symlinks outside the share")
@pytest.mark.parametrize("mode", MODES)
def test_ghsa_q49m_copyfile_policy(mode, request, kata_sandbox_config, kata_sandbox_version, kata_result):
    if mode == "static":
        return static(kata_sandbox_config, kata_sandbox_version,
                      lambda c, v: checks.static_version(v, "3.29.0", "GHSA-q49m-57vm-c8cc (genpolicy)")
                      ).apply(kata_result)
    sandbox_for(request, "a CopyFile request with a symlink", needs_shim=True)
    pytest.skip("dynamic: needs kata-agent-ctl and a genpolicy-generated policy to send a raw CopyFile request; "
                "not part of a candidate bundle")
