"""``pytest-kata``: the command line over the library. Subcommands live in :mod:`pytest_kata.commands`.

Each module there defines ``register(subparsers)`` that adds its parser and sets ``func(args) -> int``.
Errors a user can cause end in one line (``pytest-kata: error: ...``) and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pytest_kata import __version__
from pytest_kata import commands as _commands
from pytest_kata.errors import KataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pytest-kata", description="Validate Kata Containers releases.")
    parser.add_argument("--version", action="version", version=f"pytest-kata {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(_commands.__path__), key=lambda m: m.name):
        if not module.name.startswith("_"):
            importlib.import_module(f"pytest_kata.commands.{module.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if "--" in argv and hasattr(args, "passthrough"):  # `run SUITE -- ARGS`: ARGS go on untouched
        cut = argv.index("--")
        args = parser.parse_args(argv[:cut])
        args.passthrough = argv[cut + 1:]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KataError as exc:
        print(f"pytest-kata: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pytest-kata: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
