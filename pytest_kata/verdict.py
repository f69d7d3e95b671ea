"""The verdict: every check's result, the totals, and accept/reject by the ``fail_on`` severity.

Statuses: ``pass``, ``fail``, ``error``, ``notapplicable``, ``waived``, ``skipped``. A candidate is rejected
when any ``fail`` or ``error`` is at or above ``fail_on``, or when no check ran at all (an empty run proves
nothing).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.hashing import sha256_file
from pytest_kata.options import SEVERITIES, severity_rank

STATUSES = ("pass", "fail", "error", "notapplicable", "waived", "skipped")
BLOCKING = ("fail", "error")


@dataclass
class Result:
    id: str
    suite: str
    status: str
    severity: str
    title: str
    evidence: dict[str, Any] = field(default_factory=dict)
    nodeid: str = ""

    def blocks(self, fail_on: str) -> bool:
        return self.status in BLOCKING and severity_rank(self.severity) >= severity_rank(fail_on)


@dataclass
class Verdict:
    candidate: dict[str, Any]
    results: list[Result]
    fail_on: str = "high"

    @property
    def totals(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    @property
    def blocking(self) -> list[Result]:
        return [r for r in self.results if r.blocks(self.fail_on)]

    @property
    def verdict(self) -> str:
        ran = [r for r in self.results if r.status in ("pass", "fail", "error", "waived")]
        return "reject" if self.blocking or not ran else "accept"

    @property
    def reasons(self) -> list[str]:
        if not [r for r in self.results if r.status in ("pass", "fail", "error", "waived")]:
            return ["no check ran: an empty run proves nothing"]
        return [f"{r.id} [{r.severity}] {r.status}: {r.title}" for r in self.blocking]

    def to_json(self) -> dict[str, Any]:
        return {
            "candidate": self.candidate,
            "results": [
                {k: v for k, v in asdict(r).items() if k != "nodeid"} | {"nodeid": r.nodeid} for r in self.results
            ],
            "totals": self.totals,
            "fail_on": self.fail_on,
            "verdict": self.verdict,
            "reasons": self.reasons,
        }

    def write(self, path: str | Path) -> None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
        tmp.replace(out)

    def table(self, width: int = 100) -> str:
        """The human verdict table printed at the end of a run."""
        rows = sorted(self.results, key=lambda r: (r.status not in BLOCKING, -severity_rank(r.severity), r.id))
        id_width = min(max((len(r.id) for r in rows), default=2), 52)
        lines = [f"{'status':<13} {'severity':<9} {'id':<{id_width}} title", "-" * min(width, 120)]
        for r in rows:
            lines.append(f"{r.status:<13} {r.severity:<9} {r.id[:id_width]:<{id_width}} {r.title}")
        t = self.totals
        lines.append("-" * min(width, 120))
        lines.append("totals: " + ", ".join(f"{k} {v}" for k, v in t.items() if v))
        version = self.candidate.get("version") or "unknown version"
        lines.append(f"VERDICT: {self.verdict.upper()}  candidate {self.candidate.get('path')} ({version}), "
                     f"fail-on {self.fail_on}")
        for reason in self.reasons[:20]:
            lines.append(f"  - {reason}")
        return "\n".join(lines)


def side_by_side(verdicts: list[tuple[str, dict[str, Any]]], width: int = 118) -> str:
    """Several verdict JSONs (label, document) as one table: each check's status per verdict, then what
    every blocking result showed (its advisory and observed effect, where it has them)."""
    ids: dict[str, str] = {}
    statuses: dict[str, dict[str, str]] = {}
    for label, doc in verdicts:
        for r in doc.get("results", []):
            ids.setdefault(r["id"], r.get("title", ""))
            statuses.setdefault(r["id"], {})[label] = r["status"]
    labels = [label for label, _ in verdicts]
    id_width = min(max((len(i) for i in ids), default=2), 44)
    col = max(9, *(len(label) for label in labels))
    lines = [f"{'id':<{id_width}} " + " ".join(f"{label:<{col}}" for label in labels) + " title",
             "-" * width]
    for check_id in sorted(ids):
        row = " ".join(f"{statuses[check_id].get(label, '-'):<{col}}" for label in labels)
        lines.append(f"{check_id[:id_width]:<{id_width}} {row} {ids[check_id]}"[:width])
    lines.append("-" * width)
    for label, doc in verdicts:
        lines.append(f"{label}: VERDICT {str(doc.get('verdict', '?')).upper()} "
                     f"({', '.join(f'{k} {v}' for k, v in (doc.get('totals') or {}).items() if v)})")
        for r in doc.get("results", []):
            if r["status"] in BLOCKING:
                ev = r.get("evidence") or {}
                static = ev.get("mode") == "static" and ev.get("decided_by")
                what = f"decided by {ev['decided_by']}" if static else ev.get("effect") or r.get("title", "")
                lines.append(f"  - {r['id']} {r['status']} [{ev.get('advisory', '-')}, {ev.get('mode', '-')}]: "
                             f"{what}")
    return "\n".join(lines)


__all__ = ["BLOCKING", "SEVERITIES", "STATUSES", "Result", "Verdict", "sha256_file", "side_by_side"]
