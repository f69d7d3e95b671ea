"""A stable rootdir for ``pytest --pyargs pytest_kata.suites --kata-candidate PATH``.

pytest picks its rootdir and ini file before it loads plugins, so it does not yet know that ``PATH`` after
``--kata-candidate`` is an option's value: it takes ``PATH`` for a test path, and the candidate's directory
becomes the rootdir (the user's ``pytest.ini``/``kata.toml`` are ignored and ``.pytest_cache`` lands beside the
candidate). Once the plugin is loaded, pytest's second parse knows the options; this plugin decides the rootdir
again from that parse, the way pytest does, and adopts it when it differs, before conftests are loaded. Where
this pytest's internals differ from the ones known here, the session stops with one line that says what to
write instead (``--kata-candidate=PATH``).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
from _pytest.config import findpaths

from pytest_kata.options import OPTIONS

_VALUE_FLAGS = tuple(o.flag for o in OPTIONS if o.type != "bool")


def _space_form(args: list[str]) -> bool:
    return any(a in _VALUE_FLAGS for a in args[:-1])


def _determine(config: pytest.Config) -> tuple[Path, Path | None, Any]:
    ns = config.known_args_namespace
    given = {"inifile": ns.inifilename, "override_ini": ns.override_ini, "args": list(ns.file_or_dir),
             "rootdir_cmd_arg": ns.rootdir or None, "invocation_dir": config.invocation_params.dir}
    accepted = inspect.signature(findpaths.determine_setup).parameters
    rootpath, inipath, inicfg = findpaths.determine_setup(**{k: v for k, v in given.items() if k in accepted})[:3]
    return rootpath, inipath, inicfg


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    if not _space_form(args):
        return
    try:
        rootpath, inipath, inicfg = _determine(early_config)
        if (rootpath, inipath) == (early_config.rootpath, early_config.inipath):
            return
        old_cut = Path(str(early_config.inipath.parent if early_config.inipath else early_config.rootpath))
        early_config._rootpath = rootpath
        early_config._inipath = inipath
        early_config._inicfg = inicfg
        early_config._inicache.clear()
        parser.extra_info.update(rootdir=str(rootpath), inifile=str(inipath))
        ns = early_config.known_args_namespace
        if ns.confcutdir is not None and Path(ns.confcutdir) == old_cut:  # derived from the old rootdir
            ns.confcutdir = str(inipath.parent if inipath else rootpath)
        args[:0] = early_config.getini("addopts")  # the ini pytest read first had none of the user's
    except (AttributeError, TypeError, ValueError) as exc:
        flags = " ".join(a for a in args if a in _VALUE_FLAGS)
        raise pytest.UsageError(f"pytest took an option's value for a test path ({flags} VALUE) and this pytest "
                                f"cannot be corrected ({exc}): write {_VALUE_FLAGS[0]}=VALUE (with '=')") from None
