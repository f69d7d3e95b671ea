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
from pytest_kata.rules import Facts, evaluate, judge, load_profile, load_rules
from pytest_kata.severities import severity_rank

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


# ---- rules that follow the runtimes' real behaviour ------------------------------------------------------


def outcome(rule_id: str, config: KataConfig, profile: str | None = None):
    rule = next(r for r in RULES if r.id == rule_id)
    if profile is None:
        return evaluate(rule, config, context_of(config))
    return judge(rule, config, context_of(config), profile=load_profile(profile))


def upstream(rel: str) -> KataConfig:
    return load_config(CONFIGS / "upstream" / rel)


@pytest.mark.parametrize(("rule_id", "rel", "key"), [
    ("KATA-CFG-021", "runtime-rs/configuration-clh-runtime-rs.toml", None),  # absent in the real file
    ("KATA-CFG-021", "configuration-qemu.toml", "hypervisor.qemu.valid_virtio_fs_daemon_paths"),
    ("KATA-CFG-020", "configuration-qemu.toml", "hypervisor.qemu.valid_hypervisor_paths"),
    ("KATA-CFG-022", "configuration-fc.toml", "hypervisor.firecracker.valid_jailer_paths"),
])
def test_absent_or_empty_allowlist_rejects_every_annotation_value(rule_id: str, rel: str, key: str | None) -> None:
    """Both runtimes reject every value of a restricted annotation when its valid_*_paths list is absent or
    empty (the safest setting); a glob or a directory in the list is what lets a pod pick a host binary."""
    config = upstream(rel)
    variants = [config] if key is None else [config.with_changes({key: []}), config.with_changes({key: MISSING})]
    for variant in variants:
        result = outcome(rule_id, variant)
        assert result.status == "pass", result.message
    if key is not None:
        assert outcome(rule_id, config.with_changes({key: ["/opt/kata/*"]})).status == "fail"


def test_absent_keys_follow_each_runtimes_default() -> None:
    """runtime-rs defaults sandbox_cgroup_only to true, Go to false; QEMU uses vhost-net unless
    disable_vhost_net says otherwise."""
    rs = upstream("runtime-rs/configuration-qemu-runtime-rs.toml")
    rs = rs.with_changes({"runtime.sandbox_cgroup_only": MISSING})
    result = outcome("KATA-CFG-010", rs)
    assert result.status == "pass" and "runtime runtime-rs defaults to true" in result.message
    go = upstream("configuration-qemu.toml").with_changes({"runtime.sandbox_cgroup_only": MISSING})
    result = outcome("KATA-CFG-010", go)
    assert result.status == "fail" and "runtime go defaults to false" in result.message
    qemu = upstream("configuration-qemu.toml").with_changes({"hypervisor.qemu.disable_vhost_net": MISSING})
    result = outcome("KATA-CFG-050", qemu)
    assert result.status == "fail" and "hypervisor qemu defaults to false" in result.message
    clh = upstream("configuration-clh.toml")
    assert outcome("KATA-CFG-050", clh).status in ("pass", "notapplicable")


# Rules that no real 4.1.0 configuration gives a key to change, and why that is right.
CANNOT_FIRE_ON_SHIPPED_FILES = {
    "KATA-CFG-060": "drift: judged on the installed configuration (--kata-installed-config), not on a shipped file",
    "KATA-CFG-023": "no 4.1.0 file sets a ctlpath (dragonball ships it empty): the rule guards a drop-in that does",
    "KATA-CFG-036": "every 4.1.0 file leaves VFIO at no-port: the rule guards a drop-in that plugs devices",
}


def can_fire(rule, config: KataConfig) -> bool:
    """The rule applies to the file and its precondition holds there, and the file fails it now, or sets a key
    it reads (so a wrong value of that key fails it), or leaves a key unset whose absence fails it."""
    from pytest_kata.rules.engine import applicable, run_check

    if not applicable(rule, context_of(config))[0]:
        return False
    if rule.when is not None and run_check(rule.when, config, context_of(config)).status != "pass":
        return False  # its precondition does not hold on this file
    if evaluate(rule, config, context_of(config)).status == "fail":
        return True

    def leaves(check):
        if check.composite:
            for sub in (*check.all, *check.any):
                yield from leaves(sub)
        else:
            yield check

    for leaf in leaves(rule.check):
        present = config.get(leaf.key, MISSING) is not MISSING
        if present or (leaf.missing == "fail" and not leaf.has_default):
            return True
    return False


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_every_rule_can_fire_on_a_real_configuration_it_targets(rule) -> None:
    configs = [upstream(rel) for rel in FILES]
    firing = [c.name for c in configs if can_fire(rule, c)]
    if rule.id in CANNOT_FIRE_ON_SHIPPED_FILES:
        assert not firing, f"{rule.id} can fire on {firing}: drop it from CANNOT_FIRE_ON_SHIPPED_FILES"
        return
    assert firing, f"{rule.id} can never fire on the real 4.1.0 configurations its applicability selects"


def test_confidential_is_decided_from_the_content_not_the_file_name(tmp_path: Path) -> None:
    qemu = (CONFIGS / "upstream" / "configuration-qemu.toml").read_bytes()
    for name in ("configuration-qemu-se.toml", "configuration-qemu-coco-dev-copy.toml"):
        (tmp_path / name).write_bytes(qemu)
        assert not load_config(tmp_path / name).confidential, name
    assert not upstream("configuration-qemu-coco-dev.toml").confidential  # no TEE: confidential_guest unset
    assert upstream("configuration-qemu-snp.toml").confidential
    assert upstream("configuration-qemu-tdx.toml").confidential


def test_a_dropin_turning_the_tee_off_fails_the_confidential_profile(tmp_path: Path) -> None:
    snp = tmp_path / "configuration-qemu-snp.toml"
    snp.write_bytes((CONFIGS / "hardened" / "configuration-qemu-snp.toml").read_bytes())
    assert outcome("KATA-CFG-058", load_config(snp), "confidential").status == "pass"
    (tmp_path / "config.d").mkdir()
    (tmp_path / "config.d" / "50-off.toml").write_text("[hypervisor.qemu]\nconfidential_guest = false\n")
    off = load_config(snp)
    assert off.confidential, "the file as shipped asks for a TEE: the confidential rules still apply"
    judged = outcome("KATA-CFG-058", off, "confidential")
    assert judged.status == "fail" and "confidential_guest is false" in judged.outcome.message


def test_snp_guest_policy_debug_bit_and_firmware_pinning_fail_the_confidential_profile() -> None:
    snp = load_config(CONFIGS / "hardened" / "configuration-qemu-snp.toml")
    assert outcome("KATA-CFG-059", snp, "confidential").status == "pass"  # 196608 = 0x30000: no DEBUG bit
    debug = snp.with_changes({"hypervisor.qemu.snp_guest_policy": 196608 | 1 << 19})
    assert outcome("KATA-CFG-059", debug, "confidential").status == "fail"
    assert outcome("KATA-CFG-061", snp, "confidential").status == "pass"
    for changes in ({"hypervisor.qemu.firmware": ""},
                    {"hypervisor.qemu.enable_annotations": ["firmware"]}):
        assert outcome("KATA-CFG-061", snp.with_changes(changes), "confidential").status == "fail", changes
    tdx = load_config(CONFIGS / "hardened" / "configuration-qemu-tdx.toml")
    assert outcome("KATA-CFG-059", tdx, "confidential").status == "notapplicable"
    assert outcome("KATA-CFG-061", tdx, "confidential").status == "pass"


def test_vfio_hot_plug_rule_fires_on_the_real_snp_and_tdx_files() -> None:
    for rel in ("configuration-qemu-snp.toml", "configuration-qemu-tdx.toml"):
        config = upstream(rel)
        assert outcome("KATA-CFG-053", config).status == "pass"
        ports = config.with_changes({"hypervisor.qemu.pcie_root_port": 2})
        assert outcome("KATA-CFG-053", ports).status == "fail", rel
