"""Candidate bundles: every archive format and tree shape, both layouts, the split 4.1 tarballs, version
evidence, drop-in merge order, the cache, and each unsafe or broken input refused with one line.

Bundles are built here from the real rendered Kata configurations (``../shared/data/kata-configs``), in
``tmp_path``, so the tests stay fast and never depend on the reference candidate.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import struct
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from pytest_kata.bundle import Bundle, archives, identify, open_bundle
from pytest_kata.cli import main
from pytest_kata.errors import BundleError, KataError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO.parent / "shared" / "data" / "kata-configs"
DEFAULTS = "share/defaults/kata-containers"
KDIR = "share/kata-containers"


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_KATA_QUIET", "1")


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def configs() -> Path:
    if not (CONFIGS / "configuration-qemu.toml").is_file():
        pytest.skip(f"{CONFIGS} is absent: these tests use the real rendered Kata configurations")
    return CONFIGS


def tiny_elf(message: str) -> bytes:
    """A static x86-64 ELF that writes ``message`` and exits 0: a stand-in shim with no toolchain needed."""
    msg = message.encode()
    base, code_off = 0x400000, 64 + 56
    code = (b"\xb8\x01\x00\x00\x00" + b"\xbf\x01\x00\x00\x00" + b"\x48\x8d\x35" + struct.pack("<i", 16)
            + b"\xba" + struct.pack("<I", len(msg)) + b"\x0f\x05" + b"\xb8\x3c\x00\x00\x00" + b"\x31\xff"
            + b"\x0f\x05")
    total = code_off + len(code) + len(msg)
    header = (b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 8
              + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, base + code_off, 64, 0, 0, 64, 56, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, total, total, 0x1000)
    return header + phdr + code + msg


def make_tree(top: Path, configs: Path, *, version: str | None = "3.2.0", go: bool = True, rs: bool = True,
              extra: dict[str, bytes] | None = None) -> Path:
    """A kata-static layout in ``top/opt/kata`` (real configs, kernel, image); returns that opt/kata."""
    root = top / "opt" / "kata"
    (root / KDIR).mkdir(parents=True)
    if version:
        (root / "VERSION").write_text(version + "\n")
    if go:
        (root / DEFAULTS).mkdir(parents=True, exist_ok=True)
        for name in ("configuration-qemu.toml", "configuration-clh.toml"):
            shutil.copy(configs / name, root / DEFAULTS / name)
        (root / DEFAULTS / "configuration.toml").symlink_to("configuration-qemu.toml")
    if rs:
        (root / DEFAULTS / "runtime-rs").mkdir(parents=True, exist_ok=True)
        for name in ("configuration-qemu-runtime-rs.toml", "configuration-dragonball.toml"):
            shutil.copy(configs / "runtime-rs" / name, root / DEFAULTS / "runtime-rs" / name)
        rs_link = root / DEFAULTS / "runtime-rs" / "configuration.toml"
        rs_link.symlink_to("configuration-qemu-runtime-rs.toml")
    (root / "bin").mkdir(exist_ok=True)
    (root / "bin" / "qemu-system-x86_64").write_bytes(b"\x7fELF fake qemu")
    (root / "bin" / "qemu-system-x86_64").chmod(0o755)
    (root / KDIR / "vmlinux-6.1.0-202").write_bytes(b"kernel" * 100)
    (root / KDIR / "vmlinux.container").symlink_to("vmlinux-6.1.0-202")
    (root / KDIR / "config-6.1.0-202").write_text("CONFIG_X=y\n")
    (root / KDIR / "kata-ubuntu-22.04.image").write_bytes(os.urandom(4096))
    (root / KDIR / "kata-containers.img").symlink_to("kata-ubuntu-22.04.image")
    (root / KDIR / "kata-ubuntu-22.04.initrd").write_bytes(b"initrd")
    (root / KDIR / "kata-containers-initrd.img").symlink_to("kata-ubuntu-22.04.initrd")
    for rel, data in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def pack(top: Path, out: Path, fmt: str) -> Path:
    """Tar ``top``'s ``./opt`` the way kata-deploy-merge-builds.sh does, compressed as ``fmt``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        tf.add(top / "opt", arcname="./opt")
    data = buf.getvalue()
    if fmt == "xz":
        import lzma

        data = lzma.compress(data)
    elif fmt == "gz":
        import gzip

        data = gzip.compress(data)
    elif fmt == "zst":
        data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)
    out.write_bytes(data)
    return out


def evil_tar(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: str = "zst") -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ok = tarfile.TarInfo("./opt/kata/VERSION")
        ok.size = 6
        tf.addfile(ok, io.BytesIO(b"3.2.0\n"))
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    out.write_bytes(zstandard.ZstdCompressor().compress(raw) if fmt == "zst" else raw)
    return out


def info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname, ti.mode = kind, linkname, mode
    return ti


def assert_one_line(exc: BaseException, *needles: str) -> None:
    text = str(exc)
    assert "\n" not in text and text.strip() == text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("shape", ["tar.zst", "tar.xz", "tar.gz", "tar", "opt-kata-dir", "root-dir"])
def test_opens_every_format_with_both_layouts(shape: str, tmp_path: Path, cache: Path, configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs)
    if shape.startswith("tar"):
        target = pack(tmp_path / "src", tmp_path / f"kata-static-3.2.0-amd64.{shape}", shape.split(".")[-1])
    else:
        target = src if shape == "opt-kata-dir" else tmp_path / "src"
    b = open_bundle(target, cache=cache)
    assert b.version == "3.2.0"
    assert b.layouts == {"go", "runtime-rs"}
    assert set(b.shims) == {"qemu", "clh", "qemu-runtime-rs", "dragonball"}
    assert b.default_shim == "qemu-runtime-rs"  # runtime-rs present: kata-deploy's 4.x default
    assert b.shims["dragonball"].runtime_rs and not b.shims["qemu"].runtime_rs
    assert b.shims["qemu"].config.hypervisor == "qemu"
    assert (b.root / "VERSION").read_text() == "3.2.0\n"
    assert b.files["bin/qemu-system-x86_64"].sha256 == sha(src / "bin/qemu-system-x86_64")
    assert b.files["bin/qemu-system-x86_64"].mode == 0o755
    img = f"{KDIR}/kata-ubuntu-22.04.image"
    assert b.files[img].sha256 == sha(src / img) and b.files[img].size == 4096
    assert b.files[f"{KDIR}/vmlinux.container"].target == "vmlinux-6.1.0-202"
    assert b.kernels == [f"{KDIR}/vmlinux-6.1.0-202", f"{KDIR}/vmlinux.container"]
    assert b.kernel_configs == [f"{KDIR}/config-6.1.0-202"]
    assert b.images == [f"{KDIR}/kata-containers.img", img]
    assert b.initrds == [f"{KDIR}/kata-containers-initrd.img", f"{KDIR}/kata-ubuntu-22.04.initrd"]
    assert b.hypervisors == ["bin/qemu-system-x86_64"]
    assert b.path(f"{KDIR}/vmlinux.container").read_bytes() == b"kernel" * 100
    if shape.startswith("tar"):
        assert b.sha256 == sha(target)  # the archive's own hash: what the verdict records
        assert b.root.is_relative_to(cache)
        assert "file name kata-static-3.2.0-amd64." + shape in b.version_evidence
    else:
        assert b.root.resolve() == src.resolve()


def test_go_only_default_follows_configuration_toml(tmp_path: Path, cache: Path, configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs, rs=False)
    (src / DEFAULTS / "configuration.toml").unlink()
    (src / DEFAULTS / "configuration.toml").symlink_to("configuration-clh.toml")
    b = open_bundle(src, cache=cache)
    assert b.layouts == {"go"} and b.default_shim == "clh"
    assert b.shim().name == "clh" and b.shim("qemu").config_path.name == "configuration-qemu.toml"
    with pytest.raises(KataError) as err:
        b.shim("qemu-runtime-rs")
    assert_one_line(err.value, "no shim 'qemu-runtime-rs'", "clh, qemu")
    (src / DEFAULTS / "configuration.toml").unlink()
    assert open_bundle(src, cache=cache).default_shim == "qemu"  # no link: Kata's historical default


def test_kata_deploy_runtimes_and_dropins_merge_in_lexical_order(tmp_path: Path, cache: Path,
                                                                  configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs, rs=False)
    shim_dir = src / DEFAULTS / "runtimes" / "qemu"
    (shim_dir / "config.d").mkdir(parents=True)
    (src / DEFAULTS / "configuration-qemu.toml").rename(shim_dir / "configuration-qemu.toml")
    (src / DEFAULTS / "configuration-qemu.toml").symlink_to("runtimes/qemu/configuration-qemu.toml")
    (shim_dir / "config.d" / "20-later.toml").write_text("[hypervisor.qemu]\nenable_debug = false\n"
                                                          "default_memory = 4096\n")
    (shim_dir / "config.d" / "10-first.toml").write_text("[hypervisor.qemu]\nenable_debug = true\n"
                                                          "default_vcpus = 3\n")
    shim = open_bundle(src, cache=cache).shim("qemu")
    assert shim.config_path == src / DEFAULTS / "runtimes/qemu/configuration-qemu.toml"
    assert [p.name for p in shim.config.dropins] == ["10-first.toml", "20-later.toml"]
    assert shim.config.get("hypervisor.qemu.enable_debug") is False  # 20-later wins over 10-first
    assert shim.config.get("hypervisor.qemu.default_vcpus") == 3
    assert shim.config.get("hypervisor.qemu.default_memory") == 4096
    assert shim.config.base_data["hypervisor"]["qemu"]["default_memory"] != 4096


def test_absolute_link_inside_opt_kata_stays_in_the_bundle(tmp_path: Path, cache: Path,
                                                           configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs)
    (src / KDIR / "vmlinux.container").unlink()
    (src / KDIR / "vmlinux.container").symlink_to("/opt/kata/share/kata-containers/vmlinux-6.1.0-202")
    b = open_bundle(pack(tmp_path / "src", tmp_path / "k.tar.zst", "zst"), cache=cache)
    assert b.files[f"{KDIR}/vmlinux.container"].target == "/opt/kata/share/kata-containers/vmlinux-6.1.0-202"
    assert os.readlink(b.root / KDIR / "vmlinux.container") == "vmlinux-6.1.0-202"  # never the host's file
    assert b.path("/opt/kata/share/kata-containers/vmlinux.container") == b.root / KDIR / "vmlinux-6.1.0-202"
    with pytest.raises(KataError):
        b.path("/etc/passwd")


# --------------------------------------------------------------------------------------------- cache

def test_second_open_and_identify_reuse_the_cache(tmp_path: Path, cache: Path, configs: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path / "src", configs)
    tarball = pack(tmp_path / "src", tmp_path / "kata-static-3.2.0-amd64.tar.zst", "zst")
    first = open_bundle(tarball, cache=cache)
    assert first.root == cache / "bundles" / sha(tarball) / "tree" / "opt" / "kata"
    assert not list((cache / "bundles").glob(".tmp-*"))

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was unpacked again")

    monkeypatch.setattr(archives, "_stream_members", no_extraction)
    second = open_bundle(str(tarball), cache=cache)
    assert second.root == first.root and second.files == first.files
    assert identify([str(tarball)], cache=cache) == {"path": str(tarball), "version": "3.2.0",
                                                    "sha256": sha(tarball)}
    # the same bytes under a new name (new inode): hashed again, found by content, version from its name
    copy = shutil.copy(tarball, tmp_path / "kata-static-3.2.0-amd64-copy.tar.zst")
    monkeypatch.undo()
    monkeypatch.setenv("PYTEST_KATA_QUIET", "1")
    assert open_bundle(copy, cache=cache).root == first.root


def test_changed_archive_is_not_served_from_the_stat_index(tmp_path: Path, cache: Path,
                                                           configs: Path) -> None:
    make_tree(tmp_path / "src", configs)
    tarball = pack(tmp_path / "src", tmp_path / "kata-static-3.2.0-amd64.tar.zst", "zst")
    assert open_bundle(tarball, cache=cache).version == "3.2.0"
    (tmp_path / "src/opt/kata/VERSION").write_text("3.3.0\n")
    pack(tmp_path / "src", tarball, "zst")
    again = open_bundle(tarball, cache=cache)
    assert again.version == "3.3.0" and again.sha256 == sha(tarball)
    assert identify(tarball, cache=cache)["version"] == "3.3.0"


def test_directory_inventory_is_cached_until_the_tree_changes(tmp_path: Path, cache: Path,
                                                              configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs)
    first = open_bundle(src, cache=cache)
    assert identify(src, cache=cache) == {"path": str(src), "version": "3.2.0", "sha256": first.sha256}
    (src / "VERSION").write_text("3.2.1\n")
    second = open_bundle(src, cache=cache)
    assert second.version == "3.2.1" and second.sha256 != first.sha256


# --------------------------------------------------------------------------------------------- split 4.1

def split_tarballs(tmp_path: Path, configs: Path, *, go_kernel: bytes | None = None) -> list[Path]:
    rs_top, go_top, tools_top = tmp_path / "rs", tmp_path / "go", tmp_path / "tools"
    make_tree(rs_top, configs, version="4.1.0", go=False, rs=True,
              extra={"runtime-rs/bin/containerd-shim-kata-v2": b"#!/bin/sh\necho placeholder\n"})
    go_root = make_tree(go_top, configs, version="4.1.0", go=True, rs=False,
                        extra={"bin/containerd-shim-kata-v2": b"#!/bin/sh\n",
                               "bin/kata-runtime": b"#!/bin/sh\n"})
    (go_root / KDIR / "kata-ubuntu-22.04.image").write_bytes((rs_top / "opt/kata" / KDIR /
                                                              "kata-ubuntu-22.04.image").read_bytes())
    if go_kernel is not None:
        (go_root / KDIR / "vmlinux-6.1.0-202").write_bytes(go_kernel)
    (tools_top / "opt/kata/bin").mkdir(parents=True)
    (tools_top / "opt/kata/bin/kata-ctl").write_bytes(b"#!/bin/sh\n")
    return [pack(rs_top, tmp_path / "kata-static-4.1.0-amd64.tar.zst", "zst"),
            pack(go_top, tmp_path / "kata-go-static-4.1.0-amd64.tar.zst", "zst"),
            pack(tools_top, tmp_path / "kata-tools-static-4.1.0-amd64.tar.zst", "zst")]


def test_split_tarballs_merge_into_one_tree(tmp_path: Path, cache: Path, configs: Path) -> None:
    parts = split_tarballs(tmp_path, configs)
    b = open_bundle(parts, cache=cache)
    assert b.layouts == {"go", "runtime-rs"}
    assert {"qemu", "clh", "qemu-runtime-rs", "dragonball"} <= set(b.shims)
    assert b.shims["qemu-runtime-rs"].binary == "runtime-rs/bin/containerd-shim-kata-v2"
    assert b.shims["qemu"].binary == "bin/containerd-shim-kata-v2"
    assert (b.root / "bin/kata-ctl").is_file()
    assert (b.root / "runtime-rs/bin/containerd-shim-kata-v2").is_file()
    assert b.version == "4.1.0" and len(b.sources) == 3 and not b.version_conflicts
    assert b.sha256 not in {sha(p) for p in parts}
    assert identify(parts, cache=cache)["sha256"] == b.sha256
    assert open_bundle(parts, cache=cache).root == b.root  # merged tree cached too


def test_split_tarballs_with_different_content_for_one_path_conflict(tmp_path: Path, cache: Path,
                                                                     configs: Path) -> None:
    parts = split_tarballs(tmp_path, configs, go_kernel=b"another kernel")
    with pytest.raises(BundleError) as err:
        open_bundle(parts, cache=cache)
    assert_one_line(err.value, "kata-go-static-4.1.0-amd64.tar.zst", f"{KDIR}/vmlinux-6.1.0-202",
                    "kata-static-4.1.0-amd64.tar.zst", "different content")


# --------------------------------------------------------------------------------------------- versions

def test_version_sources_and_disagreement(tmp_path: Path, cache: Path, configs: Path) -> None:
    versions_yaml = (b"description: test\nassets:\n  kernel:\n    version: v6.18.35\n"
                     b"  hypervisor:\n    qemu:\n      version: v11.0.1\nexternals:\n  virtiofsd:\n"
                     b"    version: v1.14.0\n")
    reference = {"reference": True, "version": "3.2.0",
                 "missing": {"containerd-shim-kata-v2": "cannot be built here", "kata-agent": "placeholder"}}
    make_tree(tmp_path / "src", configs, extra={"versions.yaml": versions_yaml,
                                                "kata-reference.json": json.dumps(reference).encode()})
    tarball = pack(tmp_path / "src", tmp_path / "kata-static-3.3.0-amd64.tar.xz", "xz")
    b = open_bundle(tarball, cache=cache)
    assert b.version == "3.2.0"  # VERSION outranks a file name
    assert b.version_evidence["VERSION"] == "3.2.0"
    assert b.version_evidence["kata-reference.json"] == "3.2.0"
    assert b.version_evidence["file name kata-static-3.3.0-amd64.tar.xz"] == "3.3.0"
    assert b.version_conflicts == [
        "file name kata-static-3.3.0-amd64.tar.xz says 3.3.0 but VERSION says 3.2.0"]
    assert b.component_versions["assets.kernel"] == "v6.18.35"
    assert b.component_versions["assets.hypervisor.qemu"] == "v11.0.1"
    assert b.missing == reference["missing"]


def test_filename_is_the_only_evidence_when_nothing_else_says(tmp_path: Path, cache: Path,
                                                              configs: Path) -> None:
    make_tree(tmp_path / "src", configs, version=None)
    b = open_bundle(pack(tmp_path / "src", tmp_path / "kata-static-3.2.0-rc0-reference-amd64.tar.gz", "gz"),
                    cache=cache)
    assert b.version == "3.2.0-rc0" and not b.version_conflicts
    plain = open_bundle(tmp_path / "src", cache=cache)
    assert plain.version is None and plain.version_evidence == {}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the stand-in shim is an x86-64 ELF")
def test_shim_version_runs_only_executable_elf_for_this_machine(tmp_path: Path, cache: Path,
                                                                configs: Path) -> None:
    line = ('Kata Containers containerd shim (Rust): id: "io.containerd.kata.v2", version: 3.2.1, '
            'commit: abc\n')
    src = make_tree(tmp_path / "src", configs,
                    extra={"runtime-rs/bin/containerd-shim-kata-v2": tiny_elf(line),
                           "bin/containerd-shim-kata-v2": tiny_elf(line)})
    (src / "runtime-rs/bin/containerd-shim-kata-v2").chmod(0o755)
    (src / "bin/containerd-shim-kata-v2").chmod(0o644)  # not executable: must not be run
    b = open_bundle(src, cache=cache)
    assert b.version_evidence["containerd-shim-kata-v2 --version (runtime-rs)"] == "3.2.1"
    assert "containerd-shim-kata-v2 --version (go)" not in b.version_evidence
    assert any("bin/containerd-shim-kata-v2: not executable" in n for n in b.notes)
    assert b.version == "3.2.0" and b.version_conflicts  # VERSION wins; the shim's disagreement is kept
    script = make_tree(tmp_path / "s2", configs,
                       extra={"bin/containerd-shim-kata-v2": b"#!/bin/sh\necho x\n"})
    (script / "bin/containerd-shim-kata-v2").chmod(0o755)
    notes = open_bundle(script, cache=cache).notes
    assert any("not an ELF executable" in n for n in notes)
    quiet = open_bundle(src, cache=tmp_path / "cache2", run_binaries=False)
    assert "containerd-shim-kata-v2 --version (runtime-rs)" not in quiet.version_evidence


# --------------------------------------------------------------------------------------------- unsafe input

UNSAFE: dict[str, tuple[Callable[[], list[tuple[tarfile.TarInfo, bytes | None]]], str]] = {
    "dotdot": (lambda: [(info("./opt/kata/../../etc/cron.d/x"), b"* * * * * root sh\n")], "'..'"),
    "absolute": (lambda: [(info("/etc/passwd"), b"root::0:0::/:/bin/sh\n")], "absolute name"),
    "outside-opt-kata": (lambda: [(info("./etc/hostname"), b"evil\n")], "outside opt/kata"),
    "symlink-out": (lambda: [(info("./opt/kata/bin/sh", tarfile.SYMTYPE, "../../../bin/sh"), None)],
                    "points outside the bundle"),
    "symlink-absolute-out": (lambda: [(info("./opt/kata/passwd", tarfile.SYMTYPE, "/etc/passwd"), None)],
                             "points outside the bundle"),
    "symlink-up-then-through": (lambda: [(info("./opt/kata/a/b/up", tarfile.SYMTYPE, "../.."), None),
                                         (info("./opt/kata/a/b/esc", tarfile.SYMTYPE, "up/../x"), None)],
                                "outside the bundle"),
    "write-through-symlink": (lambda: [(info("./opt/kata/lib", tarfile.SYMTYPE, "share"), None),
                                       (info("./opt/kata/lib/x"), b"x")], "goes through the symlink"),
    "hardlink-out": (lambda: [(info("./opt/kata/shadow", tarfile.LNKTYPE, "etc/shadow"), None)],
                     "points outside the bundle"),
    "hardlink-absolute": (lambda: [(info("./opt/kata/shadow", tarfile.LNKTYPE, "/etc/shadow"), None)],
                          "absolute name"),
    "hardlink-through-symlink": (lambda: [(info("./opt/kata/etc", tarfile.SYMTYPE, "share"), None),
                                          (info("./opt/kata/h", tarfile.LNKTYPE, "./opt/kata/etc/VERSION"), None)],
                                 "does not point at a file"),
    "chardev": (lambda: [(info("./opt/kata/mem", tarfile.CHRTYPE), None)], "device file"),
    "blockdev": (lambda: [(info("./opt/kata/sda", tarfile.BLKTYPE), None)], "device file"),
    "fifo": (lambda: [(info("./opt/kata/pipe", tarfile.FIFOTYPE), None)], "fifo"),
    "duplicate": (lambda: [(info("./opt/kata/VERSION"), b"9.9.9\n")], "appears twice"),
}


@pytest.fixture(params=["data_filter", "own-checks-only"])
def filter_api(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a bundle is unpacked: with ``tarfile.data_filter`` (3.11.4+) and without it (Debian 12's
    3.11.2), simulated on any Python so that the fallback is exercised everywhere."""
    if request.param == "data_filter" and not hasattr(tarfile, "data_filter"):
        pytest.skip(f"this Python ({platform.python_version()}) has no tarfile.data_filter")
    if request.param == "own-checks-only":
        monkeypatch.setattr(archives, "_DATA_FILTER", None)
    return str(request.param)


def test_data_filter_is_feature_detected() -> None:
    """3.11.2 has no ``data_filter``: the module must import and know it (no AttributeError at open)."""
    assert (archives._DATA_FILTER is None) == (not hasattr(tarfile, "data_filter"))


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_members_are_refused_with_one_line(case: str, tmp_path: Path, cache: Path, filter_api: str) -> None:
    members, needle = UNSAFE[case]
    tarball = evil_tar(tmp_path / "kata-static-3.2.0-amd64.tar.zst", members())
    with pytest.raises(BundleError) as err:
        open_bundle(tarball, cache=cache)
    assert_one_line(err.value, str(tarball), needle)
    assert not (tmp_path / "etc").exists()
    bundles = cache / "bundles"
    assert not [p for p in bundles.iterdir() if p.name not in ("index", ".lock")]  # nothing half-unpacked


def test_special_bits_are_dropped_on_disk_and_kept_in_the_inventory(tmp_path: Path, cache: Path,
                                                                   filter_api: str) -> None:
    """What ``data_filter`` does to modes (no setuid/setgid/sticky, no group/world write) holds without it."""
    members = [(info("./opt/kata/bin/suid", mode=0o4777), b"#!/bin/sh\n"),
               (info("./opt/kata/bin/sgid", mode=0o2666), b"x"),
               (info("./opt/kata/share/", tarfile.DIRTYPE, mode=0o1777), None),
               (info("./opt/kata/share/ro", mode=0o400), b"y")]
    b = open_bundle(evil_tar(tmp_path / "modes.tar", members, fmt="tar"), cache=cache)
    on_disk = {rel: (b.root / rel).stat().st_mode & 0o7777 for rel in ("bin/suid", "bin/sgid", "share", "share/ro")}
    assert on_disk == {"bin/suid": 0o755, "bin/sgid": 0o644, "share": 0o755, "share/ro": 0o644}
    assert (b.root / "bin/suid").stat().st_uid == os.geteuid()  # the archive's owner is not applied
    assert b.files["bin/suid"].mode == 0o4777 and b.files["share"].mode == 0o1777  # the rules still see them


def test_safe_links_inside_the_tree_are_accepted(tmp_path: Path, cache: Path) -> None:
    """Negative control for the link cases: the same shapes pointing inside opt/kata unpack fine."""
    members = [(info("./opt/kata/share/a"), b"a"),
               (info("./opt/kata/bin/l", tarfile.SYMTYPE, "../share/a"), None),
               (info("./opt/kata/bin/h", tarfile.LNKTYPE, "./opt/kata/share/a"), None)]
    b = open_bundle(evil_tar(tmp_path / "ok.tar", members, fmt="tar"), cache=cache)
    assert b.path("bin/l").read_bytes() == b"a" and (b.root / "bin/h").read_bytes() == b"a"
    assert b.files["bin/h"].sha256 == b.files["share/a"].sha256


def test_oversize_member_total_and_count_limits(tmp_path: Path, cache: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = evil_tar(tmp_path / "big.tar.zst",
                       [(info("./opt/kata/share/kata-containers/img"), b"x" * 5000)])
    monkeypatch.setattr(archives, "COUNT_LIMIT", 1)
    with pytest.raises(BundleError) as err:
        open_bundle(tarball, cache=cache)
    assert_one_line(err.value, "more than 1 members")
    monkeypatch.undo()
    monkeypatch.setenv("PYTEST_KATA_QUIET", "1")
    with pytest.raises(BundleError) as err:
        open_bundle(tarball, cache=cache, member_limit=4096)
    assert_one_line(err.value, str(tarball), "over the per-member limit of 4096")
    with pytest.raises(BundleError) as err:
        open_bundle(tarball, cache=cache, total_limit=5000)
    assert_one_line(err.value, "total limit of 5000")
    fits = open_bundle(tarball, cache=cache, member_limit=5000)
    assert fits.files["share/kata-containers/img"].size == 5000


@pytest.mark.parametrize("fmt,cut", [("xz", 0.5), ("gz", 0.5), ("zst", 0.5), ("zst", -3), ("tar", 0.5)])
def test_truncated_archive(fmt: str, cut: float, tmp_path: Path, cache: Path, configs: Path) -> None:
    make_tree(tmp_path / "src", configs)
    full = pack(tmp_path / "src", tmp_path / f"kata-static-3.2.0-amd64.tar.{fmt}", fmt).read_bytes()
    broken = tmp_path / f"cut-kata-static-3.2.0-amd64.tar.{fmt}"
    broken.write_bytes(full[: int(len(full) * cut)] if cut > 0 else full[: int(cut)])
    with pytest.raises(BundleError) as err:
        open_bundle(broken, cache=cache)
    assert_one_line(err.value, str(broken), "truncated archive", "re-download it")


def test_corrupt_compressed_data(tmp_path: Path, cache: Path, configs: Path) -> None:
    make_tree(tmp_path / "src", configs)
    data = bytearray(pack(tmp_path / "src", tmp_path / "k.tar.xz", "xz").read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64
    (tmp_path / "k.tar.xz").write_bytes(bytes(data))
    with pytest.raises(BundleError) as err:
        open_bundle(tmp_path / "k.tar.xz", cache=cache)
    assert_one_line(err.value, "k.tar.xz", "re-download it")


def test_bad_paths(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "notes.tar.xz").write_text("this is not an archive\n")
    (tmp_path / "empty.tar.zst").write_bytes(b"")
    (tmp_path / "random").mkdir()
    cases = {tmp_path / "missing.tar.zst": "no such file", tmp_path / "notes.tar.xz": "not a tar archive",
             tmp_path / "empty.tar.zst": "empty file", tmp_path / "random": "neither an /opt/kata tree"}
    for path, needle in cases.items():
        with pytest.raises(BundleError) as err:
            open_bundle(path, cache=cache)
        assert_one_line(err.value, str(path), needle)
    with pytest.raises(BundleError):
        open_bundle([], cache=cache)


def test_directory_with_a_link_out_is_refused(tmp_path: Path, cache: Path, configs: Path) -> None:
    src = make_tree(tmp_path / "src", configs)
    (src / "bin" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(BundleError) as err:
        open_bundle(src, cache=cache)
    assert_one_line(err.value, str(src), "bin/passwd", "outside the bundle")
    os.mkfifo(src / "pipe")
    (src / "bin" / "passwd").unlink()
    with pytest.raises(BundleError) as err:
        open_bundle(src, cache=cache)
    assert_one_line(err.value, "fifo")


def test_archive_with_nothing_under_opt_kata(tmp_path: Path, cache: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.addfile(info("./opt/", tarfile.DIRTYPE, mode=0o755))
    (tmp_path / "hollow.tar").write_bytes(buf.getvalue())
    with pytest.raises(BundleError) as err:
        open_bundle(tmp_path / "hollow.tar", cache=cache)
    assert_one_line(err.value, "hollow.tar", "nothing under opt/kata")


# --------------------------------------------------------------------------------------------- CLI

def test_cli_inspect_prints_the_inventory(tmp_path: Path, cache: Path, configs: Path,
                                          monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(cache))
    make_tree(tmp_path / "src", configs)
    tarball = pack(tmp_path / "src", tmp_path / "kata-static-3.3.0-amd64.tar.zst", "zst")
    assert main(["inspect", str(tarball), "--files"]) == 0
    out, err = capsys.readouterr()
    assert "version        3.2.0" in out and sha(tarball) in out
    assert "*qemu-runtime-rs" in out and "configuration-qemu-runtime-rs.toml" in out
    assert f"{KDIR}/vmlinux.container -> vmlinux-6.1.0-202" in out
    assert "bin/qemu-system-x86_64" in out and "files          " in out
    assert "warning: version sources disagree" in err  # VERSION 3.2.0 vs the 3.3.0 file name
    assert main(["inspect", str(tarball), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sha256"] == sha(tarball) and data["default_shim"] == "qemu-runtime-rs"
    assert {f["path"] for f in data["files"]} >= {"VERSION", "bin/qemu-system-x86_64"}


def test_cli_inspect_truncated_tarball_exits_2_with_one_line(tmp_path: Path, cache: Path, configs: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(cache))
    make_tree(tmp_path / "src", configs)
    full = pack(tmp_path / "src", tmp_path / "full.tar.xz", "xz").read_bytes()
    broken = tmp_path / "kata-static-3.2.0-amd64.tar.xz"
    broken.write_bytes(full[: len(full) // 2])
    assert main(["inspect", str(broken)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("pytest-kata: error: ")
    assert "kata-static-3.2.0-amd64.tar.xz: truncated archive" in err and "Traceback" not in err


def test_bundle_json_round_trips(tmp_path: Path, cache: Path, configs: Path) -> None:
    b: Bundle = open_bundle(make_tree(tmp_path / "src", configs), cache=cache)
    data = json.loads(json.dumps(b.to_json()))
    assert data["layouts"] == ["go", "runtime-rs"] and data["shims"]["qemu"]["hypervisor"] == "qemu"
    assert data["file_count"] == sum(1 for f in data["files"] if f["kind"] != "dir")


def test_multi_frame_zstd_with_a_skippable_frame(tmp_path: Path, cache: Path, configs: Path) -> None:
    """pzstd writes a skippable frame first and several frames: both must open (and a cut one must not)."""
    make_tree(tmp_path / "src", configs)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(tmp_path / "src" / "opt", arcname="./opt")
    raw = buf.getvalue()
    half = len(raw) // 2
    compressor = zstandard.ZstdCompressor(level=1)
    data = (b"\x50\x2a\x4d\x18" + struct.pack("<I", 4) + b"pzst"
            + compressor.compress(raw[:half]) + compressor.compress(raw[half:]))
    (tmp_path / "multi.tar.zst").write_bytes(data)
    assert open_bundle(tmp_path / "multi.tar.zst", cache=cache).version == "3.2.0"
    (tmp_path / "cut.tar.zst").write_bytes(data[:-2])
    with pytest.raises(BundleError) as err:
        open_bundle(tmp_path / "cut.tar.zst", cache=cache)
    assert_one_line(err.value, "cut.tar.zst", "truncated")


def test_plugin_opens_the_candidate_and_the_verdict_identifies_it(pytester: pytest.Pytester,
                                                                   tmp_path: Path, cache: Path,
                                                                   configs: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the plugin: kata_candidate is this Bundle; the verdict records its sha256."""
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(cache))
    make_tree(tmp_path / "src", configs)
    tarball = pack(tmp_path / "src", tmp_path / "kata-static-3.2.0-amd64.tar.zst", "zst")
    pytester.makepyfile(test_c=(
        "def test_c(kata_candidate):\n"
        "    assert kata_candidate.version == '3.2.0'\n"
        "    assert kata_candidate.shim().name == 'qemu-runtime-rs'\n"))
    report = tmp_path / "verdict.json"
    result = pytester.runpytest("--kata-candidate", str(tarball), "--kata-report", str(report))
    result.assert_outcomes(passed=1)
    candidate = json.loads(report.read_text())["candidate"]
    assert candidate == {"path": str(tarball), "version": "3.2.0", "sha256": sha(tarball)}


def test_ownership_and_risky_modes_are_inventoried(tmp_path: Path, cache: Path, configs: Path) -> None:
    """`tar -C /` as root keeps owners and setuid bits: the inventory records and flags them."""
    suid = info("./opt/kata/bin/helper", mode=0o4755)
    foreign = info("./opt/kata/bin/kata-ctl", mode=0o755)
    foreign.uid = foreign.gid = 1000
    writable = info("./opt/kata/share/open", mode=0o666)
    b = open_bundle(evil_tar(tmp_path / "k.tar.zst", [(suid, b"x"), (foreign, b"y"), (writable, b"z")]),
                    cache=cache)
    assert b.files["bin/helper"].mode == 0o4755 and not (b.root / "bin/helper").stat().st_mode & 0o4000
    assert (b.files["bin/kata-ctl"].uid, b.files["bin/kata-ctl"].gid) == (1000, 1000)
    assert "1 path(s) not owned by root:root: bin/kata-ctl" in b.notes
    assert "1 path(s) setuid/setgid: bin/helper" in b.notes
    assert "1 path(s) group/world-writable: share/open" in b.notes
    clean = open_bundle(make_tree(tmp_path / "src", configs), cache=cache)
    assert not [n for n in clean.notes if "path(s)" in n]
