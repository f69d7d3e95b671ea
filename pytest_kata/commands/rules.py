"""``pytest-kata rules``: list the shipped rules, or check a configuration/kernel config without pytest.

    pytest-kata rules list [--set runtime-config] [--profile strict]
    pytest-kata rules check /etc/kata-containers/configuration.toml [--profile P] [--waivers W] [--fail-on high]
    pytest-kata rules check /opt/kata/share/kata-containers/config-6.1.0 --kernel-cmdline "module.sig_enforce=1"

``check`` picks the rule set from the file: ``*.toml`` is a runtime configuration, anything else a kernel
config. It exits 1 when a failure or error at or above ``--fail-on`` remains, like the suite's verdict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pytest_kata.errors import ConfigError
from pytest_kata.severities import SEVERITIES, severity_rank


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
    from pytest_kata.rules import load_all_rules, load_profile

    profile = load_profile(args.profile)
    rules = load_all_rules([args.rule_set] if args.rule_set else None)
    for rule in rules:
        on, _ = profile.enabled(rule)
        flag = "" if on else f"  (off: needs {', '.join(rule.tags)})"
        print(f"{rule.id:<16} {profile.severity_of(rule):<9} {rule.set_name:<15} {rule.title}{flag}")
    return 0


def _subject(path: Path, cmdline: str | None) -> tuple[str, Any, dict[str, Any], list[str]]:
    from pytest_kata.kataconfig import load_config
    from pytest_kata.rules import Facts
    from pytest_kata.rules.kconfig import load_kconfig

    if path.is_file() and not path.read_bytes().strip():
        raise ConfigError("empty file: nothing to check", path=path)
    if path.suffix == ".toml":
        config = load_config(path)
        if not config.data.get("hypervisor"):
            raise ConfigError("no [hypervisor.<name>] table: not a Kata runtime configuration", path=path)
        context = {
            "runtime": "runtime-rs" if config.runtime_rs else "go",
            "hypervisor": config.hypervisor,
            "confidential": config.confidential,
        }
        return "runtime-config", config, context, [config.name, config.shim]
    kconfig = load_kconfig(path)
    facts = Facts({}, overlay={"kernel.cmdline": cmdline}, base=kconfig) if cmdline is not None else kconfig
    return "kernel", facts, kconfig.context, [kconfig.name]


def _check(args: argparse.Namespace) -> int:
    from pytest_kata.rules import judge, load_all_rules, load_profile, load_rules, load_waivers

    profile = load_profile(args.profile)
    waivers = load_waivers(args.waivers)
    waivers.validate(r.id for r in load_all_rules())
    rows: list[dict[str, Any]] = []
    for path in args.files:
        set_name, facts, context, scopes = _subject(path, args.kernel_cmdline)
        for rule in load_rules(set_name):
            judged = judge(rule, facts, context, profile=profile, waivers=waivers, scopes=scopes)
            rows.append(
                {
                    "file": str(path),
                    "id": rule.id,
                    "status": judged.status,
                    "severity": judged.severity,
                    "title": rule.title,
                    **judged.evidence(),
                }
            )
    blocking = [
        r
        for r in rows
        if r["status"] in ("fail", "error") and severity_rank(r["severity"]) >= severity_rank(args.fail_on)
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "results": rows,
                    "blocking": [r["id"] for r in blocking],
                    "verdict": "reject" if blocking else "accept",
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
            f"VERDICT: {'REJECT' if blocking else 'ACCEPT'} ({len(blocking)} blocking at fail-on {args.fail_on}, "
            f"profile {profile.name})"
        )
    return 1 if blocking else 0
