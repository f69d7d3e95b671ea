"""Fixtures the escape-regression checks share beyond the plugin's sandbox fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pytest_kata.sandbox import exploits


@pytest.fixture(scope="session")
def kata_hostile_pod(kata_sandbox: Any) -> Iterator[exploits.HostilePod | str]:
    """One running pod with a privileged container that acts as the guest's root, reused by every
    shared-directory check (CVE-2020-2024, CVE-2020-2026); the reason as a string where the session's
    driver cannot run it. Removed at the end of the session."""
    with exploits.hostile_pod(kata_sandbox) as pod:
        yield pod
