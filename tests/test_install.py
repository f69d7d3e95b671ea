"""Install, upgrade and rollback on a real local sysroot: real tar extraction, real files, the atomic switch,
a real (private) containerd parsing our drop-ins, injected failures, interrupted installs, and the negative
controls (residue, a config rewritten without backup) caught with the exact difference."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.bundle import open_bundle
from pytest_kata.cli import main
from pytest_kata.hosts.base import LocalHost, RunResult
from pytest_kata.install import Installer, InstallError, SysrootContainerd, capture_state, diff_states
from pytest_kata.install.installer import add_import
from pytest_kata.install.journal import Journal, JournalError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fixtures" / "configs" / "upstream"
needs_containerd = pytest.mark.skipif(not shutil.which("containerd") or os.geteuid() != 0,
                                      reason="needs containerd and root (a private containerd is started)")


def make_bundle(root: Path, version: str, *, extra: dict[str, str] | None = None,
                shims: tuple[str, ...] = ("qemu",), shim_binary: bool = True) -> Any:
    """A small kata-static-layout tree, opened through the real bundle code. Its shim binary is a placeholder
    script that no containerd can start (a broken shim); ``shim_binary=False`` leaves it out, as the
    reference candidate does."""
    kata = root / "opt" / "kata"
    (kata / "bin").mkdir(parents=True)
    (kata / "VERSION").write_text(version + "\n")
    defaults = kata / "share/defaults/kata-containers"
    defaults.mkdir(parents=True)
    for shim in shims:
        shutil.copy(CONFIGS / f"configuration-{shim}.toml", defaults / f"configuration-{shim}.toml")
    (defaults / "configuration.toml").symlink_to(f"configuration-{shims[0]}.toml")
    if shim_binary:
        shim_bin = kata / "bin/containerd-shim-kata-v2"
        shim_bin.write_text(f"#!/bin/sh\necho 'placeholder shim {version}'\n")
        shim_bin.chmod(0o755)
    for rel, text in (extra or {}).items():
        path = kata / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return open_bundle(kata)


@pytest.fixture
def bundles(tmp_path: Path) -> tuple[Any, Any]:
    baseline = make_bundle(tmp_path / "baseline", "3.30.0",
                           extra={"share/kata-containers/vmlinuz-6.1.0-ref": "kernel A",
                                  "share/kata-containers/common.txt": "baseline text"})
    candidate = make_bundle(tmp_path / "candidate", "3.31.0", shims=("qemu", "clh"),
                            extra={"share/kata-containers/vmlinuz-6.2.0-ref": "kernel B",
                                   "share/kata-containers/common.txt": "candidate text"})
    return baseline, candidate


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
def containerd(sysroot: Path) -> Any:
    if not shutil.which("containerd") or os.geteuid() != 0:
        pytest.skip("needs containerd and root (a private containerd is started)")
    service = SysrootContainerd.prepare(sysroot)
    service.start()
    yield service
    service.stop()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------ state


def test_state_manifest_digest_and_exact_difference(sysroot: Path) -> None:
    tree = sysroot / "opt/kata-releases/1.0.0-abc"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin/tool").write_bytes(b"\x7fELF binary")
    (tree / "bin/tool").chmod(0o755)
    (tree / "link").symlink_to("bin/tool")
    (sysroot / "opt/kata").symlink_to("kata-releases/1.0.0-abc")
    (sysroot / "etc/containerd").mkdir(parents=True)
    (sysroot / "etc/containerd/config.toml").write_text("version = 2\n")
    (sysroot / "usr/local/bin").mkdir(parents=True)
    (sysroot / "usr/local/bin/kata-runtime").symlink_to("/opt/kata/bin/kata-runtime")
    (sysroot / "usr/local/bin/unrelated").write_text("not ours")

    state = capture_state(LocalHost(), str(sysroot))
    tool = state.entries["/opt/kata-releases/1.0.0-abc/bin/tool"]
    assert (tool.kind, tool.mode, tool.uid, tool.sha256) == ("file", 0o755, os.geteuid(),
                                                             sha256(tree / "bin/tool"))
    assert state.entries["/opt/kata"].target == "kata-releases/1.0.0-abc" and state.release == "1.0.0-abc"
    assert state.entries["/opt/kata-releases/1.0.0-abc/link"].target == "bin/tool"
    assert "/usr/local/bin/kata-runtime" in state.entries and "/usr/local/bin/unrelated" not in state.entries
    assert state.configs == {"/etc/containerd/config.toml": "version = 2\n"}
    assert capture_state(LocalHost(), str(sysroot)).digest == state.digest  # stable

    (tree / "bin/tool").chmod(0o700)
    (sysroot / "etc/containerd/config.toml").write_text("version = 2\nimports = []\n")
    after = capture_state(LocalHost(), str(sysroot))
    diff = diff_states(state, after)
    assert after.digest != state.digest and not diff.equal
    lines = diff.lines()
    assert "~ /opt/kata-releases/1.0.0-abc/bin/tool: mode 0755 -> 0700" in lines
    assert any(line.startswith("~ /etc/containerd/config.toml: size 12 -> 25") for line in lines)
    assert "  +imports = []" in lines  # the config difference, line by line


class ShellOnlyHost:
    """This machine reached only through ``run``: exercises the capture path remote hosts take."""

    name = "shell-only"

    def __init__(self) -> None:
        self.local = LocalHost("shell-only")

    def run(self, cmd: Any, **kwargs: Any) -> RunResult:
        return self.local.run(cmd, **kwargs)

    def put(self, local: Any, remote: str, *, mode: int | None = None) -> None:
        self.local.put(local, remote, mode=mode)

    def get(self, remote: str, local: Any) -> None:
        self.local.get(remote, local)


def test_shell_capture_for_remote_hosts_agrees_with_the_local_walk(sysroot: Path) -> None:
    tree = sysroot / "opt/kata"
    (tree / "dir with space").mkdir(parents=True)
    (tree / "dir with space/file\twith tab").write_text("x")
    (tree / "empty").write_bytes(b"")
    (tree / "setuid").write_text("s")
    (tree / "setuid").chmod(0o4755)
    (tree / "abs-link").symlink_to("/nonexistent/target")
    (sysroot / "etc/containerd/conf.d").mkdir(parents=True)
    (sysroot / "etc/containerd/conf.d/kata-qemu.toml").write_text("version = 2\n")
    local = capture_state(LocalHost(), str(sysroot))
    remote = capture_state(ShellOnlyHost(), str(sysroot))  # type: ignore[arg-type]
    assert diff_states(local, remote).lines() == []
    assert remote.digest == local.digest and len(remote.entries) == 9


# ------------------------------------------------------------------------------------------------ install


@needs_containerd
def test_upgrade_and_rollback_restore_the_state_byte_for_byte(sysroot: Path, bundles: tuple[Any, Any],
                                                              containerd: SysrootContainerd) -> None:
    baseline, candidate = bundles
    installer = Installer(LocalHost(), str(sysroot), containerd=containerd)
    first = installer.install(baseline)
    assert first.release == f"3.30.0-{baseline.sha256[:12]}" and first.containerd_mode == "imports"
    prefix = sysroot / "opt/kata"
    assert prefix.is_symlink() and os.readlink(prefix) == f"kata-releases/{first.release}"
    assert (prefix / "share/kata-containers/common.txt").read_text() == "baseline text"
    assert set(containerd.handlers()) >= {"kata-qemu"} and "kata-clh" not in containerd.handlers()
    config_before_upgrade = (sysroot / "etc/containerd/config.toml").read_bytes()
    state_before = installer.capture()

    second = installer.install(candidate)
    assert second.containerd_mode == "dropin", "the first install already made containerd import conf.d"
    assert (prefix / "share/kata-containers/common.txt").read_text() == "candidate text"
    reported = containerd.handlers()  # containerd's own view (config dump), after a real restart
    assert reported["kata-clh"]["config_path"] == \
        f"{sysroot}/opt/kata/share/defaults/kata-containers/configuration-clh.toml"
    assert reported["kata-qemu"]["runtime_path"] == f"{sysroot}/opt/kata/bin/containerd-shim-kata-v2"
    assert (sysroot / "opt/kata-releases" / first.release).is_dir(), "the previous release is kept"

    report = installer.rollback()
    assert report.restored and report.residue == [] and report.difference() == []
    assert report.digest_after == state_before.digest == second.digest_before
    assert (prefix / "share/kata-containers/common.txt").read_text() == "baseline text"
    assert not (sysroot / "opt/kata-releases" / second.release).exists()
    assert (sysroot / "etc/containerd/config.toml").read_bytes() == config_before_upgrade
    assert "kata-clh" not in containerd.handlers() and containerd.answers()

    again = installer.rollback()
    assert again.noop and "second rollback is a no-op" in again.message
    assert installer.capture().digest == state_before.digest


def test_first_install_rollback_says_there_is_no_previous_release(sysroot: Path, bundles: tuple[Any, Any]
                                                                   ) -> None:
    installer = Installer(LocalHost(), str(sysroot))
    empty = installer.capture()
    report = installer.install(bundles[0])
    assert any("skipped" in note for note in report.notes), "no containerd: restart/verify skipped with reason"
    with pytest.raises(InstallError, match="no previous release to roll back to"):
        installer.rollback()
    removed = installer.rollback(uninstall=True)
    assert removed.restored and installer.capture().digest == empty.digest
    assert sorted(p.name for p in sysroot.iterdir()) == ["var"]  # only the journal remains


def test_nothing_installed_rollback_is_a_noop(sysroot: Path) -> None:
    report = Installer(LocalHost(), str(sysroot)).rollback()
    assert report.noop and report.message.startswith("nothing to roll back: no install recorded")


def test_legacy_real_opt_kata_is_moved_aside_and_restored(sysroot: Path, bundles: tuple[Any, Any]) -> None:
    legacy = sysroot / "opt/kata"
    (legacy / "bin").mkdir(parents=True)
    (legacy / "bin/old").write_text("a tar -C / install")
    installer = Installer(LocalHost(), str(sysroot))
    before = installer.capture()
    installer.install(bundles[1])
    assert legacy.is_symlink() and not (legacy / "bin/old").exists()
    assert installer.rollback().restored
    assert not legacy.is_symlink() and (legacy / "bin/old").read_text() == "a tar -C / install"
    assert installer.capture().digest == before.digest


# ------------------------------------------------------------------------------------------------ containerd


def test_add_import_keeps_every_other_byte() -> None:
    text = "# my containerd\nversion = 2\nroot = \"/var/lib/containerd\"\n\n[plugins]\n"
    new = add_import(text, {"version": 2}, "/etc/containerd/conf.d/*.toml")
    assert new == 'imports = ["/etc/containerd/conf.d/*.toml"]\n' + text
    existing = 'version = 2\nimports = [\n  "/a/*.toml",\n]\n[x]\ny = 1\n'
    assert add_import(existing, {"imports": ["/a/*.toml"]}, "/b/*.toml") == \
        'version = 2\nimports = ["/a/*.toml", "/b/*.toml"]\n[x]\ny = 1\n'


@needs_containerd
@pytest.mark.parametrize("kind", ["v2-without-imports", "v2-importing-conf.d", "v1-no-dropins"])
def test_containerd_config_modes_and_restore(sysroot: Path, bundles: tuple[Any, Any], kind: str) -> None:
    dropins = f"{sysroot}/etc/containerd/conf.d/*.toml"
    service = SysrootContainerd.prepare(sysroot, version=1 if kind.startswith("v1") else 2,
                                        imports=[dropins] if kind == "v2-importing-conf.d" else None)
    if kind == "v2-importing-conf.d":
        (sysroot / "etc/containerd/conf.d").mkdir()
    config = sysroot / "etc/containerd/config.toml"
    original = config.read_bytes()
    service.start()
    try:
        installer = Installer(LocalHost(), str(sysroot), containerd=service)
        before = installer.capture()
        report = installer.install(bundles[0])
        expected_mode = {"v2-without-imports": "imports", "v2-importing-conf.d": "dropin",
                         "v1-no-dropins": "whole-file"}[kind]
        assert report.containerd_mode == expected_mode
        assert service.handlers()["kata-qemu"]["runtime_type"] == "io.containerd.kata-qemu.v2"
        backups = sorted(config.parent.glob("config.toml.pytest-kata-*.bak"))
        if expected_mode == "dropin":
            assert config.read_bytes() == original and backups == []
        else:
            assert config.read_bytes() != original and [b.read_bytes() for b in backups] == [original]
        if expected_mode == "imports":  # only the imports line differs
            old, new = original.decode().splitlines(), config.read_text().splitlines()
            assert [x for x in new if x not in old] == [f'imports = ["{dropins}"]']
            assert [x for x in old if x not in new] in ([], ["imports = []"])
        rollback = installer.rollback(uninstall=True)
        assert rollback.restored, rollback.difference()
        assert config.read_bytes() == original and not list(config.parent.glob("*.bak"))
        assert installer.capture().digest == before.digest
    finally:
        service.stop()


def test_broken_containerd_config_is_refused_before_any_change(sysroot: Path, bundles: tuple[Any, Any]) -> None:
    config = sysroot / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("version = 2\n[plugins\n")
    installer = Installer(LocalHost(), str(sysroot))
    before = installer.capture()
    with pytest.raises(InstallError, match=r"failed at step containerd-config: .*config.toml: not valid TOML"):
        installer.install(bundles[0])
    assert installer.capture().digest == before.digest


# ------------------------------------------------------------------------------------------------ failures


def corrupt_archive(step: str, installer: Installer) -> None:
    if step == "unpack":
        staged = Path(installer.journal.last("install").step("stage").data["staged"])  # type: ignore[union-attr]
        data = staged.read_bytes()
        staged.write_bytes(data[: len(data) // 2] + b"\xff" * 1024)


@needs_containerd
def test_corrupt_archive_rolls_back_by_itself(sysroot: Path, bundles: tuple[Any, Any],
                                              containerd: SysrootContainerd) -> None:
    installer = Installer(LocalHost(), str(sysroot), containerd=containerd)
    installer.install(bundles[0])
    before = installer.capture()
    installer.inject = corrupt_archive
    with pytest.raises(InstallError, match=r"failed at step unpack: .*rolled back, host state restored"):
        installer.install(bundles[1])
    assert installer.capture().digest == before.digest
    assert not list((sysroot / "opt/kata-releases").glob("*partial*"))
    assert installer.journal.last("install").status == "aborted"  # type: ignore[union-attr]


@needs_containerd
def test_killed_containerd_rolls_back_and_containerd_comes_back(sysroot: Path, bundles: tuple[Any, Any],
                                                                containerd: SysrootContainerd) -> None:
    installer = Installer(LocalHost(), str(sysroot), containerd=containerd)
    installer.install(bundles[0])
    before = installer.capture()

    def kill_containerd(step: str, inst: Installer) -> None:
        if step == "verify-handlers":
            containerd.kill()

    installer.inject = kill_containerd
    with pytest.raises(InstallError, match=r"failed at step verify-handlers: .*does not answer.*host state restored"):
        installer.install(bundles[1])
    assert containerd.answers(), "the rollback restarts containerd"
    assert installer.capture().digest == before.digest and "kata-clh" not in containerd.handlers()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_rolls_back_by_itself(sysroot: Path, bundles: tuple[Any, Any]) -> None:
    releases = sysroot / "opt/kata-releases"
    releases.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k,mode=0755", "kt-test-full", str(releases)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
    try:
        installer = Installer(LocalHost(), str(sysroot))
        before = installer.capture()
        big = make_bundle(sysroot.parent / "big", "3.31.0", extra={"share/blob": "x" * 200_000})
        with pytest.raises(InstallError, match=r"failed at step unpack: .*No space left on device.*restored"):
            installer.install(big)
        assert installer.capture().digest == before.digest and list(releases.iterdir()) == []
    finally:
        subprocess.run(["umount", str(releases)], check=True)


@pytest.mark.parametrize("step", ["capture-before", "stage", "switch", "containerd-config"])
def test_failure_at_any_step_leaves_the_host_as_it_was(sysroot: Path, bundles: tuple[Any, Any], step: str) -> None:
    installer = Installer(LocalHost(), str(sysroot))
    installer.install(bundles[0])
    before = installer.capture()

    def fail(name: str, inst: Installer) -> None:
        if name == step:
            raise OSError(f"injected failure at {name}")

    installer.inject = fail
    with pytest.raises(InstallError, match=f"failed at step {step}: injected failure.*host state restored"):
        installer.install(bundles[1])
    assert installer.capture().digest == before.digest


CRASH = textwrap.dedent("""
    import os, signal, sys
    from pytest_kata.bundle import open_bundle
    from pytest_kata.hosts.base import LocalHost
    from pytest_kata.install import Installer
    def crash(step, installer):
        if step == sys.argv[3]:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no undo: a power cut
    Installer(LocalHost(), sys.argv[1], inject=crash).install(open_bundle(sys.argv[2]))
""")


def crash_install(sysroot: Path, bundle: Any, step: str) -> None:
    proc = subprocess.run([sys.executable, "-c", CRASH, str(sysroot), str(bundle.root), step],
                          capture_output=True, text=True, env={**os.environ, "PYTEST_KATA_QUIET": "1"})
    assert proc.returncode == -9, proc.stderr


def test_interrupted_install_can_be_resumed_or_rolled_back(sysroot: Path, bundles: tuple[Any, Any]) -> None:
    baseline, candidate = bundles
    installer = Installer(LocalHost(), str(sysroot))
    installer.install(baseline)
    before = installer.capture()
    crash_install(sysroot, candidate, "containerd-config")  # killed after unpack and switch
    last = installer.journal.last("install")
    assert last is not None and last.status == "running" and last.done_steps[-1] == "switch"
    assert os.readlink(sysroot / "opt/kata").startswith("kata-releases/3.31.0-")
    resumed = installer.resume(candidate)
    assert resumed.tx == last.id and installer.journal.last("install").status == "committed"  # type: ignore
    assert (sysroot / "etc/containerd/conf.d/kata-runtimes.toml").is_file()
    assert installer.rollback().restored and installer.capture().digest == before.digest

    crash_install(sysroot, candidate, "verify-handlers")
    report = installer.rollback()
    assert report.restored and installer.capture().digest == before.digest
    assert installer.journal.last("install").status == "aborted"  # type: ignore[union-attr]


def test_journal_survives_a_torn_last_line_but_not_a_corrupt_one(sysroot: Path, bundles: tuple[Any, Any]) -> None:
    installer = Installer(LocalHost(), str(sysroot))
    installer.install(bundles[0])
    path = Path(installer.journal.path)
    path.write_text(path.read_text() + '{"tx": "torn')
    assert installer.journal.last("install").status == "committed"  # type: ignore[union-attr]
    path.write_text('garbage\n' + path.read_text())
    with pytest.raises(JournalError, match="line 1 is not JSON"):
        Journal(LocalHost(), str(sysroot)).transactions()


# ------------------------------------------------------------------------------------------------ negative controls


def test_negative_control_in_place_upgrade_leaves_residue_with_exact_difference(
        sysroot: Path, bundles: tuple[Any, Any]) -> None:
    baseline, candidate = bundles
    installer = Installer(LocalHost(), str(sysroot), layout="in-place")  # upstream's tar -C / over the tree
    installer.install(baseline)
    before = installer.capture()
    installer.install(candidate)
    report = installer.rollback()
    assert not report.restored, "extract-over-the-old-tree leaves the candidate's files: must be caught"
    assert [line.split(":")[0] for line in report.residue] == [
        "/opt/kata/share/defaults/kata-containers/configuration-clh.toml",
        "/opt/kata/share/kata-containers/vmlinuz-6.2.0-ref"]
    assert "+ /opt/kata/share/kata-containers/vmlinuz-6.2.0-ref: file 8 bytes" in "\n".join(report.difference())
    # what the candidate changed in files both releases have is restored (the baseline is re-extracted)
    assert (sysroot / "opt/kata/share/kata-containers/common.txt").read_text() == "baseline text"
    assert installer.capture().digest != before.digest


class CarelessInstaller(Installer):
    """Rewrites the containerd config without keeping a backup (what a careless installer does)."""

    def backup_config(self, tx: str, path: str) -> str | None:
        return None


def test_negative_control_config_rewritten_without_backup_is_caught(sysroot: Path,
                                                                    bundles: tuple[Any, Any]) -> None:
    config = sysroot / "etc/containerd/config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('# site config\nversion = 2\nroot = "/var/lib/containerd"\n')
    careful = Installer(LocalHost(), str(sysroot))
    careful.install(bundles[0])
    before = careful.capture()
    careful.install(bundles[1])
    assert careful.rollback().restored  # the positive control: with a backup, restored byte for byte

    (sysroot / "etc/containerd/conf.d").joinpath("unrelated.toml").write_text("version = 2\n")
    config.write_text('# site config\nversion = 2\nroot = "/var/lib/containerd"\n')  # no imports line again
    before = careful.capture()
    careless = CarelessInstaller(LocalHost(), str(sysroot))
    careless.install(bundles[1])
    report = careless.rollback()
    assert not report.restored
    difference = report.difference()
    assert any(line.startswith("~ /etc/containerd/config.toml: size") for line in difference)
    assert f'  +imports = ["{sysroot}/etc/containerd/conf.d/*.toml"]' in difference
    assert report.digest_expected == before.digest != report.digest_after


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_state_install_rollback(sysroot: Path, bundles: tuple[Any, Any], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["state", "--sysroot", str(sysroot), "--json"]) == 0
    saved = tmp_path / "state.json"
    saved.write_text(capsys.readouterr().out)
    assert main(["install", "--sysroot", str(sysroot), "--bundle", str(bundles[0].root)]) == 0
    assert main(["install", "--sysroot", str(sysroot), "--bundle", str(bundles[1].root), "--shim", "clh"]) == 0
    out = capsys.readouterr().out
    assert "installed 3.31.0-" in out and "handlers: kata-clh" in out
    assert main(["state", "--sysroot", str(sysroot), "--compare", str(saved)]) == 1
    assert "DIFFERENT" in capsys.readouterr().out
    assert main(["rollback", "--sysroot", str(sysroot)]) == 0
    assert "state digest equals" in capsys.readouterr().out
    assert main(["rollback", "--sysroot", str(sysroot)]) == 0
    assert "no-op" in capsys.readouterr().out
    assert main(["install", "--sysroot", str(sysroot), "--bundle", str(bundles[1].root), "--shim", "nope"]) == 2
    assert "no shim nope in the bundle" in capsys.readouterr().err
    assert main(["install", "--host", "qemu+tcp://stage-1/system", "--bundle", str(bundles[1].root)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
