"""Open a candidate (one or more tarballs or trees) as one :class:`Bundle`, or identify it cheaply for the
verdict."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_kata.bundle.analysis import _build_bundle
from pytest_kata.bundle.archives import MEMBER_LIMIT, TOTAL_LIMIT, _extract_archive, _sniff
from pytest_kata.bundle.cache import _as_paths, _merge_key, _Part, _part_from_cache, _Store
from pytest_kata.bundle.directories import _dir_key, _open_directory
from pytest_kata.bundle.evidence import _choose_version, _filename_evidence
from pytest_kata.bundle.merging import _merge
from pytest_kata.bundle.model import Bundle
from pytest_kata.errors import BundleError, KataError


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
        inv = _cached_inventory(store, source)
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


def _cached_inventory(store: _Store, source: Path) -> dict[str, Any] | None:
    """The cached inventory of a source, without reading its content (``None``: not cached)."""
    try:
        if source.is_dir():
            _root, key, _sig = _dir_key(source)
        else:
            found = store.known_key(source)
            if found is None:
                return None
            key = found
    except (OSError, KataError):
        return None
    return store.read_inventory(key)
