"""Checks and the verdict in pytest: the markers, the ``kata_result`` recorder, each check's result (also from
xdist workers), the decision, the report and the exit status. The decision itself is
:class:`pytest_kata.verdict.Verdict`; this module only feeds it from pytest's reports.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pytest_kata.errors import KataError
from pytest_kata.plugins.candidate import opened_bundle
from pytest_kata.plugins.recorder import (
    RESULT_KEY,
    WARNING_CATEGORY,
    CheckRecorder,
    result_from_report,
    skip_reason,
    status_for_report,
    suite_of,
    warn_below_fail_on,
    warning_of,
)
from pytest_kata.plugins.settings import settings_of
from pytest_kata.severities import SEVERITIES
from pytest_kata.verdict import Result, Verdict

MARKERS = {
    "kata_check(id, *, severity='medium', title=None)": "a check that counts in the verdict, with a stable id",
    "kata_advisory(advisory_id)": "the Kata advisory (GHSA-... or CVE-...) this test guards against",
    "kata_requires(*needs)": "skip unless the candidate/host has each need: shim, agent, kvm, libvirt, containerd",
    "kata_hosts(n)": "the test needs n provisioned hosts",
    "kata_dirty": "the test changes its host beyond repair: give it a fresh host instead of a revert",
    "vm": "boots VMs or starts containers (qemu, libvirt, containerd); -m 'not vm' selects the static checks",
}
ADVISORY_PREFIXES = ("GHSA-", "CVE-", "GO-", "KCSA-")
CANDIDATE_FIXTURES = {"kata_candidate", "kata_config_case", "kata_kernel_case"}  # what judges the candidate


def pytest_configure(config: pytest.Config) -> None:
    for signature, text in MARKERS.items():
        config.addinivalue_line("markers", f"{signature}: {text}")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(VerdictCollector(config), "kata-verdict")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Validate marker arguments up front: a typo in a severity must not silently downgrade a check."""
    for item in items:
        for mark in item.iter_markers("kata_check"):
            if not mark.args or not isinstance(mark.args[0], str):
                raise pytest.UsageError(f"{item.nodeid}: kata_check needs a string id as first argument")
            sev = mark.kwargs.get("severity", "medium")
            if sev not in SEVERITIES:
                raise pytest.UsageError(f"{item.nodeid}: kata_check severity {sev!r} not in {SEVERITIES}")
        for mark in item.iter_markers("kata_advisory"):
            if len(mark.args) != 1 or not str(mark.args[0]).startswith(ADVISORY_PREFIXES):
                raise pytest.UsageError(f"{item.nodeid}: kata_advisory takes one id starting with "
                                        f"{'/'.join(ADVISORY_PREFIXES)}")
        for mark in item.iter_markers("kata_hosts"):
            if len(mark.args) != 1 or not isinstance(mark.args[0], int) or mark.args[0] < 1:
                raise pytest.UsageError(f"{item.nodeid}: kata_hosts takes one positive int")
    _require_bundles(config, items)


def _require_bundles(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Suite checks that judge the candidate need one: without it each would skip and the verdict reject with no
    reason a reader would believe. A baseline that does not open stops the run rather than erroring one check."""
    settings = settings_of(config)

    def uses(item: pytest.Item, names: set[str]) -> bool:
        return bool(names & set(getattr(item, "fixturenames", ())))

    if not settings.candidate and any(suite_of(i) and uses(i, CANDIDATE_FIXTURES) for i in items):
        raise pytest.UsageError("the suites need a candidate: pass --kata-candidate PATH "
                                "(a kata-static tarball or an /opt/kata tree)")
    if settings.baseline and any(uses(i, {"kata_baseline"}) for i in items):
        try:
            opened_bundle(config, "baseline")
        except KataError as exc:
            raise pytest.UsageError(f"--kata-baseline: {exc}") from None


@pytest.fixture
def kata_result(request: pytest.FixtureRequest) -> CheckRecorder:
    """Records this test's check id, severity, title and evidence for the verdict (and allure)."""
    recorder = CheckRecorder.for_item(request.node)
    request.node.stash[RESULT_KEY] = recorder
    return recorder


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    recorder = item.stash.get(RESULT_KEY, None) or CheckRecorder.from_markers(item)
    if recorder is not None and _counts(report):
        payload = recorder.payload(status_for_report(report, recorder))
        if payload["status"] == "skipped":
            recorder.evidence["reason"] = skip_reason(report)
        warn_below_fail_on(item, report, payload, settings_of(item.config).fail_on)
        report.user_properties.append(("kata_result", json.dumps(payload, default=str)))
        item.user_properties.extend(recorder.junit_properties(payload["status"]))
        recorder.attach_to_allure(payload, warning_of(report))
    return report


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
    """A check that failed below --kata-fail-on: its own category in the summary line, "W" and a -v word."""
    if report.when == "call" and warning_of(report):
        return WARNING_CATEGORY, "W", (WARNING_CATEGORY.upper(), {"yellow": True})
    return None


def _counts(report: pytest.TestReport) -> bool:
    return report.when == "call" or (report.when == "setup" and not report.passed) or \
        (report.when == "teardown" and report.failed)


class VerdictCollector:
    """Controller-side: gathers results from all workers, decides, writes the report, fixes the exit status."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: dict[str, Result] = {}
        self.other_failures: set[str] = set()
        self.verdict: Verdict | None = None
        self.write_error: str | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        result = result_from_report(report)
        if result is None:
            if report.failed:
                self.other_failures.add(report.nodeid)
            return
        previous = self.results.get(report.nodeid)
        if previous is None or result.status == "error" or previous.status in ("pass",):
            self.results[report.nodeid] = result
        self.config.hook.pytest_kata_result(result=result, config=self.config)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        s = settings_of(self.config)
        if not self.results and not s.report:
            return
        candidate: dict[str, Any] = {"path": None, "version": None, "sha256": None}
        try:
            bundle = opened_bundle(self.config, "candidate")
        except KataError as exc:
            candidate = {"path": s.candidate, "version": None, "sha256": None, "error": str(exc)}
        else:
            if bundle is not None:
                candidate = bundle.identity()
        self.verdict = Verdict(candidate, list(self.results.values()), s.fail_on)
        self.config.hook.pytest_kata_verdict(verdict=self.verdict, config=self.config)
        if s.report:
            try:
                self.verdict.write(s.report)
            except OSError as exc:  # a verdict nobody can read is no verdict: the run fails, in one line
                self.write_error = f"cannot write the verdict to {s.report}: {exc.strerror or exc}"
                session.exitstatus = pytest.ExitCode.INTERNAL_ERROR
                return
        if not self.results:
            return
        failed_checks = {r.nodeid for r in self.results.values() if r.status in ("fail", "error")}
        if self.verdict.verdict == "accept" and exitstatus == pytest.ExitCode.TESTS_FAILED \
                and not self.other_failures and failed_checks:
            session.exitstatus = pytest.ExitCode.OK  # only failures below --kata-fail-on: the gate passes
        elif self.verdict.verdict == "reject" and exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.verdict is None:
            return
        terminalreporter.write_sep("=", "kata verdict")
        table = self.verdict.table(width=terminalreporter._tw.fullwidth, verbose=self.config.option.verbose > 0)
        for line in table.splitlines():
            markup = {"red": True} if line.startswith(("fail", "error", "VERDICT: REJECT")) else {}
            if line.startswith(("warning", "not run")):
                markup = {"yellow": True}
            if line.startswith("VERDICT: ACCEPT"):
                markup = {"green": True, "bold": True}
            terminalreporter.write_line(line, **markup)
        report = settings_of(self.config).report
        if self.write_error:
            terminalreporter.write_line(f"ERROR: {self.write_error}", red=True, bold=True)
        elif report:
            terminalreporter.write_line(f"verdict written to {report}")
