"""What a candidate bundle is once opened: the tree, the inventory of every file, the shims it ships."""

from __future__ import annotations

import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.kataconfig import KataConfig
from pytest_kata.resources import KATA_PREFIX

PREFIX = KATA_PREFIX.lstrip("/")  # as tar members name it
ALL_SHIMS = "all"  # --kata-shim all: every shipped configuration
DEFAULTS_DIR = "share/defaults/kata-containers"
SHIM_GO = "bin/containerd-shim-kata-v2"
SHIM_RS = "runtime-rs/bin/containerd-shim-kata-v2"
KATA_RUNTIME = "bin/kata-runtime"


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

    def ships_shim(self) -> bool:
        """Whether the default shim has a real ``containerd-shim-kata-v2`` (the reference candidate has none)."""
        try:
            return bool(self.shim(None).binary)
        except KataError:
            return False

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


def _norm_version(value: str) -> str:
    return value.strip().removeprefix("v")


def bundle_relative(value: str) -> str | None:
    """A path a configuration names under ``/opt/kata`` as the path inside the bundle (None: not under it)."""
    if value == KATA_PREFIX or value.startswith(KATA_PREFIX + "/"):
        return value[len(KATA_PREFIX):].lstrip("/")
    return None
