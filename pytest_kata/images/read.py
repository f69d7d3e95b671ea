"""Read guest images without root: ext4 filesystems and partitioned disks (debugfs), initrds (cpio newc,
gzip/zstd/xz/uncompressed, concatenated segments as the kernel accepts them), erofs (``fsck.erofs
--extract``) and unpacked rootfs directories, behind one :class:`RootView`.

Why not loop mounts: they need root and a kernel that trusts the image. debugfs parses the filesystem in user
space; a whole Debian rootfs is listed in a few batched calls (one per directory depth), not one per file.
The guest's package database and ``os-release`` are read from a view by :mod:`pytest_kata.images.packages`.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import lzma
import os
import posixpath
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pytest_kata.compression import GZIP_MAGIC, XZ_MAGIC, ZSTD_MAGIC
from pytest_kata.errors import KataError

KINDS = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
         stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}
EXT_MAGIC_OFFSET = 1024 + 56
EROFS_MAGIC = b"\xe2\xe1\xf5\xe0"
CPIO_MAGICS = (b"070701", b"070702")
MAX_SYMLINK_HOPS = 40


def _tmp_prefix(what: str) -> str:
    """Temporary files carry the run id when there is one (the sweep finds leftovers of a killed run)."""
    return f"{os.environ.get('PYTEST_KATA_RUN_ID', 'kt')}-{what}-"


class ImageError(KataError):
    """An image, initrd or package database cannot be read."""


@dataclass(frozen=True)
class Entry:
    """One file of the guest, as the image records it (not as this host would)."""

    path: str  # absolute posix path inside the guest, e.g. "/usr/bin/su"
    kind: str  # file, dir, symlink, char, block, fifo, socket
    mode: int  # permission bits including setuid/setgid/sticky (st_mode & 0o7777)
    uid: int
    gid: int
    size: int
    target: str | None = None  # symlink target as stored
    capability: bytes | None = None  # raw security.capability xattr (file capabilities)

    @property
    def executable(self) -> bool:
        return self.kind == "file" and bool(self.mode & 0o111)


class RootView:
    """A read-only view of a guest root filesystem. Subclasses fill ``_entries`` and implement ``_read``."""

    kind = "rootfs"
    fidelity_notes: tuple[str, ...] = ()

    def __init__(self, source: Path) -> None:
        self.source = source
        self._entries: dict[str, Entry] | None = None

    # -- listing ---------------------------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = self._list()
        return self._entries

    def _list(self) -> dict[str, Entry]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries().values())

    def entry(self, path: str) -> Entry | None:
        return self.entries().get(_norm(path))

    def exists(self, path: str) -> bool:
        return self.resolve(path) is not None

    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path`` (after resolving symlinks)."""
        real = self.resolve(path)
        if real is None:
            return []
        prefix = real.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in self.entries() if p.startswith(prefix) and "/" not in p[len(prefix):]
                      and p != prefix)

    def resolve(self, path: str) -> str | None:
        """Follow symlinks (absolute targets are relative to the guest root), like the guest would."""
        parts = [p for p in _norm(path).split("/") if p]
        done = "/"
        hops = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                done = posixpath.dirname(done) or "/"
                continue
            candidate = posixpath.join(done, name)
            entry = self.entries().get(candidate)
            if entry is None:
                return None
            if entry.kind == "symlink" and entry.target is not None:
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    return None
                target = entry.target
                base = "/" if target.startswith("/") else done
                parts = [p for p in target.split("/") if p and p != "."] + parts
                done = base
                continue
            done = candidate
        return done

    # -- content ---------------------------------------------------------------------------------
    def read(self, path: str) -> bytes:
        """File content (symlinks followed); KeyError when absent or not a regular file."""
        real = self.resolve(path)
        entry = self.entries().get(real or "")
        if entry is None or entry.kind != "file":
            raise KeyError(path)
        return self._read(entry)

    def read_text(self, path: str, default: str | None = None) -> str | None:
        try:
            return self.read(path).decode("utf-8", "replace")
        except KeyError:
            return default

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes]:
        """Contents of the regular files among ``paths`` (missing ones are left out); batched where it pays."""
        out = {}
        for p in paths:
            try:
                out[p] = self.read(p)
            except KeyError:
                pass
        return out

    def _read(self, entry: Entry) -> bytes:
        raise NotImplementedError

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a shell pattern (fnmatch on the whole path: ``/etc/sysctl.d/*.conf``)."""
        rx = re.compile(fnmatch.translate(_norm(pattern)))
        return sorted(p for p in self.entries() if rx.match(p))

    def close(self) -> None:
        """Release temporary files (no-op for most views)."""

    def __enter__(self) -> RootView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return f"{self.kind} {self.source}"


def _norm(path: str) -> str:
    p = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if p in ("/", "//") else p


# ---------------------------------------------------------------------------------------------------
class DirRoot(RootView):
    """An unpacked rootfs directory (mmdebstrap output, an extracted erofs)."""

    kind = "directory"

    def _list(self) -> dict[str, Entry]:
        root = str(self.source)
        out: dict[str, Entry] = {"/": _entry_from_stat("/", os.lstat(root), None, None)}
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = "/" + os.path.relpath(dirpath, root).replace(os.sep, "/").removeprefix(".").lstrip("/")
            for name in dirnames + filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
                cap = None
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                    try:
                        cap = os.getxattr(full, "security.capability", follow_symlinks=False)
                    except OSError:
                        cap = None
                path = posixpath.join(rel_dir if rel_dir != "" else "/", name)
                out[_norm(path)] = _entry_from_stat(_norm(path), st, target, cap)
        return out

    def _read(self, entry: Entry) -> bytes:
        return (self.source / entry.path.lstrip("/")).read_bytes()


def _entry_from_stat(path: str, st: os.stat_result, target: str | None, cap: bytes | None) -> Entry:
    return Entry(path=path, kind=KINDS.get(stat.S_IFMT(st.st_mode), "other"), mode=st.st_mode & 0o7777,
                 uid=st.st_uid, gid=st.st_gid, size=st.st_size if stat.S_ISREG(st.st_mode) else 0,
                 target=target, capability=cap)


# ---------------------------------------------------------------------------------------------------
class Ext4Root(RootView):
    """An ext2/3/4 filesystem in a file, at a byte offset (0, or partition 1 of a raw disk), read by debugfs."""

    kind = "ext4"

    def __init__(self, source: Path, offset: int = 0) -> None:
        super().__init__(source)
        self.offset = offset
        self._ls_re = re.compile(r"^/(\d+)/(\d+)/(\d+)/(\d+)/(.*)/(\d*)/$")
        self._inodes: dict[str, int] = {}
        if shutil.which("debugfs") is None:
            raise ImageError("debugfs not found", path=source, hint="apt-get install e2fsprogs")
        self._check_size()

    def _check_size(self) -> None:
        """debugfs lists a truncated filesystem happily (metadata comes first) and then reads zeros: refuse it."""
        with self.source.open("rb") as f:
            f.seek(self.offset + 1024)
            sb = f.read(1024)
        if len(sb) < 1024:
            raise ImageError("truncated image: no complete ext4 superblock", path=self.source)
        blocks = int.from_bytes(sb[4:8], "little")
        if int.from_bytes(sb[0x60:0x64], "little") & 0x80:  # INCOMPAT_64BIT: high half of the block count
            blocks |= int.from_bytes(sb[0x150:0x154], "little") << 32
        needed = blocks * (1024 << int.from_bytes(sb[24:28], "little"))
        have = self.source.stat().st_size - self.offset
        if needed > have:
            raise ImageError(f"truncated image: the ext4 filesystem needs {needed} bytes, the file holds {have}",
                             path=self.source, hint="copy or download it again")

    @property
    def spec(self) -> str:
        return f"{self.source}?offset={self.offset}" if self.offset else str(self.source)

    def describe(self) -> str:
        return f"ext4 {self.source}" + (f" (partition at byte {self.offset})" if self.offset else "")

    def debugfs(self, commands: list[str]) -> list[tuple[str, str]]:
        """Run commands in ONE debugfs process; returns (command, output) pairs."""
        script = "".join(c + "\n" for c in commands)
        proc = subprocess.run(["debugfs", "-f", "-", self.spec], input=script.encode(), capture_output=True,
                              check=False)
        err = proc.stderr.decode("utf-8", "replace")
        if proc.returncode != 0 or "while trying to open" in err or "Filesystem not open" in err:
            first = next((line.removeprefix("debugfs: ") for line in err.splitlines()
                          if "while trying to open" in line), f"debugfs exit {proc.returncode}")
            raise ImageError(f"not a readable ext4 filesystem: {first.strip()}", path=self.source,
                             hint="is the image truncated or corrupt? check with e2fsck -n")
        text = proc.stdout.decode("utf-8", "surrogateescape")
        out: list[tuple[str, str]] = []
        for chunk in text.split("debugfs: ")[1:]:
            cmd, _, body = chunk.partition("\n")
            out.append((cmd, body))
        return out

    def _list(self) -> dict[str, Entry]:
        entries: dict[str, Entry] = {"/": Entry("/", "dir", 0o755, 0, 0, 0)}
        pending = ["/"]
        symlinks: list[str] = []
        executables: list[str] = []
        while pending:  # one debugfs call per directory depth
            results = self.debugfs([f'ls -p "{d}"' for d in pending])
            pending = []
            for (cmd, body) in results:
                parent = cmd[len('ls -p "'):-1]
                for line in body.splitlines():
                    m = self._ls_re.match(line)
                    if not m:
                        continue
                    ino, mode, uid, gid, name, size = m.groups()
                    if name in (".", "..") or not name:
                        continue
                    if int(ino) == 0:
                        continue  # deleted entry shown by ls -d
                    path = _norm(posixpath.join(parent, name))
                    mode_i = int(mode, 8)
                    kind = KINDS.get(stat.S_IFMT(mode_i), "other")
                    entries[path] = Entry(path, kind, mode_i & 0o7777, int(uid), int(gid),
                                          int(size or 0) if kind == "file" else 0)
                    self._inodes[path] = int(ino)
                    if kind == "dir":
                        pending.append(path)
                    elif kind == "symlink":
                        symlinks.append(path)
                    elif kind == "file" and mode_i & 0o111:
                        executables.append(path)
        self._add_symlink_targets(entries, symlinks)
        self._add_capabilities(entries, executables)
        return entries

    def _add_symlink_targets(self, entries: dict[str, Entry], symlinks: list[str]) -> None:
        if not symlinks:
            return
        slow: list[str] = []
        for path, (_, body) in zip(symlinks, self.debugfs([f"stat <{self._inodes[p]}>" for p in symlinks]),
                                   strict=False):
            m = re.search(r'Fast link dest: "(.*)"', body)
            if m:
                entries[path] = _replace(entries[path], target=m.group(1))
            else:
                slow.append(path)
        if slow:  # long targets live in a data block: cat the inode
            for path, (_, body) in zip(slow, self.debugfs([f"cat <{self._inodes[p]}>" for p in slow]), strict=False):
                entries[path] = _replace(entries[path], target=body.rstrip("\n").split("\x00")[0])

    def _add_capabilities(self, entries: dict[str, Entry], executables: list[str]) -> None:
        if not executables:
            return
        for path, (_, body) in zip(executables, self.debugfs([f"ea_get <{self._inodes[p]}> security.capability"
                                                              for p in executables]), strict=False):
            if "security.capability" not in body or "not found" in body.lower():
                continue
            hexes = re.findall(r"\b([0-9a-f]{2})\b", body.split("=", 1)[-1])
            entries[path] = _replace(entries[path], capability=bytes(int(h, 16) for h in hexes) or b"?")

    def _read(self, entry: Entry) -> bytes:
        return self.read_many([entry.path])[entry.path]

    def read_many(self, paths: Iterable[str]) -> dict[str, bytes]:
        wanted: dict[str, str] = {}
        for p in paths:
            real = self.resolve(p)
            e = self.entries().get(real or "")
            if e is not None and e.kind == "file":
                wanted[p] = real  # type: ignore[assignment]
        if not wanted:
            return {}
        with tempfile.TemporaryDirectory(prefix=_tmp_prefix("debugfs")) as tmp:
            reals = sorted(set(wanted.values()))
            names = {r: os.path.join(tmp, str(i)) for i, r in enumerate(reals)}
            self.debugfs([f'dump <{self._inodes[r]}> "{names[r]}"' for r in reals])
            data = {r: Path(names[r]).read_bytes() for r in reals if os.path.exists(names[r])}
        return {p: data[r] for p, r in wanted.items() if r in data}


def _replace(entry: Entry, **changes: object) -> Entry:
    return replace(entry, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
class CpioRoot(RootView):
    """An initrd: one or more cpio newc archives, each optionally gzip/zstd/xz compressed, concatenated.

    Parsed here rather than with libarchive because the kernel's initramfs format is a *concatenation* of
    such segments (e.g. uncompressed early microcode + compressed main archive), which libarchive does not
    read as one; the newc header is 13 hex fields.
    """

    kind = "initrd"
    fidelity_notes = ("cpio archives carry no extended attributes: file capabilities cannot be seen",)

    def __init__(self, source: Path) -> None:
        super().__init__(source)
        self._data: dict[str, bytes] = {}
        self.segments: list[str] = []

    def _list(self) -> dict[str, Entry]:
        raw = self.source.read_bytes()
        entries: dict[str, Entry] = {"/": Entry("/", "dir", 0o755, 0, 0, 0)}
        pos = 0
        while pos < len(raw):
            while pos < len(raw) and raw[pos] == 0:  # padding between segments
                pos += 1
            if pos >= len(raw):
                break
            head = raw[pos:pos + 6]
            if head in CPIO_MAGICS:
                pos = self._parse_cpio(raw, pos, entries)
                self.segments.append("cpio")
                continue
            decompressed, name = _decompress_segment(raw[pos:], self.source)
            self.segments.append(f"cpio+{name}")
            self._parse_cpio(decompressed, 0, entries, whole=True)
            break  # a compressed segment runs to the end of the file
        if len(entries) == 1:
            raise ImageError("no cpio archive inside", path=self.source)
        return entries

    def _parse_cpio(self, buf: bytes, pos: int, entries: dict[str, Entry], whole: bool = False) -> int:
        while True:
            while whole and pos < len(buf) and buf[pos] == 0:
                pos += 1
            if pos + 110 > len(buf):
                if whole:
                    return pos
                raise ImageError("truncated cpio header", path=self.source)
            magic = buf[pos:pos + 6]
            if magic not in CPIO_MAGICS:
                if (whole and buf[pos:pos + 2] in (GZIP_MAGIC,)) or buf[pos:pos + 4] == ZSTD_MAGIC:
                    inner, _ = _decompress_segment(buf[pos:], self.source)
                    return self._parse_cpio(inner, 0, entries, whole=True)
                raise ImageError(f"bad cpio magic {magic!r} at byte {pos}", path=self.source,
                                 hint="only the newc format (cpio -H newc) is supported")
            try:
                fields = [int(buf[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
            except ValueError:
                raise ImageError(f"corrupt cpio header at byte {pos}", path=self.source) from None
            _, mode, uid, gid, _, _, filesize, _, _, _, _, namesize, _ = fields
            name_start = pos + 110
            name = buf[name_start:name_start + namesize - 1].decode("utf-8", "surrogateescape")
            data_start = _align4(name_start + namesize)
            data = buf[data_start:data_start + filesize]
            if len(data) != filesize:
                raise ImageError(f"truncated cpio member {name!r}", path=self.source)
            pos = _align4(data_start + filesize)
            if name == "TRAILER!!!":
                return pos
            path = _norm(name)
            if path == "/":
                continue
            kind = KINDS.get(stat.S_IFMT(mode), "other")
            target = data.decode("utf-8", "surrogateescape") if kind == "symlink" else None
            entries[path] = Entry(path, kind, mode & 0o7777, uid, gid, filesize if kind == "file" else 0, target)
            if kind == "file":
                self._data[path] = data
            parent = posixpath.dirname(path)
            while parent != "/" and parent not in entries:  # archives may omit parent directories
                entries[parent] = Entry(parent, "dir", 0o755, 0, 0, 0)
                parent = posixpath.dirname(parent)

    def _read(self, entry: Entry) -> bytes:
        return self._data[entry.path]


def _align4(n: int) -> int:
    return (n + 3) & ~3


def _decompress_segment(blob: bytes, source: Path) -> tuple[bytes, str]:
    try:
        if blob.startswith(GZIP_MAGIC):
            return gzip.decompress(blob), "gzip"
        if blob.startswith(ZSTD_MAGIC):
            import zstandard

            out = bytearray()
            reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
            while chunk := reader.read(1 << 20):
                out += chunk
            return bytes(out), "zstd"
        if blob.startswith(XZ_MAGIC):
            return lzma.decompress(blob), "xz"
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise ImageError(f"corrupt compressed initrd segment: {exc}", path=source) from None
    except Exception as exc:  # zstandard.ZstdError
        raise ImageError(f"corrupt compressed initrd segment: {exc}", path=source) from None
    raise ImageError(f"unknown initrd segment (magic {blob[:6].hex()})", path=source,
                     hint="expected cpio newc, optionally gzip, zstd or xz compressed")


# ---------------------------------------------------------------------------------------------------
class ErofsRoot(DirRoot):
    """An erofs image, extracted with ``fsck.erofs --extract`` into a private temporary directory."""

    kind = "erofs"
    fidelity_notes = ("erofs-utils 1.5 drops setuid/setgid bits and xattrs: setuid files and file capabilities "
                      "cannot be seen in erofs images",)

    def __init__(self, source: Path, offset: int = 0) -> None:
        if shutil.which("fsck.erofs") is None:
            raise ImageError("erofs image but fsck.erofs is not installed", path=source,
                             hint="apt-get install erofs-utils")
        self._tmp = tempfile.mkdtemp(prefix=_tmp_prefix("erofs"))
        image = source
        if offset:
            image = Path(self._tmp) / "partition.img"
            _copy_range(source, image, offset)
        out = Path(self._tmp) / "root"
        proc = subprocess.run(["fsck.erofs", f"--extract={out}", "--preserve", str(image)], capture_output=True,
                              check=False)
        if proc.returncode != 0:
            self.close()
            err = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()
            raise ImageError(f"fsck.erofs cannot extract it: {err[-1] if err else proc.returncode}", path=source)
        super().__init__(out)
        self.image = source

    def describe(self) -> str:
        return f"erofs {self.image}"

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def _copy_range(src: Path, dst: Path, offset: int, length: int | None = None) -> None:
    with src.open("rb") as fin, dst.open("wb") as fout:
        fin.seek(offset)
        remaining = length
        while remaining is None or remaining > 0:
            chunk = fin.read(1 << 20 if remaining is None else min(1 << 20, remaining))
            if not chunk:
                break
            fout.write(chunk)
            if remaining is not None:
                remaining -= len(chunk)


# ---------------------------------------------------------------------------------------------------
def open_image(path: str | Path) -> RootView:
    """Open a rootfs directory, ext4 image, partitioned raw disk, erofs image or initrd; one-line error else."""
    p = Path(path)
    if p.is_dir():
        return DirRoot(p)
    if not p.is_file():
        raise ImageError("no such image file or rootfs directory", path=p)
    with p.open("rb") as f:
        head = f.read(4096)
    if head[:6] in CPIO_MAGICS or head.startswith((GZIP_MAGIC, ZSTD_MAGIC, XZ_MAGIC)):
        return CpioRoot(p)
    kind = _fs_kind(head)
    if kind:
        return _fs_view(p, kind, 0)
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        return _open_partitioned(p)
    raise ImageError("not a recognised guest image", path=p,
                     hint="expected an ext4/erofs filesystem, a partitioned raw disk, a cpio initrd or a directory")


def _fs_kind(head: bytes) -> str | None:
    if len(head) >= EXT_MAGIC_OFFSET + 2 and head[EXT_MAGIC_OFFSET:EXT_MAGIC_OFFSET + 2] == b"\x53\xef":
        return "ext4"
    if len(head) >= 1028 and head[1024:1028] == EROFS_MAGIC:
        return "erofs"
    return None


def _fs_view(p: Path, kind: str, offset: int) -> RootView:
    return Ext4Root(p, offset) if kind == "ext4" else ErofsRoot(p, offset)


def _open_partitioned(p: Path) -> RootView:
    """Raw disk (osbuilder layout): the first partition holding ext4 or erofs is the root filesystem."""
    if shutil.which("sfdisk") is None:
        raise ImageError("partitioned disk but sfdisk is not installed", path=p, hint="apt-get install fdisk")
    proc = subprocess.run(["sfdisk", "--json", str(p)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ImageError(f"unreadable partition table: {proc.stderr.strip().splitlines()[-1:]}", path=p)
    try:
        table = json.loads(proc.stdout)["partitiontable"]
        sector = int(table.get("sectorsize", 512))
        parts = table.get("partitions", [])
    except (ValueError, KeyError, TypeError):
        raise ImageError("unreadable partition table (sfdisk --json)", path=p) from None
    with p.open("rb") as f:
        for part in parts:
            offset = int(part["start"]) * sector
            f.seek(offset)
            kind = _fs_kind(f.read(2048))
            if kind:
                return _fs_view(p, kind, offset)
    raise ImageError(f"partitioned disk with {len(parts)} partition(s) but none holds ext4 or erofs", path=p,
                     hint="is the image truncated or corrupt?")
