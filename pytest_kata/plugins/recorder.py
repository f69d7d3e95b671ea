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
# Kata severity -> allure severity. Kata's "critical" is allure's "critical" and each lower Kata level takes the
# next lower allure level; "blocker" is never used, because whether a failure blocks the release is the
# verdict's decision (--kata-fail-on), not a property of the check. info shares "trivial" with low; the exact
# Kata severity is always in the ``kata_severity`` label.
ALLURE_SEVERITY = {"critical": "critical", "high": "normal", "medium": "minor", "low": "trivial", "info": "trivial"}
WARNING_KEY = "kata.warning"  # user property of a check that failed below --kata-fail-on
WARNING_CATEGORY = "warning (below fail-on)"  # its pytest outcome category (summary line, -v word)
EVIDENCE_ATTACHMENT_LIMIT = 64 * 1024


def suite_of(item: pytest.Item) -> str | None:
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
        suite = suite_of(item)
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
                  ("kata_severity", self.severity), ("title", self.title), ("advisory", advisory)}
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

    def attach_to_allure(self, payload: dict[str, Any], warning: str | None = None) -> None:
        """Identity labels on every report; for a check that did not pass: its status, why the rule exists,
        how to fix it and its references, and the evidence itself when the check attached none."""
        self._allure_identity()
        status = payload["status"]
        try:
            import allure

            allure.dynamic.label("kata_status", status)
            if warning:
                allure.dynamic.tag(WARNING_CATEGORY)
                allure.dynamic.title(f"[warning] {self.id}: {self.title}")
            if status in ("pass", "notapplicable", "skipped"):
                return
            ev = self.evidence
            text = [f"**{status}** ({self.severity})" + (f": {warning}" if warning else "")]
            for key in ("message", "rationale", "remediation"):
                if ev.get(key):
                    text.append(f"**{key}**: {ev[key]}")
            refs = [str(r) for r in ev.get("references") or []]
            if refs:
                text.append("**references**: " + ", ".join(refs))
            allure.dynamic.description("\n\n".join(text))
            for ref in refs:
                if ref.startswith(("https://", "http://")):
                    allure.dynamic.link(ref, name=ref.rsplit("/", 1)[-1] or ref)
            if not self.attachments:
                body = json.dumps(ev, indent=1, default=str)
                if len(body) > EVIDENCE_ATTACHMENT_LIMIT:
                    body = body[:EVIDENCE_ATTACHMENT_LIMIT] + "\n... (truncated: the full evidence is in the verdict)"
                allure.attach(body, name=f"evidence {self.id}", attachment_type=allure.attachment_type.JSON)
        except Exception:  # allure not active for this run: the verdict JSON has all of it
            return

    def junit_properties(self, status: str) -> list[tuple[str, str]]:
        """What pytest's junitxml writes as the case's <properties> (it reads the item's user_properties)."""
        props = [("kata.rule_id", self.id), ("kata.title", self.title), ("kata.severity", self.severity),
                 ("kata.status", status)]
        if self.evidence.get("advisory"):
            props.append(("kata.advisory", str(self.evidence["advisory"])))
        return props

    def payload(self, status: str) -> dict[str, Any]:
        return {"id": self.id, "suite": self.suite, "status": status, "severity": self.severity,
                "title": self.title, "evidence": self.evidence}


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skipped report gives, without pytest's "Skipped: " prefix."""
    text = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr or "")
    return text.removeprefix("Skipped: ")


def warn_below_fail_on(item: pytest.Item, report: pytest.TestReport, payload: dict[str, Any], fail_on: str) -> None:
    """A check that failed below ``--kata-fail-on`` does not reject: its call report becomes a pass carrying a
    warning, so pytest's summary, exit status, JUnit and allure all agree with the verdict."""
    if report.when != "call" or not report.failed:
        return
    result = Result(id=payload["id"], suite=payload["suite"], status=payload["status"],
                    severity=payload["severity"], title=payload["title"], evidence=payload["evidence"])
    if result.blocks(fail_on):
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    message = " ".join((crash.message if crash is not None else report.longreprtext).split())
    message = message.removeprefix("Failed: ")[:500]
    warning = f"{result.severity} {result.status} is below fail-on {fail_on}: {message}"
    report.outcome = "passed"
    payload["evidence"]["warning"] = warning
    report.user_properties.append((WARNING_KEY, warning))
    item.user_properties.append((WARNING_KEY, warning))


def warning_of(report: pytest.TestReport) -> str | None:
    return next((str(v) for k, v in report.user_properties if k == WARNING_KEY), None)


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
