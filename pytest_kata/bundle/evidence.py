"""Where a bundle's release version comes from (VERSION, versions.yaml, the binaries' ``--version``, the
tarball's name), strongest first."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_kata.bundle.cache import _Part
from pytest_kata.bundle.model import KATA_RUNTIME, SHIM_GO, SHIM_RS, _norm_version, _resolve_in_tree
from pytest_kata.errors import BundleError

VERSION_TIMEOUT = 10.0
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
