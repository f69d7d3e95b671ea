"""Fast tests of the sandbox library: the probe (run for real on this host), its packaging and parsing,
the guest spec the direct driver derives from a configuration, driver choice, and the check logic."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from pytest_kata.advisories import decide, load_feed
from pytest_kata.bundle import open_bundle
from pytest_kata.errors import KataError
from pytest_kata.kataconfig import load_config
from pytest_kata.sandbox import SandboxError, SandboxUnavailable, checks, choose_driver, escape
from pytest_kata.sandbox.base import HostInvariants
from pytest_kata.sandbox.direct import GuestSpec, kernel_release_of
from pytest_kata.sandbox.probe import build_oci_image, console_upload_commands, parse_output, script_path
from pytest_kata.sandbox.variants import stand_in_tree, variant_tree

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = REPO / "fixtures" / "configs" / "upstream"
HARDENED = REPO / "fixtures" / "configs" / "hardened"
FEED = load_feed()


def run_probe(**env: str) -> str:
    proc = subprocess.run(["sh", str(script_path())], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd="/")
    return proc.stdout


def test_probe_reports_this_hosts_facts():
    """The probe is real shell: run here, it must describe this very host (no writes: KATA_PROBE_WRITES unset)."""
    facts = parse_output(run_probe(KATA_PROBE_HOST_PATHS="/etc/hostname /nonexistent-kata",
                                   KATA_PROBE_VSOCK_TIMEOUT="1"))
    assert facts["kernel_release"] == os.uname().release
    assert facts["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert facts["host_paths"] == {"/etc/hostname": True, "/nonexistent-kata": False}
    assert facts["uid"] == os.getuid()
    assert "writes" not in facts
    assert {"mounts", "processes", "status", "vsock", "cgroup", "masked", "block_devices"} <= set(facts)


def test_parse_output_rejects_missing_markers_and_bad_json():
    with pytest.raises(SandboxError, match="markers missing"):
        parse_output("kernel panic\n", source="vm")
    with pytest.raises(SandboxError, match="malformed"):
        parse_output("=== KATA-PROBE-BEGIN ===\n{\"a\": \n=== KATA-PROBE-END ===\n")


def test_parse_output_takes_the_last_result_and_skips_console_noise():
    text = ("=== KATA-PROBE-BEGIN ===\n{\"n\": 1}\n=== KATA-PROBE-END ===\n"
            "=== KATA-PROBE-BEGIN ===\r\n[  3.1] random: crng init done\r\n{\"n\": 2}\r\n=== KATA-PROBE-END ===\r\n")
    assert parse_output(text)["n"] == 2


def test_console_upload_recreates_the_script_byte_for_byte(tmp_path):
    dest = tmp_path / "probe.sh"
    commands = console_upload_commands(script_path().read_text(), str(dest))
    assert all(len(c) < 1024 for c in commands), "busybox ash edits at most 1024 bytes per line"
    subprocess.run(["sh", "-c", "\n".join(commands)], check=True)
    assert dest.read_bytes() == script_path().read_bytes()


def test_console_upload_refuses_tabs():
    with pytest.raises(SandboxError, match="tab"):
        console_upload_commands("echo\ta\n", "/tmp/x")


def test_probe_image_is_deterministic_and_runnable_layout(tmp_path):
    one, name = build_oci_image(tmp_path / "a.tar")
    two, name2 = build_oci_image(tmp_path / "b.tar")
    assert one.read_bytes() == two.read_bytes() and name == name2
    with tarfile.open(one) as tar:
        index = json.loads(tar.extractfile("index.json").read())
        assert index["manifests"][0]["annotations"]["io.containerd.image.name"] == name
        assert "oci-layout" in tar.getnames()


def test_kernel_release_is_read_from_the_bzimage_header():
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    if not kernels:
        pytest.skip("no kernel in /boot")
    assert kernel_release_of(kernels[-1]) == kernels[-1].name.removeprefix("vmlinuz-")
    assert kernel_release_of(script_path()) is None


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    if not (HARDENED / "configuration-qemu.toml").is_file():
        pytest.skip("fixtures/configs/hardened is missing")
    return stand_in_tree(tmp_path_factory.mktemp("cand"), HARDENED / "configuration-qemu.toml", version="4.1.0",
                         image=True)


def test_guest_spec_follows_the_configuration(stand_in, tmp_path):
    spec = GuestSpec.from_bundle(open_bundle(stand_in), accel="tcg")
    assert spec.kernel_release == os.uname().release or spec.kernel_release.endswith("amd64")
    assert "root=/dev/vda1" in spec.cmdline() and " ro " in f" {spec.cmdline()} "
    assert "cgroup_no_v1=all" in spec.cmdline()  # the config's kernel_params
    drive = next(a for a in spec.argv("x") if a.startswith("file="))
    assert "readonly=on" in drive
    assert spec.memory_mb == 512 and spec.machine_type == "q35"
    assert any("host's" in n for n in spec.notes)  # no qemu in the stand-in bundle: said so
    writable = variant_tree(stand_in, tmp_path / "rw", {"hypervisor.qemu.kernel_params": "rw"})
    spec_rw = GuestSpec.from_bundle(open_bundle(writable), accel="tcg")
    assert not spec_rw.image_read_only
    assert "readonly=on" not in next(a for a in spec_rw.argv("x") if a.startswith("file="))
    # the variant's config changed, the original's did not (hard links are never written through)
    assert "rw" not in load_config(stand_in / "share/defaults/kata-containers/configuration.toml") \
        .get("hypervisor.qemu.kernel_params")


def test_guest_spec_names_the_config_when_the_kernel_is_missing(stand_in, tmp_path):
    broken = variant_tree(stand_in, tmp_path / "b", {"hypervisor.qemu.kernel": "/opt/kata/share/nope"})
    with pytest.raises(SandboxError, match=r"configuration-qemu.toml.*kernel"):
        GuestSpec.from_bundle(open_bundle(broken))


def test_choose_driver(stand_in):
    with pytest.raises(KataError, match="--kata-runtime"):
        choose_driver("direct", "runc", open_bundle(stand_in))
    with pytest.raises(SandboxUnavailable, match="no candidate"):
        choose_driver("direct", None, None)
    with pytest.raises(SandboxError, match="unknown runtime handler"):
        choose_driver("auto", "bogus", None)
    runc = choose_driver("auto", "runc", None)
    assert runc.name == "containerd" and runc.is_vm is False
    assert choose_driver("auto", None, open_bundle(stand_in)).name == "direct"


def test_kata_handler_without_a_shim_is_unavailable_with_the_bundles_reason(stand_in):
    driver = choose_driver("containerd", None, open_bundle(stand_in.parent.parent))
    with pytest.raises(SandboxUnavailable, match="no containerd-shim-kata-v2"):
        driver.check_available()


# ---- checks -----------------------------------------------------------------------------------------------

HOST = {"kernel_release": "6.18.44-host", "boot_id": "b-host", "hostname": "host", "mem_total_kb": 24_000_000}


def test_kernel_identity_fails_on_runc_and_passes_on_the_guest_kernel():
    runc = checks.kernel_identity({"kernel_release": "6.18.44-host", "boot_id": "b-host"}, HOST, expected=None,
                                  is_vm=False, handler="runc")
    assert runc.status == "fail" and "runc is no VM: the workload runs on the host kernel" in runc.message
    good = checks.kernel_identity({"kernel_release": "6.1.0-ref", "boot_id": "b-guest"}, HOST, expected="6.1.0-ref",
                                  is_vm=True, handler="direct")
    assert good.status == "pass"
    wrong = checks.kernel_identity({"kernel_release": "5.10", "boot_id": "b-guest"}, HOST, expected="6.1.0-ref",
                                   is_vm=True, handler="direct")
    assert wrong.status == "fail" and "not the candidate's guest kernel" in wrong.message


def test_device_network_vsock_and_memory_checks():
    host_blocks = [{"name": "vda", "dev": "254:0", "size": 100}]
    assert checks.host_devices({"block_devices": [{"name": "vda", "dev": "254:0", "size": 100}]}, host_blocks,
                               []).status == "fail"
    assert checks.host_devices({"block_devices": [{"name": "vda", "dev": "254:0", "size": 7}], "devices": ["vda"]},
                               host_blocks, ["vda"]).status == "pass"
    assert checks.host_devices({"devices": ["kvm"]}, [], ["kvm"]).status == "fail"
    assert checks.network({"reach": {"10.0.0.2": "reachable"}}, ["10.0.0.2"], []).status == "fail"
    assert checks.network({"reach": {"10.0.0.2": "unreachable"}, "addresses": ["eth0 192.0.2.2/24"]},
                          ["10.0.0.2"], ["192.0.2.2"]).status == "fail"
    assert checks.network({"reach": {"10.0.0.2": "unreachable"}}, ["10.0.0.2"], ["192.0.2.2"]).status == "pass"
    assert checks.vsock_ports({"vsock": {"2:1026": "reachable"}}).status == "fail"
    assert checks.vsock_ports({"vsock": {"2:1024": "untestable: no socat"}}).status == "notapplicable"
    assert checks.vsock_ports({"vsock": {"2:1024": "unreachable: Connection reset by peer"}}).status == "pass"
    # a VM without a vsock device, where no virtio-serial port was tried either, cannot show whether the
    # agent's channel answers: skipped, never a pass
    no_device = checks.vsock_ports({"vsock": {"2:1024": "unreachable: this VM has no virtio-vsock device",
                                              "2:1026": "unreachable: this VM has no virtio-vsock device"}})
    assert no_device.status == "skipped" and "no virtio-vsock device" in no_device.message
    assert checks.vsock_ports({"vsock": {"2:1024": "unreachable: no AF_VSOCK transport in this kernel/VM"}}).status \
        == "skipped"
    serial = {"agent.channel.0": "reachable", "console": "unreachable: Device or resource busy"}
    assert checks.vsock_ports({"vsock": {}, "agent_serial": serial}).status == "fail"
    serial["agent.channel.0"] = "unreachable: no /dev/vport1p1 in the workload"
    assert checks.vsock_ports({"vsock": {}, "agent_serial": serial}).status == "pass"
    assert checks.memory_bounded({"mem_total_kb": 500_000}, HOST, limit_mb=512, is_vm=True,
                                 handler="d").status == "pass"
    assert checks.memory_bounded({"mem_total_kb": 4_000_000}, HOST, limit_mb=512, is_vm=True,
                                 handler="d").status == "fail"


def test_host_invariants_see_a_changed_image(tmp_path):
    image = tmp_path / "kata.img"
    image.write_bytes(b"a" * 4096)
    before = HostInvariants.capture([image])
    assert before.diff() == {}
    image.write_bytes(b"b" * 4096)
    changed = before.diff()
    assert list(changed) == ["files"] and str(image) in changed["files"]
    assert checks.host_unchanged(changed, what="x").status == "fail"


# ---- static escape checks on the real configuration files ------------------------------------------------


def test_static_checks_on_upstream_and_hardened_configs():
    if not (UPSTREAM / "configuration-qemu.toml").is_file():
        pytest.skip("fixtures/configs/upstream is missing")
    upstream = load_config(UPSTREAM / "configuration-qemu.toml")
    hardened = load_config(HARDENED / "configuration-qemu.toml")
    assert escape.kernel_params_annotation(upstream, "3.31.0").status == "fail"  # kernel_params is enabled upstream
    assert escape.kernel_params_annotation(hardened, "3.31.0").status == "pass"
    assert escape.virtiofs_extra_args_annotation(hardened, "3.31.0").status == "pass"
    opened = hardened.with_changes({"hypervisor.qemu.enable_annotations": ["enable_iommu", "virtio_fs_extra_args"]})
    assert escape.virtiofs_extra_args_annotation(opened, "3.31.0").status == "fail"
    assert escape.block_hotplug(hardened, "3.31.0").status == "pass"
    assert escape.block_hotplug(hardened.with_changes({"hypervisor.qemu.disable_block_device_use": False}),
                                "3.31.0").status == "fail"
    weak = hardened.with_changes({"hypervisor.qemu.virtio_fs_extra_args": ["--sandbox=none"]})
    assert escape.virtiofsd_sandbox(weak, "4.1.0", FEED).status == "fail"
    assert escape.annotation_exec(hardened, "4.1.0", FEED).status == "pass"
    opened = hardened.with_changes({"hypervisor.qemu.enable_annotations": ["path"]})
    # an empty allowlist refuses every value; a wildcard lets a pod pick any matching host program
    empty = escape.annotation_exec(opened.with_changes({"hypervisor.qemu.valid_hypervisor_paths": []}), "4.1.0", FEED)
    assert empty.status == "pass" and "any path" not in str(empty.evidence)
    assert "every value of the annotation is rejected" in str(empty.evidence)
    assert escape.annotation_exec(opened.with_changes({"hypervisor.qemu.valid_hypervisor_paths": ["/opt/*"]}),
                                  "4.1.0", FEED).status == "fail"
    assert escape.writable_image(hardened.with_changes({"hypervisor.qemu.kernel_params": "rw"}), "4.1.0", None,
                                 FEED).status == "fail"
    assert escape.sandbox_bind_mounts(hardened.with_changes({"runtime.sandbox_bind_mounts": ["/etc"]}),
                                      "4.1.0", FEED).status == "fail"


def test_static_checks_on_runtime_rs_versions():
    path = UPSTREAM / "runtime-rs" / "configuration-qemu-runtime-rs.toml"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    rs = load_config(path)
    assert rs.runtime_rs
    # the feed decides the version (GHSA-2gv2 lists 3.30.0, not 3.31.0); the configuration decides the mode
    old = escape.virtiofsd_sandbox(rs, "3.30.0", FEED)
    assert old.status == "fail" and "runtime-rs starts virtiofsd itself" in old.message
    assert escape.virtiofsd_sandbox(rs, "3.31.0", FEED).status == "pass"
    # an advisory the feed does not carry is not judged by a version written in the code: skipped, not pass
    missing = escape.sandbox_bind_mounts(rs, "3.32.0", [a for a in FEED if a.id != "GHSA-7fhf-v3p3-rp56"])
    assert missing.status == "skipped" and "not in the advisory feed" in missing.message


@pytest.mark.parametrize(("advisory", "version", "expected"), [
    ("CVE-2020-2023", "1.10.5", "pass"),  # the backported fix: a "< 1.11.1" check would wrongly reject it
    ("CVE-2020-2023", "1.10.4", "fail"),
    ("CVE-2020-2023", "1.11.0", "fail"),
    ("CVE-2020-2023", "1.11.5", "pass"),
    ("CVE-2020-2026", "1.10.5", "pass"),
    ("CVE-2020-2026", "1.11.0", "fail"),
    ("CVE-2020-27151", "1.11.0", "fail"),
    ("CVE-2020-27151", "1.11.5", "pass"),
    ("CVE-2020-28914", "1.11.4", "fail"),
    ("CVE-2020-28914", "1.11.5", "pass"),
    ("GHSA-877x-32pm-p28x", "1.11.0", "fail"),  # found by its alias (CVE-2020-2026)
])
def test_static_version_decisions_come_from_the_feed(advisory, version, expected):
    """The static escape checks decide with the advisory gate's own code, so both agree on every release."""
    outcome = escape.advisory_decision(FEED, advisory, version)
    gate = decide(escape.find_advisory(FEED, advisory), version)
    assert outcome.status == expected and gate.affected == (expected == "fail")
    assert outcome.evidence["mode"] == "static" and outcome.evidence["decided_by"] == gate.evidence


def test_static_decision_without_a_judgeable_version_is_skipped():
    assert escape.advisory_decision(FEED, "CVE-2020-2023", None).status == "skipped"
    assert escape.advisory_decision(FEED, "CVE-2020-2023", "main-branch").status == "skipped"
    assert escape.advisory_decision(FEED, "GHSA-0000-0000-0000", "1.11.0").status == "skipped"
