"""Archives are untrusted input: each member is checked before anything is written, hashed as it streams
through the decompressor, and the finished tree's links are followed again."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import posixpath
import shutil
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO

from pytest_kata import compression, progress
from pytest_kata.bundle.cache import _Part, _Store, _write_inventory
from pytest_kata.bundle.evidence import _collect_evidence
from pytest_kata.bundle.model import PREFIX, FileEntry, _link_destination, _resolve_in_tree
from pytest_kata.errors import BundleError, KataError

MEMBER_LIMIT = 4 << 30  # the largest real member is a guest image (~300 MiB); 4 GiB leaves room
TOTAL_LIMIT = 32 << 30
COUNT_LIMIT = 200_000  # a kata-static release holds a few thousand paths; millions of inodes is an attack
CHUNK = 1 << 20
# Python 3.11.4+ only: feature-detected so that Debian 12's 3.11.2 opens bundles with the same safety.
_DATA_FILTER = getattr(tarfile, "data_filter", None)
_FILTER_ERROR: type[Exception] = getattr(tarfile, "FilterError", Exception)


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
    compressed = compression.sniff(head)
    if compressed is not None:
        return compressed
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


def _check_links(part: _Part) -> None:
    """Every symlink, followed through the whole tree, must stay inside it (dangling is allowed)."""
    for rel, entry in part.files.items():
        if entry.kind == "symlink" and _resolve_in_tree(rel, part.files) is None:
            raise BundleError(f"symlink {rel!r} -> {entry.target!r} leads outside the bundle",
                              path=part.source, hint="refusing to use an unsafe bundle")
