"""Evaluate a rule against facts: applicability, precondition, check, outcome.

Facts are anything with ``.get(dotted_key, default)``: a :class:`~pytest_kata.kataconfig.KataConfig`, a
parsed kernel config, guest-image facts, or :class:`Facts` over a plain dict. The context says what the facts
describe (``runtime``, ``hypervisor``, ``confidential``, ``kernel_version``, ...) and decides applicability.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_kata.kataconfig import lookup
from pytest_kata.rules.model import Check, Rule
from pytest_kata.rules.operators import OPERATORS, describe

ABSENT: Any = object()
STATUSES = ("pass", "fail", "error", "notapplicable", "waived")


class FactSource(Protocol):
    def get(self, key: str, default: Any = ...) -> Any: ...


class Facts:
    """Facts over a dict: dotted keys address nested tables, flat keys (``CONFIG_X``) work as they are."""

    def __init__(
        self, data: dict[str, Any], *, overlay: dict[str, Any] | None = None, base: FactSource | None = None
    ) -> None:
        self.data = data
        self.overlay = overlay or {}
        self.base = base

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.overlay:
            return self.overlay[key]
        if self.base is not None:
            value = self.base.get(key, ABSENT)
            return default if value is ABSENT else value
        if key in self.data:
            return self.data[key]
        return lookup(self.data, key, default)


@dataclass
class Outcome:
    status: str
    actual: Any = None
    expected: str = ""
    message: str = ""
    keys: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "actual": self.actual,
            "expected": self.expected,
            "message": self.message,
        }


def applicable(rule: Rule, context: dict[str, Any]) -> tuple[bool, str]:
    """Does the rule apply to what the facts describe? Unknown context keys never exclude a rule."""
    for name, wanted in rule.applies.items():
        have = context.get(name)
        if have is None:
            continue
        if isinstance(wanted, str) and wanted[:1] in "<>=!":
            if not version_matches(str(have), wanted):
                return False, f"{name} {have} is not {wanted}"
        elif isinstance(wanted, list):
            if have not in wanted:
                return False, f"{name} {have!r} is not one of {wanted}"
        elif have != wanted:
            return False, f"{name} is {have!r}, the rule is for {wanted!r}"
    return True, ""


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", text)[:3])


def version_matches(version: str, spec: str) -> bool:
    """``spec`` like ``>=6.6`` or ``>=5.10,<6.9`` (comma = and)."""
    have = _version_tuple(version)
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|==|!=|>|<)\s*([\d.]+)\s*", part)
        if not m:
            return False
        want = _version_tuple(m.group(2))
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        ok = {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[m.group(1)]
        if not ok:
            return False
    return True


@dataclass
class _Leaf:
    ok: bool | None  # None: decided by the missing policy
    status: str
    actual: Any
    expected: str
    message: str


def display_key(facts: FactSource, key: str) -> str:
    """``hypervisor.*.path`` as the file spells it (``hypervisor.qemu.path``), for messages."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == "*":
            table = facts.get(".".join(parts[:i]), ABSENT) if i else ABSENT
            if isinstance(table, dict) and table:
                parts[i] = str(next(iter(table)))
    return ".".join(parts)


def _context_default(check: Check, context: dict[str, Any]) -> tuple[Any, str]:
    """The built-in default of an absent key for this subject (ABSENT when the rule names none)."""
    for name, table in check.context_default.items():
        have = context.get(name)
        if have is not None and str(have) in table:
            return table[str(have)], f"{name} {have} defaults to {_show(table[str(have)])}"
    return ABSENT, ""


def _leaf(check: Check, facts: FactSource, context: dict[str, Any] | None = None) -> _Leaf:
    assert check.key is not None and check.op is not None
    value = facts.get(check.key, ABSENT)
    key = display_key(facts, check.key)
    expected_value = check.expected
    shown = describe(check.op, expected_value) if check.expected_key is None else ""
    if check.expected_key is not None:
        expected_value = facts.get(check.expected_key, ABSENT)
        if expected_value is ABSENT:
            return _Leaf(
                None,
                "error",
                None,
                f"the value of {check.expected_key}",
                f"{check.expected_key} is not set, so {key} cannot be compared with it",
            )
        shown = describe(check.op, expected_value) + f" (the value of {display_key(facts, check.expected_key)})"
    if value is ABSENT and check.op == "absent":
        return _Leaf(True, "pass", None, shown, f"{key} is not set")
    if value is ABSENT and check.has_default:
        value = check.default
    default_note = ""
    if value is ABSENT and check.context_default:
        value, default_note = _context_default(check, context or {})
    if value is ABSENT:
        text = f"{key} is not set"
        if check.op == "exists":
            return _Leaf(False, "fail", None, shown, text)
        note = check.missing_note or f"a missing key counts as {check.missing}"
        return _Leaf(None, check.missing, None, shown, f"{text} ({note})")
    compared = check.join.join(str(v) for v in value) if check.join is not None and isinstance(value, list) else value
    try:
        ok = OPERATORS[check.op](compared, expected_value)
    except (TypeError, ValueError) as exc:
        return _Leaf(None, "error", value, shown, f"{key} = {value!r} cannot be compared: {exc}")
    if default_note:
        return _Leaf(ok, "pass" if ok else "fail", value, shown,
                     f"{key} is not set ({default_note}), expected {shown}")
    return _Leaf(ok, "pass" if ok else "fail", value, shown, f"{key} is {_show(value)}, expected {shown}")


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def run_check(check: Check, facts: FactSource, context: dict[str, Any] | None = None) -> Outcome:
    """Evaluate a check (no applicability, no waivers): pass/fail/error/notapplicable with evidence."""
    if not check.composite:
        leaf = _leaf(check, facts, context)
        return Outcome(
            leaf.status,
            leaf.actual,
            leaf.expected,
            leaf.message,
            [display_key(facts, k) for k in check.fact_keys()],
        )
    subs = [run_check(sub, facts, context) for sub in (check.all or check.any)]
    actual = {(s.keys[0] if s.keys else "?"): s.actual for s in subs}
    expected = (" and " if check.all else " or ").join(f"({s.expected})" if len(subs) > 1 else s.expected for s in subs)
    by_status = {st: [s for s in subs if s.status == st] for st in ("pass", "fail", "error", "notapplicable")}
    if len(by_status["notapplicable"]) == len(subs):
        status = "notapplicable"
    elif check.any and by_status["pass"]:
        status = "pass"
    elif by_status["error"]:
        status = "error"
    elif check.any or by_status["fail"]:
        status = "fail"
    else:
        status = "pass"
    decisive = by_status[status][:1] if (check.any and status == "pass") else by_status[status]
    message = "; ".join(s.message for s in decisive)
    return Outcome(status, actual, expected, message, [k for s in subs for k in s.keys])


def evaluate(rule: Rule, facts: FactSource, context: dict[str, Any] | None = None) -> Outcome:
    """The outcome of one rule on one set of facts (waivers: :mod:`pytest_kata.rules.waivers`)."""
    context = context or {}
    ok, why = applicable(rule, context)
    if not ok:
        return Outcome("notapplicable", None, "", f"{rule.id} does not apply: {why}", rule.check.fact_keys())
    if rule.when is not None:
        pre = run_check(rule.when, facts, context)
        if pre.status != "pass":
            return Outcome(
                "notapplicable",
                pre.actual,
                "",
                f"precondition not met: {pre.message}",
                rule.check.fact_keys(),
            )
    return run_check(rule.check, facts, context)
