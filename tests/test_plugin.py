"""The plugin itself, driven with pytester: options, markers, the verdict report and the exit status."""

from __future__ import annotations

import json

import pytest

CHECKS = """
import pytest

@pytest.mark.kata_check("KATA-T-LOW", severity="low", title="a low check")
def test_low_fails():
    assert False, "low-severity problem"

@pytest.mark.kata_check("KATA-T-HIGH", severity="high", title="a high check")
def test_high_passes():
    pass

def test_recorded(kata_result):
    kata_result.record(id="KATA-T-REC", severity="critical", title="recorded", actual=1, expected=1)
    kata_result.conclude("pass", "ok")

def test_waived(kata_result):
    kata_result.record(id="KATA-T-W", severity="critical", title="waived one")
    kata_result.conclude("waived", "accepted risk until 2099-01-01")

def test_na(kata_result):
    kata_result.record(id="KATA-T-NA", severity="high", title="not applicable one")
    kata_result.conclude("notapplicable", "only for clh")
"""


def test_options_are_in_one_kata_group_with_ini_twins(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    group = out[out.index("Kata Containers release validation"):]
    for flag in ("--kata-candidate", "--kata-baseline", "--kata-shim", "--kata-profile", "--kata-waivers",
                 "--kata-advisories", "--kata-report", "--kata-fail-on", "--kata-keep-on-failure"):
        assert flag in group
    for ini in ("kata_candidate", "kata_fail_on", "kata_report", "kata_keep_on_failure"):
        assert ini in out


def test_markers_are_registered_with_signatures(pytester: pytest.Pytester) -> None:
    out = pytester.runpytest("--markers").stdout.str()
    assert "kata_check(id, *, severity='medium', title=None)" in out
    assert "kata_advisory(advisory_id)" in out and "kata_hosts(n)" in out and "kata_dirty" in out


def test_report_statuses_and_exit_status_follow_fail_on(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("--kata-report", "v.json")
    assert result.ret == 0, "a low failure must not reject at fail-on high"
    data = json.loads((pytester.path / "v.json").read_text())
    by_id = {r["id"]: r for r in data["results"]}
    assert by_id["KATA-T-LOW"]["status"] == "fail" and by_id["KATA-T-HIGH"]["status"] == "pass"
    assert by_id["KATA-T-REC"]["evidence"] == {"actual": 1, "expected": 1}
    assert by_id["KATA-T-W"]["status"] == "waived" and by_id["KATA-T-NA"]["status"] == "notapplicable"
    assert data["verdict"] == "accept" and data["totals"]["fail"] == 1
    result.stdout.fnmatch_lines(["*kata verdict*", "VERDICT: ACCEPT*"])

    strict = pytester.runpytest("--kata-report", "v2.json", "--kata-fail-on", "low")
    assert strict.ret == 1
    assert json.loads((pytester.path / "v2.json").read_text())["verdict"] == "reject"
    strict.stdout.fnmatch_lines(["VERDICT: REJECT*", "*KATA-T-LOW*"])


def test_fail_on_from_ini_and_kata_toml(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    pytester.makeini("[pytest]\nkata_fail_on = low\n")
    assert pytester.runpytest().ret == 1
    pytester.makeini("[pytest]\n")
    (pytester.path / "kata.toml").write_text('[kata]\nfail_on = "low"\n')
    assert pytester.runpytest().ret == 1
    assert pytester.runpytest("--kata-fail-on", "critical").ret == 0


def test_a_non_kata_failure_still_fails_the_run(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS + "\ndef test_plain():\n    assert 0\n")
    assert pytester.runpytest("--kata-report", "v.json").ret == 1


def test_verdict_is_collected_from_xdist_workers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("-n", "2", "--kata-report", "v.json", "--kata-fail-on", "low")
    data = json.loads((pytester.path / "v.json").read_text())
    assert len(data["results"]) == 5 and data["verdict"] == "reject" and result.ret == 1


@pytest.mark.parametrize(("body", "needle"), [
    ('@pytest.mark.kata_check("X", severity="severe")\ndef test_a(): pass', "severity 'severe'"),
    ('@pytest.mark.kata_check(42)\ndef test_a(): pass', "string id"),
    ('@pytest.mark.kata_advisory("BUG-1")\ndef test_a(): pass', "kata_advisory takes one id"),
    ('@pytest.mark.kata_hosts(0)\ndef test_a(): pass', "kata_hosts takes one positive int"),
])
def test_bad_marker_arguments_are_usage_errors(pytester: pytest.Pytester, body: str, needle: str) -> None:
    pytester.makepyfile(test_m="import pytest\n" + body + "\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert needle in result.stderr.str()


def test_bad_option_value_is_one_line(pytester: pytest.Pytester) -> None:
    (pytester.path / "kata.toml").write_text('[kata]\nhosts = "lots"\n')
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = [line for line in result.stderr.str().splitlines() if "kata.toml" in line]
    assert len(err) == 1 and "hosts" in err[0] and "Traceback" not in result.stderr.str()


def test_candidate_fixture_skips_with_reason_when_none_given(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_c="def test_c(kata_candidate):\n    pass\n")
    result = pytester.runpytest("-rs")
    result.stdout.fnmatch_lines(["*no candidate given: pass --kata-candidate PATH*"])


def test_custom_hooks_are_called(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        "seen = []\n"
        "def pytest_kata_result(result, config):\n    seen.append(result.id)\n"
        "def pytest_kata_verdict(verdict, config):\n"
        "    print('HOOK-VERDICT', verdict.verdict, sorted(seen))\n"
    )
    pytester.makepyfile(test_checks=CHECKS)
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*HOOK-VERDICT accept*KATA-T-HIGH*"])


def test_parametrized_check_variants_get_distinct_ids(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_p=(
        "import pytest\n"
        "@pytest.mark.kata_check('KATA-P-1', severity='high')\n"
        "@pytest.mark.parametrize('mode', ['static', 'dynamic'])\n"
        "def test_p(mode):\n    assert mode == 'static'\n"))
    result = pytester.runpytest("--kata-report", "v.json")
    data = json.loads((pytester.path / "v.json").read_text())
    assert {r["id"]: r["status"] for r in data["results"]} == {"KATA-P-1[static]": "pass", "KATA-P-1[dynamic]": "fail"}
    assert result.ret == 1
