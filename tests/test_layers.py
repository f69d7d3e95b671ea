"""The library stands without pytest: every module outside ``plugin.py``, ``plugins/`` and the suites imports
with pytest blocked, so the CLI and other programs use the same code as the suites."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = r'''
import importlib, pkgutil, sys

class BlockPytest:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pytest", "_pytest", "pluggy", "xdist", "allure_pytest"):
            raise ImportError(f"{name} is blocked")
        return None

sys.meta_path.insert(0, BlockPytest())
import pytest_kata

pytest_layer = ("pytest_kata.plugin", "pytest_kata.plugins", "pytest_kata.suites")
imported, failed = [], []
for info in pkgutil.walk_packages(pytest_kata.__path__, "pytest_kata.", onerror=lambda name: None):
    if info.name.startswith(pytest_layer):
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except ImportError as exc:
        failed.append(f"{info.name}: {exc}")
try:
    importlib.import_module(sys.argv[1])
    failed.append(f"control {sys.argv[1]} imported with pytest blocked")
except ImportError:
    pass
print(len(imported))
print("\n".join(failed))
'''


def test_the_library_imports_without_pytest() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT, "pytest_kata.plugins.verdict"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    count, _, failures = done.stdout.partition("\n")
    assert not failures.strip(), failures
    assert int(count) > 60  # every library module was reached (bundle, rules, sandbox, hosts, install, ...)
