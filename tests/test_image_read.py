"""Reading guest images without root: ext4 (bare and partitioned, msdos and gpt), initrds, erofs, rootfs dirs,
package databases, and one-line errors for corrupt input. Images are made for real (mkfs.ext4 -d, sfdisk,
cpio writers, mkfs.erofs) from small trees built in the test."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_kata.errors import KataError
from pytest_kata.images.common import make_ext4_disk, make_initrd
from pytest_kata.images.packages import parse_apk_installed, parse_dpkg_status, read_packages
from pytest_kata.images.read import ImageError, open_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURE = SHARED / "data" / "vuln-fixtures"
CAP_NET_RAW_EP = bytes.fromhex("0100000200200000000000000000000000000000")  # VFS_CAP v2, cap_net_raw, effective


def make_tree(root: Path) -> Path:
    (root / "usr/bin").mkdir(parents=True)
    (root / "etc/sysctl.d").mkdir(parents=True)
    (root / "var/lib/dpkg").mkdir(parents=True)
    os.symlink("usr/bin", root / "bin")
    shutil.copy("/bin/busybox", root / "usr/bin/busybox")
    os.symlink("busybox", root / "usr/bin/sh")
    shutil.copy("/bin/true", root / "usr/bin/su")
    os.chmod(root / "usr/bin/su", 0o4755)
    shutil.copy("/bin/true", root / "usr/bin/ping")
    os.setxattr(root / "usr/bin/ping", "security.capability", CAP_NET_RAW_EP)
    (root / "etc/os-release").write_text('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n')
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    long_target = "/" + "/".join(["deep"] * 20) + "/target"  # > 60 bytes: a slow symlink in ext4
    os.symlink(long_target, root / "etc/longlink")
    status = (FIXTURE / "debian12-rootfs/var/lib/dpkg/status")
    if status.is_file():
        shutil.copytree(FIXTURE / "debian12-rootfs/var", root / "var", dirs_exist_ok=True)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("tree") / "root")


def _check_view(path: Path, *, caps: bool = True) -> None:
    with open_image(path) as root:
        su = root.entry("/usr/bin/su")
        assert su is not None and su.mode & 0o4000, f"setuid bit lost reading {root.describe()}"
        assert root.resolve("/bin/sh") == "/usr/bin/busybox"
        assert root.read("/bin/su") == Path("/bin/true").read_bytes()
        assert root.entry("/etc/longlink").target.endswith("/deep/target")
        assert "ID=debian" in root.read_text("/etc/os-release")
        if caps:
            assert root.entry("/usr/bin/ping").capability == CAP_NET_RAW_EP
            assert root.entry("/usr/bin/su").capability is None
        with pytest.raises(KeyError):
            root.read("/etc/nonexistent")


def test_directory(tree: Path) -> None:
    _check_view(tree)


@pytest.mark.parametrize("table", ["msdos", "gpt", None])
def test_ext4_disk_and_bare_fs(tree: Path, tmp_path: Path, table: str | None) -> None:
    img = tmp_path / "disk.img"
    make_ext4_disk(tree, img, partitioned=table is not None, table=table or "msdos")
    _check_view(img)
    with open_image(img) as root:
        assert root.kind == "ext4"
        assert (root.offset > 0) == (table is not None)


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
def test_initrd(tree: Path, tmp_path: Path, compress: str) -> None:
    out = tmp_path / f"initrd.{compress}"
    make_initrd(tree, out, compress=compress)
    _check_view(out, caps=False)  # cpio has no xattrs: said in fidelity_notes
    with open_image(out) as root:
        assert root.kind == "initrd" and any("capabilit" in n for n in root.fidelity_notes)


def test_initrd_concatenated_segments(tree: Path, tmp_path: Path) -> None:
    """Kernel initramfs semantics: an uncompressed cpio followed by a compressed one (Debian's early microcode)."""
    early = tmp_path / "early"
    (early / "kernel/x86/microcode").mkdir(parents=True)
    (early / "kernel/x86/microcode/GenuineIntel.bin").write_bytes(b"ucode")
    raw = subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=early, capture_output=True,
                         check=True).stdout
    main = tmp_path / "main.gz"
    make_initrd(tree, main, compress="gzip")
    both = tmp_path / "initrd.img"
    both.write_bytes(raw + main.read_bytes())
    with open_image(both) as root:
        assert root.read("/kernel/x86/microcode/GenuineIntel.bin") == b"ucode"
        assert root.entry("/usr/bin/su").mode & 0o4000
        assert root.segments == ["cpio", "cpio+gzip"]


def test_debian_kernel_initrd_is_read() -> None:
    """A real initrd from this machine (initramfs-tools, zstd, possibly with an early cpio)."""
    initrds = sorted(Path("/boot").glob("initrd.img-*"))
    if not initrds:
        pytest.skip("no /boot/initrd.img-* on this machine")
    with open_image(initrds[-1]) as root:
        assert root.entry("/init") is not None
        assert len(root.entries()) > 100


@pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="erofs-utils not installed")
def test_erofs(tree: Path, tmp_path: Path) -> None:
    img = tmp_path / "root.erofs"
    subprocess.run(["mkfs.erofs", "--quiet", str(img), str(tree)], check=True)
    with open_image(img) as root:
        assert root.kind == "erofs"
        assert root.read("/usr/bin/su") == Path("/bin/true").read_bytes()
        assert root.resolve("/bin/sh") == "/usr/bin/busybox"
        assert any("setuid" in n for n in root.fidelity_notes)  # erofs-utils 1.5 drops the bits: said so
        tmp = root._tmp  # type: ignore[attr-defined]
    assert not Path(tmp).exists(), "erofs extraction directory left behind"


# -- package databases ---------------------------------------------------------------------------------------
def test_dpkg_from_ext4_image(tree: Path, tmp_path: Path) -> None:
    if not (FIXTURE / "debian12-rootfs").is_dir():
        pytest.skip("../shared/data/vuln-fixtures absent")
    img = tmp_path / "disk.img"
    make_ext4_disk(tree, img)
    with open_image(img) as root:
        db = read_packages(root)
    assert db.kind == "dpkg" and db.codename == "bookworm"
    names = {p.name: p for p in db.packages}
    assert "dbus" not in names  # deinstall ok config-files: not installed
    assert names["e2fsprogs"].source_version == "1.47.0-2"  # binNMU: Source: e2fsprogs (1.47.0-2)
    assert names["libssl3"].source == "openssl"
    assert "/usr/bin/openssl" in names["openssl"].files  # from var/lib/dpkg/info/openssl.list
    assert names["libc6"].files, "libc6:amd64.list (arch-qualified) was not found"
    assert len(db.packages) == 8


def test_apk_installed() -> None:
    data = b"C:Q1abc=\nP:musl\nV:1.2.4-r2\nA:x86_64\nI:622592\no:musl\nF:lib\nR:ld-musl-x86_64.so.1\n\n" \
           b"P:busybox-binsh\nV:1.36.1-r5\nA:x86_64\no:busybox\nF:bin\nR:sh\n"
    pkgs = parse_apk_installed(data)
    assert [(p.name, p.source, p.version) for p in pkgs] == [("musl", "musl", "1.2.4-r2"),
                                                               ("busybox-binsh", "busybox", "1.36.1-r5")]
    assert pkgs[0].files == ["/lib/ld-musl-x86_64.so.1"] and pkgs[0].installed_size_kib == 608
    with pytest.raises(ImageError, match="lacks P:"):
        parse_apk_installed(b"V:1.0\nA:x86_64\n")


def test_rpm_db_is_reported_unsupported(tmp_path: Path) -> None:
    (tmp_path / "var/lib/rpm").mkdir(parents=True)
    (tmp_path / "var/lib/rpm/rpmdb.sqlite").write_bytes(b"SQLite format 3\x00")
    with pytest.raises(KataError, match=r"rpm database .* unsupported") as info:
        read_packages(open_image(tmp_path))
    assert "\n" not in str(info.value)


def test_no_package_database(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    db = read_packages(open_image(tmp_path))
    assert db.kind == "none" and db.packages == []


def test_malformed_dpkg_status() -> None:
    with pytest.raises(ImageError, match="malformed dpkg status"):
        parse_dpkg_status(b"Package: x\nStatus: install ok installed\n")  # no Version
    with pytest.raises(ImageError, match="Source"):
        parse_dpkg_status(b"Package: x\nStatus: install ok installed\nVersion: 1\nSource: bad source (1) x\n")


# -- bad input: one line, never a traceback -------------------------------------------------------------------
def test_corrupt_ext4_superblock(tree: Path, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_ext4_disk(tree, img, partitioned=False)
    data = bytearray(img.read_bytes())
    data[1024:1024 + 56] = bytes(56)  # wipe the superblock but keep the magic: debugfs must refuse it
    img.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="not a readable ext4 filesystem") as info:
        open_image(img).entries()
    assert "\n" not in str(info.value) and str(img) in str(info.value)


def test_unknown_and_truncated_inputs(tree: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(8192))
    with pytest.raises(ImageError, match="not a recognised guest image"):
        open_image(junk)
    with pytest.raises(ImageError, match="no such image"):
        open_image(tmp_path / "missing.img")
    initrd = tmp_path / "initrd.gz"
    make_initrd(tree, initrd)
    truncated = tmp_path / "truncated.gz"
    truncated.write_bytes(initrd.read_bytes()[:2000])
    with pytest.raises(ImageError, match=r"corrupt compressed initrd|truncated"):
        open_image(truncated).entries()
    bad_cpio = tmp_path / "bad.cpio.gz"
    bad_cpio.write_bytes(gzip.compress(b"070701" + b"zz" * 60))
    with pytest.raises(ImageError, match="cpio"):
        open_image(bad_cpio).entries()
    disk = tmp_path / "disk.img"
    make_ext4_disk(tree, disk)
    cut = tmp_path / "cut.img"
    cut.write_bytes(disk.read_bytes()[:1024 * 1024 + 512])  # partition table intact, filesystem gone
    with pytest.raises(ImageError, match=r"none holds ext4|not a readable|truncated"):
        open_image(cut).entries()
    half = tmp_path / "half.img"
    half.write_bytes(disk.read_bytes()[:disk.stat().st_size // 2])  # metadata intact, data cut off
    with pytest.raises(ImageError, match="truncated image: the ext4 filesystem needs"):
        open_image(half).entries()
