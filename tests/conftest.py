"""Shared helpers for the project's own tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (reference data); tests that need it skip when it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent: these tests read the shared reference data beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def reference_bundle() -> Callable[[str], Path]:
    """``reference_bundle("candidate" | "baseline")``: the hardened reference tarball, built by
    ``fixtures/build-reference`` on first use and cached by content hash."""
    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from reference import reference_tarball
    finally:
        sys.path.pop(0)
    return lambda which: Path(reference_tarball(which, "hardened"))
