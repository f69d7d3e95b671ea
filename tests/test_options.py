"""Options: every flag has an ini twin and a kata.toml key; precedence and bad values."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from pytest_kata.errors import ConfigError
from pytest_kata.options import OPTIONS, SETTING_FIELDS, KataSettings, resolve_settings


def _none() -> dict[str, None]:
    return {o.name: None for o in OPTIONS}


def test_defaults_when_nothing_given(tmp_path: Path) -> None:
    s = resolve_settings(_none(), _none(), tmp_path)
    assert s.fail_on == "high" and s.profile == "default" and s.candidate is None
    assert s.sources["fail_on"] == "default"


def test_precedence_cli_over_ini_over_kata_toml(tmp_path: Path) -> None:
    (tmp_path / "kata.toml").write_text('[kata]\nfail_on = "low"\nprofile = "strict"\nhosts = 3\n')
    ini = _none() | {"profile": "confidential"}
    cli = _none() | {"hosts": "2"}
    s = resolve_settings(cli, ini, tmp_path)
    assert (s.fail_on, s.profile, s.hosts) == ("low", "confidential", 2)
    assert s.sources["hosts"] == "command line" and s.sources["profile"] == "ini"
    assert s.sources["fail_on"].endswith("kata.toml")


def test_pyproject_table_is_read(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.pytest_kata]\nkeep-on-failure = true\ncandidate = "c.tar.zst"\n')
    s = resolve_settings(_none(), _none(), tmp_path)
    assert s.keep_on_failure is True
    assert s.candidate == [str(tmp_path / "c.tar.zst")]


def test_paths_split_on_commas_and_resolve_relative_to_cwd(tmp_path: Path) -> None:
    cli = _none() | {"candidate": ["a.tar.zst,b.tar.zst", "/abs/c"]}
    s = resolve_settings(cli, _none(), tmp_path, cwd=tmp_path / "sub")
    assert s.candidate == [str(tmp_path / "sub/a.tar.zst"), str(tmp_path / "sub/b.tar.zst"), "/abs/c"]


@pytest.mark.parametrize(("text", "needle"), [
    ('[kata]\nfail_on = "severe"\n', "fail_on"),
    ('[kata]\nhosts = "many"\n', "hosts"),
    ('[kata]\nno_such = 1\n', "unknown option"),
    ('[kata\n', "cannot read options"),
])
def test_bad_kata_toml_is_one_line_naming_the_file(tmp_path: Path, text: str, needle: str) -> None:
    (tmp_path / "kata.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_settings(_none(), _none(), tmp_path)
    message = str(info.value)
    assert "\n" not in message and needle in message and "kata.toml" in message


def test_settings_have_one_typed_field_per_option_with_its_default(tmp_path: Path) -> None:
    """A new option needs its field (and an unknown attribute is an error, not a silent None)."""
    assert {o.name for o in OPTIONS} == SETTING_FIELDS
    s = resolve_settings(_none(), _none(), tmp_path)
    assert all(s.value(o.name) == o.default for o in OPTIONS)
    with pytest.raises(AttributeError):
        s.no_such_option  # type: ignore[attr-defined]  # noqa: B018
    with pytest.raises(KeyError):
        s.value("sources")
    annotations = {f.name: f.type for f in fields(KataSettings)}
    assert annotations["candidate"] == "list[str] | None" and annotations["hosts"] == "int"
