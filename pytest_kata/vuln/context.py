"""Rank findings for the Kata guest: what actually runs there, and what reaches it.

A Kata guest is not a general-purpose host: PID 1 is the agent (or systemd), which runs a handful of tools
(iptables-save/-restore, mkfs.ext4, cryptsetup, modprobe), plus chronyd/dbus in systemd guests. Containers run
from their own image layers, not from the guest rootfs. So a finding on a package whose files are run by
those processes, or loaded by them (ELF ``DT_NEEDED``, read with pyelftools), keeps its severity; one on a
package nothing runs is ranked ``low`` ("present, not run"). Every finding keeps its raw severity and the
reasons, so no downgrade is silent (shared/reference/vuln-and-advisories.md b6).
"""

from __future__ import annotations

import io
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from pytest_kata.images.packages import InstalledPackage
from pytest_kata.images.read import RootView
from pytest_kata.severities import SEVERITIES
from pytest_kata.vuln.match import Finding

# Tools the agent runs (src/agent/src/rpc.rs, storage handlers, kernel module loading).
AGENT_TOOLS = ("iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore", "iptables",
               "ip6tables", "iptables-nft", "iptables-legacy", "xtables-nft-multi", "xtables-legacy-multi",
               "mkfs.ext4", "mke2fs", "cryptsetup", "veritysetup", "modprobe", "kmod")
SYSTEMD_EXTRAS = ("systemd", "systemd-journald", "systemd-udevd", "udevadm", "chronyd", "dbus-daemon")
LIB_DIRS = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
EXEC_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/lib/systemd", "/lib/systemd")


@dataclass
class GuestProcesses:
    """What runs in the guest (real paths) and which shared libraries they load."""

    executed: dict[str, str] = field(default_factory=dict)  # path -> who runs it
    loaded: dict[str, str] = field(default_factory=dict)  # library path -> the executable loading it
    notes: list[str] = field(default_factory=list)
    elf_readable: bool = True


def guest_processes(root: RootView | None, init_kind: str | None, init_target: str | None,
                    services: list[str] | None = None) -> GuestProcesses:
    gp = GuestProcesses()
    if root is None:
        gp.elf_readable = False
        gp.notes.append("no image given (status file only): reachability is judged from package names")
        return gp
    if init_target:
        gp.executed[init_target] = "PID 1"
    names = list(AGENT_TOOLS) + (list(SYSTEMD_EXTRAS) if init_kind == "systemd" else [])
    for name in names:
        for d in EXEC_DIRS:
            real = root.resolve(posixpath.join(d, name))
            entry = root.entries().get(real or "")
            if entry is not None and entry.executable:
                gp.executed.setdefault(real, "the agent" if name in AGENT_TOOLS else "systemd")  # type: ignore[arg-type]
                break
    if init_kind == "systemd":
        for unit in services or []:
            for d in ("/etc/systemd/system", "/usr/lib/systemd/system", "/lib/systemd/system"):
                text = root.read_text(posixpath.join(d, unit))
                if text:
                    for exe in re.findall(r"^Exec(?:Start|StartPre)=[-@!+:]*(\S+)", text, re.M):
                        real = root.resolve(exe)
                        if real:
                            gp.executed.setdefault(real, f"{unit}")
                    break
    # interpreters of scripts (a placeholder agent written in sh runs /bin/sh)
    contents = root.read_many(list(gp.executed))
    for path, data in list(contents.items()):
        if data.startswith(b"#!"):
            interp = data[2:].split(b"\n", 1)[0].strip().split(b" ")[0].decode("utf-8", "replace")
            real = root.resolve(interp)
            if real and real not in gp.executed:
                gp.executed[real] = f"interpreter of {path}"
                contents.update(root.read_many([real]))
    _add_libraries(root, gp, contents)
    return gp


def _add_libraries(root: RootView, gp: GuestProcesses, contents: dict[str, bytes]) -> None:
    from elftools.common.exceptions import ELFError
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    queue = [(path, data, path) for path, data in contents.items()]
    seen: set[str] = set(contents)
    while queue:
        path, data, origin = queue.pop()
        if not data.startswith(b"\x7fELF"):
            continue
        try:
            elf = ELFFile(io.BytesIO(data))
            needed = [str(t.needed) for s in elf.iter_sections() if isinstance(s, DynamicSection)  # type: ignore[attr-defined]
                      for t in s.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
        except (ELFError, ValueError, OSError):
            continue
        if path == origin and not needed and path in gp.executed and gp.executed[path] == "PID 1":
            gp.notes.append(f"{path} (PID 1) is statically linked: library CVEs do not affect it")
        for lib in needed:
            for d in LIB_DIRS:
                real = root.resolve(posixpath.join(d, lib))
                if real and (root.entries().get(real) or None) is not None:
                    if real not in gp.loaded:
                        gp.loaded[real] = origin
                    if real not in seen:
                        seen.add(real)
                        body = root.read_many([real]).get(real, b"")
                        queue.append((real, body, origin))
                    break


def _file_owner_map(root: RootView | None, packages: list[InstalledPackage]) -> dict[str, str]:
    """Real path -> owning package, through merged-/usr symlinks."""
    owners: dict[str, str] = {}
    for pkg in packages:
        for f in pkg.files:
            owners.setdefault(f, pkg.name)
            if root is not None:
                d = root.resolve(posixpath.dirname(f))
                if d:
                    owners.setdefault(posixpath.join(d, posixpath.basename(f)), pkg.name)
    return owners


def _is_file(root: RootView, path: str) -> bool:
    real = root.resolve(path)
    entry = root.entries().get(real or "")
    return entry is not None and entry.kind == "file"


def lower(severity: str, levels: int = 1) -> str:
    idx = SEVERITIES.index(severity) if severity in SEVERITIES else SEVERITIES.index("medium")
    return SEVERITIES[max(0, idx - levels)]


def rank_findings(findings: list[Finding], packages: list[InstalledPackage], root: RootView | None,
                  facts: Any | None = None, *, trust: str = "kata") -> list[str]:
    """Set ``rank``, ``reachability`` and ``reasons`` on every finding; returns scan-level notes."""
    init_kind = facts.get("init.kind") if facts is not None else None
    init_target = facts.get("init.target") if facts is not None else None
    services = facts.get("services.enabled", []) if facts is not None else []
    listeners = facts.get("image.network_daemons", []) if facts is not None else []
    gp = guest_processes(root, init_kind, init_target, services)
    owners = _file_owner_map(root, packages)
    runs: dict[str, list[str]] = {}
    loads: dict[str, list[str]] = {}
    for path, who in gp.executed.items():
        if path in owners:
            runs.setdefault(owners[path], []).append(f"{path} (run by {who})")
    for path, exe in gp.loaded.items():
        if path in owners:
            loads.setdefault(owners[path], []).append(f"{posixpath.basename(path)} (loaded by {exe})")
    by_name = {p.name: p for p in packages}
    notes = list(gp.notes)
    for f in findings:
        base = f.severity if f.severity in SEVERITIES else "medium"
        reasons = list(f.reasons)
        if f.severity not in SEVERITIES:
            reasons.append("the feed gives no severity: medium assumed")
        pkg = by_name.get(f.package)
        files = pkg.files if pkg else []
        if f.package in runs:
            f.reachability = "runs-in-guest"
            reasons.append("runs in the guest: " + ", ".join(runs[f.package][:3]))
            rank = base
        elif f.package in loads:
            f.reachability = "loaded-by-guest-process"
            reasons.append("loaded in the guest: " + ", ".join(loads[f.package][:3]))
            rank = base
        elif root is not None and gp.elf_readable and any(_is_file(root, x) for x in files):
            f.reachability = "present-not-run"
            reasons.append("present in the image, but neither the agent, the tools it calls nor a "
                           "service runs or loads it")
            rank = "low" if SEVERITIES.index(base) > SEVERITIES.index("low") else base
        else:
            by_list = [x for x in files if posixpath.basename(x) in AGENT_TOOLS]
            if by_list:
                f.reachability = "runs-in-guest"
                reasons.append(f"provides {by_list[0]}, which the agent runs (from the package's file list)")
            else:
                f.reachability = "unknown"
                reasons.append("the package's files are not in the scanned tree: cannot tell whether a guest "
                               "process uses it; severity kept")
            rank = base
        if f.scope == "remote" and not listeners and f.reachability != "present-not-run":
            reasons.append("remote-scope issue, but the guest runs no network daemon (the agent listens on "
                           "vsock only): lowered one level")
            rank = lower(rank)
        if not f.fix_available:
            reasons.append("no fixed version yet")
        if f.nodsa:
            reasons.append(f"Debian: no DSA ({f.nodsa})")
        if f.status == "undetermined":
            reasons.append("version comparison undetermined: kept for review")
        if trust == "coco" and f.package in ("cryptsetup", "cryptsetup-bin", "libcryptsetup12"):
            rank = max(rank, "high", key=SEVERITIES.index)
            reasons.append("confidential guest: cryptsetup parses host-supplied input")
        f.rank = rank
        f.reasons = reasons
    return notes
