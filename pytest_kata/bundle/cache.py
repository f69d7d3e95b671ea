"""The bundle cache: extracted trees under ``cache_dir()/bundles/<sha256>/`` with their inventory, published
atomically, so a second open costs a few ``stat`` calls."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_kata.bundle.model import PREFIX, FileEntry
from pytest_kata.errors import BundleError
from pytest_kata.locking import exclusive
from pytest_kata.resources import cache_dir

INVENTORY_FORMAT = 3


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
        with exclusive(self.base / ".lock"):
            yield

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


def _as_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise BundleError("no bundle given (pass a kata-static tarball or an /opt/kata tree)")
    return [Path(p) for p in items]


def _merge_key(shas: Sequence[str]) -> str:
    return hashlib.sha256(("kata-bundle-merge\n" + "\n".join(shas)).encode()).hexdigest()


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
