"""Image building blocks and guest image recipes: real mkfs.ext4/sfdisk/debugfs/cpio, real mmdebstrap and qemu.

Fast tests exercise the building blocks on small trees; the ``slow`` ones build the guest recipes (cached by
content hash, so a warm cache makes them cheap) and boot the reference guest once per mode under TCG.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import time
from pathlib import Path

import pexpect
import pytest

from pytest_kata.errors import ConfigError, KataError
from pytest_kata.images import common
from pytest_kata.images.common import (
    cached,
    content_hash,
    host_kernel,
    make_ext4_disk,
    make_ext4_fs,
    make_initrd,
)

AGENT = "usr/bin/kata-agent"


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc").mkdir()
    (root / AGENT).write_text("#!/bin/sh\necho placeholder\n")
    (root / AGENT).chmod(0o755)
    (root / "etc/hostname").write_text("guest\n")
    (root / "usr/bin/sh").symlink_to("busybox")
    for i in range(20):
        (root / "etc" / f"f{i}").write_text(str(i) * i)
    return root


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(cache))
    return cache


def _debugfs(spec: str, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["debugfs", "-R", command, spec], capture_output=True, text=True)


# ---------------------------------------------------------------------------------------------- ext4 disks
def test_partitioned_disk_has_ext4_in_partition_one(tree: Path, tmp_path: Path) -> None:
    disk = make_ext4_disk(tree, tmp_path / "guest.image")
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk.path)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    (part,) = table["partitions"]
    assert part["type"] == "83" and part["start"] * 512 == disk.partition_offset == 1024 * 1024
    assert (part["start"] + part["size"]) * 512 <= disk.path.stat().st_size
    stat = _debugfs(f"{disk.path}?offset={disk.partition_offset}", f"stat /{AGENT}")
    assert "Type: regular" in stat.stdout and "Mode:  0755" in stat.stdout, stat.stderr
    fsck = subprocess.run(["e2fsck", "-fn", f"{disk.path}?offset={disk.partition_offset}"], capture_output=True,
                          text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # Negative control: at offset 0 there is a partition table, not a filesystem.
    assert "Type: regular" not in _debugfs(str(disk.path), f"stat /{AGENT}").stdout


def test_gpt_and_bare_filesystem(tree: Path, tmp_path: Path) -> None:
    gpt = make_ext4_disk(tree, tmp_path / "gpt.image", table="gpt")
    table = json.loads(subprocess.run(["sfdisk", "--json", str(gpt.path)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["partitions"][0]["type"] == common.LINUX_GPT_TYPE
    bare = tmp_path / "bare.ext4"
    size = make_ext4_fs(tree, bare)
    assert bare.stat().st_size == size
    assert "Type: regular" in _debugfs(str(bare), f"stat /{AGENT}").stdout
    with pytest.raises(KataError, match="unknown partition table"):
        make_ext4_disk(tree, tmp_path / "x.image", table="apm")


def test_images_are_reproducible_from_equal_trees(tree: Path, tmp_path: Path) -> None:
    twin = tmp_path / "twin"
    shutil.copytree(tree, twin, symlinks=True)
    time.sleep(1.1)
    (twin / "etc/hostname").write_text("guest\n")  # same content, new mtime and ctime
    outputs = {}
    for name, root in (("a", tree), ("b", twin)):
        outputs[name] = (make_ext4_disk(root, tmp_path / f"{name}.image").path,
                         tmp_path / f"{name}.initrd")
        make_initrd(root, outputs[name][1])
    assert _sha(outputs["a"][0]) == _sha(outputs["b"][0])
    assert _sha(outputs["a"][1]) == _sha(outputs["b"][1])
    # ... and a content change shows.
    (twin / "etc/hostname").write_text("other\n")
    make_initrd(twin, tmp_path / "c.initrd")
    assert _sha(tmp_path / "c.initrd") != _sha(outputs["a"][1])


def test_mkfs_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(KataError, match="not a directory"):
        make_ext4_disk(tmp_path / "absent", tmp_path / "x.image")
    (tmp_path / "t").mkdir()
    with pytest.raises(KataError) as exc:
        make_ext4_fs(tmp_path / "t", tmp_path / "tiny.ext4", size=4096 * 3)  # far too small for ext4
    assert "\n" not in str(exc.value) and "mkfs.ext4" in str(exc.value)


# ---------------------------------------------------------------------------------------------- initrd
@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_initrd_is_sorted_root_owned_newc(tree: Path, tmp_path: Path, compress: str) -> None:
    out = tmp_path / f"initrd.{compress}"
    count = make_initrd(tree, out, compress=compress)
    raw = gzip.decompress(out.read_bytes()) if compress == "gzip" else _unzstd(out.read_bytes())
    assert raw.startswith(b"070701")
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=raw, capture_output=True, check=True).stdout
    lines = listing.decode().splitlines()
    names = [ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in lines]
    assert len(names) == count and names == sorted(names)
    assert AGENT in names
    assert all(" root " in ln for ln in lines)
    assert all("2023" in ln for ln in lines)  # SOURCE_DATE_EPOCH, not today
    with pytest.raises(KataError, match="unknown initrd compression"):
        make_initrd(tree, tmp_path / "x", compress="lz4")


def _unzstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().stream_reader(data).read()


# ---------------------------------------------------------------------------------------------- hash + cache
def test_content_hash_sees_content_mode_and_links(tree: Path) -> None:
    before = content_hash(tree)
    assert content_hash(tree) == before
    (tree / AGENT).chmod(0o4755)
    assert content_hash(tree) != before
    (tree / AGENT).chmod(0o755)
    assert content_hash(tree) == before
    (tree / "usr/bin/sh").unlink()
    (tree / "usr/bin/sh").symlink_to("dash")
    assert content_hash(tree) != before
    assert content_hash("ab", "c") != content_hash("a", "bc")


def test_cached_builds_once_and_never_keeps_a_failed_build(private_cache: Path) -> None:
    calls = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "artefact").write_text("x")

    first = cached("unit", "k1", build)
    start = time.monotonic()
    again = cached("unit", "k1", build)
    assert again == first and len(calls) == 1 and time.monotonic() - start < 0.1
    assert (first / "artefact").read_text() == "x"

    def broken(out: Path) -> None:
        (out / "half").write_text("partial")
        raise RuntimeError("build died")

    with pytest.raises(RuntimeError):
        cached("unit", "k2", broken)
    assert not (private_cache / "unit/k2").exists()
    assert not list((private_cache / "unit").glob(".tmp-*"))
    cached("unit", "k1", build, force=True)
    assert len(calls) == 2
    with pytest.raises(KataError, match="invalid cache"):
        cached("unit", "../escape", build)


def _racing_builder(cache: str, counter: str) -> None:
    os.environ["PYTEST_KATA_CACHE"] = cache

    def build(out: Path) -> None:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (out / "done").write_text("ok")

    cached("race", "same-key", build)


def test_concurrent_builders_build_once(private_cache: Path, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_racing_builder, args=(str(private_cache), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("built") == 1
    assert (private_cache / "race/same-key/done").read_text() == "ok"


def test_host_kernel_is_the_debian_kernel() -> None:
    kernel = host_kernel()
    assert kernel.vmlinuz.exists() and kernel.config.exists()
    assert kernel.release in kernel.vmlinuz.name and (kernel.modules_dir / "modules.dep").exists()


# ---------------------------------------------------------------------------------------------- recipes
def _recipe_copy(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_shipped_recipes_load() -> None:
    from pytest_kata.images.guest import list_recipes, load_recipe

    assert {"reference", "baseline", "minimal"} <= set(list_recipes())
    minimal = load_recipe("guest-minimal")
    assert minimal.read_only_root and minimal.lock_modules and minimal.strip_setuid
    assert minimal.sysctl["kernel.kptr_restrict"] == 2 and "dpkg" in minimal.purge
    assert load_recipe("baseline").init == "systemd"


@pytest.mark.parametrize(("text", "message"), [
    ("variant = 'custom'\npackages = [\n", "malformed TOML"),
    ("variant = 'custom'\npackages = ['dpkg']\nbogus = 1\n", "unknown recipe key"),
    ("variant = 'custom'\npackages = 'dpkg'\n", "must be a list"),
    ("variant = 'custom'\npackages = ['busybox-static']\n", "needs 'dpkg'"),
    ("variant = 'weird'\npackages = ['dpkg']\n", "expected one of"),
    ("packages = ['dpkg']\n", "'variant' is required"),
    ("variant = 'minbase'\npackages = ['Bad Name']\n", "invalid Debian package name"),
])
def test_bad_recipe_is_one_line(tmp_path: Path, text: str, message: str) -> None:
    from pytest_kata.images.guest import load_recipe

    path = _recipe_copy(tmp_path, "bad", text)
    with pytest.raises(ConfigError) as exc:
        load_recipe(path)
    assert message in str(exc.value) and str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_package_fails_before_mmdebstrap(tmp_path: Path, private_cache: Path) -> None:
    from pytest_kata.images.guest import load_recipe, resolve_versions

    path = _recipe_copy(tmp_path, "typo", "variant = 'minbase'\npackages = ['busybox-static', "
                                          "'no-such-package-pytest-kata']\ninit = 'systemd'\n")
    with pytest.raises(KataError, match=r"unknown package.*no-such-package-pytest-kata"):
        resolve_versions(load_recipe(path))


def test_key_follows_recipe_and_package_versions(tmp_path: Path) -> None:
    from pytest_kata.images.guest import guest_key, load_recipe, recipes_dir

    kernel = host_kernel()
    text = (recipes_dir() / "reference.toml").read_text()
    a = load_recipe(_recipe_copy(tmp_path, "reference", text))
    versions = {"busybox-static": "1:1.35.0-4", "dpkg": "1.21.23"}
    key = guest_key(a, versions, kernel)
    assert guest_key(load_recipe(_recipe_copy(tmp_path, "reference", text + "\n# comment\n")), versions,
                     kernel) == key  # formatting is not content
    changed = load_recipe(_recipe_copy(tmp_path, "reference", text.replace("read_only_root = true",
                                                                           "read_only_root = false")))
    assert guest_key(changed, versions, kernel) != key
    assert guest_key(a, {**versions, "dpkg": "1.21.24"}, kernel) != key


def test_module_load_order_puts_dependencies_first() -> None:
    from pytest_kata.images.guest import module_load_order

    order = [Path(p).name for p in module_load_order(host_kernel(), ["virtio_blk", "ext4"])]
    assert order.index("virtio.ko") < order.index("virtio_blk.ko")
    assert order.index("jbd2.ko") < order.index("ext4.ko")
    with pytest.raises(KataError, match="no_such_module"):
        module_load_order(host_kernel(), ["no_such_module"])


def test_cli_unknown_image_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_kata.cli import main

    assert main(["images", "build", "guest-nosuch"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[kata")]
    assert len(err) == 1 and "no guest image recipe" in err[0] and "guest-minimal" in err[0]


# ---------------------------------------------------------------------------------------------- real builds
@pytest.fixture(scope="session")
def reference_guest():
    from pytest_kata.images.guest import build_guest

    return build_guest("reference")


@pytest.fixture(scope="session")
def minimal_guest():
    from pytest_kata.images.guest import build_guest

    return build_guest("minimal")


@pytest.mark.slow
def test_reference_guest_image_layout(reference_guest) -> None:
    g = reference_guest
    assert g.image.name == "kata-debian-12-reference.image" and g.initrd.name.endswith(".initrd")
    spec = f"{g.image}?offset={g.partition_offset}"
    assert "Type: regular" in _debugfs(spec, f"stat /{AGENT}").stdout
    inside = _debugfs(spec, "cat /var/lib/osbuilder/osbuilder.yaml").stdout
    assert "file-format-version: 0.0.2" in inside and f"key: {g.key}" in inside
    status = _debugfs(spec, "cat /var/lib/dpkg/status").stdout
    assert "Package: busybox-static" in status  # a real dpkg database for scanners
    assert g.packages["busybox-static"] in status
    modules = _debugfs(spec, "cat /etc/kata-guest/modules").stdout.split()
    assert any(m.endswith("/virtio_blk.ko") for m in modules) and any(m.endswith("/ext4.ko") for m in modules)
    manifest = {e["path"]: e for e in json.loads(g.rootfs_manifest.read_text())}
    assert manifest[AGENT]["mode"] == 0o755 and manifest["init"]["type"] == "file"


@pytest.mark.slow
def test_cache_hit_is_instant(reference_guest) -> None:
    from pytest_kata.images.guest import build_guest

    start = time.monotonic()
    again = build_guest("guest-reference")
    assert time.monotonic() - start < 2.0
    assert not again.built and again.key == reference_guest.key and again.image == reference_guest.image


@pytest.mark.slow
def test_minimal_guest_is_hardened(minimal_guest) -> None:
    g = minimal_guest
    manifest = json.loads(g.rootfs_manifest.read_text())
    paths = {e["path"] for e in manifest}
    assert not {"usr/bin/dpkg", "bin/tar", "usr/bin/apt"} & paths
    assert not [e["path"] for e in manifest if e["type"] == "file" and e["mode"] & 0o6000]
    assert "dpkg" not in g.packages and "busybox-static" in g.packages
    spec = f"{g.image}?offset={g.partition_offset}"
    sysctl = _debugfs(spec, "cat /etc/sysctl.d/90-kata-hardening.conf").stdout
    for line in ("kernel.kptr_restrict = 2", "kernel.modules_disabled = 1", "fs.suid_dumpable = 0"):
        assert line in sysctl
    assert "Type: regular" in _debugfs(spec, "stat /etc/kata-guest/lock-modules").stdout
    assert "Package: busybox-static" in _debugfs(spec, "cat /var/lib/dpkg/status").stdout


def _boot(args: list[str], probe: str = "true") -> dict[str, str]:
    """Boot with qemu under pexpect; return what the guest said about itself (and ``probe``'s output)."""
    child = pexpect.spawn("qemu-system-x86_64", args, encoding="utf-8", timeout=180, codec_errors="replace")
    try:
        child.expect(r"KATA-GUEST-READY ([^\r\n]+)[\r\n]")
        ready = child.match.group(1)
        child.expect("kata-guest# ")
        child.sendline("kata-agent --version; echo VERSION-END-$((40+2))")
        child.expect("VERSION-END-42")  # the echoed command line shows $((40+2)), only the output shows 42
        version = child.before
        child.expect("kata-guest# ")
        child.sendline("touch /probe 2>/dev/null && echo ROOT-RW-$((1+1)) || echo ROOT-RO-$((1+1))")
        readonly = child.expect(["ROOT-RO-2", "ROOT-RW-2"]) == 0
        child.expect("kata-guest# ")
        child.sendline(f"{probe}; echo PROBE-END-$((50+2))")
        child.expect("PROBE-END-52")
        probed = child.before
        child.expect("kata-guest# ")
        child.sendline("poweroff -f")
        child.expect(pexpect.EOF, timeout=30)
        return {"ready": ready, "readonly": str(readonly), "version": version, "probe": probed}
    finally:
        child.close(force=True)


@pytest.mark.slow
@pytest.mark.vm
def test_tcg_boot_initrd_mode(reference_guest) -> None:
    from pytest_kata.images.guest import qemu_boot_args

    seen = _boot(qemu_boot_args(reference_guest, mode="initrd"))
    assert "init=kata-agent" in seen["ready"] and host_kernel().release in seen["ready"]
    assert "root=ro" in seen["ready"]
    assert "kata-agent placeholder: pytest-kata reference candidate, no real agent" in seen["version"]
    assert seen["readonly"] == "True"  # read_only_root = true remounts the initramfs read-only


@pytest.mark.slow
@pytest.mark.vm
def test_tcg_boot_image_mode_read_only_root(reference_guest) -> None:
    from pytest_kata.images.guest import qemu_boot_args

    args = qemu_boot_args(reference_guest, mode="image")
    assert "readonly=on" in " ".join(args) and "root=/dev/vda1" in args[-1]
    seen = _boot(args)
    assert "root=ro" in seen["ready"] and seen["readonly"] == "True"


def test_tool_errors_keep_the_telling_line() -> None:
    dpkg_failure = ("Setting up base-files ...\nchown: unknown user/group root:mail\n"
                    "dpkg: error processing package base-files (--install):\n"
                    " installed base-files package post-installation script subprocess returned error exit status 1\n"
                    "Errors were encountered while processing:\n base-files\nE: setup failed: E: env ... failed\n")
    line = common._telling_line(dpkg_failure)
    assert "base-files" in line and "post-installation script" in line
    assert common._telling_line("I: ok\nE: Unable to locate package nope\nE: mmdebstrap failed to run\n") == \
        "E: Unable to locate package nope"


@pytest.mark.slow
def test_mmdebstrap_unknown_package_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(KataError) as exc:
        common.mmdebstrap(tmp_path / "rootfs", variant="extract", include=["no-such-package-pytest-kata"])
    message = str(exc.value)
    assert "\n" not in message and "no-such-package-pytest-kata" in message


@pytest.mark.slow
def test_prune_removes_only_stale_entries(private_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_kata.cli import main
    from pytest_kata.images.guest import guest_key, load_recipe, resolve_versions

    recipe = load_recipe("reference")
    current = guest_key(recipe, resolve_versions(recipe), host_kernel())
    for key in ("0" * 20, current):
        entry = private_cache / "guest" / f"reference-{key}"
        entry.mkdir(parents=True)
        (entry / "guest.json").write_text(json.dumps({"key": key}))
    old, new = private_cache / "reference/candidate-hardened-aaa", private_cache / "reference/candidate-hardened-bbb"
    for i, entry in enumerate((old, new)):
        entry.mkdir(parents=True)
        os.utime(entry, (1_000_000 + i, 1_000_000 + i))
    assert main(["images", "prune", "--dry-run"]) == 0
    assert (private_cache / "guest" / f"reference-{'0' * 20}").exists()
    assert main(["images", "prune"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 cache entries" in out
    assert not (private_cache / "guest" / f"reference-{'0' * 20}").exists() and not old.exists()
    assert (private_cache / "guest" / f"reference-{current}").exists() and new.exists()


@pytest.mark.slow
@pytest.mark.vm
def test_tcg_boot_minimal_is_locked_down(minimal_guest) -> None:
    from pytest_kata.images.guest import qemu_boot_args

    # "S""YSCTL" and $((1+1)): the echoed command line never matches what the assertions look for
    probe = ("for k in kernel/modules_disabled kernel/kptr_restrict kernel/yama/ptrace_scope "
             "kernel/unprivileged_bpf_disabled fs/suid_dumpable; do echo \"S\"\"YSCTL $k=$(cat /proc/sys/$k)\"; "
             "done; insmod /lib/modules/$(uname -r)/kernel/fs/mbcache.ko 2>/dev/null || echo INSMOD-$((1+1))-NO")
    seen = _boot(qemu_boot_args(minimal_guest, mode="initrd"), probe)
    values = dict(line.split(" ", 1)[1].strip().split("=") for line in seen["probe"].splitlines()
                  if line.startswith("SYSCTL "))
    assert values == {"kernel/modules_disabled": "1", "kernel/kptr_restrict": "2",
                      "kernel/yama/ptrace_scope": "3", "kernel/unprivileged_bpf_disabled": "1",
                      "fs/suid_dumpable": "0"}
    assert "INSMOD-2-NO" in seen["probe"] and seen["readonly"] == "True" and "root=ro" in seen["ready"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_safe_rmtree_unmounts_before_deleting(tmp_path: Path) -> None:
    """A killed mmdebstrap leaves proc/dev mounted in its rootfs: cleaning up must not delete through them."""
    tree = tmp_path / "rootfs"
    (tree / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "kt-test", str(tree / "proc")], check=True)
    try:
        (tree / "proc/inside").write_text("x")
        assert common.mounts_under(tree) == [str(tree / "proc")]
        common.safe_rmtree(tree)
        assert not tree.exists() and common.mounts_under(tmp_path) == []
    finally:
        subprocess.run(["umount", "-l", str(tree / "proc")], capture_output=True)


@pytest.mark.slow
def test_guest_image_fixture(pytester: pytest.Pytester, reference_guest) -> None:
    pytester.makepyfile("""
        def test_built(kata_guest_image):
            g = kata_guest_image("guest-reference")
            assert g.image.exists() and g.initrd.exists()
            assert kata_guest_image("reference") is g

        def test_unknown(kata_guest_image):
            kata_guest_image("guest-nosuch")
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*no guest image recipe 'nosuch'; known: guest-baseline*"])
