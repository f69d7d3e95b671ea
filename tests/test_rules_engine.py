"""The rules engine on its own: operators, composition, applicability, rule-file validation, waivers and
profiles."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pytest_kata.errors import ConfigError
from pytest_kata.rules import Facts, apply_waiver, evaluate, judge, load_profile, load_rules, load_waivers
from pytest_kata.rules.engine import Outcome, run_check, version_matches
from pytest_kata.rules.model import parse_check

RULE_HEAD = """
[[rule]]
id = "T-RULE-001"
title = "t"
severity = "high"
rationale = "r"
remediation = "m"
references = ["https://example.invalid"]
"""


def leaf(facts: dict, **check) -> str:
    return run_check(parse_check(check, "t.toml", "rule T"), Facts(facts)).status


@pytest.mark.parametrize(
    ("op", "actual", "expected", "status"),
    [
        ("eq", False, False, "pass"),
        ("eq", True, False, "fail"),
        ("ne", "virtio-9p", "virtio-fs", "pass"),
        ("ne", "x", "x", "fail"),
        ("in", "virtio-fs", ["virtio-fs", "none"], "pass"),
        ("in", "virtio-9p", ["virtio-fs", "none"], "fail"),
        ("not_in", "a", ["b"], "pass"),
        ("not_in", "b", ["b"], "fail"),
        ("subset_of", ["enable_iommu"], ["enable_iommu", "default_memory"], "pass"),
        ("subset_of", [".*"], ["enable_iommu"], "fail"),
        ("disjoint_from", ["/opt/kata/bin/qemu"], ["/", "/usr/bin"], "pass"),
        ("disjoint_from", ["/usr/bin"], ["/", "/usr/bin"], "fail"),
        ("contains", "on,spawn=deny,obsolete=deny", ["spawn=deny", "obsolete=deny"], "pass"),
        ("contains", "on,obsolete=deny", ["spawn=deny"], "fail"),
        ("contains", ["/a", "/b"], "/a", "pass"),
        ("contains", ["/a"], "/b", "fail"),
        ("not_contains", ["enable_iommu"], "kernel_params", "pass"),
        ("not_contains", ["kernel_params"], "kernel_params", "fail"),
        ("regex", ["/opt/kata/bin/qemu"], r"^(/[^/*?\[\]{}]+)+$", "pass"),
        ("regex", ["/opt/kata/bin/qemu", "/opt/*"], r"^(/[^/*?\[\]{}]+)+$", "fail"),
        ("not_regex", "cgroup_no_v1=all", r"(^|\s)nokaslr(\s|$)", "pass"),
        ("not_regex", "a nokaslr b", r"(^|\s)nokaslr(\s|$)", "fail"),
        ("no_pattern_matches", ["enable_iommu"], ["kernel_params"], "pass"),
        ("no_pattern_matches", ["kernel"], ["kernel_params"], "fail"),
        ("no_pattern_matches", [".*"], ["path"], "fail"),
        ("no_pattern_matches", ["("], ["path"], "fail"),
        ("gte", 2, 1, "pass"),
        ("gte", 0, 1, "fail"),
        ("lte", "0x10", 16, "pass"),
        ("lte", 17, 16, "fail"),
    ],
)
def test_operators(op: str, actual, expected, status: str) -> None:
    assert leaf({"k": actual}, key="k", op=op, expected=expected) == status


@pytest.mark.parametrize(
    ("op", "value", "status"),
    [
        ("empty", "", "pass"),
        ("empty", [], "pass"),
        ("empty", ["x"], "fail"),
        ("not_empty", "x", "pass"),
        ("not_empty", [], "fail"),
        ("exists", 0, "pass"),
        ("absent", 0, "fail"),
    ],
)
def test_unary_operators(op: str, value, status: str) -> None:
    assert leaf({"k": value}, key="k", op=op) == status


def test_missing_keys_follow_the_policy_and_default() -> None:
    assert leaf({}, key="k", op="eq", expected=True) == "fail"  # default policy: absent fails
    assert leaf({}, key="k", op="eq", expected=True, missing="pass") == "pass"
    assert leaf({}, key="k", op="eq", expected=True, missing="notapplicable") == "notapplicable"
    assert leaf({}, key="k", op="eq", expected=True, default=True) == "pass"  # the runtime's built-in default
    assert leaf({}, key="k", op="absent") == "pass" and leaf({}, key="k", op="exists") == "fail"


def test_join_reads_split_arguments_as_one_command_line() -> None:
    pattern = r"(^|\s)--sandbox(=|\s+)none"
    assert leaf({"a": ["--sandbox", "none"]}, key="a", op="not_regex", expected=pattern) == "pass"  # per item
    assert leaf({"a": ["--sandbox", "none"]}, key="a", op="not_regex", expected=pattern, join=" ") == "fail"


def test_expected_key_compares_two_facts() -> None:
    facts = {"hv": {"qemu": {"path": "/opt/q", "valid": ["/opt/q"]}}}
    assert leaf(facts, key="hv.*.valid", op="contains", expected_key="hv.*.path") == "pass"
    facts["hv"]["qemu"]["valid"] = ["/opt/other"]
    assert leaf(facts, key="hv.*.valid", op="contains", expected_key="hv.*.path") == "fail"
    assert leaf({"hv": {"q": {"valid": []}}}, key="hv.*.valid", op="contains", expected_key="hv.*.path") == "error"


def test_type_mismatch_is_an_error_not_a_pass() -> None:
    assert leaf({"k": "lots"}, key="k", op="gte", expected=1) == "error"
    assert leaf({"k": True}, key="k", op="gte", expected=1) == "error"


def test_composition_all_and_any() -> None:
    check = {"all": [{"key": "a", "op": "eq", "expected": 1}, {"key": "b", "op": "eq", "expected": 2}]}
    parsed = parse_check(check, "t", "T")
    assert run_check(parsed, Facts({"a": 1, "b": 2})).status == "pass"
    out = run_check(parsed, Facts({"a": 1, "b": 3}))
    assert out.status == "fail" and out.actual == {"a": 1, "b": 3} and "b is 3" in out.message
    anyof = parse_check({"any": check["all"]}, "t", "T")
    assert run_check(anyof, Facts({"a": 0, "b": 2})).status == "pass"
    assert run_check(anyof, Facts({"a": 0, "b": 0})).status == "fail"


def test_messages_name_the_real_table() -> None:
    out = run_check(
        parse_check({"key": "hypervisor.*.x", "op": "eq", "expected": 1}, "t", "T"),
        Facts({"hypervisor": {"clh": {"x": 2}}}),
    )
    assert out.message == "hypervisor.clh.x is 2, expected == 1"


def _rule_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "set.toml"
    path.write_text(body)
    return path


def test_applicability_and_precondition(tmp_path: Path) -> None:
    body = (
        RULE_HEAD + 'applies = { runtime = ["go"], kernel_version = ">=6.6" }\n'
        'when = { key = "on", op = "eq", expected = true }\ncheck = { key = "v", op = "eq", expected = 1 }\n'
    )
    rule = load_rules(_rule_file(tmp_path, body))[0]
    assert evaluate(rule, Facts({"on": True, "v": 2}), {"runtime": "go"}).status == "fail"
    assert evaluate(rule, Facts({"on": True, "v": 2}), {"runtime": "runtime-rs"}).status == "notapplicable"
    assert evaluate(rule, Facts({"on": True, "v": 2}), {"kernel_version": "6.1.0"}).status == "notapplicable"
    assert evaluate(rule, Facts({"on": True, "v": 2}), {"kernel_version": "6.12.3"}).status == "fail"
    assert evaluate(rule, Facts({"on": False, "v": 2}), {}).status == "notapplicable"


def test_version_specs() -> None:
    assert version_matches("6.1.0-56-amd64", ">=5.10,<6.9") and not version_matches("6.9", "<6.9")
    assert version_matches("6.12", ">=6.6") and not version_matches("5.15.0", ">=6.6")


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            RULE_HEAD + 'check = { key = "k", op = "frobnicate", expected = 1 }\n',
            "unknown operator 'frobnicate'",
        ),
        (
            RULE_HEAD.replace('severity = "high"\n', "") + 'check = { key = "k", op = "eq", expected = 1 }\n',
            "missing field 'severity'",
        ),
        (RULE_HEAD + 'check = { key = "k", op = "eq" }\n', "needs 'expected'"),
        (RULE_HEAD + 'check = { key = "k", op = "empty", expected = 1 }\n', "takes no expected value"),
        (RULE_HEAD + 'check = { key = "k", op = "regex", expected = "(" }\n', "bad regular expression"),
        (
            RULE_HEAD + 'check = { key = "k", op = "eq", expected = 1, missing = "maybe" }\n',
            "missing = 'maybe'",
        ),
        (RULE_HEAD + "check = { all = [] }\n", "non-empty list"),
        (
            RULE_HEAD + 'check = { key = "k", op = "eq", expected = 1 }\ncolour = "red"\n',
            "unknown field(s) colour",
        ),
        (
            RULE_HEAD.replace('"high"', '"severe"') + 'check = { key = "k", op = "eq", expected = 1 }\n',
            "severity 'severe'",
        ),
        ((RULE_HEAD + 'check = { key = "k", op = "eq", expected = 1 }\n') * 2, "duplicate id"),
        (
            RULE_HEAD + 'applies = { hypervisors = ["qemu"] }\ncheck = { key = "k", op = "exists" }\n',
            "unknown applies key(s) hypervisors",
        ),
        ("[[rule]\nid=", "not valid TOML"),
        ('title = "no rules here"\n', "no [[rule]] tables"),
    ],
)
def test_malformed_rule_files_give_one_line_naming_file_and_rule(tmp_path: Path, body: str, problem: str) -> None:
    path = _rule_file(tmp_path, body)
    with pytest.raises(ConfigError) as err:
        load_rules(path)
    message = str(err.value)
    assert problem in message and str(path) in message and "\n" not in message
    if "TOML" not in problem and "no [[rule]]" not in problem:
        assert "T-RULE-001" in message


def test_unknown_rule_set_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown rule set 'nope'; known: .*runtime-config"):
        load_rules("nope")


# ------------------------------------------------------------------------------------------------- waivers


def _waivers(tmp_path: Path, body: str):
    path = tmp_path / "waivers.toml"
    path.write_text(body)
    return load_waivers(path)


def test_waiver_turns_fail_into_waived_until_it_expires(tmp_path: Path) -> None:
    waivers = _waivers(
        tmp_path,
        '[[waiver]]\nrule = "KATA-CFG-006"\njustification = "needs ptrace, JIRA-1"\n'
        'expires = 2027-01-31\nscope = "configuration-qemu.toml"\n',
    )
    waiver = waivers.find("KATA-CFG-006", ["configuration-qemu.toml", "qemu"])
    assert waiver is not None and waivers.find("KATA-CFG-006", ["configuration-clh.toml"]) is None
    failed = Outcome("fail", True, "== false", "runtime.disable_guest_seccomp is true")
    waived = apply_waiver(failed, waiver, dt.date(2026, 12, 1))
    assert waived.status == "waived" and "needs ptrace, JIRA-1" in waived.message and "2027-01-31" in waived.message
    expired = apply_waiver(failed, waiver, dt.date(2027, 2, 1))
    assert expired.status == "error" and "expired on 2027-01-31" in expired.message
    assert "renew" in expired.message and str(tmp_path / "waivers.toml") in expired.message
    assert apply_waiver(Outcome("pass"), waiver, dt.date(2030, 1, 1)).status == "pass"  # unused: harmless


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('[[waiver]]\nrule = "KATA-CFG-006"\nexpires = 2027-01-31\n', "missing 'justification'"),
        (
            '[[waiver]]\nrule = "KATA-CFG-006"\njustification = "  "\nexpires = 2027-01-31\n',
            "missing 'justification'",
        ),
        ('[[waiver]]\nrule = "KATA-CFG-006"\njustification = "j"\n', "missing 'expires'"),
        ('[[waiver]]\nrule = "KATA-CFG-006"\njustification = "j"\nexpires = "next year"\n', "is not a date"),
        ('[[waiver]]\njustification = "j"\nexpires = 2027-01-31\n', "missing 'rule'"),
        (
            '[[waiver]]\nrule = "KATA-CFG-006"\njustification = "j"\nexpires = 2027-01-31\nreason = "x"\n',
            "unknown field(s) reason",
        ),
        ("[waiver\n", "not valid TOML"),
        ('[[waivers]]\nrule = "x"\n', "unknown top-level key(s) waivers"),
    ],
)
def test_malformed_waivers_give_one_line(tmp_path: Path, body: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        _waivers(tmp_path, body)
    assert problem in str(err.value) and "waivers.toml" in str(err.value) and "\n" not in str(err.value)


def test_waiver_for_an_unknown_rule_is_caught(tmp_path: Path) -> None:
    waivers = _waivers(tmp_path, '[[waiver]]\nrule = "KATA-CFG-999"\njustification = "j"\nexpires = 2027-01-31\n')
    with pytest.raises(ConfigError, match="unknown rule 'KATA-CFG-999'"):
        waivers.validate({r.id for r in load_rules("runtime-config")})


def test_missing_waivers_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such waivers file"):
        load_waivers(tmp_path / "absent.toml")


# ------------------------------------------------------------------------------------------------ profiles


def test_profiles_enable_tags_and_raise_severities() -> None:
    rules = {r.id: r for r in load_rules("runtime-config")}
    default, strict, confidential = (load_profile(n) for n in ("default", "strict", "confidential"))
    assert default.enabled(rules["KATA-CFG-017"])[0] is False and strict.enabled(rules["KATA-CFG-017"])[0]
    assert confidential.enabled(rules["KATA-CFG-055"])[0] and not strict.enabled(rules["KATA-CFG-055"])[0]
    assert default.severity_of(rules["KATA-CFG-010"]) == "medium"
    assert strict.severity_of(rules["KATA-CFG-010"]) == "high"  # raised one level
    assert strict.severity_of(rules["KATA-CFG-004"]) == "critical"  # capped
    assert strict.severity_of(rules["KATA-CFG-035"]) == "high"  # explicit override
    assert confidential.severity_of(rules["KATA-CFG-016"]) == "high"
    assert strict.chain == ["kata-guest", "default", "strict"]


def test_judge_applies_profile_then_waivers(tmp_path: Path) -> None:
    rule = next(r for r in load_rules("runtime-config") if r.id == "KATA-CFG-017")
    facts = Facts({"hypervisor": {"qemu": {"enable_annotations": ["enable_iommu"]}}})
    assert judge(rule, facts, profile=load_profile("default")).status == "notapplicable"
    judged = judge(rule, facts, profile=load_profile("strict"))
    assert judged.status == "fail" and judged.severity == "medium"
    waivers = _waivers(
        tmp_path, '[[waiver]]\nrule = "KATA-CFG-017"\njustification = "sizing only"\nexpires = 2999-01-01\n'
    )
    judged = judge(rule, facts, profile=load_profile("strict"), waivers=waivers)
    assert judged.status == "waived" and judged.evidence()["waiver"]["justification"] == "sizing only"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ('extends = ["nope"]\n', "unknown profile 'nope'"),
        ("raise_severity = -1\n", "raise_severity"),
        ('[severity]\n"KATA-CFG-001" = "severe"\n', "'severe' not in"),
        ("colour = 1\n", "unknown field(s) colour"),
        ('extends = ["self"]\n', "extends itself"),
    ],
)
def test_malformed_profiles_give_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str, problem: str
) -> None:
    from pytest_kata.rules import profiles

    (tmp_path / "self.toml").write_text(body)
    monkeypatch.setattr(profiles, "profiles_dir", lambda: tmp_path)
    with pytest.raises(ConfigError) as err:
        load_profile("self")
    assert problem in str(err.value) and "\n" not in str(err.value)


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: confidential, default, kata-guest, strict"):
        load_profile("paranoid")


def test_rule_file_can_declare_extra_context_keys(tmp_path: Path) -> None:
    body = (
        'context = ["flavour"]\n'
        + RULE_HEAD
        + 'applies = { flavour = ["alpine"] }\ncheck = { key = "k", op = "exists" }\n'
    )
    rule = load_rules(_rule_file(tmp_path, body))[0]
    assert evaluate(rule, Facts({}), {"flavour": "debian"}).status == "notapplicable"
    assert evaluate(rule, Facts({}), {"flavour": "alpine"}).status == "fail"
