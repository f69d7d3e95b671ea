"""Guest and host images: build them from Debian packages (mmdebstrap) into the formats Kata uses.

:mod:`pytest_kata.images.common` holds the building blocks (rootfs, raw partitioned ext4 disk, initrd,
content-hash cache, the host's Debian kernel); :mod:`pytest_kata.images.guest` builds the guest image
recipes in ``vm-images/guest/``. Nothing here mounts anything: images are made with ``mkfs.ext4 -d`` and
``sfdisk`` and read back with ``debugfs`` (see :mod:`pytest_kata.images.read`).
"""

from __future__ import annotations

from pytest_kata.images.common import (
    SOURCE_DATE_EPOCH,
    HostKernel,
    cached,
    content_hash,
    host_kernel,
    make_ext4_disk,
    make_ext4_fs,
    make_initrd,
    mmdebstrap,
)

__all__ = [
    "SOURCE_DATE_EPOCH",
    "HostKernel",
    "cached",
    "content_hash",
    "host_kernel",
    "make_ext4_disk",
    "make_ext4_fs",
    "make_initrd",
    "mmdebstrap",
]
