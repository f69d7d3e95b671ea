"""Hooks that pytest-kata adds, for conftest files and other plugins (like pytest-xdist's newhooks)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest

    from pytest_kata.bundle import Bundle
    from pytest_kata.verdict import Result, Verdict


def pytest_kata_candidate_opened(bundle: Bundle, config: pytest.Config) -> None:
    """Called once per process when the candidate bundle is opened and inventoried, before any rule item is
    generated.

    Use it to add site-specific facts (an internal version scheme, a signature check) before suites run: the
    rules, the suites' fixtures and the verdict all use this same bundle.
    """


def pytest_kata_result(result: Result, config: pytest.Config) -> None:
    """Called on the controller for every check that reaches the verdict (also under xdist)."""


def pytest_kata_verdict(verdict: Verdict, config: pytest.Config) -> None:
    """Called once at the end of the run with the final verdict, before the report is written.

    Staging pipelines use it to publish the verdict (a chat message, a release gate API).
    """


def pytest_kata_host_ready(host: Any, config: pytest.Config) -> None:
    """Called when a host has booted and reached its prompt, before its clean snapshot is taken.

    Use it to add site-specific provisioning that every test should see (certificates, mirrors).
    """
