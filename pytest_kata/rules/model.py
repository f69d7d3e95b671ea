"""Rules as data: the record a rule file holds, loaded and validated from TOML.

A rule file (``pytest_kata/data/rules/<set>.toml``) is a list of ``[[rule]]`` tables (and optionally
``context = ["key", ...]``: extra subject context keys its ``applies`` tables may use)::

    [[rule]]
    id = "KATA-CFG-006"                 # stable: never renumber, never reuse
    title = "..."; severity = "high"; rationale = "..."; remediation = "..."; references = ["..."]
    tags = ["strict"]                   # optional: opt-in tags a profile must enable
    applies = { runtime = ["go"], hypervisor = ["qemu"], confidential = false }   # optional
    when = { key = "...", op = "not_empty", missing = "fail" }                    # optional precondition
    check = { key = "runtime.disable_guest_seccomp", op = "eq", expected = false, missing = "pass" }
    [rule.test]                         # mutation data for the project's own tests
    bad = { "runtime.disable_guest_seccomp" = true }
    good = { "runtime.disable_guest_seccomp" = false }

A check is either a leaf (``key``, ``op``, ``expected`` or ``expected_key``, ``missing``, ``default``,
``context_default``, ``join``, ``missing_note``) or a composition (``all = [...]`` / ``any = [...]``).
``context_default = { runtime = { go = false, runtime-rs = true } }`` gives the value an absent key has in
each runtime (or hypervisor, ...), because an absent key means the runtime's built-in default. Every problem in a rule
file is a :class:`~pytest_kata.errors.ConfigError` naming the file and the rule id.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import ConfigError
from pytest_kata.resources import data_path
from pytest_kata.rules.operators import OPERATORS, REGEX, UNARY
from pytest_kata.severities import SEVERITIES

MISSING_POLICIES = ("pass", "fail", "notapplicable", "error")
RULE_FIELDS = {
    "id",
    "title",
    "severity",
    "rationale",
    "remediation",
    "references",
    "tags",
    "applies",
    "when",
    "check",
    "test",
    "description",
}
LEAF_FIELDS = {"key", "op", "expected", "expected_key", "missing", "missing_note", "default", "context_default",
               "join"}
# What subjects tell the engine about themselves (applies = {...} keys); a rule file can add its own.
CONTEXT_KEYS = frozenset(
    {"runtime", "hypervisor", "confidential", "shim", "config", "kernel_version", "arch", "image_kind", "init"}
)
REQUIRED = ("id", "title", "severity", "rationale", "remediation", "references", "check")


@dataclass(frozen=True)
class Check:
    """A leaf comparison, or ``all``/``any`` of sub-checks."""

    key: str | None = None
    op: str | None = None
    expected: Any = None
    expected_key: str | None = None
    missing: str = "fail"
    missing_note: str | None = None  # what an absent key means, in words, for the report
    default: Any = None
    has_default: bool = False
    # the value an absent key has, per subject context: {"runtime": {"go": false, "runtime-rs": true}} says
    # each runtime's built-in default; a context value not listed falls back to ``missing``
    context_default: dict[str, dict[str, Any]] = field(default_factory=dict)
    join: str | None = None
    all: tuple[Check, ...] = ()
    any: tuple[Check, ...] = ()

    @property
    def composite(self) -> bool:
        return bool(self.all or self.any)

    def fact_keys(self) -> list[str]:
        """Every fact key this check reads (for evidence)."""
        if self.composite:
            return [k for sub in (*self.all, *self.any) for k in sub.fact_keys()]
        return [k for k in (self.key, self.expected_key) if k]


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    severity: str
    rationale: str
    remediation: str
    references: tuple[str, ...]
    check: Check
    when: Check | None = None
    applies: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    test: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the rule file, for error messages
    set_name: str = ""

    def __repr__(self) -> str:  # short: it is the allure parameter of every rule-driven item
        return f"Rule({self.id!r})"


def rules_dir() -> Path:
    return data_path("rules")


def rule_sets() -> list[str]:
    """The names of the shipped rule sets (``runtime-config``, ``kernel``, ...)."""
    return sorted(p.stem for p in rules_dir().glob("*.toml"))


def _file_for(set_name_or_path: str | Path) -> Path:
    candidate = Path(set_name_or_path)
    if candidate.suffix == ".toml" or candidate.is_file() or len(candidate.parts) > 1:
        return candidate
    path = rules_dir() / f"{set_name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown rule set {set_name_or_path!r}; known: {', '.join(rule_sets())}")
    return path


def read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"no such {what} file", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what} file: {exc}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None


def load_rules(set_name_or_path: str | Path) -> list[Rule]:
    """Load and validate one rule set (a shipped set name or a path to a TOML file)."""
    path = _file_for(set_name_or_path)
    data = read_toml(path, "rule")
    extra_context = data.get("context", [])
    if not isinstance(extra_context, list) or not all(isinstance(k, str) for k in extra_context):
        raise ConfigError("context must be a list of context key names", path=path)
    context_keys = CONTEXT_KEYS | frozenset(extra_context)
    raw_rules = data.get("rule")
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError("no [[rule]] tables", path=path)
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules):
        rule = _parse_rule(raw, path, index, context_keys)
        if rule.id in seen:
            raise ConfigError(f"rule {rule.id}: duplicate id", path=path)
        seen.add(rule.id)
        rules.append(rule)
    return rules


def load_all_rules(set_names: list[str] | None = None) -> list[Rule]:
    """Every rule of the given (default: all shipped) sets; ids must be unique across sets."""
    out: list[Rule] = []
    seen: dict[str, str] = {}
    for name in set_names or rule_sets():
        for rule in load_rules(name):
            if rule.id in seen:
                raise ConfigError(f"rule {rule.id}: duplicate id (also in {seen[rule.id]})", path=rule.source)
            seen[rule.id] = rule.source
            out.append(rule)
    return out


def _parse_rule(raw: Any, path: Path, index: int, context_keys: frozenset[str] = frozenset()) -> Rule:
    where = f"rule #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table", path=path)
    rid = raw.get("id")
    if isinstance(rid, str) and rid:
        where = f"rule {rid}"
    for name in REQUIRED:
        if name not in raw or raw[name] in ("", None):
            raise ConfigError(f"{where}: missing field {name!r}", path=path)
    if not isinstance(rid, str) or not re.fullmatch(r"[A-Z][A-Z0-9]*(-[A-Z0-9]+)+", rid):
        raise ConfigError(f"{where}: id must look like KATA-CFG-001", path=path)
    unknown = sorted(set(raw) - RULE_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}", path=path)
    if raw["severity"] not in SEVERITIES:
        raise ConfigError(f"{where}: severity {raw['severity']!r} not in {', '.join(SEVERITIES)}", path=path)
    refs = raw["references"]
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise ConfigError(f"{where}: references must be a non-empty list of strings", path=path)
    applies = raw.get("applies", {})
    if not isinstance(applies, dict):
        raise ConfigError(f"{where}: applies must be a table", path=path)
    unknown_context = sorted(set(applies) - context_keys)
    if unknown_context:  # a typo here would make the rule apply everywhere
        raise ConfigError(
            f"{where}: unknown applies key(s) {', '.join(unknown_context)}; known: "
            f"{', '.join(sorted(context_keys))} (a rule file may add some with `context = [...]`)",
            path=path,
        )
    tags = raw.get("tags", [])
    if not isinstance(tags, list):
        raise ConfigError(f"{where}: tags must be a list", path=path)
    test = raw.get("test", {})
    if not isinstance(test, dict):
        raise ConfigError(f"{where}: [rule.test] must be a table", path=path)
    return Rule(
        id=rid,
        title=str(raw["title"]),
        severity=raw["severity"],
        rationale=str(raw["rationale"]).strip(),
        remediation=str(raw["remediation"]).strip(),
        references=tuple(refs),
        check=parse_check(raw["check"], path, where),
        when=parse_check(raw["when"], path, f"{where} (when)") if "when" in raw else None,
        applies=dict(applies),
        tags=tuple(str(t) for t in tags),
        test=test,
        source=str(path),
        set_name=path.stem,
    )


def parse_check(raw: Any, path: Path | str, where: str) -> Check:
    """Validate one check table (recursively for ``all``/``any``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: check must be a table", path=path)
    if "all" in raw or "any" in raw:
        if set(raw) - {"all", "any"} or ("all" in raw and "any" in raw):
            raise ConfigError(
                f"{where}: a composite check has exactly one of 'all' or 'any' and nothing else", path=path
            )
        kind = "all" if "all" in raw else "any"
        subs = raw[kind]
        if not isinstance(subs, list) or not subs:
            raise ConfigError(f"{where}: '{kind}' must be a non-empty list of checks", path=path)
        parsed = tuple(parse_check(s, path, where) for s in subs)
        return Check(all=parsed) if kind == "all" else Check(any=parsed)
    unknown = sorted(set(raw) - LEAF_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown check field(s) {', '.join(unknown)}", path=path)
    key, op = raw.get("key"), raw.get("op")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: check needs a 'key'", path=path)
    if op not in OPERATORS:
        raise ConfigError(f"{where}: unknown operator {op!r}; known: {', '.join(OPERATORS)}", path=path)
    has_expected = "expected" in raw or "expected_key" in raw
    if op in UNARY and has_expected:
        raise ConfigError(f"{where}: operator {op!r} takes no expected value", path=path)
    if op not in UNARY and not has_expected:
        raise ConfigError(f"{where}: operator {op!r} needs 'expected' or 'expected_key'", path=path)
    if op in REGEX and "expected" in raw:
        try:
            re.compile(str(raw["expected"]))
        except re.error as exc:
            raise ConfigError(f"{where}: bad regular expression {raw['expected']!r}: {exc}", path=path) from None
    missing = raw.get("missing", "fail")
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"{where}: missing = {missing!r} not in {', '.join(MISSING_POLICIES)}", path=path)
    context_default = raw.get("context_default", {})
    if not isinstance(context_default, dict) or not all(isinstance(v, dict) for v in context_default.values()):
        raise ConfigError(f"{where}: context_default must be a table of context key -> {{value = default}}",
                          path=path)
    return Check(
        key=key,
        op=op,
        expected=raw.get("expected"),
        expected_key=raw.get("expected_key"),
        missing=missing,
        missing_note=raw.get("missing_note"),
        default=raw.get("default"),
        has_default="default" in raw,
        context_default={str(k): dict(v) for k, v in context_default.items()},
        join=raw.get("join"),
    )
