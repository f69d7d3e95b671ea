"""The configuration the containerd driver hands a Kata shim, the generated TCG wrapper, and the lent /dev/log."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_kata import runid, services
from pytest_kata.kataconfig import KataConfig
from pytest_kata.sandbox.base import SandboxError, host_mounts
from pytest_kata.sandbox.containerd import shim_binary_name
from pytest_kata.sandbox.shimconfig import (
    CONFIG_PATH_ANNOTATION,
    SHORT_BOOLEAN_PROBE,
    config_args,
    read_argv_log,
    rewritten,
    write_shim_config,
    write_tcg_wrapper,
)

KATA_ARGV = ["/opt/kata/bin/qemu-system-x86_64", "-name", "sandbox-kt-00000000-x", "-machine",
             "q35,accel=kvm,kernel_irqchip", "-cpu", "host,pmu=off", "-m", "2048M,slots=10,maxmem=8G",
             "-device", "virtio-serial-pci,disable-modern=true,id=serial0", "-append",
             "tsc=reliable no_timer_check rcupdate.rcu_expedited=1 quiet accel=kvm", "-daemonize"]


def test_wrapper_rewrites_only_accel_and_cpu_and_logs_the_original(tmp_path):
    """The wrapper is run for real by sh with Kata's kind of argv; a stand-in "qemu" prints what it got."""
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_qemu.chmod(0o755)
    wrapper, log = write_tcg_wrapper(tmp_path / "w", fake_qemu)
    argv = [*KATA_ARGV[1:], "arg with  spaces", ""]
    got = subprocess.run([str(wrapper), *argv], capture_output=True, text=True, check=True).stdout
    expected = [*argv]
    expected[expected.index("q35,accel=kvm,kernel_irqchip")] = "q35,accel=tcg"  # KVM's irqchip means nothing in TCG
    expected[expected.index("host,pmu=off")] = "max,pmu=off"
    assert got.split("\n")[:-1] == expected  # the -append text keeps its own "accel=kvm": not a -machine value
    assert rewritten(argv) == expected
    assert read_argv_log(log) == [argv]  # logged exactly as Kata gave it
    other = ["-cpu", "host", "-machine", "pc,kernel_irqchip=on,nvdimm=on", "-M", "q35,accel=kvm:tcg", "*"]
    got = subprocess.run([str(wrapper), *other], capture_output=True, text=True, check=True).stdout
    assert read_argv_log(log)[1] == other
    # only accel=kvm exactly is KVM's: a -machine without it (or asking kvm:tcg) keeps every property
    assert got.split("\n")[:-1] == rewritten(other) == ["-cpu", "max", *other[2:]]


def test_wrapper_spells_image_modes_bare_nvdimm_flag_for_qemu_7(tmp_path):
    """Kata 1.11's image mode appends a bare ``nvdimm`` to ``-machine`` (qemu_arch_base.go handleImagePath),
    which qemu 7+ refuses ("Expected '=' after parameter 'nvdimm'"): the wrapper writes ``nvdimm=on``."""
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_qemu.chmod(0o755)
    wrapper, log = write_tcg_wrapper(tmp_path / "w", fake_qemu)
    argv = ["-machine", "pc,accel=kvm,kernel_irqchip,nvdimm", "-device", "nvdimm,id=nv0,memdev=mem0"]
    got = subprocess.run([str(wrapper), *argv], capture_output=True, text=True, check=True).stdout
    assert got.split("\n")[:-1] == rewritten(argv) == ["-machine", "pc,accel=tcg,nvdimm=on", *argv[2:]]
    assert read_argv_log(log) == [argv]


def test_where_kvm_works_the_wrapper_only_spells_bare_booleans(tmp_path):
    """With KVM the wrapper keeps accel=kvm, kernel_irqchip and -cpu host; it only writes Kata 1.x's bare
    ``-machine`` flags in the ``=on`` form qemu 7+ takes (and hands qemu back at once: no agent wait)."""
    fake_qemu = tmp_path / "qemu"
    fake_qemu.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    fake_qemu.chmod(0o755)
    wrapper, log = write_tcg_wrapper(tmp_path / "w", fake_qemu, tcg=False)
    argv = ["-machine", "pc,accel=kvm,kernel_irqchip,nvdimm", "-cpu", "host,pmu=off", "-qmp",
            f"unix:{tmp_path}/qmp.sock,server=on,wait=off", "-daemonize"]
    got = subprocess.run([str(wrapper), *argv], capture_output=True, text=True, check=True, timeout=30).stdout
    expected = ["-machine", "pc,accel=kvm,kernel_irqchip=on,nvdimm=on", *argv[2:]]
    assert got.split("\n")[:-1] == rewritten(argv, tcg=False) == expected
    assert read_argv_log(log) == [argv]


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86 is not installed")
def test_the_short_boolean_probe_tells_qemu_7_from_the_long_form():
    """The probe the driver runs on a host's hypervisor: this machine's qemu (7.2) refuses the bare flag and
    takes the spelled one, so the probe says which form the wrapper must write."""
    refused = subprocess.run(["qemu-system-x86_64", *SHORT_BOOLEAN_PROBE], capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode != 0 and "Expected '=' after parameter 'nvdimm'" in refused.stderr
    spelled = [a.replace("nvdimm", "nvdimm=on") for a in SHORT_BOOLEAN_PROBE]
    assert subprocess.run(["qemu-system-x86_64", *spelled], capture_output=True, timeout=60).returncode == 0


def test_a_config_for_a_staging_host_keeps_the_installed_paths(tmp_path):
    """``place``: the copy is written here and runs on a host where the candidate is installed at /opt/kata;
    its paths stay /opt/kata (checked against the bundle tree), the wrapper and its log live under ``place``."""
    config, root = _config(tmp_path, use_vsock=True, image="/opt/kata/share/kata-containers/vmlinuz")
    place = Path("/run/pytest-kata/kt-00000000/kata-shim-1-1")
    out = write_shim_config(config, root, tmp_path / "out", accel="kvm", vhost_net=True, vhost_vsock=True,
                           refuses_short_booleans=True, place=place)
    qemu = tomllib.loads(out.path.read_text())["hypervisor"]["qemu"]
    assert qemu["kernel"] == "/opt/kata/share/kata-containers/vmlinuz"
    assert qemu["valid_hypervisor_paths"] == ["/opt/kata/bin/qemu-system-x86_64"]
    assert qemu["path"] == str(place / out.wrapper.name) and out.runs_at == place / out.path.name
    text = out.wrapper.read_text()
    assert "/opt/kata/bin/qemu-system-x86_64" in text and str(place / out.argv_log.name) in text
    assert out.rewrite_note.startswith("hypervisor argv spelled for qemu 7+") and "KVM works here" in out.rewrite_note
    assert list(out.changes) == ["hypervisor.qemu.path"]
    out.read_log = lambda path: "@@KATA-ARGV 1\n-machine\npc,nvdimm\n" if path == place / out.argv_log.name else ""
    assert out.original_argv() == [["-machine", "pc,nvdimm"]]
    assert out.to_json()["rewritten_argv"] == ["-machine", "pc,nvdimm=on"]
    # a hypervisor that takes the bare flags gets no wrapper at all where KVM works
    plain = write_shim_config(config, root, tmp_path / "plain", accel="kvm", vhost_net=True, vhost_vsock=True,
                              place=place)
    assert plain.wrapper is None and plain.changes == {} and plain.rewrite_note == ""
    assert tomllib.loads(plain.path.read_text())["hypervisor"]["qemu"]["path"] == "/opt/kata/bin/qemu-system-x86_64"


def test_kata_1_shims_get_their_configuration_by_annotation():
    assert config_args("1.11.5", "/c.toml") == ["--annotation", f"{CONFIG_PATH_ANNOTATION}=/c.toml"]
    assert config_args("3.2.0", "/c.toml") == ["--runtime-config-path", "/c.toml"]


def _config(tmp_path: Path, **qemu: object) -> tuple[KataConfig, Path]:
    root = tmp_path / "tree"
    for rel in ("bin/qemu-system-x86_64", "libexec/kata-containers/kata-proxy", "share/kata-containers/vmlinuz"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    data = {"hypervisor": {"qemu": {"path": "/opt/kata/bin/qemu-system-x86_64",
                                    "kernel": "/opt/kata/share/kata-containers/vmlinuz",
                                    "valid_hypervisor_paths": ["/opt/kata/bin/qemu-system-x86_64"], **qemu}},
            "proxy": {"kata": {"path": "/opt/kata/libexec/kata-containers/kata-proxy"}},
            "runtime": {"enable_debug": False}}
    return KataConfig(tmp_path / "configuration-qemu.toml", data), root


def test_config_copy_maps_paths_and_names_every_change(tmp_path):
    config, root = _config(tmp_path, use_vsock=True)
    out = write_shim_config(config, root, tmp_path / "out", accel="tcg", vhost_net=False, vhost_vsock=False)
    data = tomllib.loads(out.path.read_text())
    qemu = data["hypervisor"]["qemu"]
    assert qemu["kernel"] == str(root / "share/kata-containers/vmlinuz")
    assert qemu["valid_hypervisor_paths"] == [str(root / "bin/qemu-system-x86_64")]
    assert data["proxy"]["kata"]["path"] == str(root / "libexec/kata-containers/kata-proxy")
    assert qemu["path"] == str(out.wrapper) and qemu["disable_vhost_net"] is True and qemu["use_vsock"] is False
    assert sorted(out.changes) == ["hypervisor.qemu.disable_vhost_net", "hypervisor.qemu.path",
                                   "hypervisor.qemu.use_vsock"]
    assert str(root / "bin/qemu-system-x86_64") in out.wrapper.read_text()
    assert out.rewrite_note.startswith("hypervisor argv rewritten for TCG:")
    assert config.get("hypervisor.qemu.path") == "/opt/kata/bin/qemu-system-x86_64"  # the candidate's own: untouched


def test_where_kvm_and_vhost_work_only_paths_change(tmp_path):
    config, root = _config(tmp_path, use_vsock=True)
    out = write_shim_config(config, root, tmp_path / "out", accel="kvm", vhost_net=True, vhost_vsock=True)
    qemu = tomllib.loads(out.path.read_text())["hypervisor"]["qemu"]
    assert out.changes == {} and out.wrapper is None and out.rewrite_note == ""
    assert qemu["path"] == str(root / "bin/qemu-system-x86_64") and qemu["use_vsock"] is True


def test_no_vsock_and_no_proxy_is_a_clear_error(tmp_path):
    config, root = _config(tmp_path, use_vsock=True)
    (root / "libexec/kata-containers/kata-proxy").unlink()
    with pytest.raises(SandboxError, match="no /dev/vhost-vsock and the candidate ships no kata-proxy"):
        write_shim_config(config, root, tmp_path / "out", accel="kvm", vhost_net=True, vhost_vsock=False)


def test_shim_binary_names():
    assert shim_binary_name("io.containerd.kata.v2") == "containerd-shim-kata-v2"
    assert shim_binary_name("io.containerd.kata-qemu.v2") == "containerd-shim-kata-qemu-v2"


@pytest.mark.skipif(not shutil.which("socat"), reason="needs socat")
def test_lent_syslog_answers_and_the_last_user_takes_it_away(tmp_path, monkeypatch):
    """A socket at a private path stands for /dev/log; two runs share it, the second one's return removes it."""
    monkeypatch.setenv("PYTEST_KATA_STATE", str(tmp_path / "state"))
    devlog = tmp_path / "log"
    first, second = runid.new_run_id(), runid.new_run_id()
    for rid in (first, second):
        runid.register(rid)
    try:
        log = services.lend_syslog(first, devlog=devlog)
        assert log is not None and devlog.is_socket()
        assert services.lend_syslog(second, devlog=devlog) == log
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"<14>kata-shim: hello", str(devlog))
        assert services.return_syslog(first) == [] and devlog.is_socket()
        assert services.syslog_users() == [second]
        for _ in range(100):
            if b"hello" in log.read_bytes():
                break
            time.sleep(0.05)
        assert b"kata-shim: hello" in log.read_bytes()
        removed = services.return_syslog(second)
        assert any("socat" in r for r in removed) and f"socket {devlog}" in removed
        assert not devlog.exists() and not log.exists() and services.syslog_users() == []
    finally:
        for rid in (first, second):
            services.return_syslog(rid, whole_run=True)
            runid.unregister(rid)


@pytest.mark.skipif(not shutil.which("socat"), reason="needs socat")
def test_lent_syslog_is_held_per_holder_within_one_run(tmp_path, monkeypatch):
    """Two Kata drivers of one run (xdist workers, or a suite and a driver in one process) each hold the socket:
    the first one's return must not take it from the second; a sweep of the run gives back every hold."""
    monkeypatch.setenv("PYTEST_KATA_STATE", str(tmp_path / "state"))
    devlog = tmp_path / "log"
    run = runid.new_run_id()
    runid.register(run)
    try:
        log = services.lend_syslog(run, devlog=devlog)
        assert services.lend_syslog(run, devlog=devlog) == log
        assert services.return_syslog(run) == [] and devlog.is_socket(), "the second holder lost the socket"
        assert services.syslog_users() == [run]
        removed = services.return_syslog(run)
        assert any("socat" in r for r in removed) and not devlog.exists()
        services.lend_syslog(run, devlog=devlog)
        services.lend_syslog(run, devlog=devlog)
        assert any("socat" in r for r in services.return_syslog(run, whole_run=True)) and not devlog.exists()
    finally:
        services.return_syslog(run, whole_run=True)
        runid.unregister(run)


def test_machine_syslog_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_KATA_STATE", str(tmp_path / "state"))
    devlog = tmp_path / "log"
    run = runid.new_run_id()  # registered by hand: a run starting here would sweep from the private state dir
    runid.register(run)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as own:
            own.bind(str(devlog))
            assert services.lend_syslog(run, devlog=devlog) is None
            assert services.return_syslog(run) == [] and devlog.is_socket()
        os.unlink(devlog)
    finally:
        runid.unregister(run)


def test_both_guest_forms_shipped_keeps_the_one_asked_for(tmp_path):
    config, root = _config(tmp_path, initrd="/opt/kata/share/kata-containers/initrd.img",
                           image="/opt/kata/share/kata-containers/guest.img")
    for name in ("initrd.img", "guest.img"):
        (root / "share/kata-containers" / name).write_text("x")
    initrd = write_shim_config(config, root, tmp_path / "a", accel="kvm", vhost_net=True, vhost_vsock=True)
    image = write_shim_config(config, root, tmp_path / "b", accel="kvm", vhost_net=True, vhost_vsock=True,
                              guest="image")
    assert "image" not in tomllib.loads(initrd.path.read_text())["hypervisor"]["qemu"]
    assert "initrd" not in tomllib.loads(image.path.read_text())["hypervisor"]["qemu"]
    assert list(image.changes) == ["hypervisor.qemu.initrd"]
    (root / "share/kata-containers/guest.img").unlink()
    with pytest.raises(SandboxError, match="ships no guest image"):
        write_shim_config(config, root, tmp_path / "c", accel="kvm", vhost_net=True, vhost_vsock=True, guest="image")


def test_a_staging_hosts_own_pod_shares_are_not_host_changes_but_a_redirected_mount_is():
    """On a staging host containerd shares the host's mount namespace: the share mounts Kata makes for this
    run's pods are what a pod is; a mount the runtime made elsewhere (a guest-planted symlink's target), or
    one in another sandbox's share that is not this run's, still counts."""
    own = runid.current_run_id()
    share = "/run/kata-containers/shared/sandboxes"
    lines = [f"{n} 1 0:{n} / {point} rw shared:1 - {fs} {fs} rw" for n, (point, fs) in enumerate([
        ("/", "ext4"),
        (f"{share}/{own}-hold-1-1-1/shared", "tmpfs"),
        (f"{share}/{own}-hold-1-1-1/shared/{own}-hold-1-1-1/rootfs", "overlay"),
        ("/var/lib/victim/rootfs", "overlay"),
        (f"{share}/someone-else/shared", "tmpfs"),
    ], start=20)]
    host = SimpleNamespace(run=lambda command, **_: SimpleNamespace(stdout="\n".join(lines) + "\n"))
    assert host_mounts(host=host) == ["/ ext4 ext4", f"{share}/someone-else/shared tmpfs tmpfs",
                                      "/var/lib/victim/rootfs overlay overlay"]
