"""Advisory gate: one check per advisory in the feed, failing when the candidate's release is affected.

Run: ``pytest suites/advisories --kata-candidate BUNDLE [--kata-advisories FEED ...]``. The feed defaults to
the Kata advisories shipped with pytest-kata (``pytest-kata advisories refresh`` updates it). Each item's id
is the advisory id; the verdict carries the evidence that decided (``decided_by``), the fixed release and the
candidate's release number. The decision logic lives in :mod:`pytest_kata.advisories` (it never compares a
release number with a Go pseudo-version range).
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_kata.advisories import Advisory, ReleaseVersion, decide, normalise_release
from pytest_kata.plugin import ADVISORY_PREFIXES
from pytest_kata.plugins.advisories import advisory_feed
from pytest_kata.recorder import CheckRecorder


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One item per advisory, so that each shows up (and can be waived) by its own id."""
    if "advisory" not in metafunc.fixturenames:
        return
    feed = advisory_feed(metafunc.config)
    params = [pytest.param(a, id=a.id, marks=[pytest.mark.kata_advisory(a.id)]
                           if a.id.startswith(ADVISORY_PREFIXES) else []) for a in feed]
    metafunc.parametrize("advisory", params)


def test_advisory(advisory: Advisory, kata_candidate: Any, kata_result: CheckRecorder) -> None:
    """The candidate's Kata release is not affected by this advisory."""
    kata_result.record(id=advisory.id, severity=advisory.severity, title=advisory.title, suite="advisories",
                       advisory=advisory.id, aliases=advisory.aliases, url=advisory.url,
                       severity_source=advisory.severity_source)
    version = getattr(kata_candidate, "version", None)
    if not version or ReleaseVersion.parse(normalise_release(str(version))) is None:
        where = ", ".join(str(s) for s in getattr(kata_candidate, "sources", []) or []) or "the candidate"
        kata_result.record(version=version, decided_by=None, fixed=advisory.fixed_in,
                           version_evidence=getattr(kata_candidate, "version_evidence", {}))
        state = "unknown" if not version else f"{version!r}, not a release number"
        kata_result.conclude("error", f"cannot check {advisory.id}: the Kata release of {where} is {state}; "
                             "put the release number (X.Y.Z) in opt/kata/VERSION of the bundle as "
                             "kata-static tarballs do, or check by hand with "
                             "`pytest-kata advisories --version X.Y.Z`")
    decision = decide(advisory, str(version))
    kata_result.record(version=decision.version, decided_by=decision.evidence, fixed=decision.fixed,
                       notes=decision.notes)
    if decision.undecided:
        kata_result.conclude("error", f"{advisory.id}: {decision.evidence}")
    if decision.affected:
        kata_result.conclude("fail", f"{decision.version} is affected by {advisory.id} "
                             f"({advisory.severity}): {advisory.title}; decided by: {decision.evidence}; "
                             f"fixed in {decision.fixed or 'no release yet'}")
    kata_result.conclude("pass", f"{decision.version} not affected: {decision.evidence}")
