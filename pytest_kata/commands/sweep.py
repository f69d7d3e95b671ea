"""``pytest-kata sweep``: remove what dead runs left behind (domains, netns, links, daemons, mounts, files)."""

from __future__ import annotations

import argparse

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.sweep import sweep


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="remove leftovers of dead pytest-kata runs (every run also does this at start)",
                       description="Finds libvirt domains, network namespaces, links, daemons, qemu processes, "
                                   "mounts and scratch files labelled with a run id (kt-xxxxxxxx) whose run is "
                                   "no longer alive, and removes them. Resources of live runs are left alone.")
    p.add_argument("--all", action="store_true",
                   help="also remove resources of runs that are still alive (stop every pytest-kata run first)")
    p.add_argument("--run", metavar="RUN_ID", help="only this run (kt-xxxxxxxx), also one kept by "
                   "--kata-keep-on-failure; with --all even if it is alive")
    p.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
    p.set_defaults(func=_sweep)


def _sweep(args: argparse.Namespace) -> int:
    if args.run and not runid.RUN_ID_RE.fullmatch(args.run):
        raise KataError(f"not a run id: {args.run!r}", path="--run", hint="run ids look like kt-1a2b3c4d")
    report = sweep(dead_only=not args.all, run_id=args.run, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for line in report.removed:
        print(f"{verb} {line}")
    for run in report.live:
        print(f"kept {run}: the run is alive (use --all to remove it anyway)")
    for run in report.kept:
        print(f"kept {run}: kept for inspection by --kata-keep-on-failure (remove it with --run {run})")
    for line in report.errors:
        print(f"ERROR {line}")
    print(report.summary())
    return 1 if report.errors else 0
