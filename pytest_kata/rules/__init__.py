"""The rules engine: checks as data (TOML), evaluated over any facts, shaped by a profile and waivers.

Library code (no pytest). :mod:`pytest_kata.rules.subjects` turns a candidate (or one file) into what the
rules judge, :mod:`pytest_kata.rules.cases` into one case per (rule, subject); the suites make each case a pytest
item through :mod:`pytest_kata.plugins.rules` and ``pytest-kata rules check`` judges the same subjects.
Typical use::

    profile = load_profile("default")
    for rule in load_rules("runtime-config"):
        verdict = judge(rule, config, context_of(config), profile=profile, waivers=waivers,
                        scopes=[config.name, config.shim])
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pytest_kata.rules.engine import ABSENT, Facts, FactSource, Outcome, applicable, evaluate, run_check
from pytest_kata.rules.model import Check, Rule, load_all_rules, load_rules, rule_sets
from pytest_kata.rules.profiles import Profile, load_profile, profile_names
from pytest_kata.rules.waivers import Waiver, Waivers, apply_waiver, load_waivers


@dataclass
class Judgement:
    """A rule's outcome on one subject after profile and waivers: what a suite item records."""

    rule: Rule
    severity: str
    outcome: Outcome
    waiver: Waiver | None = None

    @property
    def status(self) -> str:
        return self.outcome.status

    def evidence(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "actual": self.outcome.actual,
            "expected": self.outcome.expected,
            "message": self.outcome.message,
            "rationale": self.rule.rationale,
            "remediation": self.rule.remediation,
            "references": list(self.rule.references),
        }
        if self.waiver is not None:
            if self.status == "error":
                out["waiver_expired"] = True
            out["waiver"] = {
                "justification": self.waiver.justification,
                "expires": str(self.waiver.expires),
                "source": self.waiver.source,
            }
        return out


def judge(
    rule: Rule,
    facts: FactSource,
    context: dict[str, Any] | None = None,
    *,
    profile: Profile,
    waivers: Waivers | None = None,
    scopes: Iterable[str] = (),
    today: dt.date | None = None,
) -> Judgement:
    """Evaluate ``rule`` on ``facts`` under ``profile``, then apply the profile's and the user's waivers."""
    severity = profile.severity_of(rule)
    on, why = profile.enabled(rule)
    if not on:
        return Judgement(rule, severity, Outcome("notapplicable", None, "", why, rule.check.fact_keys()))
    outcome = evaluate(rule, facts, context)
    scopes = list(scopes)
    waiver = (waivers.find(rule.id, scopes) if waivers else None) or profile.waivers.find(rule.id, scopes)
    judged = apply_waiver(outcome, waiver, today)
    return Judgement(rule, severity, judged, waiver if judged is not outcome else None)


__all__ = [
    "ABSENT",
    "Check",
    "FactSource",
    "Facts",
    "Judgement",
    "Outcome",
    "Profile",
    "Rule",
    "Waiver",
    "Waivers",
    "applicable",
    "apply_waiver",
    "evaluate",
    "judge",
    "load_all_rules",
    "load_profile",
    "load_rules",
    "load_waivers",
    "profile_names",
    "rule_sets",
    "run_check",
]
