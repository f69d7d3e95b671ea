"""The guest kernel of a bundle built from source: Kata's own, Debian's, or one the user built (``--kernel``).

By default it is Kata's guest kernel built from the release's own packaging sources (its config fragments on
``linux-source-6.1``, :func:`pytest_kata.kata_build.kernel.build_guest_kernel`, cached), as upstream's
kata-static ships; Debian's kernel only when the sources hold no packaging tree. Either way it is a
:class:`~pytest_kata.images.common.HostKernel` (image, config, release), which is what the guest-image
builder takes: for Debian's kernel it copies the agent's transport modules from ``/lib/modules/<release>``;
for a kernel without a module tree there (Kata's, everything built in) the config must show them built in.
Image mode (the guest image as an NVDIMM root, no initrd) needs the drivers of
:data:`~pytest_kata.kata_build.image_mode.IMAGE_MODE_BUILTINS` built in, which Debian's kernel lacks.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pytest_kata.errors import KataError
from pytest_kata.images.common import HostKernel, host_kernel
from pytest_kata.kata_build.image_mode import image_mode_gaps
from pytest_kata.kata_build.kernel import build_guest_kernel
from pytest_kata.kata_build.sources import SourceSet

GUESTS = ("image", "initrd")


def bzimage_release(path: Path) -> str:
    """The release (``uname -r``) written in an x86 bzImage's setup header (``kernel_version`` field)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(0x10400)  # the version string sits in the setup code, below 64 KiB + 0x200
    except OSError as exc:
        raise KataError(f"cannot read the kernel: {exc.strerror}", path=path) from None
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        raise KataError("not an x86 bzImage (no HdrS setup header)", path=path,
                        hint="give the compressed kernel image (arch/x86/boot/bzImage, vmlinuz-*)")
    (offset,) = struct.unpack_from("<H", head, 0x20E)
    start = offset + 0x200
    if not offset or start >= len(head):
        raise KataError("the bzImage names no kernel version", path=path)
    text = head[start:start + 256].split(b"\0")[0].decode("ascii", "replace")
    release = text.split(" ")[0]
    if not release:
        raise KataError("the bzImage names no kernel version", path=path)
    return release


def guest_kernel(path: Path | None = None, config: Path | None = None) -> HostKernel:
    """The kernel to ship: the host's newest Debian kernel, or the bzImage at ``path``.

    ``config`` defaults to ``config-<release>`` beside ``path``, else the only ``config-*`` (or ``.config``).
    """
    if path is None:
        if config is not None:
            raise KataError("--kernel-config needs --kernel", path=config)
        return host_kernel()
    path = Path(path)
    if not path.is_file():
        raise KataError("no such kernel image", path=path)
    release = bzimage_release(path)
    if config is None:
        named = path.parent / f"config-{release}"  # how Kata's install_kata and Debian name it
        beside = [named] if named.is_file() else sorted(
            p for p in path.parent.glob("config-*") if p.suffix != ".json") or sorted(path.parent.glob(".config"))
        if len(beside) != 1:
            raise KataError(f"cannot tell which kernel config belongs to this kernel ({len(beside)} "
                            f"config-* files beside it)", path=path, hint="give --kernel-config PATH")
        config = beside[0]
    config = Path(config)
    if not config.is_file():
        raise KataError("no such kernel config", path=config)
    return HostKernel(vmlinuz=path, initrd=None, config=config, release=release)


def kata_kernel(packaging: Path) -> HostKernel:
    """Kata's guest kernel from a packaging archive or checkout (built once, then taken from the cache)."""
    built = build_guest_kernel(packaging)
    return HostKernel(vmlinuz=built.vmlinuz, initrd=None, config=built.config, release=built.kernel_version)


def bundle_kernel(sources: SourceSet, kernel: HostKernel | None, guest: str) -> tuple[HostKernel, str]:
    """The kernel a bundle of ``sources`` ships and where it comes from (for the build record).

    ``kernel`` is the user's (``--kernel``); else Kata's from the release's packaging sources; else Debian's.
    A kernel that cannot boot the ``guest`` form asked for is refused here, in one line, before anything
    is built.
    """
    if guest not in GUESTS:
        raise KataError(f"unknown guest form {guest!r}: use {' or '.join(GUESTS)}", path="--guest")
    if kernel is not None:
        origin = f"given with --kernel ({kernel.vmlinuz})"
    elif "packaging" in sources.sources:
        packaging = sources["packaging"].path
        kernel, origin = kata_kernel(packaging), f"Kata's guest kernel built from {packaging.name}"
    else:
        kernel, origin = host_kernel(), "Debian's (the sources hold no kata-packaging tree to build Kata's from)"
    if guest == "image":
        gaps = image_mode_gaps(kernel.config)
        if gaps:
            raise KataError(f"kernel {kernel.release} ({origin}) cannot boot Kata's image mode, which has no initrd "
                            f"to load drivers: {', '.join(gaps[:6])}{' ...' if len(gaps) > 6 else ''}",
                            path=kernel.config, hint="use --guest initrd, or Kata's guest kernel (put the "
                            "release's kata-packaging archive beside the sources)")
    return kernel, origin
