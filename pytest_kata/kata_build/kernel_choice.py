"""The guest kernel of a bundle built from source: Debian's, or one the user built (``--kernel PATH``).

Either way it is a :class:`~pytest_kata.images.common.HostKernel` (image, config, release), which is what
the guest-image builder takes: for Debian's kernel it copies the agent's transport modules from
``/lib/modules/<release>``; for a kernel without a module tree there (a kernel built the way Kata builds
its own, everything built in) the config must show them built in.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pytest_kata.errors import KataError
from pytest_kata.images.common import HostKernel, host_kernel


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
