"""The library's layering: no pytest_kata import hides inside a function (a deferred import dodges an import
cycle or hides a dependency), and nothing outside the pytest side needs pytest to import."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest_kata

PACKAGE = Path(pytest_kata.__file__).resolve().parent
ROOT = PACKAGE.parent

# Modules that are pytest's side of the library and need pytest to import; everything else must not.
PYTEST_SIDE = {"pytest_kata.plugin"}


def function_level_imports(source: str, filename: str = "<src>") -> list[str]:
    """``line: module`` of every ``import pytest_kata...``/``from pytest_kata... import`` (or a relative
    import) inside a function body."""
    found = []
    for fn in ast.walk(ast.parse(source, filename)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
            elif isinstance(node, ast.Import):
                module = ",".join(alias.name for alias in node.names)
            else:
                continue
            if module.startswith((".", "pytest_kata")):
                found.append(f"{node.lineno}: {module}")
    return sorted(set(found), key=lambda entry: int(entry.split(":")[0]))


def library_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "suites" not in p.relative_to(PACKAGE).parts)


def test_no_function_level_imports_of_the_package() -> None:
    offenders = {}
    for path in library_files():
        rel = path.relative_to(PACKAGE).as_posix()
        found = function_level_imports(path.read_text(), str(path))
        if found:
            offenders[rel] = found
    assert offenders == {}


def test_the_import_check_sees_deferred_imports() -> None:
    source = textwrap.dedent("""
        import os
        from pytest_kata import runid

        def f():
            from pytest_kata.bundle import open_bundle
            import json
            return open_bundle

        class C:
            def m(self):
                import pytest_kata.services
                from . import sibling
    """)
    assert function_level_imports(source) == ["6: pytest_kata.bundle", "12: pytest_kata.services", "13: ."]
    assert function_level_imports("from pytest_kata import runid\n") == []


def library_modules() -> list[str]:
    modules = []
    for path in library_files():
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] == "plugins":
            continue
        parts = ("pytest_kata", *rel.parts[:-1]) if rel.name == "__init__" else ("pytest_kata", *rel.parts)
        modules.append(".".join(parts))
    return sorted(set(modules) - PYTEST_SIDE)


BLOCKER = textwrap.dedent("""
    import importlib, importlib.abc, sys

    class NoPytest(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("pytest", "_pytest", "xdist", "pluggy", "allure_pytest"):
                raise ImportError(f"pytest is blocked: {name}")
            return None

    sys.meta_path.insert(0, NoPytest())
    for module in sys.argv[1:]:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"{module}: {exc}")
    print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in ("pytest", "_pytest")))
""")


def import_without_pytest(modules: list[str]) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *modules], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_the_library_imports_with_pytest_blocked() -> None:
    modules = library_modules()
    assert "pytest_kata.bundle" in modules and "pytest_kata.cli" in modules and "pytest_kata.hooks" in modules
    assert import_without_pytest(modules) == ["loaded: []"]


def test_the_blocker_blocks_the_pytest_side() -> None:
    lines = import_without_pytest(sorted(PYTEST_SIDE))
    assert [line.split(":")[0] for line in lines[:-1]] == sorted(PYTEST_SIDE)
    assert lines[-1] == "loaded: []"
