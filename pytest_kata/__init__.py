"""pytest-kata: decide whether a candidate Kata Containers release is safe to roll out.

The library (everything but :mod:`pytest_kata.plugin` and :mod:`pytest_kata.plugins`) does not need pytest:
bundles, rules, advisories, hosts and the verdict can be driven from the ``pytest-kata`` CLI or any script.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


def _checkout_suites() -> None:
    """Make ``pytest_kata.suites`` the checkout's top-level ``suites/`` (an editable install).

    A wheel ships the suites inside the package; an editable install maps only ``pytest_kata/`` itself, so
    without this ``pytest --pyargs pytest_kata.suites`` (and ``pytest-kata run``) would not find them.
    """
    here = Path(__file__).resolve().parent
    suites = here.parent / "suites"
    if (here / "suites").is_dir() or not (suites / "__init__.py").is_file() or f"{__name__}.suites" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(f"{__name__}.suites", suites / "__init__.py",
                                                  submodule_search_locations=[str(suites)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


_checkout_suites()
