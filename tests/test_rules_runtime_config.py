"""The runtime-configuration rules on the real rendered Kata configurations and on mutated copies.

Every rule carries ``[rule.test]`` mutation data: ``bad`` must make it fail and ``good`` must make it pass on
a real configuration, so no rule can silently be a no-op. The upstream defaults are rejected for concrete
reasons; the hardened fixtures are accepted.
"""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kata.kataconfig import MISSING, KataConfig, load_config
from pytest_kata.options import severity_rank
from pytest_kata.rules import Facts, evaluate, judge, load_profile, load_rules

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "fixtures" / "configs"
RULES = load_rules("runtime-config")
FILES = sorted(p.relative_to(CONFIGS / "upstream").as_posix() for p in (CONFIGS / "upstream").rglob("*.toml"))


def context_of(config: KataConfig) -> dict:
    return {
        "runtime": "runtime-rs" if config.runtime_rs else "go",
        "hypervisor": config.hypervisor,
        "confidential": config.confidential,
    }


def mutated(config: KataConfig, changes: dict, absent: list[str]) -> KataConfig:
    return config.with_changes({**changes, **dict.fromkeys(absent, MISSING)})


def test_every_rule_carries_mutation_data() -> None:
    lacking = [
        r.id for r in RULES if not (isinstance(r.test.get("bad"), dict) and isinstance(r.test.get("good"), dict))
    ]
    assert not lacking, f"rules without [rule.test] bad/good mutation data: {lacking}"
    assert len(RULES) >= 40


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_rule_fails_on_bad_mutation_and_passes_on_good(rule) -> None:
    base = load_config(CONFIGS / "upstream" / rule.test.get("config", "configuration-qemu.toml"))
    context = context_of(base)
    bad = mutated(base, rule.test["bad"], rule.test.get("bad_absent", []))
    good = mutated(base, rule.test["good"], rule.test.get("good_absent", []))
    bad_outcome = evaluate(rule, bad, context)
    good_outcome = evaluate(rule, good, context)
    assert bad_outcome.status == "fail", f"{rule.id} on bad mutation: {bad_outcome.message}"
    assert good_outcome.status == "pass", f"{rule.id} on good mutation: {good_outcome.message}"
    assert bad_outcome.actual is not None and bad_outcome.expected and bad_outcome.message


def test_drift_rule_is_notapplicable_without_an_installed_config() -> None:
    rule = next(r for r in RULES if r.id == "KATA-CFG-060")
    config = load_config(CONFIGS / "upstream" / "configuration-qemu.toml")
    outcome = evaluate(rule, config, context_of(config))
    assert outcome.status == "notapplicable" and "--kata-installed-config" in outcome.message
    assert evaluate(rule, Facts({}, overlay={"kata.drift": ["x: 1 -> 2"]}, base=config)).status == "fail"


def failing(variant: str, rel: str, profile: str = "default", at_least: str = "info") -> dict[str, str]:
    config = load_config(CONFIGS / variant / rel)
    prof = load_profile(profile)
    out = {}
    for rule in RULES:
        judged = judge(rule, config, context_of(config), profile=prof)
        if judged.status in ("fail", "error") and severity_rank(judged.severity) >= severity_rank(at_least):
            out[rule.id] = judged.outcome.message
    return out


# The concrete reasons the upstream defaults are rejected at --kata-fail-on high.
UPSTREAM_REASONS = {
    "configuration-qemu.toml": {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011"},
    "configuration-clh.toml": {"KATA-CFG-006", "KATA-CFG-011"},
    "configuration-fc.toml": {"KATA-CFG-006", "KATA-CFG-011"},
    "configuration-qemu-snp.toml": {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011"},
    "configuration-qemu-tdx.toml": {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011"},
    "configuration-qemu-coco-dev.toml": {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011"},
    "runtime-rs/configuration-qemu-runtime-rs.toml": {
        "KATA-CFG-006",
        "KATA-CFG-008",
        "KATA-CFG-011",
        "KATA-CFG-030",
    },
    "runtime-rs/configuration-clh-runtime-rs.toml": {"KATA-CFG-006", "KATA-CFG-011", "KATA-CFG-030"},
    "runtime-rs/configuration-dragonball.toml": {"KATA-CFG-006", "KATA-CFG-011", "KATA-CFG-030"},
}


@pytest.mark.parametrize("rel", FILES)
def test_upstream_defaults_are_rejected_for_concrete_reasons(rel: str) -> None:
    reasons = failing("upstream", rel, at_least="high")
    assert set(reasons) == UPSTREAM_REASONS[rel], reasons
    assert reasons["KATA-CFG-006"].endswith("runtime.disable_guest_seccomp is true, expected == false")
    assert "'kernel_params'" in reasons["KATA-CFG-011"]


@pytest.mark.parametrize("rel", FILES)
def test_hardened_variant_passes_every_default_rule(rel: str) -> None:
    assert failing("hardened", rel) == {}


@pytest.mark.parametrize("rel", FILES)
def test_hardened_variant_changes_only_what_rules_ask(rel: str) -> None:
    """The hardened file is the upstream one plus the listed edits: its header says what changed and why."""
    text = (CONFIGS / "hardened" / rel).read_text()
    assert text.startswith((CONFIGS / "upstream" / rel).read_text().split("\n#\n")[0])  # licence header kept
    assert "HARDENED VARIANT" in text and "why: a pod must not set guest kernel parameters" in text


def test_confidential_profile_adds_confidential_rules() -> None:
    reasons = failing("hardened", "configuration-qemu-snp.toml", profile="confidential")
    assert set(reasons) == {"KATA-CFG-055"}  # the rendered file carries no dm-verity root hash
    assert failing("hardened", "configuration-qemu.toml", profile="confidential") == {}


def test_strict_profile_fails_what_default_tolerates() -> None:
    strict = failing("hardened", "runtime-rs/configuration-qemu-runtime-rs.toml", profile="strict")
    assert {"KATA-CFG-017", "KATA-CFG-038"} <= set(strict)
    assert failing("hardened", "runtime-rs/configuration-qemu-runtime-rs.toml", profile="strict", at_least="high") == {}


def test_hardened_fixtures_are_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(CONFIGS / "make-hardened.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_upstream_fixtures_are_verbatim_copies(shared_dir: Path) -> None:
    source = shared_dir / "data" / "kata-configs"
    for rel in FILES:
        assert filecmp.cmp(source / rel, CONFIGS / "upstream" / rel, shallow=False), rel
    assert len(FILES) == 9
