"""pytest-kata: decide whether a candidate Kata Containers release is safe to roll out.

The library (everything but :mod:`pytest_kata.plugin` and :mod:`pytest_kata.plugins`) does not need pytest:
bundles, rules, advisories, hosts and the verdict can be driven from the ``pytest-kata`` CLI or any script.
"""

from __future__ import annotations

__version__ = "0.1.0"
