"""Guest image fixtures: ``kata_guest_image("minimal")`` builds (or reuses) a recipe from ``vm-images/guest``.

Session-scoped and cached by content hash underneath, so asking for the same recipe in many tests (or many
xdist workers: the cache's file lock lets one build and the others wait) costs one build per machine. A bad
recipe name fails the test with the one-line error, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pytest_kata.errors import KataError
from pytest_kata.images.guest import GuestImage, build_guest, normalize_name


@pytest.fixture(scope="session")
def kata_guest_image() -> Callable[..., object]:
    """Factory: ``kata_guest_image(name, force=False) -> pytest_kata.images.guest.GuestImage``."""
    built: dict[str, GuestImage] = {}

    def make(name: str, *, force: bool = False) -> GuestImage:
        name = normalize_name(name)  # "guest-minimal" and "minimal" are one image
        if force or name not in built:
            try:
                built[name] = build_guest(name, force=force)
            except KataError as exc:
                pytest.fail(str(exc), pytrace=False)
        return built[name]

    return make
