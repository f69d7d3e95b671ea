"""Profiles: which rules apply and at what severity (``--kata-profile``).

A profile file (``pytest_kata/data/profiles/<name>.toml``)::

    description = "..."
    extends = ["default"]          # profiles merged first, in order
    enable_tags = ["strict"]       # opt-in rules (rules with tags) that this profile turns on
    disable = ["KATA-CFG-017"]     # rules switched off
    raise_severity = 1             # every rule's severity goes up this many levels (capped at critical)
    [severity]                     # explicit per-rule severities (win over raise_severity)
    "KATA-CFG-010" = "critical"
    [[waiver]]                     # structural waivers, justified, expiry optional (e.g. kata-guest)

A rule with tags runs only when the profile enables every one of its tags.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import ConfigError
from pytest_kata.resources import data_path
from pytest_kata.rules.model import Rule, read_toml
from pytest_kata.rules.waivers import Waivers, parse_waivers
from pytest_kata.severities import SEVERITIES

PROFILE_FIELDS = {"description", "extends", "enable_tags", "disable", "raise_severity", "severity", "waiver"}


@dataclass
class Profile:
    name: str
    description: str = ""
    enable_tags: set[str] = field(default_factory=set)
    disable: set[str] = field(default_factory=set)
    raise_severity: int = 0
    severity: dict[str, str] = field(default_factory=dict)
    waivers: Waivers = field(default_factory=lambda: Waivers([]))
    chain: list[str] = field(default_factory=list)  # the profiles merged into this one, base first

    def enabled(self, rule: Rule) -> tuple[bool, str]:
        if rule.id in self.disable:
            return False, f"disabled by profile {self.name!r}"
        missing = [t for t in rule.tags if t not in self.enable_tags]
        if missing:
            return (
                False,
                f"needs a profile that enables {', '.join(missing)} (e.g. --kata-profile {missing[0]})",
            )
        return True, ""

    def severity_of(self, rule: Rule) -> str:
        if rule.id in self.severity:
            return self.severity[rule.id]
        rank = min(SEVERITIES.index(rule.severity) + self.raise_severity, len(SEVERITIES) - 1)
        return SEVERITIES[rank]

    def validate(self, known_ids: set[str]) -> None:
        """Profile entries naming rules that do not exist are typos: fail loudly."""
        for rid in sorted((self.disable | set(self.severity)) - known_ids):
            raise ConfigError(
                f"profile {self.name!r} names unknown rule {rid!r}", path=profiles_dir() / f"{self.name}.toml"
            )
        self.waivers.validate(known_ids)


def profiles_dir() -> Path:
    return data_path("profiles")


def profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str | Path, _seen: tuple[str, ...] = ()) -> Profile:
    """Load a shipped profile by name (or a profile file by path), with its ``extends`` chain merged."""
    path = Path(name_or_path)
    if path.suffix != ".toml":
        path = profiles_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown profile {str(name_or_path)!r}; known: {', '.join(profile_names())}")
    name = path.stem
    if name in _seen:
        raise ConfigError(f"profile {name!r} extends itself ({' -> '.join((*_seen, name))})", path=path)
    data = read_toml(path, "profile")
    unknown = sorted(set(data) - PROFILE_FIELDS)
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}", path=path)
    merged = Profile(name=name)
    extends = _list(data.get("extends", []), "extends", path)
    for parent_name in extends:
        parent = load_profile(parent_name, (*_seen, name))
        merged.enable_tags |= parent.enable_tags
        merged.disable |= parent.disable
        merged.raise_severity = max(merged.raise_severity, parent.raise_severity)
        merged.severity.update(parent.severity)
        merged.waivers = merged.waivers + parent.waivers
        merged.chain.extend(c for c in parent.chain if c not in merged.chain)
    merged.description = str(data.get("description", ""))
    merged.enable_tags |= set(_list(data.get("enable_tags", []), "enable_tags", path))
    merged.disable |= set(_list(data.get("disable", []), "disable", path))
    raise_by = data.get("raise_severity", 0)
    if not isinstance(raise_by, int) or isinstance(raise_by, bool) or raise_by < 0:
        raise ConfigError(f"raise_severity must be a non-negative integer, got {raise_by!r}", path=path)
    merged.raise_severity = max(merged.raise_severity, raise_by)
    severity = data.get("severity", {})
    if not isinstance(severity, dict):
        raise ConfigError("[severity] must be a table of rule id = severity", path=path)
    for rid, sev in severity.items():
        if sev not in SEVERITIES:
            raise ConfigError(f"severity for {rid}: {sev!r} not in {', '.join(SEVERITIES)}", path=path)
        merged.severity[rid] = sev
    merged.waivers = merged.waivers + parse_waivers(data.get("waiver"), str(path), require_expiry=False)
    merged.chain.append(name)
    return merged


def _list(value: Any, what: str, path: Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must be a list of strings", path=path)
    return list(value)
