"""Kata 1.x image mode: the guest image as an NVDIMM root device, booted without an initrd.

Kata 1.11's runtime (virtcontainers) attaches ``image = ...`` as ``-device nvdimm,id=nv0,memdev=mem0
-object memory-backend-file,id=mem0,mem-path=IMAGE,size=N`` on a machine with ``nvdimm`` in its options,
and boots with ``root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4``
(``qemu_amd64.go``, ``qemu_arch_base.go handleImagePath``, ``hypervisor.go commonNvdimmKernelRootParams``).
``rootflags=dax`` only mounts when the pmem device offers DAX, which needs the NVDIMM "pfn" info block that
osbuilder's ``image_builder.sh`` writes in front of the disk (``set_dax_header`` with ``nsdax.gpl.c``): a 2 MiB
header (MBR #1 whose partition 1 points 2 MiB further, and the ``NVDIMM_PFN_INFO`` block at 4 KiB) followed
by the plain disk (MBR #2 + ext4), the whole padded to 128 MiB. :func:`nvdimm_image` builds that layout
from the project's raw guest disk; :func:`pfn_info_block` is ``nsdax.gpl.c`` in Python (the tests compare
it byte for byte with the compiled original).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path

from pytest_kata.errors import KataError
from pytest_kata.hashing import sha256_file
from pytest_kata.images.common import MiB, cached, content_hash, run_tool
from pytest_kata.progress import step

AREA = "image"
CACHE_KIND = "kata-nvdimm"
BUILDER_VERSION = "1"
DAX_HEADER = 2 * MiB  # image_builder.sh dax_header_sz: MBR #1 + DAX metadata
DAX_ALIGNMENT = 2 * MiB  # image_builder.sh dax_alignment: 2 MiB huge pages
IMAGE_BOUNDARY = 128 * MiB  # image_builder.sh mem_boundary_mb on x86_64
PFN_INFO_OFFSET = 4096  # the NVDIMM driver looks for the info block 4 KiB into the namespace
PFN_MODE_RAM = 1

# qemu_amd64.go kernelParams, then the image's root params (dax on amd64), kernelParamsNonDebug,
# kernelParamsSystemdNonDebug, qemu.go defaultKernelParameters; nr_cpus and agent.use_vsock follow.
KATA_KERNEL_PARAMS = (
    "tsc=reliable", "no_timer_check", "rcupdate.rcu_expedited=1", "i8042.direct=1", "i8042.dumbkbd=1",
    "i8042.nopnp=1", "i8042.noaux=1", "noreplace-smp", "reboot=k", "console=hvc0", "console=hvc1", "iommu=off",
    "cryptomgr.notests", "net.ifnames=0", "pci=lastbus=0",
)
KATA_NVDIMM_ROOT_PARAMS = ("root=/dev/pmem0p1", "rootflags=dax,data=ordered,errors=remount-ro", "ro",
                           "rootfstype=ext4")
KATA_TAIL_PARAMS = ("quiet", "systemd.show_status=false", "panic=1")
KATA_MACHINE = "pc"  # runtime arch/amd64-options.mk MACHINETYPE
# What a kernel must have built in (=y) to boot Kata's image mode: no initrd loads modules there. NVDIMM/pmem
# with the pfn (DAX) namespace and ACPI NFIT (qemu's -device nvdimm), ext4 with DAX, the msdos label, and the
# agent's transports (virtio-serial, vsock, 9p for the shared container rootfs).
IMAGE_MODE_BUILTINS = (
    "CONFIG_LIBNVDIMM", "CONFIG_BLK_DEV_PMEM", "CONFIG_ACPI_NFIT", "CONFIG_NVDIMM_PFN", "CONFIG_FS_DAX",
    "CONFIG_ZONE_DEVICE", "CONFIG_EXT4_FS", "CONFIG_MSDOS_PARTITION", "CONFIG_VIRTIO_PCI", "CONFIG_VIRTIO_BLK",
    "CONFIG_VIRTIO_CONSOLE", "CONFIG_VIRTIO_VSOCKETS", "CONFIG_9P_FS", "CONFIG_NET_9P_VIRTIO",
    "CONFIG_SERIAL_8250_CONSOLE", "CONFIG_DEVTMPFS",
)
KATA_MEMORY_MIB = 2048  # runtime Makefile DEFMEMSZ
KATA_MEMORY_SLOTS = 10  # runtime Makefile DEFMEMSLOTS


def fletcher64(data: bytes) -> int:
    """The NVDIMM driver's ``nd_fletcher64`` over little-endian 32-bit words."""
    lo, hi = 0, 0
    for (word,) in struct.iter_unpack("<I", data):
        lo = (lo + word) & 0xFFFFFFFF
        hi = (hi + lo) & 0xFFFFFFFFFFFFFFFF
    return ((hi << 32) | lo) & 0xFFFFFFFFFFFFFFFF


def pfn_info_block(data_offset: int = DAX_HEADER, alignment: int = DAX_ALIGNMENT) -> bytes:
    """``struct nd_pfn_sb`` as osbuilder's nsdax writes it (4096 bytes, checksum last)."""
    sb = bytearray(4096)
    sb[0:16] = b"NVDIMM_PFN_INFO\0"
    struct.pack_into("<H", sb, 54, 2)  # version_minor (version_major stays 0, as in nsdax)
    struct.pack_into("<Q", sb, 56, data_offset)  # dataoff
    struct.pack_into("<I", sb, 72, PFN_MODE_RAM)  # mode
    struct.pack_into("<I", sb, 84, alignment)  # align
    struct.pack_into("<Q", sb, 4088, fletcher64(bytes(sb)))
    return bytes(sb)


def nvdimm_layout(disk_size: int, partition_start: int, partition_size: int) -> dict[str, int]:
    """Sizes of the Kata NVDIMM image made from a plain disk (offsets in bytes)."""
    total = DAX_HEADER + disk_size
    total += -total % IMAGE_BOUNDARY
    return {"size": total, "partition_start": DAX_HEADER + partition_start, "partition_size": partition_size}


def _first_partition(disk: Path) -> tuple[int, int]:
    table = json.loads(run_tool(["sfdisk", "--json", disk], what="sfdisk --json", path=disk).stdout)
    try:
        table = table["partitiontable"]
        part = table["partitions"][0]
        sector = int(table.get("sectorsize", 512))
        if table["label"] != "dos":
            raise KataError(f"Kata's NVDIMM image needs an msdos label, not {table['label']}", path=disk)
        return int(part["start"]) * sector, int(part["size"]) * sector
    except (KeyError, IndexError, TypeError, ValueError):
        raise KataError("no partition 1 in the guest disk", path=disk)


def _disk_id(disk: Path) -> str:
    """MBR #1 keeps the disk identifier of MBR #2 (bytes 440-443), so the image is reproducible."""
    with open(disk, "rb") as fh:
        fh.seek(440)
        return f"{struct.unpack('<I', fh.read(4))[0]:08x}"


def write_nvdimm_image(disk: Path, out: Path) -> None:
    """Write Kata's NVDIMM layout of ``disk`` (msdos label, ext4 in partition 1) to ``out``."""
    start, size = _first_partition(disk)
    layout = nvdimm_layout(disk.stat().st_size, start, size)
    with open(out, "wb") as fh:
        fh.truncate(layout["size"])
    # MBR #1: what a kernel without DAX reads; partition 1 is the same ext4, 2 MiB further in.
    run_tool(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", out], what="sfdisk (MBR #1)", path=out,
             input=(f"label: dos\nlabel-id: 0x{_disk_id(disk)}\n"
                    f"start={layout['partition_start'] // 512}, size={size // 512}, type=83\n").encode())
    with open(out, "r+b") as fh:
        fh.seek(PFN_INFO_OFFSET)
        fh.write(pfn_info_block())
        fh.seek(DAX_HEADER)
        with open(disk, "rb") as src:
            shutil.copyfileobj(src, fh, 16 * MiB)


def nvdimm_image(disk: str | Path, *, force: bool = False) -> Path:
    """Kata's NVDIMM image of a raw guest disk, cached by the disk's content hash."""
    disk = Path(disk)
    if not disk.is_file():
        raise KataError("no such guest disk image", path=disk)
    key = content_hash(BUILDER_VERSION, sha256_file(disk), Path(__file__))[:20]
    name = disk.stem + ".nvdimm.img"

    def build(out: Path) -> None:
        step(AREA, f"{name}: adding the NVDIMM DAX header (osbuilder layout)")
        write_nvdimm_image(disk, out / name)

    return cached(CACHE_KIND, f"{disk.stem}-{key}", build, force=force) / name


def image_mode_gaps(config: Path) -> list[str]:
    """The :data:`IMAGE_MODE_BUILTINS` a kernel config does not build in, as ``CONFIG_X=<value>`` (empty: the
    kernel can boot Kata's NVDIMM image without an initrd)."""
    try:
        text = config.read_text(errors="replace")
    except OSError as exc:
        raise KataError(f"cannot read the kernel config: {exc.strerror}", path=config) from None
    values = dict(re.findall(r"^(CONFIG_[A-Za-z0-9_]+)=(\S*)", text, re.MULTILINE))
    return [f"{name}={values.get(name, 'n')}" for name in IMAGE_MODE_BUILTINS if values.get(name) != "y"]


def host_memory_mib() -> int:
    pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return pages * page // MiB


def kata_kernel_params(*, dax: bool = True, vcpus: int = 1, use_vsock: bool = False,
                       extra: Sequence[str] = ()) -> list[str]:
    """Kata 1.11's guest kernel command line for an NVDIMM image (``extra`` = configuration kernel_params)."""
    root = list(KATA_NVDIMM_ROOT_PARAMS)
    if not dax:
        root[1] = "rootflags=data=ordered,errors=remount-ro"
    return [*KATA_KERNEL_PARAMS, *root, *KATA_TAIL_PARAMS, f"nr_cpus={vcpus}",
            f"agent.use_vsock={str(use_vsock).lower()}", *extra]


def kata_image_qemu_args(kernel: Path, image: Path, *, accel: str = "tcg", memory_mib: int = KATA_MEMORY_MIB,
                         extra_params: Sequence[str] = ("console=ttyS0",), dax: bool = True) -> list[str]:
    """The parts of Kata 1.11's qemu command line that boot an NVDIMM image, serial console on stdio.

    ``accel=kvm`` and ``-cpu host`` become ``accel`` and ``-cpu max`` under TCG (nothing else changes);
    ``console=ttyS0`` is added as a configuration ``kernel_params`` would be, so that the console is readable.
    """
    # Kata writes bare "nvdimm" and "kernel_irqchip"; qemu 7+ wants them as "=on".
    machine = f"{KATA_MACHINE},accel={accel},nvdimm=on" + (",kernel_irqchip=on" if accel == "kvm" else "")
    maxmem = host_memory_mib() + 1024  # genericMemoryTopology: host memory + 1024 MiB for the NVDIMM
    return ["-machine", machine, "-cpu", "host" if accel == "kvm" else "max",
            "-m", f"{memory_mib}M,slots={KATA_MEMORY_SLOTS},maxmem={maxmem}M",
            "-device", "nvdimm,id=nv0,memdev=mem0",
            "-object", f"memory-backend-file,id=mem0,mem-path={image},size={image.stat().st_size}",
            "-rtc", "base=utc,driftfix=slew,clock=host", "-vga", "none", "-no-user-config", "-nodefaults",
            "-nographic", "-no-reboot", "-serial", "stdio", "-smp", "1",
            "-kernel", str(kernel), "-append", " ".join(kata_kernel_params(dax=dax, extra=extra_params))]
