"""``pytest-kata images``: build, list and compare guest (and host) images from ``vm-images/`` recipes.

    pytest-kata images build guest-minimal [--force]     # rebuild a hardened guest image from Debian packages
    pytest-kata images list                              # recipes, cache entries, which one is current
    pytest-kata images prune [--dry-run]                 # drop cache entries that are no longer current
    pytest-kata images compare guest-baseline guest-minimal   # attack-surface table (pytest_kata.images.surface)
    pytest-kata images rebuild-and-scan guest-minimal --feed F  # the scheduled patch/scan job

Builds are cached by content hash (recipe + resolved package versions + kernel + guest files), so a second
``build`` returns at once unless ``--force`` or a package update changed the key.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError, check_output_file
from pytest_kata.hosts.image import build_host_image
from pytest_kata.images import surface
from pytest_kata.images.guest import (
    build_guest,
    find_cached,
    guest_key,
    host_kernel,
    list_recipes,
    load_recipe,
    prune_cache,
    recipes_dir,
    resolve_versions,
)
from pytest_kata.images.pipeline import format_run, rebuild_and_scan
from pytest_kata.progress import step


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("images", help="build, list and compare guest/host images (vm-images/ recipes)",
                       description="Guest images are built with mmdebstrap into a raw partitioned ext4 disk and "
                                   "an initrd, like Kata's osbuilder, cached by content hash.")
    isub = p.add_subparsers(dest="images_command", metavar="ACTION")

    b = isub.add_parser("build", help="build images (cached): guest-reference, guest-minimal, guest-baseline, host")
    b.add_argument("names", nargs="+", metavar="NAME", help="guest-<recipe> (or just <recipe>), or host")
    b.add_argument("--force", action="store_true", help="rebuild even when the cache has this exact build")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.set_defaults(func=_build)

    ls = isub.add_parser("list", help="list recipes and cached builds (current = matches today's packages)")
    ls.add_argument("--json", action="store_true", help="print as JSON")
    ls.set_defaults(func=_list)

    pr = isub.add_parser("prune", help="delete cached guest builds that are not current (and old reference "
                                       "bundles)")
    pr.add_argument("--dry-run", action="store_true", help="only print what would be removed")
    pr.set_defaults(func=_prune)

    c = isub.add_parser("compare", help="compare the attack surface of two images (table; --budget gates)")
    surface.add_arguments(c)
    c.set_defaults(func=surface.compare_command)

    r = isub.add_parser("rebuild-and-scan", help="scheduled job: rebuild a guest image if its packages changed, "
                                                 "scan it, fail on NEW findings at or above --fail-on",
                        description="Triggers: a schedule, a new feed, new base packages. See "
                                    "vm-images/guest/README.md (the directory `pytest-kata paths` prints).")
    r.add_argument("name", metavar="NAME", help="guest recipe, e.g. guest-minimal")
    r.add_argument("--feed", action="append", required=True, metavar="FEED", help="feed file or directory (repeat)")
    r.add_argument("--fail-on", default="high", choices=("info", "low", "medium", "high", "critical"),
                   help="exit 1 when a new finding is ranked at or above this (default: high)")
    r.add_argument("--state", type=Path, metavar="FILE",
                   help="where the previous run's findings are kept (default: in the cache directory)")
    r.add_argument("--sbom", metavar="FILE", help="also write a CycloneDX SBOM with the vulnerabilities")
    r.add_argument("--force", action="store_true", help="rebuild even when the packages did not change")
    r.add_argument("--json", action="store_true", help="print the run as JSON")
    r.set_defaults(func=_rebuild_and_scan)

    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _rebuild_and_scan(args: argparse.Namespace) -> int:
    for value, flag in ((args.state, "--state"), (args.sbom, "--sbom")):
        if value:
            check_output_file(value, flag)
    run = rebuild_and_scan(args.name, args.feed, fail_on=args.fail_on, state=args.state, force=args.force,
                           sbom=args.sbom)
    print(json.dumps(run.to_json(), indent=2) if args.json else format_run(run))
    return 1 if run.gate else 0


def _is_host(name: str) -> bool:
    return name == "host" or name.startswith("host-")


def _build(args: argparse.Namespace) -> int:
    for name in args.names:  # every name checked before anything is built
        if not _is_host(name):
            load_recipe(name)
    results: list[dict[str, Any]] = []
    for n, name in enumerate(args.names, start=1):
        step("image", f"[{n}/{len(args.names)}] {name}")
        start = time.monotonic()
        if _is_host(name):
            host = build_host_image(force=args.force)
            results.append({"name": "host", "key": host.image.parent.name, "image": str(host.image),
                            "initrd": str(host.initrd or ""), "kernel": str(host.kernel),
                            "seconds": round(time.monotonic() - start, 1)})
            continue
        guest = build_guest(name, force=args.force)
        results.append({"name": f"guest-{guest.name}", "key": guest.key, "built": guest.built,
                        "image": str(guest.image or ""), "initrd": str(guest.initrd or ""),
                        "osbuilder": str(guest.osbuilder), "packages": len(guest.packages),
                        "seconds": round(time.monotonic() - start, 1)})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for r in results:
        state = "built" if r.get("built") else "cached" if "built" in r else ""
        print(f"{r['name']:<18} {state:<6} {r['seconds']:>6.1f}s  key {r.get('key', '-')}")
        for kind in ("image", "initrd", "kernel", "osbuilder"):
            if r.get(kind):
                print(f"  {kind:<9} {r[kind]}  ({_size(Path(str(r[kind])))})")
    return 0


def _size(path: Path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    return f"{size / 1e6:.1f} MB"


def _list(args: argparse.Namespace) -> int:
    rows = []
    kernel = host_kernel()
    for name in list_recipes():
        recipe = load_recipe(name)
        current: str | None = None
        error: str | None = None
        try:
            current = guest_key(recipe, resolve_versions(recipe), kernel)
        except KataError as exc:
            error = str(exc)
        entries = []
        for entry in find_cached(name):
            info = json.loads((entry / "guest.json").read_text())
            size = sum(p.stat().st_size for p in entry.iterdir() if p.is_file())
            entries.append({"key": info["key"], "current": info["key"] == current, "path": str(entry),
                            "size_mb": round(size / 1e6, 1), "packages": len(info.get("packages", {}))})
        rows.append({"name": f"guest-{name}", "recipe": str(recipe.path),
                     "description": recipe.settings["description"], "current_key": current, "error": error,
                     "cached": entries})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    host_recipe = recipes_dir().parent / "host" / "recipe.toml"
    if host_recipe.exists():
        print(f"host recipe {host_recipe} (pytest-kata images build host; cached under host/ in the cache)")
    print(f"guest recipes in {recipes_dir()}:")
    for row in rows:
        print(f"  {row['name']:<16} {row['description']}")
        if row["error"]:
            print(f"    error: {row['error']}")
        if not row["cached"]:
            print("    not built (pytest-kata images build " + row["name"] + ")")
        for e in row["cached"]:
            mark = "current" if e["current"] else "stale  "
            print(f"    {mark} {e['key']}  {e['size_mb']:>7.1f} MB  {e['packages']:>4} pkgs  {e['path']}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    removed = prune_cache(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path in removed:
        print(f"{verb} {path}")
    print(f"{verb} {len(removed)} cache entr{'y' if len(removed) == 1 else 'ies'}")
    return 0
