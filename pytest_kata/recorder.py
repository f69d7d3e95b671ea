"""Per-test check records: id, suite, severity, title, evidence, and the status the verdict sees.

A test becomes a verdict check by its ``kata_check`` marker, by living under the suites directory, or by
using the ``kata_result`` fixture. Rule-driven tests hand their outcome to :meth:`CheckRecorder.conclude`,
which turns ``fail``/``error``/``notapplicable``/``waived`` into the matching pytest outcome while keeping
the exact status for the verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from pytest_kata.resources import suites_dir
from pytest_kata.verdict import Result

RESULT_KEY = pytest.StashKey["CheckRecorder"]()
ALLURE_SEVERITY = {"critical": "blocker", "high": "critical", "medium": "normal", "low": "minor", "info": "trivial"}


def _suite_of(item: pytest.Item) -> str | None:
    path = Path(str(item.path)).resolve()
    try:
        rel = path.relative_to(suites_dir().resolve())
    except ValueError:
        parts = path.parts
        if "suites" in parts and parts.index("suites") + 1 < len(parts) - 1:
            return parts[parts.index("suites") + 1]
        return None
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@dataclass
class CheckRecorder:
    id: str
    suite: str
    severity: str = "medium"
    title: str = ""
    evidence: dict[str, Any] = field(default_factory=dict)
    status: str | None = None  # set when the test concluded with an explicit status
    attachments: list[tuple[str, str, str]] = field(default_factory=list)  # (name, body, mime)
    _allure_sent: set[tuple[str, Any]] = field(default_factory=set, repr=False)

    @classmethod
    def from_markers(cls, item: pytest.Item) -> CheckRecorder | None:
        mark = item.get_closest_marker("kata_check")
        suite = _suite_of(item)
        if mark is None and suite is None:
            return None
        module = getattr(item, "module", None)
        doc = (getattr(getattr(item, "obj", None), "__doc__", None) or "").strip()
        rec = cls(id=item.name,
                  suite=suite or (module.__name__.rsplit(".", 1)[-1] if module is not None else "tests"),
                  title=doc.splitlines()[0] if doc else item.name)
        if mark is not None:
            rec.id = str(mark.args[0])
            callspec = getattr(item, "callspec", None)
            if callspec is not None:  # one marker on a parametrized test: each variant is its own result
                rec.id = f"{rec.id}[{callspec.id}]"
            rec.severity = mark.kwargs.get("severity", "medium")
            rec.title = mark.kwargs.get("title") or rec.title
        advisory = item.get_closest_marker("kata_advisory")
        if advisory is not None:
            rec.evidence.setdefault("advisory", advisory.args[0])
        return rec

    @classmethod
    def for_item(cls, item: pytest.Item) -> CheckRecorder:
        return cls.from_markers(item) or cls(id=item.name, suite="tests", title=item.name)

    def record(self, *, id: str | None = None, severity: str | None = None, title: str | None = None,
               suite: str | None = None, **evidence: Any) -> None:
        """Set identity fields and add evidence (actual/expected values, paths, command output)."""
        if id:
            self.id = id
        if severity:
            self.severity = severity
        if title:
            self.title = title
        if suite:
            self.suite = suite
        self.evidence.update(evidence)
        self._allure_identity()

    def attach(self, name: str, body: str, mime: str = "text/plain") -> None:
        """Evidence too long for JSON: attached to allure and kept as a report section."""
        self.attachments.append((name, body, mime))
        try:
            import allure

            kind = {"application/json": allure.attachment_type.JSON, "text/x-diff": allure.attachment_type.TEXT}
            allure.attach(body, name=name, attachment_type=kind.get(mime, allure.attachment_type.TEXT))
        except Exception:  # allure not active or not installed: the report section still has it
            pass

    def conclude(self, status: str, message: str) -> None:
        """End the test with a verdict status: pass returns, the others raise the pytest outcome."""
        self.status = status
        if status == "pass":
            return
        if status in ("notapplicable", "waived", "skipped"):
            pytest.skip(f"{status}: {message}")
        if status == "error":
            self._error(message)
        pytest.fail(message, pytrace=False)

    def _error(self, message: str) -> NoReturn:
        pytest.fail(f"ERROR: {message}", pytrace=False)

    def _allure_identity(self) -> None:
        """Labels, severity, title and advisory link for allure, each emitted once per distinct value."""
        try:
            import allure
        except ImportError:
            return
        advisory = self.evidence.get("advisory")
        wanted = {("suite", self.suite), ("tag", self.id), ("rule_id", self.id), ("severity", self.severity),
                  ("title", self.title), ("advisory", advisory)}
        for kind, value in sorted(wanted - self._allure_sent, key=str):
            if not value:
                continue
            try:
                if kind == "tag":
                    allure.dynamic.tag(value)
                elif kind == "severity":
                    level = ALLURE_SEVERITY.get(value, "normal").upper()
                    allure.dynamic.severity(getattr(allure.severity_level, level))
                elif kind == "title":
                    allure.dynamic.title(f"{self.id}: {value}")
                elif kind == "advisory":
                    url = (f"https://github.com/advisories/{value}" if value.startswith("GHSA")
                           else f"https://nvd.nist.gov/vuln/detail/{value}")
                    allure.dynamic.link(url, name=value)
                else:
                    allure.dynamic.label(kind, value)
            except Exception:  # allure not active for this run: nothing to label
                return
            self._allure_sent.add((kind, value))

    def attach_to_allure(self, payload: dict[str, Any]) -> None:
        self._allure_identity()

    def payload(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "suite": self.suite, "status": status, "severity": self.severity,
                "title": self.title, "evidence": self.evidence}


def status_for_report(report: pytest.TestReport, recorder: CheckRecorder) -> str:
    if report.when in ("setup", "teardown") and report.failed:
        return "error"
    if report.passed:
        return "pass"
    if report.skipped:
        if recorder.status in ("notapplicable", "waived"):
            return recorder.status
        text = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        for status in ("notapplicable", "waived"):
            if f"Skipped: {status}:" in text or text.startswith(f"{status}:"):
                return status
        return "skipped"
    return "error" if recorder.status == "error" else "fail"


def result_from_report(report: pytest.TestReport) -> Result | None:
    for key, value in report.user_properties:
        if key == "kata_result":
            data: dict[str, Any] = json.loads(value) if isinstance(value, str) else dict(value)  # type: ignore[call-overload]
            return Result(id=data["id"], suite=data["suite"], status=data["status"], severity=data["severity"],
                          title=data["title"], evidence=data.get("evidence", {}), nodeid=report.nodeid)
    return None
