"""``pytest-kata paths`` and ``pytest-kata run``: find and run the shipped suites from any directory."""

from __future__ import annotations

import argparse

from pytest_kata.errors import KataError
from pytest_kata.resources import DATA_DIR, cache_dir, suites_dir, vm_images_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("paths", help="print where the suites, rule data, image recipes and cache are")
    p.add_argument("what", nargs="?", choices=("suites", "data", "vm-images", "cache"))
    p.set_defaults(func=_paths)
    r = sub.add_parser("run", help="run the shipped suites with pytest: pytest-kata run [SUITE...] -- [PYTEST ARGS]",
                       description="Runs `pytest --pyargs pytest_kata.suites.<SUITE>...` with the arguments after "
                                   "`--`, from the current directory (its pytest.ini/kata.toml apply), so that "
                                   "an installed pytest-kata works from any directory.")
    r.add_argument("suites", nargs="*", help="suite names (hardening, advisories, isolation, ...); default: all")
    r.add_argument("pytest_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    r.set_defaults(func=_run, passthrough=[])


def _paths(args: argparse.Namespace) -> int:
    table = {"suites": suites_dir(), "data": DATA_DIR, "vm-images": vm_images_dir(), "cache": cache_dir()}
    if args.what:
        print(table[args.what])
    else:
        for k, v in table.items():
            print(f"{k:<10} {v}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import pytest  # the one command that runs pytest loads it; every other command works without it

    base = suites_dir()
    known = sorted(p.name for p in base.iterdir() if (p / "__init__.py").is_file())
    targets = []
    for name in args.suites:
        if name not in known:
            raise KataError(f"no suite {name!r}; known suites: {', '.join(known)}", path=base,
                            hint="pytest arguments go after `--`")
        targets.append(f"pytest_kata.suites.{name}")
    return int(pytest.main(["--pyargs", *(targets or ["pytest_kata.suites"]), "-p", "no:cacheprovider",
                            *args.pytest_args, *args.passthrough]))
