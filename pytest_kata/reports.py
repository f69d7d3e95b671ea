"""The verdict in the reports CI systems read: allure's overview and categories, and the JUnit XML.

CI dashboards count JUnit ``<failure>`` elements and allure ``failed``/``broken`` results, so a candidate the
verdict accepts must not show red there, and the verdict itself must be visible without opening
``verdict.json``. The allure side writes ``environment.properties`` and ``executor.json`` (the overview's
environment widget and report name) and ``categories.json`` (rejecting failures, warnings below fail-on,
waived, not applicable, not run); the JUnit side names each case after its check, adds the verdict as testsuite
properties and one summary case that fails when, and only when, the verdict rejects.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.verdict import Verdict

SUMMARY_CLASSNAME = "pytest_kata.verdict"
WARNING_PROPERTY = "kata.warning"

# allure matches a category's regexes against the whole status message (Java ``String.matches``).
ALLURE_CATEGORIES: list[dict[str, Any]] = [
    {"name": "Rejecting failures (at or above --kata-fail-on)", "matchedStatuses": ["failed", "broken"]},
    {"name": "Warnings: failed below --kata-fail-on (do not reject)", "matchedStatuses": ["passed"],
     "messageRegex": "(?s).+"},
    {"name": "Waived", "matchedStatuses": ["skipped"], "messageRegex": "(?s)Skipped: waived:.*"},
    {"name": "Not applicable", "matchedStatuses": ["skipped"], "messageRegex": "(?s)Skipped: notapplicable:.*"},
    {"name": "Not run: no vulnerability feed (--kata-vulns)", "matchedStatuses": ["skipped"],
     "messageRegex": "(?s).*vulnerability scan not run: no feed.*"},
    {"name": "Not run", "matchedStatuses": ["skipped"],
     "messageRegex": "(?s)(?!Skipped: (waived|notapplicable):)(?!.*vulnerability scan not run: no feed).*"},
]


def headline(verdict: Verdict) -> str:
    """One line: the verdict, the candidate's version and the threshold."""
    version = verdict.candidate.get("version") or "unknown version"
    return f"Kata verdict: {verdict.verdict.upper()} - candidate {version}, fail-on {verdict.fail_on}"


def _environment(verdict: Verdict) -> dict[str, str]:
    cand = verdict.candidate
    env = {
        "Verdict": verdict.verdict.upper(),
        "Candidate": str(cand.get("path")),
        "Candidate.version": str(cand.get("version") or "unknown"),
        "Candidate.sha256": str(cand.get("sha256") or "unknown"),
        "Fail-on": verdict.fail_on,
        "Totals": ", ".join(f"{k} {v}" for k, v in verdict.totals.items() if v),
        "Warnings.below.fail-on": str(sum(1 for r in verdict.results
                                          if r.status in ("fail", "error") and not r.blocks(verdict.fail_on))),
    }
    for i, reason in enumerate(verdict.reasons[:10], 1):
        env[f"Reject.reason.{i}"] = reason
    for i, (reason, ids) in enumerate(verdict.not_run.items(), 1):
        env[f"Not.run.{i}"] = f"{len(ids)} check(s): {reason}"
    return env


def _properties_line(key: str, value: str) -> str:
    """One Java ``.properties`` line (what allure reads): backslash, newline, ``=`` and ``:`` escaped."""

    def esc(text: str) -> str:
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("=", "\\=").replace(":", "\\:")

    return f"{esc(key)}={esc(value)}"


def write_allure_verdict(results_dir: str | Path, verdict: Verdict) -> None:
    """The verdict on allure's overview (environment, report name) and the categories that tell apart what
    rejects, what only warns, and what did not run."""
    out = Path(results_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        env = "".join(f"{_properties_line(k, v)}\n" for k, v in _environment(verdict).items())
        (out / "environment.properties").write_text(env, encoding="utf-8")
        executor = {"name": "pytest-kata", "type": "pytest-kata", "reportName": headline(verdict),
                    "buildName": headline(verdict)}
        (out / "executor.json").write_text(json.dumps(executor, indent=1) + "\n", encoding="utf-8")
        (out / "categories.json").write_text(json.dumps(ALLURE_CATEGORIES, indent=1) + "\n", encoding="utf-8")
    except OSError as exc:
        raise KataError(f"cannot write the allure verdict files: {exc.strerror}", path=out) from None


def _properties(case: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in case.iterfind("properties/property")}


def junit_with_verdict(path: str | Path, verdict: Verdict) -> None:
    """Rewrite pytest's JUnit XML: cases named after their check, warnings as ``<system-out>``, the verdict as
    testsuite properties and one summary case (a ``<failure>`` only when the verdict rejects)."""
    file = Path(path)
    try:
        tree = ET.parse(file)
    except (OSError, ET.ParseError) as exc:
        raise KataError(f"cannot read the JUnit XML pytest wrote: {exc}", path=file) from None
    root = tree.getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise KataError("no <testsuite> in the JUnit XML", path=file)
    for case in suite.iter("testcase"):
        props = _properties(case)
        if props.get("kata.title") and props["kata.title"] not in case.get("name", ""):
            case.set("name", f"{case.get('name')}: {props['kata.title']}")
        if props.get(WARNING_PROPERTY):
            out = case.find("system-out")
            if out is None:
                out = ET.SubElement(case, "system-out")
            out.text = f"WARNING {props[WARNING_PROPERTY]}\n" + (out.text or "")
    suite_props = suite.find("properties")
    if suite_props is None:
        suite_props = ET.Element("properties")
        suite.insert(0, suite_props)
    for key, value in (("kata.verdict", verdict.verdict), ("kata.candidate", str(verdict.candidate.get("path"))),
                       ("kata.version", str(verdict.candidate.get("version") or "")),
                       ("kata.fail_on", verdict.fail_on),
                       ("kata.totals", json.dumps(verdict.totals))):
        ET.SubElement(suite_props, "property", name=key, value=value)
    summary = ET.SubElement(suite, "testcase", classname=SUMMARY_CLASSNAME, name=headline(verdict), time="0")
    if verdict.verdict == "reject":
        failure = ET.SubElement(summary, "failure", message="; ".join(verdict.reasons)[:1000])
        failure.text = "\n".join(verdict.reasons) + "\n"
        suite.set("failures", str(int(suite.get("failures", "0")) + 1))
    if verdict.not_run:
        ET.SubElement(summary, "system-out").text = "".join(
            f"not run ({len(ids)}): {reason}\n" for reason, ids in verdict.not_run.items())
    suite.set("tests", str(int(suite.get("tests", "0")) + 1))
    tmp = file.with_name(file.name + ".tmp")
    tree.write(tmp, encoding="utf-8", xml_declaration=True)
    tmp.replace(file)
