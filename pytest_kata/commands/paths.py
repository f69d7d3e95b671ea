"""``pytest-kata paths`` and ``pytest-kata run``: find and run the shipped suites from any directory."""

from __future__ import annotations

import argparse
import sys

from pytest_kata.resources import DATA_DIR, cache_dir, suites_dir, vm_images_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paths", help="print where the suites, rule data, image recipes and cache are")
    p.add_argument("what", nargs="?", choices=("suites", "data", "vm-images", "cache"))
    p.set_defaults(func=_paths)
    r = sub.add_parser("run", help="run the shipped suites with pytest: pytest-kata run [SUITE...] -- [PYTEST ARGS]",
                       description="Runs `pytest <suites>/<SUITE>...` with the rest of the arguments, so that "
                                   "an installed pytest-kata works from any directory.")
    r.add_argument("suites", nargs="*", help="suite names (hardening, advisories, isolation, ...); default: all")
    r.add_argument("pytest_args", nargs=argparse.REMAINDER)
    r.set_defaults(func=_run)


def _paths(args: argparse.Namespace) -> int:
    table = {"suites": suites_dir(), "data": DATA_DIR, "vm-images": vm_images_dir(), "cache": cache_dir()}
    if args.what:
        print(table[args.what])
    else:
        for k, v in table.items():
            print(f"{k:<10} {v}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import pytest

    from pytest_kata.errors import KataError

    base = suites_dir()
    targets = []
    for name in args.suites:
        if name.startswith("-"):
            args.pytest_args.insert(0, name)
            continue
        path = base / name
        if not path.exists():
            known = ", ".join(sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("_")))
            raise KataError(f"no suite {name!r}; known suites: {known}", path=base)
        targets.append(str(path))
    extra = [a for a in args.pytest_args if a != "--"]
    return int(pytest.main([*(targets or [str(base)]), "-p", "no:cacheprovider", *extra]))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
