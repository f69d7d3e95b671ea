"""Candidate bundles: open a Kata release (tarballs or an ``/opt/kata`` tree) safely and inventory it.

A candidate arrives as a ``kata-static`` tarball (``.tar.zst`` since 4.x, ``.tar.xz``/``.tar.gz`` before),
as the split 4.1 tarballs (``kata-static`` + ``kata-go-static`` + ``kata-tools-static``) given together,
or as an unpacked tree. Everything downstream (rules, install, rollback, the verdict) works on one
:class:`Bundle`: a real directory equal to the bundle's ``/opt/kata`` plus an inventory of every file.

Why it is built this way:

* Archives are untrusted input. Members are checked one by one *before* anything is written: no ``..``,
  no absolute names, nothing outside ``opt/kata`` (Kata's ``assert-tarball-host-safe.sh`` rule: the merged
  tarball is unpacked with ``tar -C /``), no device/fifo files, no link that leaves the tree (checked
  lexically per member and again by following every link through the finished tree), no oversize member.
  Files land as 0644/0755 (setuid, setgid, sticky and group/world write bits dropped), owned by the
  unpacking user. These checks stand on their own: ``tarfile.data_filter`` (Python 3.11.4+, absent from
  Debian 12's 3.11.2) runs too where it exists, as a second opinion.
* One read of the archive: the raw bytes are hashed while they stream through the decompressor into
  ``tarfile``; each member is hashed while it is written. The extracted tree lands atomically in
  ``cache_dir()/bundles/<sha256>/`` with its inventory, so a second open (and :func:`identify` in the
  verdict) costs a few ``stat`` calls.
* Every failure a user can cause is a one-line :class:`~pytest_kata.errors.BundleError` naming the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import platform
import posixpath
import re
import secrets
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pytest_kata import progress
from pytest_kata.errors import BundleError, KataError
from pytest_kata.hashing import sha256_file as _sha256_file
from pytest_kata.kataconfig import KataConfig, load_config
from pytest_kata.resources import cache_dir

PREFIX = "opt/kata"
KATA_PREFIX = "/" + PREFIX  # where a release is installed, as its configuration files name their assets
ALL_SHIMS = "all"  # --kata-shim all: every shipped configuration
MEMBER_LIMIT = 4 << 30  # the largest real member is a guest image (~300 MiB); 4 GiB leaves room
TOTAL_LIMIT = 32 << 30
COUNT_LIMIT = 200_000  # a kata-static release holds a few thousand paths; millions of inodes is an attack
INVENTORY_FORMAT = 3
CHUNK = 1 << 20
DEFAULTS_DIR = "share/defaults/kata-containers"
SHIM_GO = "bin/containerd-shim-kata-v2"
SHIM_RS = "runtime-rs/bin/containerd-shim-kata-v2"
KATA_RUNTIME = "bin/kata-runtime"
VERSION_TIMEOUT = 10.0
# Python 3.11.4+ only: feature-detected so that Debian 12's 3.11.2 opens bundles with the same safety.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", Exception)

# Where the release version can be read, strongest first (the order decides when sources disagree).
_EVIDENCE_ORDER = ("VERSION", "kata-reference.json", "containerd-shim-kata-v2 --version (runtime-rs)",
                   "containerd-shim-kata-v2 --version (go)", "kata-runtime --version", "versions.yaml")
_TARBALL_NAME = re.compile(
    r"^kata(?:-go|-tools)?-static-(?P<version>\d+\.\d+\.\d+(?:-(?:rc|alpha|beta)\d+)?)"
    r"(?:-[A-Za-z0-9_.]+)*?-(?P<arch>amd64|arm64|s390x|ppc64le|x86_64|aarch64)"
    r"\.(?:tar\.zst|tar\.xz|tar\.gz|tgz|tar)$")
# the shim prints `version: 3.31.0, commit: ...`; kata-runtime prints `kata-runtime  : 3.31.0`
_SHIM_VERSION = re.compile(r"(?:version|kata-runtime)\s*:\s*\"?v?([0-9][^\s,\"]*)")
_ELF_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183, "s390x": 22, "ppc64le": 21}
_HYPERVISORS = re.compile(r"^(bin/(qemu-system-[^/]+|cloud-hypervisor|firecracker|stratovirt|openvmm)"
                          r"|libexec/virtiofsd)$")


# --------------------------------------------------------------------------------------------- data model

@dataclass
class FileEntry:
    """One inventoried path, relative to the bundle's ``/opt/kata``."""

    path: str
    kind: str  # "file" | "symlink" | "dir"
    size: int
    mode: int  # permission bits as shipped, setuid/setgid/sticky included (the on-disk copy drops them)
    sha256: str | None = None
    target: str | None = None  # symlink target exactly as shipped
    uid: int = 0  # owner as shipped: `tar -C /` as root keeps it, so a non-root owner can rewrite the file
    gid: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileEntry:
        return cls(**data)


@dataclass
class ShimInfo:
    """One runtime handler: its shim binary and the effective configuration (drop-ins merged)."""

    name: str
    runtime_rs: bool
    binary: str | None
    config_path: Path
    config: KataConfig

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        rel = str(self.config_path.relative_to(root)) if root else str(self.config_path)
        return {"name": self.name, "runtime_rs": self.runtime_rs, "binary": self.binary, "config": rel,
                "dropins": [p.name for p in self.config.dropins], "hypervisor": self.config.hypervisor}


@dataclass
class Bundle:
    """An opened candidate: ``root`` is a real directory equal to the bundle's ``/opt/kata``.

    ``sha256`` is the archive's own hash for one tarball; for a tree, the hash of its manifest (path, kind,
    mode, content hash, link target); for several sources, the hash of their hashes in the order given.
    Treat ``root`` as read-only: it is the shared cache (or the user's own tree).
    """

    sources: list[Path]
    root: Path
    version: str | None
    version_evidence: dict[str, str]
    files: dict[str, FileEntry]
    sha256: str
    layouts: set[str]
    shims: dict[str, ShimInfo]
    default_shim: str | None
    kernels: list[str] = field(default_factory=list)
    kernel_configs: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    initrds: list[str] = field(default_factory=list)
    hypervisors: list[str] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    component_versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def version_conflicts(self) -> list[str]:
        """Human sentences for every source that disagrees with the chosen version."""
        if not self.version:
            return []
        chosen = next((k for k, v in self.version_evidence.items() if _norm_version(v) == self.version), "?")
        return [f"{source} says {value} but {chosen} says {self.version}"
                for source, value in self.version_evidence.items() if _norm_version(value) != self.version]

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values() if e.kind == "file")

    def shim(self, name: str | None = None) -> ShimInfo:
        """The named shim (``None``: the bundle's default); a one-line error lists the known ones."""
        wanted = name or self.default_shim
        if wanted and wanted in self.shims:
            return self.shims[wanted]
        known = ", ".join(sorted(self.shims)) or "none"
        what = f"no shim {wanted!r}" if wanted else "no runtime configuration"
        raise KataError(f"{what} in this bundle; known shims: {known}", path=self.label,
                        hint="pick one with --kata-shim")

    @property
    def label(self) -> str:
        return " + ".join(str(s) for s in self.sources)

    @staticmethod
    def selection(shim: str | None) -> str | None:
        """``--kata-shim`` as one shim's name; None for the default and for every configuration (``all``, empty
        or not given): checks of every shipped configuration take them all, one sandbox takes the default."""
        return None if shim in (None, "", ALL_SHIMS) else shim

    def selected_shims(self, shim: str | None) -> list[ShimInfo]:
        """The configurations ``--kata-shim`` selects: every shipped one, or the one it names."""
        name = self.selection(shim)
        return list(self.shims.values()) if name is None else [self.shim(name)]

    def identity(self) -> dict[str, Any]:
        """``{"path", "version", "sha256"}``: how the verdict names the candidate."""
        return {"path": ", ".join(str(s) for s in self.sources), "version": self.version, "sha256": self.sha256}

    def resolve(self, rel: str) -> str | None:
        """``rel`` with every symlink followed inside the bundle (``None``: dangling or leaving it)."""
        return _resolve_in_tree(rel, self.files)

    def path(self, rel: str) -> Path:
        """The real path of ``rel`` inside ``root``, links followed without ever leaving the bundle."""
        if rel.startswith("/"):
            if not (rel + "/").startswith("/" + PREFIX + "/"):
                raise KataError(f"{rel!r} is not under /{PREFIX}", path=self.label)
            rel = rel[len(PREFIX) + 1:].lstrip("/")
        resolved = self.resolve(rel)
        if resolved is None:
            parts = [p for p in rel.split("/") if p not in ("", ".")]
            if ".." in parts:
                raise KataError(f"{rel!r} leaves the bundle", path=self.label)
            return self.root.joinpath(*parts)
        return self.root / resolved if resolved else self.root

    def to_json(self, *, include_files: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sources": [str(s) for s in self.sources], "root": str(self.root), "sha256": self.sha256,
            "version": self.version, "version_evidence": self.version_evidence,
            "version_conflicts": self.version_conflicts, "component_versions": self.component_versions,
            "layouts": sorted(self.layouts), "default_shim": self.default_shim,
            "shims": {n: s.to_json(self.root) for n, s in sorted(self.shims.items())},
            "kernels": self.kernels, "kernel_configs": self.kernel_configs, "images": self.images,
            "initrds": self.initrds, "hypervisors": self.hypervisors, "missing": self.missing,
            "notes": self.notes, "file_count": sum(1 for e in self.files.values() if e.kind != "dir"),
            "total_size": self.total_size,
        }
        if include_files:
            out["files"] = [self.files[k].to_json() for k in sorted(self.files)]
        return out


# --------------------------------------------------------------------------------------------- public API

def bundle_relative(value: str) -> str | None:
    """A path a configuration names under ``/opt/kata`` as the path inside the bundle (None: not under it)."""
    if value == KATA_PREFIX or value.startswith(KATA_PREFIX + "/"):
        return value[len(KATA_PREFIX):].lstrip("/")
    return None


def open_bundle(paths: str | Path | Sequence[str | Path], *, cache: Path | None = None,
                member_limit: int = MEMBER_LIMIT, total_limit: int = TOTAL_LIMIT,
                run_binaries: bool = True) -> Bundle:
    """Open one bundle, or several split tarballs/trees merged into one, and inventory it.

    ``cache`` is the cache root (default ``resources.cache_dir()``); bundles go to ``<cache>/bundles``.
    ``run_binaries`` allows ``containerd-shim-kata-v2 --version`` (only executable ELF files for this
    machine, with a timeout) as version evidence.
    """
    sources = _as_paths(paths)
    store = _Store(cache)
    limits = (member_limit, total_limit)
    try:
        parts = [_open_source(p, store, limits, run_binaries) for p in sources]
        part = parts[0] if len(parts) == 1 else _merge(parts, store, run_binaries)
    except KataError:
        raise
    except OSError as exc:  # disk full, permissions in the cache, ...: still one line
        raise BundleError(f"cannot open: {exc.strerror or exc}", path=", ".join(map(str, sources)),
                          hint=f"check the cache directory {store.base}") from None
    return _build_bundle(sources, part)


def identify(paths: str | Path | Sequence[str | Path], *, cache: Path | None = None) -> dict[str, Any]:
    """``{"path", "version", "sha256"}`` for the verdict: cached inventory when the bundle was opened."""
    sources = _as_paths(paths)
    store = _Store(cache)
    label = ", ".join(str(p) for p in sources)
    shas = []
    inventories = []
    for source in sources:
        inv = store.lookup(source)
        if inv is None:
            break
        shas.append(inv["sha256"])
        inventories.append(inv)
    else:
        key = shas[0] if len(shas) == 1 else _merge_key(shas)
        inv = inventories[0] if len(shas) == 1 else store.read_inventory(key)
        if inv is not None:
            evidence = dict(inv.get("evidence", {}))
            evidence.update(_filename_evidence(sources))
            return {"path": label, "version": _choose_version(evidence), "sha256": key}
    bundle = open_bundle(sources, cache=cache)
    return {"path": label, "version": bundle.version, "sha256": bundle.sha256}


# --------------------------------------------------------------------------------------------- cache

@dataclass
class _Part:
    """One opened source (or the merge of several): a tree on disk and its content inventory."""

    source: str
    root: Path
    files: dict[str, FileEntry]
    sha256: str
    evidence: dict[str, str]
    components: dict[str, str]
    notes: list[str]
    missing: dict[str, str]


class _Store:
    """``<cache>/bundles``: ``<key>/tree/opt/kata`` + ``<key>/inventory.json``; ``index/`` maps stat → key."""

    def __init__(self, cache: Path | None) -> None:
        self.base = Path(cache or cache_dir()) / "bundles"

    def prepare(self) -> None:
        (self.base / "index").mkdir(parents=True, exist_ok=True)
        self._sweep()

    def entry(self, key: str) -> Path:
        return self.base / key

    def owns(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.base.resolve())

    def read_inventory(self, key: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.base / key / "inventory.json").read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("format") == INVENTORY_FORMAT else None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise cold extraction across processes (xdist workers open the same candidate)."""
        self.prepare()
        with open(self.base / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def new_tmp(self) -> Path:
        tmp = self.base / f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
        return tmp

    def publish(self, tmp: Path, key: str) -> Path:
        """Atomically move a finished tmp entry into place (a concurrent winner's copy is kept)."""
        final = self.entry(key)
        if final.exists() and self.read_inventory(key) is None:
            shutil.rmtree(final, ignore_errors=True)  # a broken entry (crash, manual edit): replace it
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / "inventory.json").exists():
                raise
        return final

    def _sweep(self) -> None:
        """Drop what a killed process left half-written, and records of trees and files that are gone."""
        for tmp in self.base.glob(".tmp-*"):
            try:
                pid = int(tmp.name.split("-")[1])
            except (IndexError, ValueError):
                continue
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for entry in self.base.glob("dir-*"):
            root = (self.read_inventory(entry.name) or {}).get("root")
            if not root or not Path(root).is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        for record in (self.base / "index").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                if not Path(json.loads(record.read_text())["path"]).exists():
                    record.unlink()

    # -- stat index: a file whose (dev, ino, size, mtime, ctime) has not changed has the same sha256;
    # ctime cannot be set from user space, so a rewrite is always noticed.
    def _index_path(self, source: Path) -> Path:
        return self.base / "index" / (hashlib.sha256(str(source.resolve()).encode()).hexdigest() + ".json")

    @staticmethod
    def _signature(source: Path) -> dict[str, int]:
        st = source.stat()
        return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime": st.st_mtime_ns,
                "ctime": st.st_ctime_ns}

    def remember(self, source: Path, key: str, signature: dict[str, int] | None = None) -> None:
        sig = signature or self._signature(source)
        path = self._index_path(source)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"path": str(source.resolve()), "sig": sig, "key": key}))
        os.replace(tmp, path)

    def known_key(self, source: Path, signature: dict[str, int] | None = None) -> str | None:
        try:
            data = json.loads(self._index_path(source).read_text())
        except (OSError, ValueError):
            return None
        if data.get("sig") != (signature or self._signature(source)):
            return None
        key = data.get("key")
        return key if isinstance(key, str) and (self.base / key / "inventory.json").exists() else None

    def lookup(self, source: Path) -> dict[str, Any] | None:
        """The cached inventory of a source, without reading its content (``None``: not cached)."""
        try:
            if source.is_dir():
                _root, key, _sig = _dir_key(source)
            else:
                found = self.known_key(source)
                if found is None:
                    return None
                key = found
        except (OSError, KataError):
            return None
        return self.read_inventory(key)


def _as_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise BundleError("no bundle given (pass a kata-static tarball or an /opt/kata tree)")
    return [Path(p) for p in items]


def _merge_key(shas: Sequence[str]) -> str:
    return hashlib.sha256(("kata-bundle-merge\n" + "\n".join(shas)).encode()).hexdigest()


def _open_source(source: Path, store: _Store, limits: tuple[int, int], run_binaries: bool) -> _Part:
    if not source.exists():
        raise BundleError("no such file or directory", path=source,
                          hint="pass a kata-static tarball (.tar.zst, .tar.xz, .tar.gz) or an /opt/kata tree")
    if source.is_dir():
        return _open_directory(source, store, run_binaries)
    if not source.is_file():
        raise BundleError("not a regular file or directory", path=source)
    fmt = _sniff(source)
    signature = store._signature(source)
    key = store.known_key(source, signature) if store.base.exists() else None
    if key is None:
        with store.locked():
            key = store.known_key(source, signature)
            if key is None:
                key = _extract_archive(source, fmt, store, limits, run_binaries)
                store.remember(source, key, signature)
    return _part_from_cache(str(source), store, key)


def _part_from_cache(source: str, store: _Store, key: str) -> _Part:
    inv = store.read_inventory(key)
    if inv is None:
        raise BundleError(f"cache entry {key} is unreadable", path=source, hint=f"delete {store.entry(key)}")
    files = {e["path"]: FileEntry.from_json(e) for e in inv["files"]}
    root = Path(inv["root"]) if inv.get("root") else store.entry(key) / "tree" / PREFIX
    return _Part(source, root, files, inv["sha256"], inv.get("evidence", {}), inv.get("components", {}),
                 inv.get("notes", []), inv.get("missing", {}))


def _write_inventory(entry: Path, part: _Part, *, root_override: Path | None = None) -> None:
    data = {"format": INVENTORY_FORMAT, "sha256": part.sha256, "source": part.source,
            "root": str(root_override) if root_override else None,
            "evidence": part.evidence, "components": part.components, "notes": part.notes,
            "missing": part.missing, "files": [part.files[k].to_json() for k in sorted(part.files)]}
    (entry / "inventory.json").write_text(json.dumps(data))


# --------------------------------------------------------------------------------------------- archives

class _HashingReader(io.RawIOBase):
    """Hashes the raw archive bytes as the decompressor pulls them: one read of the file."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        data = self.fh.read(-1 if size is None else size)
        self.sha.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def _sniff(source: Path) -> str:
    """Recognise the format by its magic bytes (the extension can lie)."""
    try:
        with open(source, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise BundleError(f"cannot read: {exc.strerror}", path=source) from None
    if not head:
        raise BundleError("empty file", path=source, hint="re-download it")
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"\x28\xb5\x2f\xfd") or (head[1:4] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50):
        return "zst"  # a zstd frame, or pzstd's leading skippable frame
    if head.startswith(b"BZh"):
        return "bz2"
    if head[257:262] == b"ustar" or (len(head) == 512 and _tar_checksum_ok(head)):
        return "tar"
    raise BundleError("not a tar archive (unknown format)", path=source,
                      hint="expected a .tar.zst, .tar.xz, .tar.gz or .tar kata-static tarball or a directory")


def _tar_checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0")[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:])


def _decompressor(fmt: str, raw: _HashingReader) -> Any:
    if fmt == "xz":
        return lzma.LZMAFile(raw)  # type: ignore[arg-type]
    if fmt == "gz":
        return gzip.GzipFile(fileobj=raw)
    if fmt == "bz2":
        import bz2

        return bz2.BZ2File(raw)
    if fmt == "zst":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(raw,  # type: ignore[arg-type]
                                                          read_across_frames=True, closefd=False)
    return raw


def _zstd_frames_complete(source: Path) -> bool:
    """Walk the zstd frame and block headers (seeking over data) to catch a cut-off last frame.

    ``zstandard``'s stream reader returns a clean EOF when the input stops mid-frame, so a download cut in
    the final block or checksum would otherwise pass unnoticed.
    """
    with open(source, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while fh.tell() < size:
            magic = fh.read(4)
            if len(magic) < 4:
                return False
            (value,) = struct.unpack("<I", magic)
            if 0x184D2A50 <= value <= 0x184D2A5F:  # skippable frame
                length = fh.read(4)
                if len(length) < 4:
                    return False
                fh.seek(struct.unpack("<I", length)[0], 1)
                continue
            if value != 0xFD2FB528:
                return False
            fhd = fh.read(1)
            if not fhd:
                return False
            d = fhd[0]
            single_segment = (d >> 5) & 1
            fcs_size = {0: 1 if single_segment else 0, 1: 2, 2: 4, 3: 8}[d >> 6]
            did_size = {0: 0, 1: 1, 2: 2, 3: 4}[d & 3]
            fh.seek((0 if single_segment else 1) + did_size + fcs_size, 1)
            while True:
                header = fh.read(3)
                if len(header) < 3:
                    return False
                bh = int.from_bytes(header, "little")
                last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
                fh.seek(1 if btype == 1 else bsize, 1)
                if fh.tell() > size:
                    return False
                if last:
                    break
            if d & 4:  # content checksum
                fh.seek(4, 1)
            if fh.tell() > size:
                return False
    return True


def _extract_archive(source: Path, fmt: str, store: _Store, limits: tuple[int, int],
                     run_binaries: bool) -> str:
    """Stream the archive once: check, extract, hash; publish ``bundles/<sha256>/``; return the sha256."""
    tmp = store.new_tmp()
    tree = tmp / "tree"
    try:
        with progress.timed("bundle", f"unpacking {source.name}"):
            files, sha = _stream_members(source, fmt, tree, limits)
            if fmt == "zst" and not _zstd_frames_complete(source):
                raise BundleError("truncated archive (the zstd stream ends early)", path=source,
                                  hint="re-download it")
            root = tree / PREFIX
            if not files:
                raise BundleError("nothing under opt/kata in this archive (not a kata-static tarball)",
                                  path=source)
            part = _Part(str(source), root, files, sha, {}, {}, [], {})
            _check_links(part)
            _collect_evidence(part, run_binaries)
            _write_inventory(tmp, part)
        if store.entry(sha).exists() and store.read_inventory(sha) is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # same content under another name: already cached
        else:
            store.publish(tmp, sha)
        return sha
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def unpack_archive(source: Path, tree: Path, *, prefix: str, member_limit: int = MEMBER_LIMIT,
                   total_limit: int = TOTAL_LIMIT) -> tuple[dict[str, FileEntry], str]:
    """Unpack any tar archive whose members all live under ``prefix/`` into the new directory ``tree``.

    The same one-pass, check-before-write extraction as a bundle (used for upstream source archives, whose
    top directory is ``prefix``). Returns the inventory (paths relative to ``tree/prefix``) and the archive's
    sha256; any unsafe member is a one-line :class:`BundleError`.
    """
    return _stream_members(source, _sniff(source), tree, (member_limit, total_limit), prefix=prefix)


def _stream_members(source: Path, fmt: str, tree: Path, limits: tuple[int, int],
                    prefix: str = PREFIX) -> tuple[dict[str, FileEntry], str]:
    import zstandard

    tree.mkdir(mode=0o755)
    with open(source, "rb") as fh:
        raw = _HashingReader(fh)
        stream = _decompressor(fmt, raw)
        try:
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                files = _Unpacker(source, tree, limits, prefix).run(archive)
            while stream is not raw and stream.read(CHUNK):
                pass  # the end-of-archive padding still belongs to the stream (and to the hash)
            raw.drain()
        except KataError:
            raise
        except tarfile.ReadError as exc:
            text = str(exc)
            if "unexpected end of data" in text or "empty" in text:
                raise BundleError(f"truncated archive ({text})", path=source, hint="re-download it") from None
            raise BundleError(f"corrupt archive ({text})", path=source, hint="re-download it") from None
        except EOFError as exc:
            raise BundleError(f"truncated archive ({exc})", path=source, hint="re-download it") from None
        except (lzma.LZMAError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, tarfile.TarError) as exc:
            raise BundleError(f"corrupt archive ({exc})", path=source, hint="re-download it") from None
        except OSError as exc:
            if exc.filename is None and exc.errno is None:  # decompressor complaints come as bare OSError
                raise BundleError(f"corrupt archive ({exc})", path=source, hint="re-download it") from None
            raise
        finally:
            if stream is not raw:
                with contextlib.suppress(Exception):
                    stream.close()
    return files, raw.sha.hexdigest()


class _Unpacker:
    """Checks each member before writing it; writes files with O_EXCL|O_NOFOLLOW and hashes them."""

    def __init__(self, source: Path, tree: Path, limits: tuple[int, int], prefix: str = PREFIX) -> None:
        self.source = source
        self.tree = tree
        self.prefix = prefix
        self.member_limit, self.total_limit = limits
        self.files: dict[str, FileEntry] = {}
        self.total = 0
        self.count = 0
        (tree / prefix).mkdir(parents=True, mode=0o755)

    def refuse(self, message: str) -> BundleError:
        return BundleError(message, path=self.source, hint="refusing to unpack an unsafe archive")

    def run(self, archive: tarfile.TarFile) -> dict[str, FileEntry]:
        for member in archive:
            self.member(archive, member)
        return self.files

    def normalise(self, name: str, what: str = "member") -> str | None:
        if "\0" in name:
            raise self.refuse(f"{what} {name!r} has a NUL byte in its name")
        if name.startswith("/"):
            raise self.refuse(f"{what} {name!r} has an absolute name")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(f"{what} {name!r} climbs out with '..'")
        return "/".join(parts) or None

    def member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        self.count += 1
        if self.count > COUNT_LIMIT:
            raise self.refuse(f"more than {COUNT_LIMIT} members (a kata-static release has a few thousand)")
        norm = self.normalise(member.name)
        if norm is None or (member.isdir() and (self.prefix + "/").startswith(norm + "/")):
            return
        if not norm.startswith(self.prefix + "/"):
            why = ("kata-static tarballs are rooted at ./opt/kata/ and are unpacked with tar -C /"
                   if self.prefix == PREFIX else f"every member of this archive must be under {self.prefix}/")
            raise self.refuse(f"member {member.name!r} is outside {self.prefix} ({why})")
        rel = norm[len(self.prefix) + 1:]
        if member.ischr() or member.isblk():
            raise self.refuse(f"member {member.name!r} is a device file")
        if member.isfifo():
            raise self.refuse(f"member {member.name!r} is a fifo")
        if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
            raise self.refuse(f"member {member.name!r} has an unsupported type {member.type!r}")
        if member.isreg():
            if member.size > self.member_limit:
                raise self.refuse(f"member {member.name!r} is {member.size} bytes, over the per-member limit "
                                  f"of {self.member_limit} (member_limit=)")
            self.total += member.size
            if self.total > self.total_limit:
                raise self.refuse(f"archive content exceeds the total limit of {self.total_limit} bytes at "
                                  f"{member.name!r} (total_limit=)")
        previous = self.files.get(rel)
        if previous is not None and not (previous.kind == "dir" and member.isdir()):
            raise self.refuse(f"member {member.name!r} appears twice (a later copy would overwrite it)")
        self.make_parents(rel, member.name)
        dest = self.tree / norm
        mode = member.mode & 0o7777
        if member.isdir():
            if previous is None:
                dest.mkdir(mode=0o755)
            self.files[rel] = FileEntry(rel, "dir", 0, mode, uid=member.uid, gid=member.gid)
        elif member.issym():
            on_disk = self.link_on_disk(rel, member)
            self.second_opinion(member, linkname=on_disk)
            os.symlink(on_disk, dest)
            self.files[rel] = FileEntry(rel, "symlink", 0, mode or 0o777, None, member.linkname,
                                        member.uid, member.gid)
        elif member.islnk():
            self.hardlink(rel, member, dest)
        else:
            self.second_opinion(member)
            self.write_file(archive, member, rel, dest, mode)

    def make_parents(self, rel: str, name: str) -> None:
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            entry = self.files.get(parent)
            if entry is None:
                (self.tree / self.prefix / parent).mkdir(mode=0o755)
                self.files[parent] = FileEntry(parent, "dir", 0, 0o755)
            elif entry.kind != "dir":
                raise self.refuse(f"member {name!r} goes through the {entry.kind} {parent!r}")

    def link_on_disk(self, rel: str, member: tarfile.TarInfo) -> str:
        """The target written on disk: relative and inside the tree (``/opt/kata/x`` stays in the bundle)."""
        target = member.linkname
        resolved = _link_destination(rel, target)
        if resolved is None:
            raise self.refuse(f"symlink {member.name!r} -> {target!r} points outside the bundle")
        return posixpath.relpath(resolved or ".", posixpath.dirname(rel) or ".")

    def hardlink(self, rel: str, member: tarfile.TarInfo, dest: Path) -> None:
        target = self.normalise(member.linkname, "hardlink target of")
        if target is None or not target.startswith(self.prefix + "/"):
            raise self.refuse(f"hardlink {member.name!r} -> {member.linkname!r} points outside the bundle")
        source_entry = self.files.get(target[len(self.prefix) + 1:])
        if source_entry is None or source_entry.kind != "file":
            raise self.refuse(f"hardlink {member.name!r} -> {member.linkname!r} does not point at a file "
                              f"unpacked before it")
        self.second_opinion(member)
        os.link(self.tree / target, dest, follow_symlinks=False)
        self.files[rel] = FileEntry(rel, "file", source_entry.size, member.mode & 0o7777, source_entry.sha256,
                                    None, member.uid, member.gid)

    def second_opinion(self, member: tarfile.TarInfo, *, linkname: str | None = None) -> None:
        """``tarfile.data_filter`` where this Python has it; the checks above already refuse what it refuses.

        ``linkname``: the symlink target as written on disk (``TarInfo.replace`` is 3.11.4+ too).
        """
        if _DATA_FILTER is None:
            return
        if linkname is not None:
            member = member.replace(linkname=linkname, deep=False)
        try:
            _DATA_FILTER(member, str(self.tree))
        except _FILTER_ERROR as exc:
            raise self.refuse(str(exc)) from None

    def write_file(self, archive: tarfile.TarFile, member: tarfile.TarInfo, rel: str, dest: Path,
                   mode: int) -> None:
        reader = archive.extractfile(member)
        assert reader is not None
        digest = hashlib.sha256()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        written = 0
        with os.fdopen(fd, "wb") as out:
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
            os.fchmod(out.fileno(), 0o755 if mode & 0o111 else 0o644)
        if written != member.size:
            raise tarfile.ReadError("unexpected end of data")
        self.files[rel] = FileEntry(rel, "file", written, mode, digest.hexdigest(), None, member.uid, member.gid)


def _link_destination(link_rel: str, target: str) -> str | None:
    """Lexical destination of a symlink, relative to the bundle root; ``None`` when it leaves the bundle.

    Absolute targets inside ``/opt/kata`` are what an installed tree really means, so they stay in-bundle.
    """
    if not target or "\0" in target:
        return None
    if target.startswith("/"):
        stripped = posixpath.normpath(target)
        if stripped == "/" + PREFIX:
            return ""
        if not stripped.startswith("/" + PREFIX + "/"):
            return None
        joined = stripped[len(PREFIX) + 2:]
    else:
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(link_rel), target))
    if joined == ".":
        return ""
    if joined == ".." or joined.startswith("../"):
        return None
    return joined


def _resolve_in_tree(rel: str, files: dict[str, FileEntry], *, strict: bool = False) -> str | None:
    """Follow symlinks component by component inside the inventory.

    Returns the final path ("" for the root), or ``None`` when a link leaves the bundle, loops, or (with
    ``strict``) dangles. A lexical check alone is fooled by ``a/link/..`` when ``link`` points up.
    """
    pending = [p for p in rel.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not done:
                return None
            done.pop()
            continue
        current = "/".join([*done, part])
        entry = files.get(current)
        if entry is not None and entry.kind == "symlink":
            hops += 1
            if hops > 40:
                return None
            target = entry.target or ""
            if target.startswith("/"):
                dest = _link_destination(current, target)
                if dest is None:
                    return None
                done = []
                pending = [p for p in dest.split("/") if p] + pending
            else:
                pending = [p for p in target.split("/") if p not in ("", ".")] + pending
            continue
        if entry is None and strict:
            return None
        done.append(part)
    return "/".join(done)


def _check_links(part: _Part) -> None:
    """Every symlink, followed through the whole tree, must stay inside it (dangling is allowed)."""
    for rel, entry in part.files.items():
        if entry.kind == "symlink" and _resolve_in_tree(rel, part.files) is None:
            raise BundleError(f"symlink {rel!r} -> {entry.target!r} leads outside the bundle",
                              path=part.source, hint="refusing to use an unsafe bundle")


# --------------------------------------------------------------------------------------------- directories

def _dir_root(source: Path) -> Path:
    if (source / PREFIX).is_dir():
        return source / PREFIX
    markers = (DEFAULTS_DIR, "share/kata-containers", SHIM_GO, SHIM_RS, "bin/kata-runtime", "bin/kata-ctl",
               "kata-reference.json")
    if any((source / m).exists() for m in markers):
        return source
    raise BundleError("neither an /opt/kata tree nor a directory containing opt/kata", path=source,
                      hint="expected share/defaults/kata-containers/, share/kata-containers/ or a shim in it")


def _walk(root: Path, source: Path) -> Iterator[tuple[str, os.stat_result]]:
    """Every path under ``root`` (not following links), refusing what a bundle must not hold."""
    def onerror(exc: OSError) -> None:
        raise BundleError(f"cannot read {exc.filename}: {exc.strerror}", path=source)

    count = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        dirnames.sort()
        count += len(dirnames) + len(filenames)
        if count > COUNT_LIMIT:
            raise BundleError(f"more than {COUNT_LIMIT} paths: not a Kata tree", path=source)
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            rel = os.path.relpath(full, root)
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                raise BundleError(f"{rel!r} is a device file", path=source, hint="refusing an unsafe tree")
            if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                raise BundleError(f"{rel!r} is a fifo or socket", path=source, hint="refusing an unsafe tree")
            yield rel, st


def _dir_key(source: Path) -> tuple[Path, str, list[tuple[str, os.stat_result]]]:
    """A key from the tree's stat data: unchanged (dev, ino, size, mtime, ctime) means unchanged content."""
    root = _dir_root(source)
    listing = list(_walk(root, source))
    sig = hashlib.sha256(str(root.resolve()).encode())
    for rel, st in listing:
        sig.update(f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n"
                   .encode())
    return root, "dir-" + sig.hexdigest(), listing


def _open_directory(source: Path, store: _Store, run_binaries: bool) -> _Part:
    root, key, listing = _dir_key(source)
    inv = store.read_inventory(key)
    if inv is not None:
        part = _part_from_cache(str(source), store, key)
        part.root = root
        return part
    files: dict[str, FileEntry] = {}
    with progress.timed("bundle", f"hashing {source}"):
        for rel, st in listing:
            mode = stat.S_IMODE(st.st_mode)
            full = root / rel
            if stat.S_ISDIR(st.st_mode):
                files[rel] = FileEntry(rel, "dir", 0, mode, uid=st.st_uid, gid=st.st_gid)
            elif stat.S_ISLNK(st.st_mode):
                files[rel] = FileEntry(rel, "symlink", 0, mode, None, os.readlink(full), st.st_uid, st.st_gid)
            else:
                files[rel] = FileEntry(rel, "file", st.st_size, mode, _sha256_file(full), None, st.st_uid,
                                       st.st_gid)
    manifest = hashlib.sha256()
    for rel in sorted(files):
        e = files[rel]
        manifest.update(f"{rel}\0{e.kind}\0{e.mode:o}\0{e.uid}:{e.gid}\0{e.sha256 or ''}\0{e.target or ''}\n"
                        .encode())
    part = _Part(str(source), root, files, manifest.hexdigest(), {}, {}, [], {})
    _check_links(part)
    _collect_evidence(part, run_binaries)
    store.prepare()
    tmp = store.new_tmp()
    try:
        _write_inventory(tmp, part, root_override=root)
        store.publish(tmp, key)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return part


# --------------------------------------------------------------------------------------------- merging

def _merge(parts: list[_Part], store: _Store, run_binaries: bool) -> _Part:
    """Overlay split tarballs in order; one path with two contents is a conflict, never an overwrite."""
    merged: dict[str, FileEntry] = {}
    origin: dict[str, _Part] = {}
    for part in parts:
        for rel, entry in part.files.items():
            prev = merged.get(rel)
            if prev is None:
                merged[rel] = entry
                origin[rel] = part
                continue
            why = _difference(prev, entry)
            if why:
                raise BundleError(f"{rel} conflicts with the same path in {origin[rel].source} ({why})",
                                  path=part.source, hint="these tarballs are not from the same release")
    key = _merge_key([p.sha256 for p in parts])
    label = " + ".join(p.source for p in parts)
    if store.read_inventory(key) is None:
        with store.locked():
            if store.read_inventory(key) is None:
                tmp = store.new_tmp()
                try:
                    with progress.timed("bundle", f"merging {label}"):
                        root = tmp / "tree" / PREFIX
                        root.mkdir(parents=True)
                        for rel in sorted(merged):
                            _place(origin[rel].root, root, merged[rel], link=store.owns(origin[rel].root))
                        part = _Part(label, root, merged, key, {}, {}, [], {})
                        _check_links(part)
                        _collect_evidence(part, run_binaries)
                        _write_inventory(tmp, part)
                    store.publish(tmp, key)
                except BaseException:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise
    return _part_from_cache(label, store, key)


def _difference(a: FileEntry, b: FileEntry) -> str | None:
    if a.kind != b.kind:
        return f"{a.kind} vs {b.kind}"
    if a.kind == "dir":
        return None
    if a.kind == "symlink":
        return None if a.target == b.target else f"symlink to {a.target!r} vs {b.target!r}"
    if a.sha256 != b.sha256:
        return "different content"
    if a.mode != b.mode:
        return f"mode {a.mode:o} vs {b.mode:o}"
    return None


def _place(src_root: Path, dst_root: Path, entry: FileEntry, *, link: bool) -> None:
    """Recreate one entry; files are hard-linked from the cache, copied from a user's tree (it may change)."""
    dest = dst_root / entry.path
    if entry.kind == "dir":
        dest.mkdir(mode=0o755, exist_ok=True)
    elif entry.kind == "symlink":
        resolved = _link_destination(entry.path, entry.target or "")
        assert resolved is not None  # checked when the part was opened
        os.symlink(posixpath.relpath(resolved or ".", posixpath.dirname(entry.path) or "."), dest)
    elif link:
        try:
            os.link(src_root / entry.path, dest, follow_symlinks=False)
        except OSError:
            shutil.copy2(src_root / entry.path, dest, follow_symlinks=False)
    else:
        shutil.copy2(src_root / entry.path, dest, follow_symlinks=False)


# --------------------------------------------------------------------------------------------- evidence

def _norm_version(value: str) -> str:
    return value.strip().removeprefix("v")


def _choose_version(evidence: dict[str, str]) -> str | None:
    for source in _EVIDENCE_ORDER:
        if evidence.get(source):
            return _norm_version(evidence[source])
    for value in evidence.values():
        if value:
            return _norm_version(value)
    return None


def _filename_evidence(sources: Iterable[Path | str]) -> dict[str, str]:
    out = {}
    for source in sources:
        name = Path(source).name
        match = _TARBALL_NAME.match(name)
        if match:
            out[f"file name {name}"] = match["version"]
    return out


def _read_small(part: _Part, rel: str, limit: int = 1 << 20) -> bytes | None:
    resolved = _resolve_in_tree(rel, part.files, strict=True) or ""
    entry = part.files.get(resolved)
    if entry is None or entry.kind != "file" or entry.size > limit:
        return None
    return (part.root / resolved).read_bytes()


def _collect_evidence(part: _Part, run_binaries: bool) -> None:
    """Read what the content says about versions (file names are added per open: they are not content)."""
    ev, notes = part.evidence, part.notes
    raw = _read_small(part, "VERSION")
    if raw is not None:
        text = raw.decode("utf-8", "replace").strip().splitlines()
        if text and text[0].strip():
            ev["VERSION"] = text[0].strip()
    raw = _read_small(part, "kata-reference.json")
    if raw is not None:
        try:
            ref = json.loads(raw)
        except ValueError as exc:
            raise BundleError(f"kata-reference.json is not valid JSON: {exc}", path=part.source) from None
        if isinstance(ref, dict):
            if ref.get("version"):
                ev["kata-reference.json"] = str(ref["version"])
            if isinstance(ref.get("missing"), dict):
                part.missing = {str(k): str(v) for k, v in ref["missing"].items()}
    raw = _read_small(part, "versions.yaml", 16 << 20)
    if raw is not None:
        _versions_yaml(part, raw)
    for rel, label in ((SHIM_RS, "containerd-shim-kata-v2 --version (runtime-rs)"),
                       (SHIM_GO, "containerd-shim-kata-v2 --version (go)"), (KATA_RUNTIME, "kata-runtime --version")):
        if rel in part.files:
            version, note = _shim_version(part, rel, run_binaries)
            if version:
                ev[label] = version
            if note:
                notes.append(note)


def _versions_yaml(part: _Part, raw: bytes) -> None:
    import yaml

    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        part.notes.append(f"versions.yaml is not valid YAML: {' '.join(str(exc).split())}")
        return
    if not isinstance(data, dict):
        return
    for key in ("version", "kata-containers", "kata"):
        value = data.get(key)
        if isinstance(value, dict):
            value = value.get("version")
        if isinstance(value, (str, int, float)) and str(value):
            part.evidence["versions.yaml"] = str(value)
            break

    def walk(node: Any, path: list[str]) -> None:
        if not isinstance(node, dict) or len(path) > 3:
            return
        version = node.get("version")
        if path and isinstance(version, (str, int, float)):
            part.components[".".join(path)] = str(version)
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, [*path, str(k)])

    for group in ("assets", "externals", "languages", "specs"):
        walk(data.get(group), [group])


def _elf_for_this_machine(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(20)
    except OSError:
        return False
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return False
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return machine == _ELF_MACHINES.get(platform.machine().lower(), -1)


def _shim_version(part: _Part, rel: str, run_binaries: bool) -> tuple[str | None, str | None]:
    """``<binary> --version``, but only for an executable ELF built for this machine."""
    resolved = _resolve_in_tree(rel, part.files, strict=True) or ""
    entry = part.files.get(resolved)
    if entry is None or entry.kind != "file":
        return None, f"{rel}: not a regular file; --version not run"
    if not entry.mode & 0o111:
        return None, f"{rel}: not executable; --version not run"
    path = part.root / resolved
    if not _elf_for_this_machine(path):
        return None, f"{rel}: not an ELF executable for {platform.machine()}; --version not run"
    if not run_binaries:
        return None, f"{rel}: --version not run (run_binaries=False)"
    with tempfile.TemporaryDirectory(prefix="kt-shimver-") as cwd:
        try:
            proc = subprocess.run([str(path), "--version"], cwd=cwd, stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=VERSION_TIMEOUT,
                                  env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})
        except subprocess.TimeoutExpired:
            return None, f"{rel} --version timed out after {VERSION_TIMEOUT:.0f}s"
        except OSError as exc:
            return None, f"{rel} --version could not run: {exc.strerror}"
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    match = _SHIM_VERSION.search(text)
    if not match:
        first = text.strip().splitlines()[0][:120] if text.strip() else "(no output)"
        return None, f"{rel} --version exited {proc.returncode} without a version: {first}"
    return match[1], None


# --------------------------------------------------------------------------------------------- analysis

_CONFIG_LOCATIONS = (
    # (regex on the relative path, runtime_rs, priority): kata-deploy's runtimes/<shim>/ copy wins.
    (re.compile(rf"^{DEFAULTS_DIR}/runtimes/(?P<shim>[^/]+)/configuration-(?P=shim)\.toml$"), None, 0),
    (re.compile(rf"^{DEFAULTS_DIR}/custom-runtimes/(?P<shim>[^/]+)/configuration[^/]*\.toml$"), None, 1),
    (re.compile(rf"^{DEFAULTS_DIR}/runtime-rs/configuration-(?P<shim>[^/]+)\.toml$"), True, 2),
    (re.compile(rf"^{DEFAULTS_DIR}/configuration-(?P<shim>[^/]+)\.toml$"), False, 3),
)


def _is_rs_name(shim: str) -> bool:
    return shim.endswith("runtime-rs") or shim == "dragonball"


def _find_shims(root: Path, files: dict[str, FileEntry], notes: list[str]) -> dict[str, ShimInfo]:
    found: dict[str, tuple[int, ShimInfo]] = {}
    for rel in sorted(files):
        if files[rel].kind == "dir":
            continue
        for pattern, rs_flag, priority in _CONFIG_LOCATIONS:
            match = pattern.match(rel)
            if not match:
                continue
            shim = match["shim"]
            resolved = _resolve_in_tree(rel, files, strict=True)
            if resolved is None or files[resolved].kind != "file":
                notes.append(f"{rel}: dangling configuration link -> {files[rel].target}")
                break
            runtime_rs = rs_flag if rs_flag is not None else (_is_rs_name(shim) or "/runtime-rs/" in resolved)
            if rs_flag is False and _is_rs_name(shim):
                runtime_rs = True
            binary = SHIM_RS if runtime_rs else SHIM_GO
            binary_resolved = _resolve_in_tree(binary, files, strict=True)
            has_binary = binary_resolved is not None and files[binary_resolved].kind == "file"
            previous = found.get(shim)
            if previous is None or priority < previous[0]:
                config = load_config(root / resolved)
                found[shim] = (priority, ShimInfo(shim, runtime_rs, binary if has_binary else None,
                                                  root / resolved, config))
            break
    return {name: info for name, (_, info) in sorted(found.items())}


def _default_shim(files: dict[str, FileEntry], shims: dict[str, ShimInfo], layouts: set[str]) -> str | None:
    """kata-deploy's default since 4.x is qemu-runtime-rs; otherwise what configuration.toml points at."""
    if "runtime-rs" in layouts and "qemu-runtime-rs" in shims:
        return "qemu-runtime-rs"
    for link in (f"{DEFAULTS_DIR}/runtime-rs/configuration.toml", f"{DEFAULTS_DIR}/configuration.toml"):
        entry = files.get(link)
        if entry is None or entry.kind != "symlink":
            continue
        resolved = _resolve_in_tree(link, files) or ""
        for name, info in shims.items():
            if str(info.config_path).endswith("/" + resolved):
                return name
        match = re.match(r"configuration-(.+)\.toml$", posixpath.basename(resolved))
        if match and match[1] in shims:
            return match[1]
    if "qemu" in shims:
        return "qemu"
    return next(iter(sorted(shims)), None)


def _classify(files: dict[str, FileEntry]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"kernels": [], "kernel_configs": [], "images": [], "initrds": [],
                                 "hypervisors": []}
    for rel in sorted(files):
        entry = files[rel]
        if entry.kind == "dir":
            continue
        base = posixpath.basename(rel)
        in_defaults = rel.startswith("share/defaults/")
        if _HYPERVISORS.match(rel):
            out["hypervisors"].append(rel)
        elif in_defaults:
            continue
        elif base.startswith(("vmlinux", "vmlinuz")):
            out["kernels"].append(rel)
        elif base.startswith("config-") and rel.startswith("share/"):
            out["kernel_configs"].append(rel)
        elif base.endswith(".initrd") or re.match(r"kata-containers-initrd.*\.img$", base):
            out["initrds"].append(rel)
        elif re.match(r"kata-.*\.image$", base) or re.match(r"kata-containers.*\.img$", base):
            out["images"].append(rel)
    return out


def _layouts(files: dict[str, FileEntry]) -> set[str]:
    layouts = set()
    if SHIM_GO in files or "bin/kata-runtime" in files or any(
            re.match(rf"^{DEFAULTS_DIR}/configuration-[^/]+\.toml$", r) for r in files):
        layouts.add("go")
    if SHIM_RS in files or any(re.match(rf"^{DEFAULTS_DIR}/runtime-rs/configuration-[^/]+\.toml$", r)
                               for r in files):
        layouts.add("runtime-rs")
    return layouts


def _permission_notes(files: dict[str, FileEntry]) -> list[str]:
    """What an installer running as root would carry over and a reviewer should see at once."""
    notes = []
    checks = (("not owned by root:root", lambda e: e.uid != 0 or e.gid != 0),
              ("setuid/setgid", lambda e: e.kind == "file" and e.mode & 0o6000),
              ("group/world-writable", lambda e: e.kind != "symlink" and e.mode & 0o022))
    for what, test in checks:
        hits = sorted(rel for rel, e in files.items() if test(e))
        if hits:
            more = f" and {len(hits) - 3} more" if len(hits) > 3 else ""
            notes.append(f"{len(hits)} path(s) {what}: {', '.join(hits[:3])}{more}")
    return notes


def _build_bundle(sources: list[Path], part: _Part) -> Bundle:
    files = part.files
    notes = list(part.notes) + _permission_notes(files)
    evidence = dict(part.evidence)
    evidence.update(_filename_evidence(sources))
    layouts = _layouts(files)
    shims = _find_shims(part.root, files, notes)
    kinds = _classify(files)
    return Bundle(
        sources=sources, root=part.root, version=_choose_version(evidence), version_evidence=evidence,
        files=files, sha256=part.sha256, layouts=layouts, shims=shims,
        default_shim=_default_shim(files, shims, layouts), missing=dict(part.missing),
        component_versions=dict(part.components), notes=notes, **kinds)


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
