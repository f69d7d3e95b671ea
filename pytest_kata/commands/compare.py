"""``pytest-kata compare LABEL=VERDICT.json ...``: several verdicts side by side (e.g. two releases)."""

from __future__ import annotations

import argparse
import json

from pytest_kata.errors import KataError
from pytest_kata.verdict import side_by_side


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="print several verdict JSONs side by side",
                       description="Each check's status per verdict, then every blocking result with its "
                                   "advisory and the effect it observed.")
    p.add_argument("verdicts", nargs="+", metavar="[LABEL=]VERDICT_JSON",
                   help="a verdict written by --kata-report, optionally labelled (default label: the "
                        "candidate's version)")
    p.set_defaults(func=_compare)


def _compare(args: argparse.Namespace) -> int:
    loaded = []
    for spec in args.verdicts:
        label, _, path = spec.rpartition("=")
        try:
            with open(path, encoding="utf-8") as fh:
                doc = json.load(fh)
        except OSError as exc:
            raise KataError(f"cannot read: {exc.strerror or exc}", path=path) from None
        except ValueError as exc:
            raise KataError(f"not a verdict JSON: {exc}", path=path) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            raise KataError("not a verdict JSON (no results list)", path=path)
        loaded.append((label or str((doc.get("candidate") or {}).get("version") or path), doc))
    print(side_by_side(loaded))
    return 0
