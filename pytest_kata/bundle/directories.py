"""An unpacked ``/opt/kata`` tree as a candidate: walked, inventoried and cached by its stat signature."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from pytest_kata import progress
from pytest_kata.bundle.archives import COUNT_LIMIT, _check_links
from pytest_kata.bundle.cache import _Part, _part_from_cache, _Store, _write_inventory
from pytest_kata.bundle.evidence import _collect_evidence
from pytest_kata.bundle.model import DEFAULTS_DIR, PREFIX, SHIM_GO, SHIM_RS, FileEntry
from pytest_kata.errors import BundleError
from pytest_kata.hashing import sha256_file as _sha256_file


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
