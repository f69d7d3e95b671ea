"""The ``--kata-*`` options in pytest: the flags and ini twins of :data:`pytest_kata.options.OPTIONS`, resolved
once per process into :class:`~pytest_kata.options.KataSettings` on the config's stash.

Every other part of the pytest layer reads them with :func:`settings_of` (or the ``kata_settings`` fixture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_kata.errors import KataError
from pytest_kata.options import OPTIONS, KataSettings, resolve_settings

SETTINGS = pytest.StashKey[KataSettings]()


def settings_of(config: pytest.Config) -> KataSettings:
    """The resolved options of this session (command line > ini > kata.toml > default)."""
    return config.stash[SETTINGS]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kata", "Kata Containers release validation (pytest-kata)")
    for o in OPTIONS:
        default = f" (default: {o.default})" if o.default not in (None, False) else ""
        kwargs: dict[str, Any] = {"dest": f"kata_{o.name}", "default": None, "help": o.help + default}
        if o.type == "bool":
            kwargs["action"] = "store_true"
        elif o.type == "paths":
            kwargs.update(action="append", metavar=o.metavar or "PATH")
        else:
            kwargs["metavar"] = o.metavar or o.name.upper()
            if o.choices:
                kwargs["choices"] = o.choices
        group.addoption(o.flag, **kwargs)
        parser.addini(o.ini, help=o.help + default, type="string", default="")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """Resolve the options before any other configure hook reads them; a bad value is one usage line."""
    cli = {o.name: config.getoption(f"kata_{o.name}") for o in OPTIONS}
    ini = {o.name: config.getini(o.ini) for o in OPTIONS}
    try:
        config.stash[SETTINGS] = resolve_settings(cli, ini, Path(config.rootpath), Path(config.invocation_params.dir))
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = settings_of(config)
    if not s.given:
        return []  # a session that does not ask for Kata (an unrelated project in the same venv)
    given = [f"{o.flag}={s.value(o.name)}" for o in OPTIONS if s.sources.get(o.name) != "default"]
    return [f"kata: {' '.join(given) or 'no options given'}"]


@pytest.fixture(scope="session")
def kata_settings(pytestconfig: pytest.Config) -> KataSettings:
    """The resolved ``--kata-*`` options (command line > ini > kata.toml > default)."""
    return settings_of(pytestconfig)
