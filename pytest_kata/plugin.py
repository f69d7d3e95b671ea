"""The pytest entry point: pytest-kata's hooks and every module of :mod:`pytest_kata.plugins`.

The options (:mod:`~pytest_kata.plugins.settings`) and the session's bundles
(:mod:`~pytest_kata.plugins.candidate`) load first, because the other plugin modules import them; the checks and
the verdict are :mod:`~pytest_kata.plugins.verdict`. Everything they decide is in the library.
"""

from __future__ import annotations

import pkgutil

import pytest

from pytest_kata import hooks
from pytest_kata import plugins as _plugins

FIRST = ("settings", "candidate", "recorder", "verdict")  # imported by the others: registered before them
pytest_plugins = [f"pytest_kata.plugins.{name}" for name in FIRST] + [
    f"pytest_kata.plugins.{m.name}" for m in pkgutil.iter_modules(_plugins.__path__) if m.name not in FIRST]


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hooks)
