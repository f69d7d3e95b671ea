"""Puts the verdict into allure's results directory and pytest's JUnit XML (see :mod:`pytest_kata.reports`).

The allure files are written as soon as the verdict exists; the JUnit XML is rewritten at unconfigure, after
pytest's junitxml plugin wrote it at the end of the session.
"""

from __future__ import annotations

import pytest

from pytest_kata.errors import KataError, check_output_file
from pytest_kata.plugins.settings import settings_of
from pytest_kata.reports import junit_with_verdict, write_allure_verdict
from pytest_kata.verdict import Verdict

VERDICT_KEY = pytest.StashKey[Verdict]()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """An unwritable ``--kata-report`` is a usage error before anything runs, not a traceback at the end."""
    report = settings_of(config).report
    if report and not hasattr(config, "workerinput"):
        try:
            check_output_file(report, "--kata-report")
        except KataError as exc:
            raise pytest.UsageError(str(exc)) from None


def pytest_kata_verdict(verdict: Verdict, config: pytest.Config) -> None:
    config.stash[VERDICT_KEY] = verdict
    alluredir = getattr(config.option, "allure_report_dir", None)
    if alluredir:
        try:
            write_allure_verdict(alluredir, verdict)
        except KataError as exc:
            config.issue_config_time_warning(pytest.PytestWarning(str(exc)), stacklevel=2)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    verdict = config.stash.get(VERDICT_KEY, None)
    xmlpath = getattr(config.option, "xmlpath", None)
    if verdict is None or not xmlpath or hasattr(config, "workerinput"):
        return
    try:
        junit_with_verdict(xmlpath, verdict)
    except KataError as exc:
        print(f"pytest-kata: error: {exc}")
