"""Severity levels shared by rules, advisories, vulnerability findings and the verdict, lowest first."""

from __future__ import annotations

SEVERITIES = ("info", "low", "medium", "high", "critical")


def severity_rank(severity: str) -> int:
    """Order of severities; unknown ones rank as medium so that a typo never hides a failure."""
    try:
        return SEVERITIES.index(severity.lower())
    except ValueError:
        return SEVERITIES.index("medium")


__all__ = ["SEVERITIES", "severity_rank"]
