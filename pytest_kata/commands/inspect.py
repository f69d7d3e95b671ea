"""``pytest-kata inspect BUNDLE [BUNDLE...]``: what a candidate contains, before anything is installed.

Opens the bundle exactly as the plugin does (safely, cached by sha256), so what ``inspect`` shows is what
the suites will test. Several paths are the split 4.1 tarballs merged into one tree.
"""

from __future__ import annotations

import argparse
import json
import sys

from pytest_kata.bundle import Bundle, human_size, open_bundle


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="inventory a candidate bundle (tarballs or an /opt/kata tree)",
                       description="Open a kata-static tarball (.tar.zst/.tar.xz/.tar.gz), the split 4.1 "
                                   "tarballs together, or an /opt/kata tree, safely; print its inventory.")
    p.add_argument("bundle", nargs="+", help="tarball(s) or directory; several paths are merged")
    p.add_argument("--json", action="store_true", help="print the full inventory (every file) as JSON")
    p.add_argument("--files", action="store_true", help="also list every file with size, mode and sha256")
    p.add_argument("--no-exec", action="store_true",
                   help="never run the shim's --version (by default only an executable ELF for this machine)")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    bundle = open_bundle(args.bundle, run_binaries=not args.no_exec)
    for conflict in bundle.version_conflicts:
        print(f"pytest-kata: warning: version sources disagree: {conflict}", file=sys.stderr)
    if args.json:
        json.dump(bundle.to_json(include_files=True), sys.stdout, indent=2, sort_keys=True)
        print()
        return 0
    print(render(bundle, files=args.files))
    return 0


def render(bundle: Bundle, *, files: bool = False) -> str:
    """The human summary: the facts a reviewer checks first, then (optionally) every file."""
    lines = [f"bundle         {bundle.label}", f"sha256         {bundle.sha256}",
             f"root           {bundle.root}"]
    evidence = "; ".join(f"{k}: {v}" for k, v in bundle.version_evidence.items()) or "no version evidence"
    lines.append(f"version        {bundle.version or 'unknown'}  ({evidence})")
    for conflict in bundle.version_conflicts:
        lines.append(f"  WARNING      {conflict}")
    if bundle.component_versions:
        shown = ", ".join(f"{k.split('.')[-1]} {v}" for k, v in list(bundle.component_versions.items())[:12])
        lines.append(f"components     {shown}")
    lines.append(f"layouts        {', '.join(sorted(bundle.layouts)) or 'none recognised'}")
    lines.append(f"shims          {len(bundle.shims)} (default: {bundle.default_shim or 'none'})")
    for name, shim in bundle.shims.items():
        mark = "*" if name == bundle.default_shim else " "
        config = shim.config_path.relative_to(bundle.root)
        dropins = f" + {len(shim.config.dropins)} drop-in(s)" if shim.config.dropins else ""
        binary = shim.binary or "no shim binary"
        lines.append(f"  {mark}{name:<20} {'runtime-rs' if shim.runtime_rs else 'go':<10} "
                     f"hypervisor={shim.config.hypervisor or '?':<12} {config}{dropins}  [{binary}]")
    for title, items in (("kernels", bundle.kernels), ("kernel configs", bundle.kernel_configs),
                         ("images", bundle.images), ("initrds", bundle.initrds),
                         ("hypervisors", bundle.hypervisors)):
        lines.append(f"{title:<15}{_describe(bundle, items) if items else '-'}")
    if bundle.missing:
        lines.append("missing")
        lines.extend(f"  {component:<24} {reason}" for component, reason in sorted(bundle.missing.items()))
    for note in bundle.notes:
        lines.append(f"note           {note}")
    count = sum(1 for e in bundle.files.values() if e.kind != "dir")
    lines.append(f"files          {count} ({human_size(bundle.total_size)})")
    if files:
        for rel in sorted(bundle.files):
            e = bundle.files[rel]
            if e.kind == "dir":
                continue
            what = f"-> {e.target}" if e.kind == "symlink" else (e.sha256 or "")
            lines.append(f"  {e.mode:04o} {e.uid}:{e.gid} {e.size:>12} {rel}  {what}")
    return "\n".join(lines)


def _describe(bundle: Bundle, items: list[str]) -> str:
    out = []
    for rel in items:
        entry = bundle.files[rel]
        out.append(f"{rel} -> {entry.target}" if entry.kind == "symlink" else rel)
    return ("\n" + " " * 15).join(out)
