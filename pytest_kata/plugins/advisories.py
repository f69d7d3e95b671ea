"""Advisory-gate fixtures: the feed named by ``--kata-advisories`` (or the shipped one), loaded once.

A feed given on the command line is read at configure time, so that a missing or malformed feed is one
``ERROR:`` line before anything runs, not a collection traceback.
"""

from __future__ import annotations

import pytest

from pytest_kata.advisories import Advisory, load_feed
from pytest_kata.errors import KataError
from pytest_kata.plugins.settings import settings_of

FEED_KEY = pytest.StashKey[list[Advisory]]()


def advisory_feed(config: pytest.Config) -> list[Advisory]:
    """The advisories of this run (cached on the config; used at collection by suites/advisories)."""
    if FEED_KEY not in config.stash:
        try:
            config.stash[FEED_KEY] = load_feed(settings_of(config).advisories)
        except KataError as exc:
            raise pytest.UsageError(f"--kata-advisories: {exc}") from None
    return config.stash[FEED_KEY]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if settings_of(config).sources.get("advisories", "default") != "default":
        advisory_feed(config)


@pytest.fixture(scope="session")
def kata_advisory_feed(pytestconfig: pytest.Config) -> list[Advisory]:
    """Every advisory in the feed (``--kata-advisories`` or the Kata advisories shipped with pytest-kata)."""
    return advisory_feed(pytestconfig)
