"""Advisory gate: one check per advisory in the feed, failing when the candidate is affected.

Run: ``pytest suites/advisories --kata-candidate BUNDLE [--kata-advisories FEED ...]``. The feed defaults to
the Kata advisories shipped with pytest-kata (``pytest-kata advisories refresh`` updates it). Each item's id
is the advisory id; the verdict carries the evidence that decided (``decided_by``), the fixed release and the
candidate's build. An advisory about a component or mode that none of the judged configurations ships
(runtime-rs, a hypervisor, Confidential Containers) is ``notapplicable`` with the reason. A commit build
(``--kata-commit SHA --kata-repo PATH``, or a pseudo-version / ``git describe`` version) is decided by git
ancestry of the fix commit; a vendor build (``3.19.1.kata2``) by its upstream base plus ``--kata-backports``.
An affected candidate is rejected whatever the advisory's CVSS severity (``--kata-fail-on`` is for rules).
The decision logic lives in :mod:`pytest_kata.advisories`.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_kata.advisories import (
    Advisory,
    CandidateBuild,
    Deployment,
    candidate_build,
    decide_build,
    load_backports,
)
from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.options import KataSettings
from pytest_kata.plugins.advisories import advisory_feed
from pytest_kata.plugins.recorder import CheckRecorder
from pytest_kata.plugins.verdict import ADVISORY_PREFIXES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One item per advisory, so that each shows up (and can be waived) by its own id."""
    if "advisory" not in metafunc.fixturenames:
        return
    feed = advisory_feed(metafunc.config)
    params = [pytest.param(a, id=a.id, marks=[pytest.mark.kata_advisory(a.id)]
                           if a.id.startswith(ADVISORY_PREFIXES) else []) for a in feed]
    metafunc.parametrize("advisory", params)


@pytest.fixture(scope="module")
def advisory_subject(kata_candidate: Bundle, kata_settings: KataSettings) -> dict[str, Any]:
    """What every advisory is judged against: the build, its binaries, the configurations, the backports."""
    try:
        build = candidate_build(kata_candidate, commit=kata_settings.commit)
        backports = load_backports(kata_settings.backports) if kata_settings.backports else {}
        deployment = Deployment.from_bundle(kata_candidate, kata_settings.shim)
    except KataError as exc:
        return {"error": str(exc)}
    return {"build": build, "backports": backports, "deployment": deployment}


def test_advisory(advisory: Advisory, kata_candidate: Bundle, kata_settings: KataSettings,
                  advisory_subject: dict[str, Any], kata_result: CheckRecorder) -> None:
    """The candidate is not affected by this advisory (or does not ship what it is about)."""
    kata_result.record(id=advisory.id, severity=advisory.severity, title=advisory.title, suite="advisories",
                       advisory=advisory.id, aliases=advisory.aliases, url=advisory.url,
                       severity_source=advisory.severity_source, rejects_whatever_severity=True)
    if "error" in advisory_subject:
        kata_result.conclude("error", f"cannot check {advisory.id}: {advisory_subject['error']}")
    build: CandidateBuild = advisory_subject["build"]
    kata_result.record(build=build.to_json())
    if build.build is None:
        where = ", ".join(str(s) for s in kata_candidate.sources) or "the candidate"
        version = kata_candidate.version
        kata_result.record(version=version, decided_by=None, fixed=advisory.fixed_in,
                           version_evidence=kata_candidate.version_evidence)
        state = "unknown" if not version else f"{version!r}, not a release number"
        kata_result.conclude("error", f"cannot check {advisory.id}: the Kata release of {where} is {state}; "
                             "put the release number (X.Y.Z) in opt/kata/VERSION of the bundle as "
                             "kata-static tarballs do, or check by hand with "
                             "`pytest-kata advisories --version X.Y.Z`")
    if build.mismatches:
        kata_result.conclude("error", f"cannot check {advisory.id}: the candidate's versions disagree: "
                             + "; ".join(build.mismatches))
    try:
        decision = decide_build(advisory, build.build or "", repo=kata_settings.repo,
                                backports=advisory_subject["backports"],
                                deployment=advisory_subject["deployment"],
                                backports_file=kata_settings.backports)
    except KataError as exc:
        kata_result.conclude("error", f"cannot check {advisory.id}: {exc}")
    kata_result.record(version=decision.version, decided_by=decision.evidence, fixed=decision.fixed,
                       notes=decision.notes, backported=decision.backported)
    if not decision.applicable:
        kata_result.conclude("notapplicable", decision.evidence)
    if decision.undecided:
        kata_result.conclude("error", f"{advisory.id}: {decision.evidence}")
    if decision.affected:
        kata_result.conclude("fail", f"{decision.version} is affected by {advisory.id} "
                             f"({advisory.severity}): {advisory.title}; decided by: {decision.evidence}; "
                             f"fixed in {decision.fixed or 'no release yet'}")
    kata_result.conclude("pass", f"{decision.version} not affected: {decision.evidence}")
