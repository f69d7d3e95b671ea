"""What the inventory says: the shims and their configurations, the default shim, file classes, layouts
and permission notes."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from pytest_kata.bundle.cache import _Part
from pytest_kata.bundle.evidence import _choose_version, _filename_evidence
from pytest_kata.bundle.model import DEFAULTS_DIR, SHIM_GO, SHIM_RS, Bundle, FileEntry, ShimInfo, _resolve_in_tree
from pytest_kata.kataconfig import load_config

_HYPERVISORS = re.compile(r"^(bin/(qemu-system-[^/]+|cloud-hypervisor|firecracker|stratovirt|openvmm)"
                          r"|libexec/virtiofsd)$")
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
