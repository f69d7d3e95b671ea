"""The reports CI systems read agree with the verdict: pytest's summary, JUnit XML and allure results.

Failures below ``--kata-fail-on`` are warnings everywhere (no JUnit ``<failure>``, allure ``passed``); the
verdict is a JUnit testsuite property plus a summary case and allure's overview; allure results of the static
suites on the reference candidate carry labels, one-to-one severities, evidence and stay small.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.resources import cache_dir
from pytest_kata.verdict import Result, Verdict

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.xdist_group("allure-static-run")  # one static run (session fixture) per CI run
CHECKS = """
import pytest

@pytest.mark.kata_check("KATA-T-LOW", severity="low", title="a low check")
def test_low_fails():
    assert False, "low-severity problem"

@pytest.mark.kata_check("KATA-T-HIGH", severity="high", title="a high check")
def test_high_passes():
    pass

@pytest.mark.kata_check("KATA-T-ADV", severity="medium", title="an advisory check")
@pytest.mark.kata_advisory("GHSA-7wwp-2jxx-vxfh")
def test_advisory_passes():
    pass
"""


def _cases(path: Path) -> tuple[ET.Element, dict[str, ET.Element]]:
    suite = ET.parse(path).getroot().find("testsuite")
    assert suite is not None
    return suite, {c.get("name", ""): c for c in suite.iter("testcase")}


def _props(element: ET.Element) -> dict[str, str]:
    return {p.get("name", ""): p.get("value", "") for p in element.iterfind("properties/property")}


def test_failure_below_fail_on_is_a_warning_in_pytest_and_junit(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("-v", "--junitxml", "j.xml", "--kata-report", "v.json")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*test_low_fails WARNING (BELOW FAIL-ON)*",
                                 "warning *low*KATA-T-LOW*a low check*",
                                 "VERDICT: ACCEPT*",
                                 "*2 passed, 1 warning (below fail-on)*"])
    suite, cases = _cases(pytester.path / "j.xml")
    assert suite.get("failures") == "0" and not list(suite.iter("failure"))
    low = cases["test_low_fails: a low check"]
    assert _props(low) | {"kata.warning": "x"} == {
        "kata.rule_id": "KATA-T-LOW", "kata.title": "a low check", "kata.severity": "low", "kata.status": "fail",
        "kata.warning": "x"}
    assert "low fail is below fail-on high" in _props(low)["kata.warning"]
    assert "low-severity problem" in (low.findtext("system-out") or "")
    assert _props(cases["test_advisory_passes: an advisory check"])["kata.advisory"] == "GHSA-7wwp-2jxx-vxfh"
    assert _props(suite)["kata.verdict"] == "accept" and _props(suite)["kata.fail_on"] == "high"
    summary = cases["Kata verdict: ACCEPT - candidate unknown version, fail-on high"]
    assert summary.get("classname") == "pytest_kata.verdict" and summary.find("failure") is None
    assert json.loads((pytester.path / "v.json").read_text())["results"][0]["status"] == "fail"


def test_failure_at_fail_on_fails_the_case_and_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("--junitxml", "j.xml", "--kata-fail-on", "low")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*1 failed, 2 passed*"])
    suite, cases = _cases(pytester.path / "j.xml")
    assert cases["test_low_fails: a low check"].find("failure") is not None
    summary = cases["Kata verdict: REJECT - candidate unknown version, fail-on low"]
    failure = summary.find("failure")
    assert failure is not None and "KATA-T-LOW [low] fail" in failure.get("message", "")
    assert suite.get("failures") == "2" and suite.get("tests") == "4"


def test_failure_below_fail_on_is_a_warning_under_xdist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("-n", "2", "--junitxml", "j.xml")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*1 warning (below fail-on)*"])
    _, cases = _cases(pytester.path / "j.xml")
    assert _props(cases["test_low_fails: a low check"])["kata.status"] == "fail"


def test_expired_waiver_rejects_at_any_severity() -> None:
    expired = Result("KATA-IMG-007", "hardening", "error", "medium", "t",
                     evidence={"images": {"img": {"waiver_expired": True}}})
    plain = Result("KATA-IMG-008", "hardening", "error", "medium", "t")
    assert Verdict({}, [expired], "high").verdict == "reject"
    assert Verdict({}, [plain], "high").verdict == "accept"


def test_table_fits_the_width_and_lists_passes_only_when_verbose() -> None:
    results = [Result("KATA-CFG-001", "s", "pass", "high", "a passing check " * 10),
               Result("KATA-VULN-001", "s", "skipped", "high", "vuln",
                      evidence={"reason": "vulnerability scan not run: no feed: pass --kata-vulns FEED"}),
               Result("KATA-CFG-002", "s", "fail", "low", "a low failure")]
    verdict = Verdict({"path": "/x" * 80, "version": "4.1.0"}, results, "high")
    short, long = verdict.table(width=100), verdict.table(width=100, verbose=True)
    assert all(len(line) <= 100 for line in (short + "\n" + long).splitlines())
    assert "KATA-CFG-001" not in short and "KATA-CFG-001" in long
    assert "warning low      KATA-CFG-002" in short
    assert "not run (1): vulnerability scan not run: no feed" in short
    assert verdict.to_json()["not_run"] == {"vulnerability scan not run: no feed: pass --kata-vulns FEED":
                                            ["KATA-VULN-001"]}


# ------------------------------------------------------------------------ allure, on the reference candidate


@pytest.fixture(scope="session")  # session: a module fixture is redone whenever xdist interleaves modules
def static_run(tmp_path_factory: pytest.TempPathFactory, reference_bundle: Callable[[str], Path]) -> Path:
    """The static suites (hardening, advisories) on the reference candidate, with allure and JUnit output."""
    out = tmp_path_factory.mktemp("static-run")
    cmd = [sys.executable, "-m", "pytest", str(REPO / "suites/hardening"), str(REPO / "suites/advisories"),
           "-p", "no:cacheprovider", "-q", "-p", "no:randomly", "-m", "not vm",
           "--kata-candidate", str(reference_bundle("candidate")), "--kata-baseline", str(reference_bundle("baseline")),
           "--kata-report", str(out / "verdict.json"), "--junitxml", str(out / "junit.xml"),
           "--alluredir", str(out / "allure-results")]
    proc = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTEST_KATA_NO_SWEEP": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def _allure_results(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in directory.glob("*-result.json")]


def _labels(result: dict[str, Any], name: str) -> list[str]:
    return [label["value"] for label in result["labels"] if label["name"] == name]


def test_allure_results_agree_with_the_verdict(static_run: Path) -> None:
    verdict = json.loads((static_run / "verdict.json").read_text())
    assert verdict["verdict"] == "accept"
    below = {r["id"] for r in verdict["results"] if r["status"] in ("fail", "error")}
    assert len(below) >= 5  # the reference candidate has medium/low failures: the case this is about
    results = _allure_results(static_run / "allure-results")
    assert len(results) == len(verdict["results"])
    by_id = {_labels(r, "rule_id")[0]: r for r in results if _labels(r, "rule_id")}
    assert set(by_id) == {r["id"] for r in verdict["results"]}  # every check labelled, vulnerability ones too
    assert {r["status"] for r in results} <= {"passed", "skipped"}  # accepted: nothing red for CI dashboards
    allure_level = {"critical": "critical", "high": "normal", "medium": "minor", "low": "trivial"}
    for r in verdict["results"]:
        labels = by_id[r["id"]]
        assert _labels(labels, "kata_severity") == [r["severity"]]
        assert _labels(labels, "severity") == [allure_level[r["severity"]]]
        assert _labels(labels, "suite") == [r["suite"]]
        assert all(len(p["value"]) < 200 for p in labels.get("parameters", [])), labels["parameters"]
    for rid in below:
        item = by_id[rid]
        assert _labels(item, "kata_status") == ["fail"] and "warning (below fail-on)" in _labels(item, "tag")
        assert "**remediation**" in item["description"] and "**rationale**" in item["description"]
        assert item.get("attachments"), f"{rid}: no evidence attached"
    vulns = [by_id[rid] for rid in by_id if rid.startswith("KATA-VULN-")]
    assert vulns and all("vulnerability scan not run: no feed" in v["statusDetails"]["message"] for v in vulns)
    size = sum(p.stat().st_size for p in (static_run / "allure-results").iterdir())
    assert size < 2 * 1024 * 1024, f"allure-results is {size} bytes"
    env = (static_run / "allure-results/environment.properties").read_text()
    assert "Verdict=ACCEPT" in env and "Candidate.version=4.1.0" in env and "Fail-on=high" in env
    categories = json.loads((static_run / "allure-results/categories.json").read_text())
    assert {"Waived", "Not applicable", "Not run: no vulnerability feed (--kata-vulns)"} <= {
        c["name"] for c in categories}


def allure_cli() -> Path:
    """The allure command line scripts/setup installs from npm (Java from Debian)."""
    found = shutil.which("allure")
    return Path(found) if found else cache_dir() / "allure-cli/node_modules/.bin/allure"


@pytest.fixture(scope="session")
def allure_report(static_run: Path) -> Path:
    cli = allure_cli()
    assert cli.exists(), f"{cli} missing: scripts/setup installs allure-commandline (npm) and Java"
    report = static_run / "allure-report"
    proc = subprocess.run([str(cli), "generate", "--clean", "-o", str(report), str(static_run / "allure-results")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return report


@pytest.mark.slow
def test_generated_allure_report_shows_the_verdict(allure_report: Path) -> None:
    report = allure_report
    summary = json.loads((report / "widgets/summary.json").read_text())
    assert summary["reportName"] == "Kata verdict: ACCEPT - candidate 4.1.0, fail-on high"
    assert summary["statistic"]["failed"] == 0 and summary["statistic"]["broken"] == 0
    env = {e["name"]: e["values"] for e in json.loads((report / "widgets/environment.json").read_text())}
    assert env["Verdict"] == ["ACCEPT"] and env["Fail-on"] == ["high"]
    categories = {c["name"]: c["statistic"] for c in json.loads((report / "widgets/categories.json").read_text())[
        "items"]}
    assert categories["Not run: no vulnerability feed (--kata-vulns)"]["skipped"] == 3
    assert categories["Warnings: failed below --kata-fail-on (do not reject)"]["passed"] >= 5
    size = sum(p.stat().st_size for p in report.rglob("*") if p.is_file())
    assert size < 20 * 1024 * 1024, f"the generated report is {size} bytes"


@pytest.mark.slow
def test_allure_overview_screenshot(allure_report: Path, tmp_path: Path) -> None:
    """The overview page rendered by a headless browser (the report is a web app: it needs HTTP, not file://);
    the PNG is kept beside the report for a person to look at."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium: apt-get install chromium to take the overview screenshot")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(allure_report))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            png = allure_report / "overview.png"
            proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                                   f"--user-data-dir={tmp_path}", "--window-size=1400,1000",
                                   "--virtual-time-budget=8000", f"--screenshot={png}",
                                   f"http://127.0.0.1:{server.server_address[1]}/index.html"],
                                  capture_output=True, text=True, timeout=120)
        finally:
            server.shutdown()
    assert proc.returncode == 0 and png.stat().st_size > 20_000, proc.stderr[-2000:]
