"""The install package's error, below every module in it."""

from __future__ import annotations

from pytest_kata.errors import KataError


class InstallError(KataError):
    """An install or rollback failed (the message says what was restored)."""
