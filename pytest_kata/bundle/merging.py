"""Several parts of one release (the split 4.1 tarballs) merged into one tree; conflicting files are refused."""

from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path

from pytest_kata import progress
from pytest_kata.bundle.archives import _check_links
from pytest_kata.bundle.cache import _merge_key, _Part, _part_from_cache, _Store, _write_inventory
from pytest_kata.bundle.evidence import _collect_evidence
from pytest_kata.bundle.model import PREFIX, FileEntry, _link_destination
from pytest_kata.errors import BundleError


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
