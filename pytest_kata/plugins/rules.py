"""Rule-driven suites in pytest: one item per (rule, subject), from the candidate bundle, profile and waivers.

A suite test asks for ``kata_config_case`` (runtime configuration rules) or ``kata_kernel_case`` (guest
kernel rules); :func:`pytest_generate_tests` expands it into one item per case of :mod:`pytest_kata.rules.cases`,
with ids like ``KATA-CFG-005[configuration-qemu.toml]``. ``kata_rule_check`` evaluates a case and records its
result in ``kata_result``, so the verdict sees pass/fail/error/notapplicable/waived with actual and expected
values.

The profile and the waivers file are read at start-up: a malformed one stops the run with one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.kataconfig import load_config
from pytest_kata.plugins.candidate import not_given, opened_bundle
from pytest_kata.plugins.recorder import CheckRecorder
from pytest_kata.plugins.settings import settings_of
from pytest_kata.resources import suites_dir
from pytest_kata.rules import Profile, Waivers, load_profile, load_rules, load_waivers, rule_sets
from pytest_kata.rules.cases import Case, CaseResult, SkipCase, kernel_cases, runtime_config_cases

RULES_STATE = pytest.StashKey["RulesState"]()
CANDIDATE_FREE_SUITE = "isolation"


@dataclass
class RulesState:
    """What every rule-driven item shares: loaded once per process (controller and each xdist worker)."""

    profile: Profile
    waivers: Waivers
    usage_error: str | None = None  # a bad --kata-candidate/--kata-shim found while collecting


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    settings = settings_of(config)
    try:
        profile = load_profile(settings.profile)
        waivers = load_waivers(settings.waivers)
        known, broken = _known_rule_ids()
        try:
            profile.validate(known)
            waivers.validate(known)
        except KataError:
            if broken is not None:
                raise broken from None  # the real cause: a rule set that does not load
            raise
        if settings.installed_config:
            load_config(settings.installed_config)  # malformed: one line now, not 50 errors later
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[RULES_STATE] = RulesState(profile, waivers)


def _known_rule_ids() -> tuple[set[str], KataError | None]:
    """Ids of every shipped rule that loads, and the first broken rule set's error (reported when a waiver
    or profile needs its ids, else when its suite is collected)."""
    known: set[str] = set()
    broken: KataError | None = None
    for name in rule_sets():
        try:
            known |= {r.id for r in load_rules(name)}
        except KataError as exc:
            broken = broken or exc
    return known, broken


def _state(config: pytest.Config) -> RulesState:
    return config.stash[RULES_STATE]


def _candidate(config: pytest.Config) -> Bundle | SkipCase:
    """The session's candidate, or the case that stands in for every item when there is none (a candidate that
    does not open is a usage error, raised after collection)."""
    try:
        bundle = opened_bundle(config, "candidate")
    except KataError as exc:
        _state(config).usage_error = str(exc)
        return SkipCase("no-candidate", str(exc))
    return bundle if bundle is not None else SkipCase("no-candidate", not_given("candidate"))


def config_cases(config: pytest.Config) -> list[Case]:
    bundle = _candidate(config)
    if isinstance(bundle, SkipCase):
        return [bundle]
    settings = settings_of(config)
    return runtime_config_cases(bundle, settings.shim, settings.installed_config)


def guest_kernel_cases(config: pytest.Config) -> list[Case]:
    bundle = _candidate(config)
    if isinstance(bundle, SkipCase):
        return [bundle]
    return kernel_cases(bundle, settings_of(config).shim)


CASE_FACTORIES: dict[str, Callable[[pytest.Config], list[Case]]] = {
    "kata_config_case": config_cases,
    "kata_kernel_case": guest_kernel_cases,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture_name, factory in CASE_FACTORIES.items():
        if fixture_name in metafunc.fixturenames:
            try:
                cases = factory(metafunc.config)
            except KataError as exc:  # a broken rule file, an unknown --kata-shim: one line after collection
                _state(metafunc.config).usage_error = str(exc)
                cases = [SkipCase("bad-input", str(exc))]
            metafunc.parametrize(fixture_name, cases, ids=[c.id for c in cases])


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist, check --kata-candidate/--kata-shim on the controller before workers start: an input error
    raised inside a worker's collection would crash it instead of printing one line."""
    config = session.config
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no":
        return
    if RULES_STATE not in config.stash:
        return
    settings = settings_of(config)
    if not settings.candidate and _targets_suites(config):
        raise pytest.UsageError("the suites need a candidate: pass --kata-candidate PATH "
                                "(a kata-static tarball or an /opt/kata tree)")
    try:
        opened_bundle(config, "baseline")
    except KataError as exc:
        raise pytest.UsageError(f"--kata-baseline: {exc}") from None
    try:
        bundle = opened_bundle(config, "candidate")
        if bundle is not None and bundle.shims:
            bundle.selected_shims(settings.shim)
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None


def _targets_suites(config: pytest.Config) -> bool:
    """Whether the run names a shipped suite that judges the candidate (a path inside the suites, or
    ``--pyargs pytest_kata.suites...``): the controller of an xdist run collects nothing, so it judges by the
    arguments. The isolation suite alone can run without one (its runc/runsc controls)."""
    suites = suites_dir().resolve()
    for arg in config.args:
        target = arg.split("::", 1)[0]
        if config.option.pyargs and target.startswith("pytest_kata.suites"):
            parts = target.split(".")[2:3]
        else:
            path = (Path(config.invocation_params.dir) / target).resolve()
            if path != suites and suites not in path.parents:
                continue
            parts = list(path.relative_to(suites).parts[:1])
        if parts != [CANDIDATE_FREE_SUITE]:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config) -> None:
    """Raise input errors found while generating items here, where pytest prints them as one line (inside a
    collector they would become a collection error with a traceback)."""
    error = config.stash[RULES_STATE].usage_error if RULES_STATE in config.stash else None
    if error:
        raise pytest.UsageError(error)


# ------------------------------------------------------------------------------------------------ fixtures


def record_case(recorder: CheckRecorder, result: CaseResult) -> None:
    """Record a case's result and end the item with its status (a skipped case records nothing)."""
    if result.status == "skipped":
        pytest.skip(result.message)
    recorder.record(id=result.id, severity=result.severity, title=result.title, suite=result.suite,
                    **result.evidence)
    for name, body, mime in result.attachments:
        recorder.attach(name, body, mime)
    recorder.conclude(result.status, result.message)


@pytest.fixture(scope="session")
def kata_profile(pytestconfig: pytest.Config) -> Profile:
    """The rule profile chosen with ``--kata-profile`` (its ``extends`` chain merged)."""
    return _state(pytestconfig).profile


@pytest.fixture(scope="session")
def kata_waivers(pytestconfig: pytest.Config) -> Waivers:
    """The user's waivers (``--kata-waivers``), validated against the known rule ids."""
    return _state(pytestconfig).waivers


@pytest.fixture
def kata_rule_check(kata_result: CheckRecorder, kata_profile: Profile, kata_waivers: Waivers) -> Callable[[Case], None]:
    """Run one rule case: evaluate, record evidence and attachments, conclude with its status."""

    def run(case: Case) -> None:
        record_case(kata_result, case.evaluate(kata_profile, kata_waivers))

    return run
