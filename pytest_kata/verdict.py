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

from pytest_kata.severities import severity_rank

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

    @property
    def subject_file(self) -> str:
        """The shipped file the result is about (a configuration, kernel config or image), or ""."""
        for key in ("config", "kernel_config", "image"):
            value = self.evidence.get(key)
            if isinstance(value, str) and value:
                return value
        return ""

    def blocks(self, fail_on: str) -> bool:
        """At or above ``fail_on``; an expired waiver and a known advisory affecting the candidate block at any
        severity (an exception that has lapsed, or a published escape, must not slip under the threshold)."""
        if self.status not in BLOCKING:
            return False
        if self.waiver_expired or self.evidence.get("rejects_whatever_severity"):
            return True
        return severity_rank(self.severity) >= severity_rank(fail_on)

    @property
    def waiver_expired(self) -> bool:
        images = self.evidence.get("images")
        nested = images.values() if isinstance(images, dict) else []
        return any(isinstance(ev, dict) and ev.get("waiver_expired") for ev in [self.evidence, *nested])


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
    def not_run(self) -> dict[str, list[str]]:
        """Skipped checks grouped by the reason they give: what this verdict did not look at."""
        out: dict[str, list[str]] = {}
        for r in self.results:
            if r.status == "skipped":
                out.setdefault(str(r.evidence.get("reason") or "no reason given"), []).append(r.id)
        return out

    @property
    def reasons(self) -> list[str]:
        if not [r for r in self.results if r.status in ("pass", "fail", "error", "waived")]:
            return ["no check ran: an empty run proves nothing"]
        return [f"{r.id} [{r.severity}] {r.status}: {r.title}"
                + (" (its waiver expired: rejects at any severity)" if r.waiver_expired else "")
                for r in self.blocking]

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
            "not_run": self.not_run,
        }

    def write(self, path: str | Path) -> None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
        tmp.replace(out)

    def table(self, width: int = 100, verbose: bool = False) -> str:
        """The human verdict table printed at the end of a run: the failures, warnings and waivers (every check
        with ``verbose``), what was not run and why, and the verdict; no line longer than ``width``."""
        shown = STATUSES if verbose else ("fail", "error", "waived")
        rows = sorted((r for r in self.results if r.status in shown),
                      key=lambda r: (not r.blocks(self.fail_on), r.status not in BLOCKING,
                                     -severity_rank(r.severity), r.id))
        labels = {id(r): "warning" if r.status in BLOCKING and not r.blocks(self.fail_on) else r.status
                  for r in rows}
        status_width = max([len("status"), *(len(v) for v in labels.values())])
        id_width = min(max((len(r.id) for r in rows), default=2), 52)

        def fit(line: str) -> str:
            return line if len(line) <= width else line[: width - 3] + "..."

        lines = [fit(f"{'status':<{status_width}} {'severity':<8} {'id':<{id_width}} title"), "-" * width]
        groups: dict[str, list[Result]] = {}
        for r in rows:
            groups.setdefault(r.subject_file, []).append(r)
        for subject in sorted(groups):  # results about no one file first, then one group per file
            if subject:
                lines.append(fit(f"== {subject}"))
            for r in groups[subject]:
                lines.append(fit(f"{labels[id(r)]:<{status_width}} {r.severity:<8} {r.id[:id_width]:<{id_width}} "
                                 f"{r.title}"))
                if verbose and r.evidence.get("warning"):
                    lines.append(fit(f"{'':<{status_width}} {r.evidence['warning']}"))
        lines.append("-" * width)
        t = self.totals
        lines.append(fit("totals: " + ", ".join(f"{k} {v}" for k, v in t.items() if v)
                         + ("" if verbose else " (-v: every check, and why each warning)")))
        warnings = sum(1 for r in self.results if r.status in BLOCKING and not r.blocks(self.fail_on))
        if warnings:
            lines.append(f"warnings: {warnings} fail/error below fail-on {self.fail_on} (they do not reject)")
        for reason, ids in self.not_run.items():
            lines.append(fit(f"not run ({len(ids)}): {reason}"))
        version = self.candidate.get("version") or "unknown version"
        lines.append(f"VERDICT: {self.verdict.upper()}  candidate {version}, fail-on {self.fail_on}")
        lines.append(fit(f"  candidate: {self.candidate.get('path')}"))
        for reason in self.reasons[:20]:
            lines.append(fit(f"  - {reason}"))
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


__all__ = ["BLOCKING", "STATUSES", "Result", "Verdict", "side_by_side"]
