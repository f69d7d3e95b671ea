"""The candidate and baseline bundles of a session, each opened once per process on one path.

The rules plugin (while it generates its items), the ``kata_candidate``/``kata_baseline`` fixtures, the input
checks before a run and the verdict all take the bundle from here. The candidate's first opening calls
``pytest_kata_candidate_opened`` (once per process, before any rule item is generated), so what a site hook
adds to the bundle is what every rule, suite and the verdict see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from pytest_kata.bundle import Bundle, open_bundle
from pytest_kata.errors import KataError
from pytest_kata.plugins.settings import settings_of

Which = Literal["candidate", "baseline"]
OPENED = pytest.StashKey[dict[str, "Opened"]]()


@dataclass
class Opened:
    """One bundle option of this process: the bundle, or why it did not open (None, None: not given)."""

    bundle: Bundle | None = None
    error: KataError | None = None


def not_given(which: Which) -> str:
    return f"no {which} given: pass --kata-{which} PATH (a kata-static tarball or an /opt/kata tree)"


def opened_bundle(config: pytest.Config, which: Which) -> Bundle | None:
    """The bundle ``--kata-<which>`` names, opened on first use and kept (None: the option was not given).

    Raises the :class:`KataError` it failed with, on every call."""
    opened = config.stash.setdefault(OPENED, {})
    if which not in opened:
        slot = opened[which] = Opened()
        paths = settings_of(config).candidate if which == "candidate" else settings_of(config).baseline
        if paths:
            try:
                slot.bundle = open_bundle(paths)
            except KataError as exc:
                slot.error = exc
            else:
                if which == "candidate":
                    config.hook.pytest_kata_candidate_opened(bundle=slot.bundle, config=config)
    slot = opened[which]
    if slot.error is not None:
        raise slot.error
    return slot.bundle


def _fixture_bundle(config: pytest.Config, which: Which) -> Bundle:
    try:
        bundle = opened_bundle(config, which)
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    if bundle is None:
        pytest.skip(not_given(which))
    return bundle


@pytest.fixture(scope="session")
def kata_candidate(pytestconfig: pytest.Config) -> Bundle:
    """The candidate bundle, opened safely and inventoried once per session (per xdist worker)."""
    return _fixture_bundle(pytestconfig, "candidate")


@pytest.fixture(scope="session")
def kata_baseline(pytestconfig: pytest.Config) -> Bundle:
    """The release the candidate replaces (skips when none was given)."""
    return _fixture_bundle(pytestconfig, "baseline")
