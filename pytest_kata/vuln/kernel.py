"""Guest-kernel CVEs from Linux CNA records (CVE JSON 5), matched by version and weighted by the guest config.

Version: the record's non-git ``affected`` block (``defaultStatus: affected``, ``custom`` ranges such as
``6.6.17 <= v <= 6.6.*`` unaffected, ``0 <= v < 6.5`` unaffected, ``original_commit_for_fix``) is evaluated;
git ranges need the kernel tree and are not. Caveat (in the record itself): when a bug was *introduced* into
an old stable branch by a backport, ``0 < 6.5 unaffected`` is wrong for that branch; the per-branch fixed
versions are kept as evidence.

Config: the record's ``programFiles`` are mapped to the Kconfig symbols that build them (a Kbuild map, kernel
version specific) and looked up in the guest's ``.config`` (or Kata's fragments): ``built`` (=y/=m),
``not-built`` (downgraded to info), ``unknown`` (no map entry: the rank is kept).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import FeedError, KataError
from pytest_kata.vuln.feeds import KernelRecord
from pytest_kata.vuln.versions import Undetermined, parse

DEFAULT_KBUILD_MAP = Path(__file__).with_name("kbuild-file-to-kconfig.json")
# Config switches that widen what an unprivileged container process can reach in the guest kernel (b6.6.3).
REACH_MODIFIERS: dict[str, tuple[str, str]] = {
    "net/": ("CONFIG_USER_NS", "unprivileged user namespaces (CONFIG_USER_NS=y) give a container process "
             "CAP_NET_ADMIN in its own network namespace"),
    "kernel/bpf/": ("CONFIG_BPF_SYSCALL", "the bpf() syscall is built (CONFIG_BPF_SYSCALL=y; Kata needs it for "
                    "cgroup device control)"),
    "io_uring/": ("CONFIG_IO_URING", "io_uring is built (CONFIG_IO_URING=y)"),
}


@dataclass
class KernelFinding:
    id: str
    kernel: str
    version_status: str  # affected | unaffected | unknown
    kconfig: list[str]
    config_reachability: str  # built | not-built | unknown
    rank: str
    title: str = ""
    program_files: list[str] = field(default_factory=list)
    fixed_in_branch: str | None = None
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_kconfig(paths: list[str | Path]) -> dict[str, str]:
    """``CONFIG_X=y|m|"str"|n`` from a .config or fragments (later files win); ``# CONFIG_X is not set`` -> n."""
    values: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise KataError(f"cannot read kernel config: {exc.strerror}", path=p) from None
        for line in text.splitlines():
            line = line.strip()
            m = re.fullmatch(r"# (CONFIG_\w+) is not set", line)
            if m:
                values[m.group(1)] = "n"
                continue
            if line.startswith("CONFIG_") and "=" in line:
                key, _, value = line.partition("=")
                values[key] = value.strip().strip('"')
    return values


def load_kbuild_map(path: str | Path | None = None) -> dict[str, list[str]]:
    p = Path(path) if path else DEFAULT_KBUILD_MAP
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        mapping = data["map"] if isinstance(data, dict) and "map" in data else data
        return {str(k): [str(s) for s in v] for k, v in mapping.items()}
    except FileNotFoundError:
        raise KataError("no such Kbuild map file", path=p) from None
    except (ValueError, TypeError, AttributeError, KeyError):
        raise KataError("malformed Kbuild map: expected {\"map\": {\"path/file.c\": [\"CONFIG_X\"]}}", path=p) \
            from None


def normalise_kernel_version(text: str) -> str:
    """``v6.18.35`` / ``6.1.192-2`` / ``6.6.10-kata`` -> ``6.18.35`` / ``6.1.192`` / ``6.6.10``."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?(?:-?(rc\d+))?", text)
    if not m:
        raise KataError(f"not a kernel version: {text!r}", hint="pass X.Y.Z, e.g. 6.18.35")
    base = ".".join(g for g in m.groups()[:3] if g)
    return base + (m.group(4) or "")


def _series(version: str) -> tuple[int, int]:
    parts = re.findall(r"\d+", version)
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def version_status(record: KernelRecord, kernel: str) -> tuple[str, str | None, str]:
    """(affected|unaffected|unknown, the fixed version of the kernel's branch if listed, why)."""
    v = parse("kernel", kernel)
    evaluated = False
    branch_fix: str | None = None
    for block in record.affected:
        versions = block.get("versions") or []
        if not versions or all(e.get("versionType") == "git" for e in versions):
            continue
        evaluated = True
        default = block.get("defaultStatus", "unknown")
        matched_unaffected = matched_affected = None
        for e in versions:
            if e.get("versionType") == "git":
                continue
            start = str(e.get("version", "0"))
            try:
                lo_ok = start == "0" or v >= parse("kernel", start)
                if "lessThan" in e:
                    hi = str(e["lessThan"])
                    inside = lo_ok and (hi == "*" or v < parse("kernel", hi))
                elif "lessThanOrEqual" in e:
                    hi = str(e["lessThanOrEqual"])
                    if hi == "*":
                        inside = lo_ok
                    elif hi.endswith(".*"):
                        inside = lo_ok and _series(kernel) == _series(hi[:-2])
                    else:
                        inside = lo_ok and v <= parse("kernel", hi)
                else:
                    inside = v == parse("kernel", start)
            except Undetermined as exc:
                return "unknown", None, str(exc)
            if str(e.get("lessThanOrEqual", "")).endswith(".*") and _series(kernel) == _series(start) and \
                    e.get("status") == "unaffected":
                branch_fix = start
            if inside:
                if e.get("status") == "unaffected":
                    matched_unaffected = e
                else:
                    matched_affected = e
        if matched_unaffected is not None:
            return "unaffected", branch_fix, f"{kernel} is in the unaffected range {_range_text(matched_unaffected)}"
        if matched_affected is not None:
            return "affected", branch_fix, f"{kernel} is in the affected range {_range_text(matched_affected)}"
        if default in ("affected", "unaffected"):
            why = f"{kernel} matches no range; the record's default is {default}"
            if branch_fix is None and default == "affected":
                why += " (no fix listed for the branch)"
            return default, branch_fix, why
    if not evaluated:
        return "unknown", None, "the record has only git ranges (needs the kernel tree)"
    return "unknown", branch_fix, "no decision in the record"


def _range_text(e: dict[str, Any]) -> str:
    if "lessThan" in e:
        return f"{e.get('version')} <= v < {e['lessThan']}"
    if "lessThanOrEqual" in e:
        return f"{e.get('version')} <= v <= {e['lessThanOrEqual']}"
    return f"= {e.get('version')}"


def config_reachability(record: KernelRecord, kconfig: dict[str, str] | None,
                        kbuild_map: dict[str, list[str]]) -> tuple[str, list[str], list[str]]:
    """(built|not-built|unknown, Kconfig symbols, reasons)."""
    symbols = sorted({s for f in record.program_files for s in kbuild_map.get(f, [])})
    unmapped = [f for f in record.program_files if f not in kbuild_map]
    if not symbols:
        return "unknown", [], [f"no Kbuild map entry for {', '.join(record.program_files) or 'the fixed files'}"]
    if kconfig is None:
        return "unknown", symbols, ["no guest kernel config given"]
    built = [s for s in symbols if kconfig.get(s) in ("y", "m")]
    reasons = []
    if built:
        shown = ", ".join(f"{s}={kconfig[s]}" for s in built)
        reasons.append(f"the affected code is built in the guest kernel: {shown}")
        for prefix, (sym, text) in REACH_MODIFIERS.items():
            if any(f.startswith(prefix) for f in record.program_files) and kconfig.get(sym) == "y":
                reasons.append(text)
        return "built", symbols, reasons
    if unmapped:
        return "unknown", symbols, [f"{', '.join(unmapped)} not in the Kbuild map"]
    shown = ", ".join(f"{s}={kconfig.get(s, 'not set')}" for s in symbols)
    reasons.append(f"not built in the guest kernel: {shown}")
    return "not-built", symbols, reasons


def evaluate_kernel(records: list[KernelRecord], kernel_version: str, kconfig: dict[str, str] | None,
                    kbuild_map: dict[str, list[str]] | None = None, *, include_unaffected: bool = False
                    ) -> list[KernelFinding]:
    kernel = normalise_kernel_version(kernel_version)
    kmap = kbuild_map if kbuild_map is not None else load_kbuild_map()
    out = []
    for rec in records:
        status, branch_fix, why = version_status(rec, kernel)
        reach, symbols, reasons = config_reachability(rec, kconfig, kmap)
        if status == "unaffected" and not include_unaffected:
            continue
        rank = {"built": "high", "unknown": "medium", "not-built": "info"}[reach] if status == "affected" else \
            ("medium" if status == "unknown" else "info")
        if status == "affected" and reach == "not-built":
            reasons.append("downgraded to info: the guest kernel does not contain the code")
        out.append(KernelFinding(rec.id, kernel, status, symbols, reach, rank, rec.title, rec.program_files,
                                 branch_fix, [why, *reasons]))
    return out


def kernel_from_bundle_names(names: list[str]) -> str | None:
    """``vmlinuz-6.18.35-170`` / ``vmlinux-6.1.0-56-amd64-ref`` -> a version string, if any."""
    for name in names:
        m = re.search(r"vmlinu[xz]-(\d+\.\d+(?:\.\d+)?)", name)
        if m:
            return m.group(1)
    return None


def check_records(records: list[KernelRecord]) -> None:
    for rec in records:
        if not rec.id.startswith("CVE-"):
            raise FeedError(f"kernel record id {rec.id!r} is not a CVE id", path=rec.source)
