"""The magic bytes of the compression formats Kata artefacts come in (tarballs, initrds, kernel configs), in
one place: every reader recognises a format by its first bytes, since an extension can lie."""

from __future__ import annotations

GZIP_MAGIC = b"\x1f\x8b"
GZIP_DEFLATE_MAGIC = GZIP_MAGIC + b"\x08"  # gzip with the deflate method (all gzip in practice)
XZ_MAGIC = b"\xfd7zXZ\x00"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = b"\x2a\x4d\x18"  # bytes 1-3 of a skippable frame (byte 0 is 0x50-0x5f), which pzstd writes first
BZIP2_MAGIC = b"BZh"
LZMA_MAGIC = b"\x5d\x00\x00\x00"


def sniff(head: bytes) -> str | None:
    """``gz``, ``xz``, ``zst`` or ``bz2`` for data that starts with ``head``; None when it is none of them."""
    if head.startswith(XZ_MAGIC):
        return "xz"
    if head.startswith(GZIP_MAGIC):
        return "gz"
    if head.startswith(ZSTD_MAGIC) or (head[1:4] == ZSTD_SKIPPABLE and head[0] & 0xF0 == 0x50):
        return "zst"
    if head.startswith(BZIP2_MAGIC):
        return "bz2"
    return None
