"""Guest kernel configuration: parse a Kconfig ``.config``, or pull it out of a kernel image (IKCONFIG).

Kata's kernel build installs ``config-<version>`` beside ``vmlinux``/``vmlinuz``; that file is the first
choice. When only the kernel is shipped, the config can still be read if the kernel was built with
``CONFIG_IKCONFIG``: it is a gzip stream between the ``IKCFG_ST`` and ``IKCFG_ED`` markers, inside the
(usually compressed) kernel payload. This is the logic of the kernel's ``scripts/extract-ikconfig``: look
for the marker in the file; otherwise find each known compression magic, decompress from there and look
again. Kata's own fragments do not set IKCONFIG, so absence is normal and reported, not guessed around.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard

from pytest_kata.compression import BZIP2_MAGIC, GZIP_DEFLATE_MAGIC, LZMA_MAGIC, XZ_MAGIC, ZSTD_MAGIC
from pytest_kata.errors import ConfigError

IKCFG_START = b"IKCFG_ST"
MAX_KERNEL = 512 << 20  # bytes of decompressed kernel we are willing to produce per attempt
_LINE_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_LINE_UNSET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_HEADER_VERSION = re.compile(r"^# Linux/\S+ (\d+\.\d+(?:\.\d+)?)\S* Kernel Configuration", re.M)


@dataclass
class KernelConfig:
    """A parsed kernel config: ``CONFIG_X`` → ``"y"``/``"m"``/``"n"`` (for "is not set") or the value.

    Options that do not appear at all do not exist in this kernel version (or depend on something
    off): ``get`` returns the default for them, and the rules' ``missing`` policy decides.
    """

    path: str
    options: dict[str, str]
    version: str | None = None
    source: str = "file"  # "file" or "ikconfig:<kernel>"
    text: str = field(default="", repr=False)

    @property
    def name(self) -> str:
        return Path(self.path).name

    def get(self, key: str, default: Any = None) -> Any:
        if key == "kernel.version":
            return self.version if self.version is not None else default
        if not key.startswith("CONFIG_"):
            key = "CONFIG_" + key
        return self.options.get(key, default)

    @property
    def context(self) -> dict[str, Any]:
        return {"kernel_version": self.version, "arch": self.arch}

    @property
    def arch(self) -> str | None:
        if self.options.get("CONFIG_X86_64") == "y":
            return "x86_64"
        if self.options.get("CONFIG_ARM64") == "y":
            return "arm64"
        if self.options.get("CONFIG_S390") == "y":
            return "s390x"
        if self.options.get("CONFIG_PPC64") == "y":
            return "ppc64le"
        return None


def parse_kconfig(text: str, path: str = "<config>", *, source: str = "file") -> KernelConfig:
    """Parse ``.config`` text; a file with no ``CONFIG_`` line at all is not a kernel config."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _LINE_SET.match(line):
            value = m.group(2)
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            options[m.group(1)] = value
        elif m := _LINE_UNSET.match(line):
            options[m.group(1)] = "n"
    if not options:
        raise ConfigError("not a kernel config (no CONFIG_ lines)", path=path)
    version = None
    if m := _HEADER_VERSION.search(text):
        version = m.group(1)
    else:
        name_version = re.search(r"(\d+\.\d+(?:\.\d+)?)", Path(path).name)
        version = name_version.group(1) if name_version else None
    return KernelConfig(path, options, version, source, text)


def load_kconfig(path: str | Path) -> KernelConfig:
    """Read a ``config-*`` file (plain or gzip, like ``/proc/config.gz``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read kernel config: {exc.strerror or exc}", path=path) from None
    if data.startswith(GZIP_DEFLATE_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ConfigError(f"corrupt gzip kernel config: {exc}", path=path) from None
    return parse_kconfig(data.decode("utf-8", errors="replace"), str(path))


# ------------------------------------------------------------------------------------------ IKCONFIG


def _gunzip_prefix(data: bytes) -> bytes:
    """Decompress one gzip member at the start of ``data``, ignoring what follows it."""
    decomp = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = decomp.decompress(data, MAX_KERNEL)
    return out


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data, MAX_KERNEL)


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(lzma.FORMAT_ALONE).decompress(data, MAX_KERNEL)


def _bz2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, MAX_KERNEL)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


# (magic, decompressor): the formats scripts/extract-ikconfig tries (lzo and lz4 need external tools).
DECOMPRESSORS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (GZIP_DEFLATE_MAGIC, _gunzip_prefix),
    (XZ_MAGIC, _xz),
    (BZIP2_MAGIC, _bz2),
    (LZMA_MAGIC, _lzma),
    (ZSTD_MAGIC, _zstd),
)


def _config_after_marker(blob: bytes) -> str | None:
    index = blob.find(IKCFG_START + GZIP_DEFLATE_MAGIC)
    if index < 0:
        return None
    try:
        return _gunzip_prefix(blob[index + len(IKCFG_START) :]).decode("utf-8", errors="replace")
    except zlib.error:
        return None


def _occurrences(blob: bytes, magic: bytes, limit: int = 8) -> Iterator[int]:
    start = 0
    for _ in range(limit):
        index = blob.find(magic, start)
        if index < 0:
            return
        yield index
        start = index + 1


def extract_ikconfig(kernel: str | Path) -> KernelConfig | None:
    """The config embedded in a vmlinux/vmlinuz (``CONFIG_IKCONFIG``), or ``None`` when there is none."""
    kernel = Path(kernel)
    try:
        blob = kernel.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read kernel: {exc.strerror or exc}", path=kernel) from None
    text = _config_after_marker(blob)
    if text is None:
        for magic, decompress in DECOMPRESSORS:
            for offset in _occurrences(blob, magic):
                try:
                    payload = decompress(blob[offset:])
                except Exception:  # a false magic inside the image: try the next one
                    continue
                text = _config_after_marker(payload)
                if text is not None:
                    break
            if text is not None:
                break
    if text is None:
        return None
    return parse_kconfig(text, str(kernel), source=f"ikconfig:{kernel.name}")


# ------------------------------------------------------------------------------ kernel-hardening-checker

KHC_PROGRAM = "kernel-hardening-checker"


def run_kernel_hardening_checker(config_path: str | Path, *, timeout: float = 120) -> list[dict[str, Any]] | None:
    """Run the external kernel-hardening-checker (GPL-3.0: a subprocess, never imported) on a config.

    Returns its JSON rows (``option_name``, ``desired_val``, ``check_result``, ...) or ``None`` when the
    program is not installed or fails. Its exit status means nothing (0 even with FAILs), so only the rows
    are kept, as a cross-check attached to the evidence, never as the verdict.
    """
    program = shutil.which(KHC_PROGRAM)
    if program is None:
        return None
    try:
        done = subprocess.run(
            [program, "-c", str(config_path), "-m", "json"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        rows = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else None
