"""Waivers: a user's signed-off exception to one rule, with a justification and an expiry.

File format (``--kata-waivers FILE``)::

    [[waiver]]
    rule = "KATA-CFG-010"
    justification = "pods need kernel_params for hugepages; tracked in JIRA-123"
    expires = 2027-01-31                       # a TOML date; required
    scope = ["configuration-qemu.toml"]        # optional: config file names, shim names, ...
    owner = "platform-team"                    # optional

A valid waiver turns a ``fail`` into ``waived``; an expired one turns it into a loud ``error`` so that a
forgotten exception cannot silently outlive its reason. Structural waivers shipped in a profile (the
``kata-guest`` kernel waivers) may omit ``expires``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pytest_kata.errors import ConfigError
from pytest_kata.rules.engine import Outcome
from pytest_kata.rules.model import read_toml

WAIVER_FIELDS = {"rule", "justification", "expires", "scope", "owner"}


@dataclass(frozen=True)
class Waiver:
    rule: str
    justification: str
    expires: dt.date | None
    scope: tuple[str, ...] = ()
    owner: str | None = None
    source: str = ""

    def covers(self, rule_id: str, scopes: Iterable[str]) -> bool:
        return self.rule == rule_id and (not self.scope or bool(set(self.scope) & set(scopes)))

    def expired(self, today: dt.date) -> bool:
        return self.expires is not None and self.expires < today


@dataclass
class Waivers:
    waivers: list[Waiver]

    def find(self, rule_id: str, scopes: Iterable[str] = ()) -> Waiver | None:
        """The most specific waiver for a rule here: a scoped one wins over a global one."""
        scopes = list(scopes)
        matching = [w for w in self.waivers if w.covers(rule_id, scopes)]
        matching.sort(key=lambda w: (not w.scope, w.expires or dt.date.max), reverse=False)
        return matching[0] if matching else None

    def validate(self, known_ids: Iterable[str]) -> None:
        """A waiver for a rule that does not exist is a typo that would waive nothing: say so."""
        known = set(known_ids)
        for w in self.waivers:
            if w.rule not in known:
                raise ConfigError(
                    f"waiver for unknown rule {w.rule!r} (check the id against `pytest-kata rules list`)",
                    path=w.source,
                )

    def __add__(self, other: Waivers) -> Waivers:
        return Waivers(self.waivers + other.waivers)


def parse_waivers(raw: Any, source: str, *, require_expiry: bool = True) -> Waivers:
    if raw is None:
        return Waivers([])
    if not isinstance(raw, list):
        raise ConfigError("[[waiver]] must be an array of tables", path=source)
    out: list[Waiver] = []
    for index, item in enumerate(raw):
        where = f"waiver #{index + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a table", path=source)
        rule = item.get("rule")
        if not isinstance(rule, str) or not rule:
            raise ConfigError(f"{where}: missing 'rule' (the rule id it waives)", path=source)
        where = f"waiver for {rule}"
        unknown = sorted(set(item) - WAIVER_FIELDS)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}", path=source)
        justification = item.get("justification")
        if not isinstance(justification, str) or not justification.strip():
            raise ConfigError(f"{where}: missing 'justification' (say why the risk is accepted)", path=source)
        expires = _date(item.get("expires"), where, source, require_expiry)
        scope = item.get("scope", [])
        scope = [scope] if isinstance(scope, str) else scope
        if not isinstance(scope, list) or not all(isinstance(s, str) for s in scope):
            raise ConfigError(f"{where}: scope must be a string or a list of strings", path=source)
        owner = item.get("owner")
        out.append(Waiver(rule, justification.strip(), expires, tuple(scope), str(owner) if owner else None, source))
    return Waivers(out)


def _date(value: Any, where: str, source: str, required: bool) -> dt.date | None:
    if value is None:
        if required:
            raise ConfigError(f"{where}: missing 'expires' (a TOML date such as 2027-01-31)", path=source)
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise ConfigError(f"{where}: expires = {value!r} is not a date (write it as 2027-01-31)", path=source)


def load_waivers(path: str | Path | None) -> Waivers:
    """Read a waivers file; ``None`` means no waivers."""
    if path is None:
        return Waivers([])
    path = Path(path)
    data = read_toml(path, "waivers")
    unknown = sorted(set(data) - {"waiver"})
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {', '.join(unknown)}; expected [[waiver]] tables", path=path)
    return parse_waivers(data.get("waiver", []), str(path))


def apply_waiver(outcome: Outcome, waiver: Waiver | None, today: dt.date | None = None) -> Outcome:
    """Turn a failure into ``waived`` (valid waiver) or ``error`` (expired waiver). Other statuses stay."""
    if waiver is None or outcome.status != "fail":
        return outcome
    today = today or dt.date.today()
    if waiver.expired(today):
        return replace(
            outcome,
            status="error",
            message=(
                f"waiver for {waiver.rule} in {waiver.source} expired on {waiver.expires}: fix the "
                f"configuration, or renew the waiver with a fresh justification and expiry. "
                f"Original failure: {outcome.message}"
            ),
        )
    until = f" until {waiver.expires}" if waiver.expires else ""
    return replace(
        outcome,
        status="waived",
        message=(f"waived{until} ({waiver.source}): {waiver.justification.rstrip('.')}. Failure: {outcome.message}"),
    )
