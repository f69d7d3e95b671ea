"""State capture: everything an install may touch, as a manifest with a digest, and the exact difference.

What is captured (paths as the host sees them, below an optional ``sysroot``):

* the Kata prefix ``/opt/kata`` (a symlink into ``/opt/kata-releases`` after a recorded install, or a real
  tree after a plain ``tar -C /``) and every release under ``/opt/kata-releases``: type, mode, owner, size,
  sha256 of every file, target of every symlink;
* ``/etc/containerd`` (``config.toml``, drop-ins, backups) with the text of each config file, so that a
  difference can be shown line by line;
* Kata links in ``/usr/local/bin`` (what Kata CI's install creates);
* the runtime handlers containerd reports (``containerd config dump``), or, where containerd cannot be
  asked, the handlers parsed from its config and imports.

The digest covers the manifest and the handlers, not times: "restored" means the same bytes, modes,
owners and links. Capture is one ``lstat`` and one read per file: linear, and close to hashing speed
(``bench/bench_install.py`` measures it against ``find | sha256sum``). On the local machine it runs in
process; on any other :class:`~pytest_kata.hosts.base.Host` it is one ``find`` + ``sha256sum`` pipeline.
"""

from __future__ import annotations

import base64
import difflib
import fnmatch
import hashlib
import json
import os
import shlex
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host, LocalHost
from pytest_kata.resources import KATA_PREFIX

PREFIX = KATA_PREFIX
RELEASES = f"{KATA_PREFIX}-releases"
CONTAINERD_DIR = "/etc/containerd"
CONTAINERD_CONFIG = "/etc/containerd/config.toml"
BIN_LINKS = "/usr/local/bin"
TREES = (PREFIX, RELEASES, CONTAINERD_DIR)  # captured recursively
BIN_GLOB = "*kata*"  # in BIN_LINKS
CRI_PLUGINS = ("io.containerd.cri.v1.runtime", "io.containerd.grpc.v1.cri", "cri")
TEXT_LIMIT = 256 << 10  # config text kept for diffs


class StateError(KataError):
    """The state of a host cannot be captured or compared."""


@dataclass(frozen=True)
class Entry:
    """One path: what it is, its permissions and owner, and its content (sha256) or link target."""

    kind: str  # file / dir / symlink / other
    mode: int
    uid: int
    gid: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None

    def describe(self) -> str:
        what = {"file": f"file {self.size} bytes sha256 {str(self.sha256)[:12]}",
                "symlink": f"symlink -> {self.target}", "dir": "dir"}.get(self.kind, self.kind)
        return f"{what}, mode {self.mode:04o}, owner {self.uid}:{self.gid}"


@dataclass
class State:
    """The captured state of one host (below ``sysroot``)."""

    host: str
    sysroot: str
    entries: dict[str, Entry]
    configs: dict[str, str] = field(default_factory=dict)  # containerd config path -> text
    handlers: dict[str, dict[str, str]] = field(default_factory=dict)
    handlers_source: str = ""

    @property
    def digest(self) -> str:
        canonical = json.dumps({"entries": {p: asdict(e) for p, e in sorted(self.entries.items())},
                                "handlers": self.handlers}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def release(self) -> str | None:
        """The release ``/opt/kata`` points at (``<version>-<sha12>``), or None."""
        entry = self.entries.get(PREFIX)
        if entry and entry.kind == "symlink" and entry.target:
            return entry.target.rstrip("/").rsplit("/", 1)[-1]
        return None

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries.values():
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "sysroot": self.sysroot, "digest": self.digest, "release": self.release,
                "counts": self.counts(), "handlers": self.handlers, "handlers_source": self.handlers_source,
                "configs": self.configs,
                "entries": {p: {k: v for k, v in asdict(e).items() if v is not None}
                            for p, e in sorted(self.entries.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        entries = {p: Entry(**{"size": 0, **e}) for p, e in data.get("entries", {}).items()}
        return cls(host=data.get("host", ""), sysroot=data.get("sysroot", "/"), entries=entries,
                   configs=dict(data.get("configs", {})), handlers=dict(data.get("handlers", {})),
                   handlers_source=data.get("handlers_source", ""))


# ------------------------------------------------------------------------------------------------ capture


def host_path(sysroot: str, path: str) -> str:
    """``path`` (as seen by the installed system) under ``sysroot`` (``/`` on a real host)."""
    root = sysroot.rstrip("/")
    return f"{root}{path}" if root else path


def is_local(host: Host) -> bool:
    return isinstance(host, LocalHost)


def capture_state(host: Host, sysroot: str = "/", *, containerd: Any = None,
                  trees: Iterable[str] = TREES) -> State:
    """Capture the state of ``host`` below ``sysroot``. ``containerd`` (a ContainerdService) is asked for
    the handler list when it can answer; otherwise the handlers are parsed from the config files."""
    trees = tuple(trees)
    entries = _walk_local(sysroot, trees) if is_local(host) else _walk_remote(host, sysroot, trees)
    configs: dict[str, str] = {}
    for path, entry in entries.items():
        if entry.kind == "file" and path.startswith(CONTAINERD_DIR + "/") and entry.size <= TEXT_LIMIT \
                and (path.endswith(".toml") or ".toml." in path or path.endswith(".bak")):
            configs[path] = _read_text(host, host_path(sysroot, path))
    handlers, source = {}, "parsed from config files"
    if containerd is not None and getattr(containerd, "can_report", lambda: False)():
        handlers, source = containerd.handlers(), f"containerd config dump ({containerd.description})"
    else:
        handlers = handlers_from_configs(configs, sysroot)
    return State(host=getattr(host, "name", "?"), sysroot=sysroot, entries=entries, configs=configs,
                 handlers=handlers, handlers_source=source)


def _walk_local(sysroot: str, trees: tuple[str, ...]) -> dict[str, Entry]:
    """In-process walk: one lstat per entry, sha256 with a 1 MiB buffer per file."""
    entries: dict[str, Entry] = {}
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    root = sysroot.rstrip("/")

    def add(path: str, st: os.stat_result) -> bool:
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            entries[path] = Entry("symlink", stat.S_IMODE(mode), st.st_uid, st.st_gid,
                                  target=os.readlink(root + path))
        elif stat.S_ISREG(mode):
            digest = hashlib.sha256()
            with open(root + path, "rb", buffering=0) as fh:
                while n := fh.readinto(buffer):
                    digest.update(view[:n])
            entries[path] = Entry("file", stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_size,
                                  digest.hexdigest())
        elif stat.S_ISDIR(mode):
            entries[path] = Entry("dir", stat.S_IMODE(mode), st.st_uid, st.st_gid)
            return True
        else:
            entries[path] = Entry("other", stat.S_IMODE(mode), st.st_uid, st.st_gid)
        return False

    def walk(path: str) -> None:
        with os.scandir(root + path) as it:
            for item in it:
                child = f"{path}/{item.name}"
                if add(child, item.stat(follow_symlinks=False)):
                    walk(child)

    for tree in trees:
        try:
            st = os.lstat(root + tree)
        except FileNotFoundError:
            continue
        if add(tree, st):
            walk(tree)
    bin_dir = root + BIN_LINKS
    if os.path.isdir(bin_dir):
        for name in sorted(os.listdir(bin_dir)):
            if fnmatch.fnmatch(name, BIN_GLOB):
                add(f"{BIN_LINKS}/{name}", os.lstat(f"{bin_dir}/{name}"))
    return entries


def _walk_remote(host: Host, sysroot: str, trees: tuple[str, ...]) -> dict[str, Entry]:
    """One find + sha256sum pipeline on the host; NUL-separated so that any file name survives."""
    root = sysroot.rstrip("/") or ""
    paths = " ".join(shlex.quote(root + t) for t in trees)
    bins = shlex.quote(root + BIN_LINKS)
    script = (
        f"cd / || exit 3; for p in {paths}; do [ -e \"$p\" ] || [ -L \"$p\" ] || continue; "
        "find \"$p\" -printf '%y %m %U %G %s %p\\0%l\\0'; done; "
        f"[ -d {bins} ] && find {bins} -mindepth 1 -maxdepth 1 -name {shlex.quote(BIN_GLOB)} "
        "-printf '%y %m %U %G %s %p\\0%l\\0'; "
        "printf 'SHA256\\0'; "
        f"for p in {paths}; do [ -e \"$p\" ] || continue; find \"$p\" -type f -print0; done "
        "| xargs -0 -r sha256sum -z; "
        f"[ -d {bins} ] && find {bins} -mindepth 1 -maxdepth 1 -type f -name {shlex.quote(BIN_GLOB)} -print0 "
        "| xargs -0 -r sha256sum -z; true")
    # base64 so that NULs and odd names survive any transport (a serial console included)
    result = host.run(f"( {script} ) | base64 -w0", timeout=3600)
    if not result.ok:
        raise StateError(f"state capture failed: {result.stderr.strip()[-200:]}", path=host.name)
    try:
        text = base64.b64decode("".join(result.stdout.split())).decode("utf-8", errors="surrogateescape")
    except ValueError as exc:
        raise StateError(f"state capture returned garbage: {exc}", path=host.name) from None
    listing, _, sums = text.partition("SHA256\0")
    fields = listing.split("\0")
    entries: dict[str, Entry] = {}
    kinds = {"f": "file", "d": "dir", "l": "symlink"}
    for i in range(0, len(fields) - 1, 2):
        head, target = fields[i], fields[i + 1]
        kind, mode, uid, gid, size, path = head.split(" ", 5)
        rel = path[len(root):] if root else path
        k = kinds.get(kind, "other")
        entries[rel] = Entry(k, int(mode, 8), int(uid), int(gid), int(size) if k == "file" else 0,
                             target=target if k == "symlink" else None)
    for line in sums.split("\0"):
        if not line:
            continue
        digest, _, path = line.partition("  ")
        rel = path[len(root):] if root else path
        if rel in entries:
            entries[rel] = Entry(**{**asdict(entries[rel]), "sha256": digest})
    return entries


def _read_text(host: Host, path: str) -> str:
    if is_local(host):
        try:
            return Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    result = host.run(["cat", path])
    return result.stdout if result.ok else ""


# ------------------------------------------------------------------------------------------------ handlers


def runtimes_of(config: dict[str, Any]) -> dict[str, dict[str, str]]:
    """The CRI runtime handlers in one (merged) containerd config."""
    out: dict[str, dict[str, str]] = {}
    plugins = config.get("plugins", {}) if isinstance(config.get("plugins"), dict) else {}
    for plugin in CRI_PLUGINS:
        section = plugins.get(plugin)
        runtimes = section.get("containerd", {}).get("runtimes", {}) if isinstance(section, dict) else {}
        for name, spec in (runtimes or {}).items():
            if not isinstance(spec, dict):
                continue
            options = spec.get("options", {}) if isinstance(spec.get("options"), dict) else {}
            out[name] = {k: str(v) for k, v in (("runtime_type", spec.get("runtime_type")),
                                                 ("runtime_path", spec.get("runtime_path")),
                                                 ("config_path", options.get("ConfigPath"))) if v}
    return out


def merge_toml(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """containerd's import merge: tables merge recursively, later values win."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_toml(out[key], value)
        else:
            out[key] = value
    return out


def handlers_from_configs(configs: dict[str, str], sysroot: str) -> dict[str, dict[str, str]]:
    """Handlers from ``config.toml`` and the files it imports (as containerd would merge them)."""
    main = configs.get(CONTAINERD_CONFIG)
    if main is None:
        return {}
    try:
        merged = tomllib.loads(main)
    except tomllib.TOMLDecodeError:
        return {"<unparsable config.toml>": {}}
    root = sysroot.rstrip("/")
    for pattern in merged.get("imports", []) or []:
        rel = pattern[len(root):] if root and pattern.startswith(root + "/") else pattern
        if not rel.startswith("/"):
            rel = f"{CONTAINERD_DIR}/{rel}"
        for path in sorted(p for p in configs if fnmatch.fnmatch(p, rel)):
            try:
                merged = merge_toml(merged, tomllib.loads(configs[path]))
            except tomllib.TOMLDecodeError:
                merged.setdefault("plugins", {})
    return runtimes_of(merged)


# ------------------------------------------------------------------------------------------------ diff


@dataclass
class StateDiff:
    """The exact difference between two states (``before`` -> ``after``)."""

    added: dict[str, Entry]
    removed: dict[str, Entry]
    changed: dict[str, tuple[Entry, Entry]]
    config_diffs: dict[str, str]
    handlers_before: dict[str, dict[str, str]]
    handlers_after: dict[str, dict[str, str]]

    @property
    def equal(self) -> bool:
        same_handlers = self.handlers_before == self.handlers_after
        return not (self.added or self.removed or self.changed) and same_handlers

    def lines(self, limit: int = 200) -> list[str]:
        out: list[str] = []
        for path, e in sorted(self.added.items()):
            out.append(f"+ {path}: {e.describe()}")
        for path, e in sorted(self.removed.items()):
            out.append(f"- {path}: {e.describe()}")
        for path, (a, b) in sorted(self.changed.items()):
            def show(key: str, value: Any) -> str:
                return f"{value:04o}" if key == "mode" else str(value)

            fields = [f"{k} {show(k, getattr(a, k))} -> {show(k, getattr(b, k))}" for k in
                      ("kind", "mode", "uid", "gid", "size", "sha256", "target") if getattr(a, k) != getattr(b, k)]
            out.append(f"~ {path}: " + ", ".join(fields))
        if self.handlers_before != self.handlers_after:
            for name in sorted(set(self.handlers_before) | set(self.handlers_after)):
                old, new = self.handlers_before.get(name), self.handlers_after.get(name)
                if old != new:
                    out.append(f"~ handler {name}: {old} -> {new}")
        for _path, text in sorted(self.config_diffs.items()):
            out.extend(f"  {line}" for line in text.splitlines())
        return out[:limit] + ([f"... {len(out) - limit} more lines"] if len(out) > limit else [])

    def to_json(self) -> dict[str, Any]:
        return {"equal": self.equal, "added": {p: asdict(e) for p, e in sorted(self.added.items())},
                "removed": {p: asdict(e) for p, e in sorted(self.removed.items())},
                "changed": {p: {"before": asdict(a), "after": asdict(b)}
                            for p, (a, b) in sorted(self.changed.items())},
                "config_diffs": self.config_diffs, "handlers_before": self.handlers_before,
                "handlers_after": self.handlers_after}


def diff_states(before: State, after: State) -> StateDiff:
    added = {p: e for p, e in after.entries.items() if p not in before.entries}
    removed = {p: e for p, e in before.entries.items() if p not in after.entries}
    changed = {p: (before.entries[p], e) for p, e in after.entries.items()
               if p in before.entries and before.entries[p] != e}
    config_diffs: dict[str, str] = {}
    for path in sorted(set(before.configs) | set(after.configs)):
        a, b = before.configs.get(path), after.configs.get(path)
        if a != b and (a is not None or b is not None):
            config_diffs[path] = "".join(difflib.unified_diff(
                (a or "").splitlines(keepends=True), (b or "").splitlines(keepends=True),
                fromfile=f"before:{path}" if a is not None else "/dev/null",
                tofile=f"after:{path}" if b is not None else "/dev/null"))
    return StateDiff(added, removed, changed, config_diffs, before.handlers, after.handlers)


def residue(before: State, after: State) -> dict[str, Entry]:
    """Paths present after a rollback that were not there before: what the candidate left behind."""
    return {p: e for p, e in after.entries.items() if p not in before.entries}
