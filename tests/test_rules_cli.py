"""``pytest-kata rules list|check``: the rules without pytest, same verdict logic as the suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_kata.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"


def test_list_shows_profile_severities_and_opt_in_rules(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "list", "--set", "runtime-config"]) == 0
    out = capsys.readouterr().out
    assert "KATA-CFG-006    " in out and "(off: needs strict)" in out
    assert main(["rules", "list", "--set", "runtime-config", "--profile", "strict"]) == 0
    strict = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert strict["KATA-CFG-010"] == "high"  # medium raised by strict


def test_check_rejects_upstream_and_accepts_hardened(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "check", str(CONFIGS / "upstream/configuration-qemu.toml"), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "reject" and set(data["blocking"]) == {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011"}
    assert main(["rules", "check", str(CONFIGS / "hardened/configuration-qemu.toml")]) == 0
    assert "VERDICT: ACCEPT" in capsys.readouterr().out
    assert main(["rules", "check", str(CONFIGS / "upstream/configuration-qemu.toml"), "--fail-on", "critical"]) == 0


def test_check_with_waivers_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    waivers = tmp_path / "w.toml"
    waivers.write_text(
        "".join(
            f'[[waiver]]\nrule = "{r}"\njustification = "lab only"\nexpires = 2999-01-01\n'
            for r in ("KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011")
        )
    )
    assert main(["rules", "check", str(CONFIGS / "upstream/configuration-qemu.toml"), "--waivers", str(waivers)]) == 0
    assert "waived" in capsys.readouterr().out
    assert main(["rules", "check", str(tmp_path / "missing.toml")]) == 2
    assert capsys.readouterr().err.strip() == f"pytest-kata: error: {tmp_path / 'missing.toml'}: no such file"


def test_check_decides_like_the_suite_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An expired waiver rejects at any severity, in the CLI as in the suites (one verdict logic); a live one
    below the threshold does not."""
    waivers = tmp_path / "w.toml"
    upstream = str(CONFIGS / "upstream/configuration-qemu.toml")
    waivers.write_text('[[waiver]]\nrule = "KATA-CFG-010"\njustification = "lab"\nexpires = 2001-01-01\n')
    assert main(["rules", "check", upstream, "--waivers", str(waivers), "--fail-on", "critical", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["blocking"] == ["KATA-CFG-010"] and data["verdict"] == "reject"
    waivers.write_text('[[waiver]]\nrule = "KATA-CFG-010"\njustification = "lab"\nexpires = 2999-01-01\n')
    assert main(["rules", "check", upstream, "--waivers", str(waivers), "--fail-on", "critical", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["blocking"] == []
