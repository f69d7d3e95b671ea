"""SshHost against a real OpenSSH server: a private ``sshd`` on 127.0.0.1 (own host key, one generated client
key, no PAM, no passwords), started for this module and killed by pid at the end. Covers exact run results,
the remote timeout, sha256-checked transfers, the refusals (snapshots, unreachable port, unknown key, libvirt
URIs) and the CLI end to end: install, state, rollback of a .tar.zst bundle over SSH into a scratch sysroot.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.cli import main
from pytest_kata.errors import KataError
from pytest_kata.hosts.accel import detect_local
from pytest_kata.hosts.base import Host, HostError, LocalHost, UnsupportedOperation
from pytest_kata.hosts.hypervisor import parse_libvirt_uri
from pytest_kata.hosts.resolve import resolve_host
from pytest_kata.hosts.ssh import CONFIG_ENV, SshHost, close_all_ssh_hosts, next_ssh_host, parse_ssh_target

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fixtures" / "configs" / "upstream"
SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses each connection without its privilege-separation directory

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not Path(SSHD).exists() or not shutil.which("ssh"),
                                reason="needs root, sshd (openssh-server) and ssh (openssh-client)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Sshd:
    port: int
    client_key: Path
    known_hosts: Path
    ssh_config: Path
    log: Path

    def host(self, **kwargs: object) -> SshHost:
        return SshHost(f"ssh://root@127.0.0.1:{self.port}", identity=self.client_key,
                       known_hosts=self.known_hosts, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A loopback-only sshd: listens on 127.0.0.1 only and admits root only from 127.0.0.1, key only."""
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@contextlib.contextmanager
def running_sshd(tmp: Path, *, wrap: tuple[str, ...] = ()) -> Iterator[Sshd]:
    """Start the loopback sshd (``wrap``: a command prefix, e.g. to run it in a UTS namespace), stop it after."""
    tmp.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"pytest-kata-{key}",
                        "-f", str(tmp / key)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    port = free_port()
    config = tmp / "sshd_config"
    config.write_text(f"""ListenAddress 127.0.0.1
Port {port}
HostKey {tmp}/host_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowUsers root@127.0.0.1
AllowTcpForwarding no
X11Forwarding no
MaxStartups 50:30:100
MaxSessions 50
SetEnv SHLVL=1
""")  # SHLVL: Debian's bash sources ~/.bashrc for ssh commands at level 0, and root's here runs pyenv (~270 ms)
    ssh_config = tmp / "ssh_config"
    ssh_config.write_text(f"IdentityFile {tmp}/client_key\nIdentitiesOnly yes\n"
                          f"UserKnownHostsFile {tmp}/known_hosts_cli\n")
    # Made when missing and left in place, as openssh-server's own unit keeps it (RuntimeDirectoryPreserve):
    # sshds of other xdist workers share it, and one removed under a running sshd resets every new connection.
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    subprocess.run([SSHD, "-t", "-f", str(config)], check=True)
    log = tmp / "sshd.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([*wrap, SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {log.read_text()[-500:]}")
                time.sleep(0.05)
        yield Sshd(port, tmp / "client_key", tmp / "known_hosts", ssh_config, log)
    finally:
        close_sessions_then(proc)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def close_sessions_then(listener: subprocess.Popen[bytes]) -> None:
    """End every client master (the CLI's hosts too), then wait until the listener has reaped its session
    children: a session that outlives the listener is re-parented to a pid 1 that may never reap it."""
    close_all_ssh_hosts()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(listener.pid)], capture_output=True, text=True).stdout.split()
        if not children:
            return
        if time.monotonic() > deadline - 5:
            for pid in children:
                os.kill(int(pid), signal.SIGTERM)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def host(sshd: Sshd) -> Iterator[SshHost]:
    with sshd.host() as h:
        yield h


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("spec,expected", [
    ("ssh://root@stage-1:2222", ("root", "stage-1", 2222)),
    ("ssh://stage-1", (None, "stage-1", 22)),
    ("kata@stage-1", ("kata", "stage-1", 22)),
    ("kata@stage-1:2200", ("kata", "stage-1", 2200)),
    ("ssh://root@[::1]:2022", ("root", "::1", 2022)),
])
def test_parse_ssh_target(spec: str, expected: tuple[str | None, str, int]) -> None:
    assert parse_ssh_target(spec) == expected


@pytest.mark.parametrize("spec", ["ssh://root@h:99999", "ssh://root@h/path", "http://h", "ssh://",
                                  "-oProxyCommand=sh", "ssh://-oProxyCommand=x@h"])
def test_bad_ssh_target_is_one_line_error(spec: str) -> None:
    with pytest.raises(KataError) as info:
        parse_ssh_target(spec)
    assert "\n" not in str(info.value) and "ssh target" in str(info.value)


def test_resolve_host_providers() -> None:
    assert isinstance(resolve_host("local"), LocalHost)
    remote = resolve_host("ssh://root@stage-1:2222")
    assert isinstance(remote, SshHost) and isinstance(remote, Host) and remote.name == "root@stage-1:2222"
    remote.close()
    with pytest.raises(KataError, match="not a host"):
        resolve_host("stage-1")
    with pytest.raises(KataError, match="needs --kata-ssh-hosts"):
        next_ssh_host("", taken=0)
    hosts = [next_ssh_host("root@a, kata@b:2200", taken=n) for n in range(2)]
    assert [h.name for h in hosts] == ["root@a", "kata@b:2200"]
    for h in hosts:
        h.close()
    with pytest.raises(HostError, match="lists 2 host"):
        next_ssh_host("root@a, kata@b:2200", taken=2)


# ------------------------------------------------------------------------------------------------ run
def test_run_exact_results(host: SshHost) -> None:
    result = host.run("echo out; echo err >&2; exit 3")
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert host.run(["printf", "%s|", "a b", "it's", "$HOME"]).stdout == "a b|it's|$HOME|"
    assert host.run("cat", stdin=b"\x00bytes in\n").stdout == "\x00bytes in\n"
    assert host.run("id -u").stdout == "0\n"
    with pytest.raises(HostError, match="exit 7"):
        host.run("exit 7", check=True)
    assert "$ echo out; echo err >&2; exit 3" in host.console_log()


def test_timeout_is_124_and_kills_the_command(host: SshHost, tmp_path: Path) -> None:
    marker = f"/tmp/pytest-kata-ssh-timeout-{os.getpid()}"
    start = time.monotonic()
    result = host.run(f"sleep 3 && touch {marker}", timeout=1)
    assert result.rc == 124 and time.monotonic() - start < 3
    time.sleep(3)
    assert not Path(marker).exists(), "the timed-out command kept running on the host"
    assert host.run("true", timeout=1).rc == 0


def test_put_get_round_trip_with_sha256(host: SshHost, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    remote = str(tmp_path / "remote" / "dir" / "big.bin")
    start = time.monotonic()
    host.put(big, remote, mode=0o640)
    back = tmp_path / "back.bin"
    host.get(remote, back)
    elapsed = time.monotonic() - start
    assert sha256(back) == sha256(big) == host.run(f"sha256sum {remote}").stdout.split()[0]
    assert Path(remote).stat().st_mode & 0o777 == 0o640
    assert not Path(remote + ".tmp-pytest-kata").exists()
    print(f"3 MiB put+get over ssh in {elapsed:.2f}s")
    with pytest.raises(HostError, match=r"cannot copy /nonexistent/file.*No such file") as info:
        host.get("/nonexistent/file", tmp_path / "missing")
    assert "\n" not in str(info.value) and not (tmp_path / "missing").exists()


def test_no_snapshots(host: SshHost) -> None:
    for operation in (host.snapshot, host.revert):
        with pytest.raises(UnsupportedOperation, match="no snapshots; use libvirt hosts"):
            operation("clean")


def test_reboot_waits_for_a_new_boot_id(host: SshHost) -> None:
    """Negative control only (rebooting this machine is not an option): a 'reboot' that does not reboot."""
    host.reboot_command = "true"
    try:
        with pytest.raises(HostError, match="did not come back with a new boot id within 3 s"):
            host.reboot(timeout=3)
    finally:
        host.reboot_command = "reboot"
    assert host.run("true").ok  # the connection comes back after the reboot attempt


# ------------------------------------------------------------------------------------------------ refusals
def test_unreachable_port_is_one_line(sshd: Sshd) -> None:
    port = free_port()
    with SshHost(f"root@127.0.0.1:{port}", identity=sshd.client_key, known_hosts=sshd.known_hosts) as h, \
            pytest.raises(HostError) as info:
        h.run("true")
    message = str(info.value)
    assert message.startswith(f"host root@127.0.0.1:{port} unreachable: ")
    assert "Connection refused" in message and "\n" not in message


def test_unknown_key_is_refused(sshd: Sshd, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    with SshHost(f"root@127.0.0.1:{sshd.port}", identity=tmp_path / "stranger",
                 known_hosts=sshd.known_hosts) as h, \
            pytest.raises(HostError, match=f"root@127.0.0.1:{sshd.port} unreachable: .*Permission denied"):
        h.run("true")


def test_close_ends_the_master(sshd: Sshd) -> None:
    h = sshd.host()
    assert h.run("true").ok
    control_dir = h._dir
    assert any(p.name.startswith("cm-") for p in control_dir.iterdir())
    h.close()
    h.close()  # idempotent
    assert not control_dir.exists()
    masters = subprocess.run(["pgrep", "-f", str(control_dir)], capture_output=True, text=True).stdout
    assert masters == "", f"ssh master still running: {masters}"
    with pytest.raises(HostError, match="is closed"):
        h.run("true")


# ------------------------------------------------------------------------------------------------ CLI
def make_bundle_tarball(root: Path, version: str) -> Path:
    """A tiny kata-static tarball (``./opt/kata/...``), zstd-compressed like the release assets."""
    kata = root / "opt" / "kata"
    defaults = kata / "share/defaults/kata-containers"
    defaults.mkdir(parents=True)
    (kata / "bin").mkdir()
    (kata / "VERSION").write_text(version + "\n")
    shutil.copy(CONFIGS / "configuration-qemu.toml", defaults / "configuration-qemu.toml")
    (defaults / "configuration.toml").symlink_to("configuration-qemu.toml")
    shim = kata / "bin/containerd-shim-kata-v2"
    shim.write_text(f"#!/bin/sh\necho 'placeholder shim {version}'\n")
    shim.chmod(0o755)
    tarball = root / f"kata-static-{version}-amd64.tar.zst"
    subprocess.run(["tar", "--zstd", "-C", str(root), "-cf", str(tarball), "./opt"], check=True)
    return tarball


def test_cli_install_state_rollback_over_ssh(sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(sshd.ssh_config))
    sysroot = tmp_path / "root"
    sysroot.mkdir()
    bundle = make_bundle_tarball(tmp_path / "bundle", "3.31.0")
    target = ["--host", f"ssh://root@127.0.0.1:{sshd.port}", "--sysroot", str(sysroot), "--containerd", "none"]

    assert main(["state", *target, "--json"]) == 0
    saved = tmp_path / "state.json"
    saved.write_text(capsys.readouterr().out)
    assert main(["install", *target, "--bundle", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "installed 3.31.0-" in out and f"on root@127.0.0.1:{sshd.port}" in out
    assert (sysroot / "opt/kata/VERSION").read_text() == "3.31.0\n"
    assert main(["state", *target, "--compare", str(saved)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out
    assert main(["rollback", *target, "--uninstall"]) == 0
    assert "state digest equals" in capsys.readouterr().out
    assert main(["state", *target, "--compare", str(saved)]) == 0
    assert not (sysroot / "opt/kata").exists()
    # negative controls: a sysroot the host does not have, and an unreachable host, each one line
    assert main(["install", "--host", f"ssh://root@127.0.0.1:{sshd.port}", "--sysroot", str(tmp_path / "nope"),
                 "--bundle", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert f"root@127.0.0.1:{sshd.port}:{tmp_path / 'nope'}: no such sysroot directory" in err
    assert err.count("\n") == 1
    port = free_port()
    assert main(["rollback", "--host", f"root@127.0.0.1:{port}", "--sysroot", str(sysroot)]) == 2
    err = capsys.readouterr().err
    assert f"host root@127.0.0.1:{port} unreachable: " in err and err.count("\n") == 1


def test_pytest_host_provider_ssh(sshd: Sshd, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--kata-host-provider ssh``: kata_host is the listed staging host; asking for more hosts than listed
    fails that test with one line (staging hosts are listed, never made)."""
    monkeypatch.setenv(CONFIG_ENV, str(sshd.ssh_config))
    pytester.makepyfile(test_stage=f"""
        def test_on_staging_host(kata_host):
            assert kata_host.name == "root@127.0.0.1:{sshd.port}"
            assert kata_host.run("id -u").stdout == "0\\n"

        def test_more_hosts_than_listed(kata_hosts):
            kata_hosts(2)
    """)
    result = pytester.runpytest("-p", "no:cacheprovider", "--kata-host-provider", "ssh",
                                "--kata-ssh-hosts", f"root@127.0.0.1:{sshd.port}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*--kata-ssh-hosts lists 1 host(s) and this run needs 2*"])


# ------------------------------------------------------------------------------------------------ libvirt URIs
@pytest.mark.parametrize(("uri", "message"), [
    ("qemu:///session", "a Kata install needs root on the host; use the /system hypervisor"),
    ("qemu+ssh://stage-1/session", "a Kata install needs root on the host"),
    ("qemu+tcp://stage-1/system", "the tcp transport carries libvirt's API but no shell"),
    ("qemu://stage-1/system", "the tls transport carries libvirt's API but no shell"),
    ("qemu+ssh:///system", "an ssh URI names no host"),
    ("qemu+ssh://stage-1:http/system", "the port is not a number"),
    ("qemu+ext://stage-1/system", "unknown libvirt transport 'ext'"),
])
def test_libvirt_uris_that_cannot_be_kata_hosts_are_one_line(uri: str, message: str) -> None:
    with pytest.raises(KataError, match=re.escape(message)) as info:
        resolve_host(uri)
    assert "\n" not in str(info.value) and uri in str(info.value)


def test_parse_libvirt_uri() -> None:
    target = parse_libvirt_uri("qemu+ssh://kata@stage-1:2222/system?keyfile=/k/id&no_verify=1")
    assert (target.transport, target.user, target.hostname, target.port) == ("ssh", "kata", "stage-1", 2222)
    assert target.ssh_target == "ssh://kata@stage-1:2222" and target.params["keyfile"] == "/k/id"
    local = parse_libvirt_uri("qemu:///system")
    assert local.transport == "" and local.hostname is None


@pytest.fixture
def libvirt_over_ssh(sshd: Sshd, tmp_path: Path, kata_libvirtd: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """A qemu+ssh:// URI that reaches this machine's libvirtd through the loopback sshd (libvirt's own ssh
    transport and virt-ssh-helper), with the test's keys and known_hosts (never root's ~/.ssh)."""
    if not shutil.which("virt-ssh-helper"):
        pytest.skip("virt-ssh-helper (libvirt-daemon) is not installed")
    monkeypatch.setenv(CONFIG_ENV, str(sshd.ssh_config))
    wrapper = tmp_path / "ssh-for-libvirt"
    wrapper.write_text(f'#!/bin/sh\nexec ssh -F {sshd.ssh_config} -o StrictHostKeyChecking=accept-new "$@"\n')
    wrapper.chmod(0o755)
    return f"qemu+ssh://root@127.0.0.1:{sshd.port}/system?keyfile={sshd.client_key}&command={wrapper}"


def test_cli_install_rollback_on_a_kvm_host_named_by_its_libvirt_uri(
        libvirt_over_ssh: str, sshd: Sshd, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pytest-kata install --host qemu+ssh://...``: the hypervisor's machine, reached over SSH as libvirt
    reaches it, checked to be the same machine libvirt answers for, its KVM state said before installing."""
    sysroot = tmp_path / "root"
    sysroot.mkdir()
    bundle = make_bundle_tarball(tmp_path / "bundle", "3.31.0")
    target = ["--host", libvirt_over_ssh, "--sysroot", str(sysroot), "--containerd", "none"]
    assert main(["install", *target, "--bundle", str(bundle)]) == 0
    captured = capsys.readouterr()
    assert f"on root@127.0.0.1:{sshd.port}" in captured.out
    expected_kvm = "KVM usable" if detect_local()[0] == "kvm" else "NO usable KVM"
    assert "qemu " in captured.err and f"via {libvirt_over_ssh}; {expected_kvm}" in captured.err
    assert (sysroot / "opt/kata/VERSION").read_text() == "3.31.0\n"
    assert main(["rollback", *target, "--uninstall"]) == 0
    assert "state digest equals" in capsys.readouterr().out and not (sysroot / "opt/kata").exists()


def test_libvirt_uri_and_shell_on_different_machines_are_refused(kata_libvirtd: Any, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: an sshd in its own UTS namespace (hostname 'elsewhere') answers the shell, while
    libvirt behind the same URI answers with this machine's name — as a port forward to the wrong machine
    would. Refused before anything is installed, in one line."""
    if not shutil.which("unshare") or not shutil.which("virt-ssh-helper"):
        pytest.skip("needs unshare (util-linux) and virt-ssh-helper (libvirt-daemon)")
    wrap = ("unshare", "--uts", "sh", "-c", 'hostname elsewhere && exec "$0" "$@"')
    with running_sshd(tmp_path / "sshd", wrap=wrap) as other:
        monkeypatch.setenv(CONFIG_ENV, str(other.ssh_config))
        wrapper = tmp_path / "ssh-for-libvirt"
        wrapper.write_text(f'#!/bin/sh\nexec ssh -F {other.ssh_config} -o StrictHostKeyChecking=accept-new "$@"\n')
        wrapper.chmod(0o755)
        uri = f"qemu+ssh://root@127.0.0.1:{other.port}/system?keyfile={other.client_key}&command={wrapper}"
        sysroot = tmp_path / "root"
        sysroot.mkdir()
        assert main(["install", "--host", uri, "--sysroot", str(sysroot), "--bundle",
                     str(make_bundle_tarball(tmp_path / "bundle", "3.31.0"))]) == 2
    err = capsys.readouterr().err
    assert f"the libvirt URI reaches '{socket.gethostname().split('.')[0]}" in err
    errors = [line for line in err.splitlines() if not line.startswith("[kata")]  # progress lines aside
    assert len(errors) == 1 and "but the shell reaches 'elsewhere': not the same machine" in errors[0]
    assert not (sysroot / "opt").exists()
