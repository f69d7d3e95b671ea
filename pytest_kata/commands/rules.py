"""``pytest-kata rules``: list the shipped rules, or check a configuration/kernel config without pytest.

    pytest-kata rules list [--set runtime-config] [--profile strict]
    pytest-kata rules check /etc/kata-containers/configuration.toml [--profile P] [--waivers W] [--fail-on high]
    pytest-kata rules check /opt/kata/share/kata-containers/config-6.1.0 --kernel-cmdline "module.sig_enforce=1"

``check`` picks the rule set from the file: ``*.toml`` is a runtime configuration, anything else a kernel
config. The decision is the suites' verdict (:class:`~pytest_kata.verdict.Verdict`): it exits 1 when a failure or
error at or above ``--fail-on`` remains, or an expired waiver's error at any severity.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pytest_kata.rules import load_all_rules, load_profile, load_rules, load_waivers
from pytest_kata.rules.subjects import file_subject, judge_subject
from pytest_kata.severities import SEVERITIES, severity_rank
from pytest_kata.verdict import Result, Verdict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rules", help="list hardening rules, or check a configuration file against them")
    actions = p.add_subparsers(dest="rules_action", required=True)
    lister = actions.add_parser("list", help="the rules with their id, severity under a profile and title")
    lister.add_argument("--set", dest="rule_set", help="one rule set (runtime-config, kernel, image, ...)")
    lister.add_argument("--profile", default="default", help="profile deciding severities and opt-in rules")
    lister.set_defaults(func=_list)
    check = actions.add_parser("check", help="evaluate a configuration.toml or a kernel config-* file")
    check.add_argument("files", nargs="+", type=Path)
    check.add_argument("--profile", default="default")
    check.add_argument("--waivers", type=Path, help="TOML waivers file")
    check.add_argument("--fail-on", default="high", choices=SEVERITIES)
    check.add_argument("--kernel-cmdline", help="guest command line for kernel rules (kernel_params)")
    check.add_argument("--all", action="store_true", help="also show passing and not-applicable rules")
    check.add_argument("--json", action="store_true", help="print JSON instead of a table")
    check.set_defaults(func=_check)


def _list(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    rules = load_all_rules([args.rule_set] if args.rule_set else None)
    for rule in rules:
        on, _ = profile.enabled(rule)
        flag = "" if on else f"  (off: needs {', '.join(rule.tags)})"
        print(f"{rule.id:<16} {profile.severity_of(rule):<9} {rule.set_name:<15} {rule.title}{flag}")
    return 0


def _check(args: argparse.Namespace) -> int:
    profile = load_profile(args.profile)
    waivers = load_waivers(args.waivers)
    waivers.validate(r.id for r in load_all_rules())
    rows: list[dict[str, Any]] = []
    results: list[Result] = []
    for path in args.files:
        set_name, subject = file_subject(path, args.kernel_cmdline)
        for rule in load_rules(set_name):
            judged = judge_subject(rule, subject, profile, waivers)
            row = {"file": str(path), "id": rule.id, "status": judged.status, "severity": judged.severity,
                   "title": rule.title, **judged.evidence()}
            rows.append(row)
            results.append(Result(rule.id, "rules", judged.status, judged.severity, rule.title, row))
    verdict = Verdict({"path": ", ".join(map(str, args.files))}, results, args.fail_on)
    blocking = verdict.blocking
    if args.json:
        print(
            json.dumps(
                {
                    "results": rows,
                    "blocking": [r.id for r in blocking],
                    "verdict": verdict.verdict,
                },
                indent=1,
                default=str,
            )
        )
    else:
        order = {"error": 0, "fail": 1, "waived": 2, "pass": 3, "notapplicable": 4}
        for r in sorted(rows, key=lambda r: (order[r["status"]], -severity_rank(r["severity"]), r["id"])):
            if args.all or r["status"] in ("fail", "error", "waived"):
                print(f"{r['status']:<13} {r['severity']:<9} {r['id']:<16} {Path(r['file']).name}: {r['message']}")
        print(
            f"VERDICT: {verdict.verdict.upper()} ({len(blocking)} blocking at fail-on {args.fail_on}, "
            f"profile {profile.name})"
        )
    return 1 if verdict.verdict == "reject" else 0
