"""Kata's guest kernel built from Debian's linux-source-6.1 with Kata 1.11.5's fragments, and image mode.

Fast tests cover the fragment merge check, the 6.1 adaptations, the packaging reader and the NVDIMM image
layout (checked byte for byte against osbuilder's own ``nsdax.gpl.c``). The ``slow`` ones build the kernel
(cached by content hash; cold it is a real kernel build) and boot the reference guest image the way Kata
1.11 does: as an NVDIMM root device, no initrd, Kata's kernel command line, under TCG. Debian's own kernel
in the same place is the negative control: it cannot mount that root.
"""

from __future__ import annotations

import json
import re
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pytest

from pytest_kata.errors import ConfigError, KataError
from pytest_kata.images.common import MiB, host_kernel, make_ext4_disk
from pytest_kata.kata_build import image_mode, kernel
from pytest_kata.kata_build.kernel import (
    Adaptation,
    KataKernelConfig,
    check_config,
    load_adaptations,
    load_packaging,
    parse_config_lines,
    parse_fragment,
)

PACKAGING = "kata-src/kata-packaging-1.11.5.tar.xz"
OSBUILDER = "kata-src/kata-osbuilder-1.11.5.tar.xz"
# What Kata 1.11.5's fragments ask for that linux 6.1 no longer has (kernel_adaptations.toml + whitelist.conf).
DROPPED_ON_6_1 = {
    "CONFIG_MEMCG_SWAP", "CONFIG_MEMCG_SWAP_ENABLED", "CONFIG_DEV_PAGEMAP_OPS", "CONFIG_ND_BLK",
    "CONFIG_MANDATORY_FILE_LOCKING", "CONFIG_NF_LOG_COMMON", "CONFIG_HAVE_NET_DSA", "CONFIG_NET_SCH_CBQ",
    "CONFIG_NF_NAT_NEEDED", "CONFIG_NF_NAT_PROTO_DCCP", "CONFIG_NF_NAT_PROTO_UDPLITE", "CONFIG_NF_NAT_PROTO_SCTP",
    "CONFIG_NF_NAT_PROTO_GRE", "CONFIG_NF_NAT_IPV4",
}


def kernel_build(test: Callable[..., None]) -> Callable[..., None]:
    """A cold kernel build is far longer than the suite's per-test timeout (tox.ini: 900 s) and the first test
    that asks for the kernel pays for it; one xdist group, since other workers would only wait on its lock."""
    return pytest.mark.timeout(3600)(pytest.mark.xdist_group("kata-kernel")(test))


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(cache))
    return cache


def _config(*fragments: tuple[str, str], whitelist: tuple[str, ...] = ()) -> KataKernelConfig:
    return KataKernelConfig(source=Path("packaging"), fragments=tuple(parse_fragment(n, t) for n, t in fragments),
                            whitelist=whitelist, config_version="76")


# ---------------------------------------------------------------------------------------------- fragments
def test_fragment_lines_values_not_set_and_malformed() -> None:
    options, ignored = parse_config_lines(
        "# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_NR=240\nCONFIG_S=\"x y\"\nCONFIG_NOVALUE\n\n")
    assert options == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_NR": "240", "CONFIG_S": '"x y"'}
    assert ignored == ("CONFIG_NOVALUE",)


def test_packaging_archive_gives_kata_fragments_in_build_kernel_order(shared_dir: Path) -> None:
    config = load_packaging(shared_dir / PACKAGING)
    names = [f.name for f in config.fragments]
    assert names[0] == "common/9p.conf" and names[-1] == "x86_64/ptp.conf"
    assert names == sorted(n for n in names if n.startswith("common/")) + sorted(
        n for n in names if n.startswith("x86_64/"))
    assert not any("experimental" in n or "gpu" in n for n in names)  # only on request, as in build-kernel.sh
    assert config.config_version == "76"
    assert "CONFIG_NF_NAT_IPV4" in config.whitelist
    dax = next(f for f in config.fragments if f.name == "common/dax.conf")
    assert dax.options["CONFIG_BLK_DEV_PMEM"] == "y"
    security = next(f for f in config.fragments if f.name == "common/security.conf")
    assert security.ignored == ("CONFIG_STACKPROTECTOR_STRONG",)  # upstream's line without a value


def test_packaging_directory_reads_the_same(shared_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(shared_dir / PACKAGING) as tar:
        members = [m for m in tar.getmembers() if "/kernel/" in m.name and m.isfile() and
                   ("/configs/" in m.name or m.name.endswith("kata_config_version"))]
        for member in members:
            target = tmp_path / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    top = tmp_path / "kata-packaging-1.11.5"
    from_dir, from_archive = load_packaging(top), load_packaging(shared_dir / PACKAGING)
    assert from_dir.fragments == from_archive.fragments and from_dir.config_version == "76"
    assert load_packaging(top / "kernel").fragments == from_archive.fragments


@pytest.mark.parametrize("layout, message", [
    ({}, "no kernel/configs/fragments/common/*.conf"),
    ({"kernel/configs/fragments/common/a.conf": "CONFIG_A=y\n",
      "kernel/configs/fragments/x86_64/b.conf": "CONFIG_B=y\n"}, "kata_config_version missing"),
])
def test_bad_packaging_tree_is_one_line(tmp_path: Path, layout: dict[str, str], message: str) -> None:
    for rel, text in layout.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(KataError, match=re.escape(message)) as exc:
        load_packaging(tmp_path)
    assert str(tmp_path) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(KataError, match="no such Kata packaging"):
        load_packaging(tmp_path / "nope.tar.xz")
    (tmp_path / "broken.tar.xz").write_bytes(b"not an archive")
    with pytest.raises(KataError, match="cannot read the packaging archive"):
        load_packaging(tmp_path / "broken.tar.xz")


# ---------------------------------------------------------------------------------------------- adaptations
def test_shipped_adaptations_are_valid_and_explained() -> None:
    adaptations = load_adaptations()
    assert {a.action for a in adaptations} == {"needs", "renamed", "removed"}
    assert all(len(a.reason) > 20 for a in adaptations)
    fragment = kernel.adaptation_fragment(adaptations)
    assert fragment.count("CONFIG_CPU_MITIGATIONS=y") == 1 and "CONFIG_NF_LOG_SYSLOG=y" in fragment


@pytest.mark.parametrize("entry, message", [
    ('name = "CONFIG_X"\naction = "gone"\nreason = "r"', "action must be one of"),
    ('name = "X"\naction = "removed"\nreason = "r"', "name must be CONFIG_<SYMBOL>"),
    ('name = "CONFIG_X"\naction = "renamed"\nreason = "r"', "action renamed needs an add list"),
    ('name = "CONFIG_X"\naction = "removed"', "every adaptation needs a reason"),
    ('name = "CONFIG_X"\naction = "needs"\nadd = ["MENU=y"]\nreason = "r"', "add must be a list of CONFIG_X"),
    ('name = "CONFIG_X"\naction = "removed"\nreason = "r"\nwhy = 1', "unknown key(s) why"),
])
def test_bad_adaptation_is_one_line_naming_the_file(tmp_path: Path, entry: str, message: str) -> None:
    path = tmp_path / "adapt.toml"
    path.write_text(f"[[option]]\n{entry}\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        load_adaptations(path)
    assert str(exc.value).startswith(str(path)) and "\n" not in str(exc.value)


def test_check_explains_every_missing_option_or_fails() -> None:
    config = _config(("common/a.conf", "CONFIG_KEPT=y\nCONFIG_GONE=y\nCONFIG_OLD=y\nCONFIG_NF_NAT_IPV4=y\n"),
                     ("x86_64/b.conf", "CONFIG_UNDER_MENU=y\nCONFIG_NR=240\n"),
                     whitelist=("CONFIG_NF_NAT_IPV4",))
    adaptations = (
        Adaptation("CONFIG_GONE", "removed", (), "gone in this kernel"),
        Adaptation("CONFIG_OLD", "renamed", ("CONFIG_NEW=y",), "renamed"),
        Adaptation("CONFIG_UNDER_MENU", "needs", ("CONFIG_MENU=y",), "menu off in allnoconfig"),
    )
    symbols = {"CONFIG_KEPT", "CONFIG_NEW", "CONFIG_UNDER_MENU", "CONFIG_MENU", "CONFIG_NR"}
    final = {"CONFIG_KEPT": "y", "CONFIG_NEW": "y", "CONFIG_UNDER_MENU": "y", "CONFIG_MENU": "y", "CONFIG_NR": "240"}
    report = check_config(config, adaptations, final, symbols, "6.1.0")
    assert report.problems == []
    assert report.requested == 8 and report.present == 5
    assert {d["option"] for d in report.dropped} == {"CONFIG_GONE", "CONFIG_OLD", "CONFIG_NF_NAT_IPV4"}
    assert any("replaced by CONFIG_NEW=y" in d["why"] for d in report.dropped)

    # the menu left off: UNDER_MENU exists but is not set -> dependencies not met
    menu_off = {**final, "CONFIG_MENU": "n", "CONFIG_UNDER_MENU": "n"}
    broken = check_config(config, adaptations, menu_off, symbols, "6.1.0")
    assert any("CONFIG_UNDER_MENU=y (x86_64/b.conf) is n" in p and "dependencies not met" in p for p in broken.problems)
    # a wrong value is not "present"
    assert any("CONFIG_NR=240" in p for p in check_config(config, adaptations, {**final, "CONFIG_NR": "64"},
                                                           symbols, "6.1.0").problems)
    # an option that is gone but not explained
    unexplained = check_config(config, adaptations[1:], final, symbols, "6.1.0")
    assert unexplained.problems == ["CONFIG_GONE=y (common/a.conf) does not exist in linux 6.1.0"]
    # a stale adaptation: says removed, but the kernel still has it
    stale = check_config(config, adaptations, {**final, "CONFIG_GONE": "y"}, symbols | {"CONFIG_GONE"}, "6.1.0")
    assert any("CONFIG_GONE is removed in kernel_adaptations.toml but exists" in p for p in stale.problems)


def test_makefile_version_and_log_tail() -> None:
    assert kernel.makefile_version("VERSION = 6\nPATCHLEVEL = 1\nSUBLEVEL = 192\nEXTRAVERSION =\n") == "6.1.192"
    assert kernel.makefile_version("VERSION = 5\nPATCHLEVEL = 4\nSUBLEVEL = 32\nEXTRAVERSION = -rc1\n") == "5.4.32-rc1"
    with pytest.raises(KataError):
        kernel.makefile_version("all:\n")
    log = "  CC a.o\n  CC b.o\nfs/x.c:3:1: error: expected ';'\nmake[2]: *** [x.o] Error 1\nmake: leaving\n"
    assert kernel.log_tail(log).startswith("fs/x.c:3:1: error: expected ';'")
    assert kernel.log_tail("one\ntwo\n") == "one | two"


def test_missing_source_tarball_is_one_line(shared_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(KataError, match="no linux source tarball") as exc:
        kernel.build_guest_kernel(shared_dir / PACKAGING, source=tmp_path / "linux.tar.xz")
    assert "linux-source-6.1" in str(exc.value)


# A stand-in for the linux source with the same interface (top Makefile with a bzImage target, Kconfig,
# scripts/kconfig/merge_config.sh), so that the pipeline around the compiler runs in a second: unpack, the
# merge, the check, make's output and failure, the install layout and the cache.
FAKE_MERGE = """#!/bin/sh
while [ "${1#-}" != "$1" ]; do shift; done
cat "$@" | grep -E '^CONFIG_[A-Z0-9_]+=' | grep -v -e CONFIG_GONE -e CONFIG_NOT_IN_KCONFIG > "$KCONFIG_CONFIG"
"""
FAKE_MAKEFILE = """VERSION = 6
PATCHLEVEL = 1
SUBLEVEL = 99
EXTRAVERSION =
bzImage:
\t@echo "  CC      init/main.o"
\t@echo "  AS      arch/x86/entry/entry_64.o"
\t@if grep -q CONFIG_BREAK=y .config; then echo "init/main.c:1:1: error: broken on purpose"; exit 2; fi
\t@mkdir -p arch/x86/boot && printf 'bz' > arch/x86/boot/bzImage && printf 'elf' > vmlinux
"""


def _fake_inputs(tmp_path: Path, *fragment_lines: str) -> tuple[Path, Path, Path]:
    tree = tmp_path / "src/linux-fake"
    (tree / "scripts/kconfig").mkdir(parents=True)
    (tree / "Makefile").write_text(FAKE_MAKEFILE)
    (tree / "Kconfig").write_text("config A\n\tbool\nconfig B\n\tbool\nconfig BREAK\n\tbool\nconfig NEW\n\tbool\n")
    merge = tree / "scripts/kconfig/merge_config.sh"
    merge.write_text(FAKE_MERGE)
    merge.chmod(0o755)
    source = tmp_path / "linux-fake.tar.xz"
    subprocess.run(["tar", "-cJf", str(source), "-C", str(tmp_path / "src"), "linux-fake"], check=True)
    packaging = tmp_path / "packaging/kernel"
    (packaging / "configs/fragments/common").mkdir(parents=True)
    (packaging / "configs/fragments/x86_64").mkdir(parents=True)
    (packaging / "configs/fragments/common/a.conf").write_text("CONFIG_A=y\nCONFIG_GONE=y\n")
    (packaging / "configs/fragments/x86_64/b.conf").write_text("\n".join(("CONFIG_B=y", *fragment_lines)) + "\n")
    (packaging / "kata_config_version").write_text("99\n")
    adaptations = tmp_path / "adaptations.toml"
    adaptations.write_text('[[option]]\nname = "CONFIG_GONE"\naction = "renamed"\nadd = ["CONFIG_NEW=y"]\n'
                           'reason = "renamed in this kernel"\n')
    return packaging.parent, source, adaptations


def test_build_pipeline_installs_like_kata_and_caches(tmp_path: Path, private_cache: Path) -> None:
    packaging, source, adaptations = _fake_inputs(tmp_path)
    lines: list[str] = []
    built = kernel.build_guest_kernel(packaging, source=source, adaptations_file=adaptations,
                                      progress=lambda area, msg: lines.append(msg))
    assert built.built and built.version == "6.1.99-99"
    assert built.vmlinuz.name == "vmlinuz-6.1.99-99" and built.vmlinuz.read_bytes() == b"bz"
    assert built.container.is_symlink() and built.container.resolve() == built.vmlinuz
    assert (built.dir / "vmlinux.container").resolve() == built.vmlinux and built.config.name == "config-6.1.99"
    report = json.loads(built.report.read_text())
    assert report["dropped"][0]["option"] == "CONFIG_GONE" and report["present"] == 3  # A, B, NEW
    assert any(m.startswith("unpack: 100%") for m in lines) and any("compile: done (2 files)" in m for m in lines)
    assert not list((private_cache / kernel.CACHE_KIND).glob(".tmp-*"))  # the source tree is gone
    again = kernel.build_guest_kernel(packaging, source=source, adaptations_file=adaptations,
                                      progress=lambda area, msg: None)
    assert not again.built and again.dir == built.dir


def test_build_failure_is_one_line_with_the_log_tail(tmp_path: Path, private_cache: Path) -> None:
    packaging, source, adaptations = _fake_inputs(tmp_path, "CONFIG_BREAK=y")
    with pytest.raises(KataError) as exc:
        kernel.build_guest_kernel(packaging, source=source, adaptations_file=adaptations,
                                  progress=lambda area, msg: None)
    message = str(exc.value)
    assert "\n" not in message and "kernel build failed (exit 2)" in message
    assert "init/main.c:1:1: error: broken on purpose" in message and message.startswith(str(private_cache))
    assert not [p for p in (private_cache / kernel.CACHE_KIND).iterdir() if p.is_dir()]  # nothing half-built


def test_unexplained_missing_option_fails_the_build(tmp_path: Path, private_cache: Path) -> None:
    packaging, source, adaptations = _fake_inputs(tmp_path, "CONFIG_NOT_IN_KCONFIG=y")
    with pytest.raises(KataError, match=r"1 Kata fragment option.* CONFIG_NOT_IN_KCONFIG=y .x86_64/b.conf. does not "
                                        r"exist in linux 6\.1\.99"):
        kernel.build_guest_kernel(packaging, source=source, adaptations_file=adaptations,
                                  progress=lambda area, msg: None)


# ---------------------------------------------------------------------------------------------- NVDIMM image
def test_pfn_info_block_is_osbuilders_nsdax_byte_for_byte(shared_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(shared_dir / OSBUILDER) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("image-builder/nsdax.gpl.c"))
        (tmp_path / "nsdax.c").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    subprocess.run(["gcc", "-O2", str(tmp_path / "nsdax.c"), "-o", str(tmp_path / "nsdax")], check=True)
    target = tmp_path / "header"
    target.write_bytes(bytes(4 * MiB))
    subprocess.run([str(tmp_path / "nsdax"), str(target), str(2 * MiB), str(2 * MiB)], check=True,
                   capture_output=True)
    written = target.read_bytes()
    assert written[4096:8192] == image_mode.pfn_info_block()
    assert image_mode.pfn_info_block(4 * MiB) != image_mode.pfn_info_block()  # the checksum covers dataoff


def test_nvdimm_image_layout(tmp_path: Path, private_cache: Path) -> None:
    tree = tmp_path / "rootfs"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("guest\n")
    disk = make_ext4_disk(tree, tmp_path / "guest.image")
    raw = disk.path.read_bytes()
    image = image_mode.nvdimm_image(disk.path)
    data = image.read_bytes()
    assert len(data) % (128 * MiB) == 0 and len(data) >= 2 * MiB + len(raw)
    assert data[2 * MiB:2 * MiB + len(raw)] == raw  # MBR #2 + ext4, untouched
    assert data[4096:8192] == image_mode.pfn_info_block() and data[510:512] == b"\x55\xaa"
    start, size = image_mode._first_partition(image)
    raw_start, raw_size = image_mode._first_partition(disk.path)
    assert (start, size) == (2 * MiB + raw_start, raw_size)  # MBR #1 points at the same ext4
    assert data[440:444] == raw[440:444]
    assert image_mode.nvdimm_image(disk.path) == image  # cached
    with pytest.raises(KataError, match="no such guest disk image"):
        image_mode.nvdimm_image(tmp_path / "none.image")


def test_kata_command_line_for_an_nvdimm_image(tmp_path: Path) -> None:
    image = tmp_path / "g.img"
    image.write_bytes(bytes(4096))
    args = image_mode.kata_image_qemu_args(tmp_path / "vmlinuz", image)
    line = " ".join(args)
    assert "-machine pc,accel=tcg,nvdimm=on" in line and "-cpu max" in line and "-initrd" not in args
    assert "-device nvdimm,id=nv0,memdev=mem0" in line
    assert f"-object memory-backend-file,id=mem0,mem-path={image},size=4096" in line
    assert re.search(r"-m 2048M,slots=10,maxmem=\d+M", line)
    append = args[args.index("-append") + 1]
    assert "root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4" in append
    assert append.endswith("agent.use_vsock=false console=ttyS0")
    assert "rootflags=data=ordered" in " ".join(image_mode.kata_kernel_params(dax=False))
    kvm = " ".join(image_mode.kata_image_qemu_args(tmp_path / "vmlinuz", image, accel="kvm"))
    assert "accel=kvm,nvdimm=on,kernel_irqchip=on" in kvm and "-cpu host" in kvm


# ---------------------------------------------------------------------------------------------- slow: build and boot
@pytest.fixture(scope="session")
def kata_kernel(shared_dir: Path) -> kernel.KernelArtifacts:
    return kernel.build_guest_kernel(shared_dir / PACKAGING)


@pytest.fixture(scope="session")
def reference_nvdimm() -> tuple[Path, Path]:
    from pytest_kata.images.guest import build_guest

    guest = build_guest("reference")
    assert guest.image is not None
    return guest.image, image_mode.nvdimm_image(guest.image)


@pytest.mark.slow
@kernel_build
def test_kernel_is_installed_like_kata(kata_kernel: kernel.KernelArtifacts, shared_dir: Path) -> None:
    k = kata_kernel
    assert k.kernel_version == "6.1.192" or k.kernel_version.startswith("6.1.")
    assert k.vmlinuz.name == f"vmlinuz-{k.kernel_version}-76" and k.version == f"{k.kernel_version}-76"
    assert k.container.resolve() == k.vmlinuz.resolve() and (k.dir / "vmlinux.container").resolve() == k.vmlinux
    assert k.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage: what qemu -kernel boots
    assert k.config.name == f"config-{k.kernel_version}"
    final, _ = parse_config_lines(k.config.read_text())
    assert image_mode.image_mode_gaps(k.config) == []  # every driver image mode needs is built in
    assert final.get("CONFIG_MODULES", "n") == "n"  # allnoconfig base, as Kata builds it
    report = json.loads(k.report.read_text())
    assert report["problems"] == [] and {d["option"] for d in report["dropped"]} == DROPPED_ON_6_1
    assert report["present"] == report["requested"] - len(DROPPED_ON_6_1)
    # every option a fragment requests that this kernel still has is in the .config with its value
    config = load_packaging(shared_dir / PACKAGING)
    for name, (value, _) in kernel.requested_options(config, load_adaptations()).items():
        assert name in DROPPED_ON_6_1 or final.get(name, "n") == value, name


@pytest.mark.slow
@kernel_build
def test_kernel_cache_hit_is_fast(kata_kernel: kernel.KernelArtifacts, shared_dir: Path) -> None:
    start = time.monotonic()
    again = kernel.build_guest_kernel(shared_dir / PACKAGING, progress=lambda area, msg: None)
    assert time.monotonic() - start < 10 and not again.built and again.vmlinuz == kata_kernel.vmlinuz


def _boot_image_mode(kernel_path: Path, image: Path) -> dict[str, str]:
    """Boot as Kata does; return what the guest says about its root, or the console where it died."""
    args = image_mode.kata_image_qemu_args(kernel_path, image)
    child = pexpect.spawn("qemu-system-x86_64", args, encoding="utf-8", timeout=240, codec_errors="replace")
    try:
        if child.expect([r"KATA-GUEST-READY ([^\r\n]+)[\r\n]", pexpect.EOF]) == 1:
            return {"died": child.before or ""}
        ready = child.match.group(1)
        child.expect("kata-guest# ")
        # split words and $((..)): the echoed command never contains what its output is matched on
        child.sendline("awk '$5 == \"/\" {print \"MOU\" \"NT\", $0}' /proc/self/mountinfo; "
                       "echo PM\"\"EM $(cat /sys/block/pmem0/pmem0p1/dev); echo KR\"\"EL $(uname -r); "
                       "echo END-$((1+1))")
        child.expect("END-2")
        probe = {line.split(" ", 1)[0]: line.split(" ", 1)[1].strip() for line in child.before.splitlines()
                 if line.startswith(("MOUNT ", "PMEM ", "KREL "))}
        child.sendline("touch /probe 2>/dev/null && echo ROOT-RW-$((1+1)) || echo ROOT-RO-$((1+1))")
        readonly = child.expect(["ROOT-RO-2", "ROOT-RW-2"]) == 0
        child.sendline("poweroff -f")
        child.expect(pexpect.EOF, timeout=60)
        return {"ready": ready, "readonly": str(readonly), **probe}
    finally:
        child.close(force=True)


@pytest.mark.slow
@pytest.mark.vm
@kernel_build
def test_kata_kernel_boots_the_image_as_a_read_only_pmem_root(kata_kernel: kernel.KernelArtifacts,
                                                              reference_nvdimm: tuple[Path, Path]) -> None:
    seen = _boot_image_mode(kata_kernel.container, reference_nvdimm[1])
    assert "ready" in seen, seen.get("died", "")[-2000:]
    # /proc/self/mountinfo: id parent major:minor root mountpoint options [optional] - fstype source superoptions
    mount = seen["MOUNT"].split()
    fstype, superoptions = mount[mount.index("-") + 1], mount[mount.index("-") + 3]
    assert mount[2] == seen["PMEM"], seen  # / is /dev/pmem0p1
    assert mount[5].split(",")[0] == "ro" and fstype == "ext4" and "dax" in superoptions, seen
    assert seen["KREL"] == kata_kernel.kernel_version  # the built kernel, not Debian's
    assert seen["readonly"] == "True" and "root=ro" in seen["ready"]


@pytest.mark.slow
@pytest.mark.vm
@kernel_build
def test_debian_kernel_cannot_mount_the_nvdimm_root(reference_nvdimm: tuple[Path, Path]) -> None:
    seen = _boot_image_mode(host_kernel().vmlinuz, reference_nvdimm[1])
    assert "ready" not in seen
    # no block device at all: the NVDIMM and pmem drivers are modules there, and there is no initrd to load them
    assert "VFS: Unable to mount root fs on unknown-block(0,0)" in seen["died"], seen["died"][-2000:]


@pytest.mark.slow
@pytest.mark.vm
@kernel_build
def test_kata_kernel_needs_the_dax_header(kata_kernel: kernel.KernelArtifacts,
                                          reference_nvdimm: tuple[Path, Path]) -> None:
    """The plain disk (no NVDIMM pfn block) as the NVDIMM: rootflags=dax cannot mount it."""
    seen = _boot_image_mode(kata_kernel.container, reference_nvdimm[0])
    assert "ready" not in seen
    # the pmem driver found the partition; only DAX, which the pfn info block enables, is missing
    assert "EXT4-fs (pmem0p1): DAX unsupported by block device" in seen["died"], seen["died"][-2000:]
