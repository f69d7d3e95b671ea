"""The hardening suite end to end with pytester: a real /opt/kata tree built from the configuration fixtures,
``--kata-report`` JSON verdicts, exit statuses, ``--kata-fail-on``, ``--kata-shim``, waivers, profiles and
drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suites" / "hardening" / "test_runtime_config.py"
CONFIGS = REPO / "fixtures" / "configs"
DEFAULTS = "opt/kata/share/defaults/kata-containers"


@pytest.fixture(autouse=True)
def _private_bundle_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(tmp_path_factory.mktemp("cache")))


def kata_tree(base: Path, variant: str, *, default: str = "configuration-qemu.toml") -> Path:
    """A minimal candidate: ``opt/kata`` with VERSION and the Go + runtime-rs configurations."""
    root = base / f"candidate-{variant}"
    defaults = root / DEFAULTS
    shutil.copytree(CONFIGS / variant, defaults)
    (root / "opt/kata/VERSION").write_text("4.1.0\n")
    (defaults / "configuration.toml").symlink_to(default)
    return root


def run(pytester: pytest.Pytester, candidate: Path, *args: str) -> tuple[pytest.RunResult, dict]:
    report = pytester.path / "verdict.json"
    report.unlink(missing_ok=True)
    result = pytester.runpytest(
        str(SUITE),
        "--kata-candidate",
        str(candidate),
        "--kata-report",
        str(report),
        "-p",
        "no:cacheprovider",
        *args,
    )
    return result, json.loads(report.read_text()) if report.exists() else {}


def by_id(verdict: dict) -> dict[str, dict]:
    return {r["id"]: r for r in verdict["results"]}


def test_upstream_defaults_are_rejected_with_concrete_reasons(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result, verdict = run(pytester, kata_tree(tmp_path, "upstream"), "--kata-shim", "all")
    assert result.ret == pytest.ExitCode.TESTS_FAILED and verdict["verdict"] == "reject"
    results = by_id(verdict)
    assert len(results) == 9 * 55  # one item per rule and configuration file
    seccomp = results["KATA-CFG-006[configuration-qemu.toml]"]
    assert seccomp["status"] == "fail" and seccomp["severity"] == "high"
    assert seccomp["evidence"]["actual"] is True and seccomp["evidence"]["expected"] == "== false"
    assert seccomp["evidence"]["config"] == "share/defaults/kata-containers/configuration-qemu.toml"
    annotations = results["KATA-CFG-011[configuration-qemu-runtime-rs.toml]"]
    assert annotations["status"] == "fail" and "kernel_params" in annotations["evidence"]["actual"]
    assert results["KATA-CFG-030[configuration-dragonball.toml]"]["status"] == "fail"
    assert results["KATA-CFG-007[configuration-qemu-runtime-rs.toml]"]["status"] == "notapplicable"
    assert any(r.startswith("KATA-CFG-006[configuration-qemu.toml] [high] fail") for r in verdict["reasons"])
    assert "VERDICT: REJECT" in result.stdout.str()


def test_hardened_variant_is_accepted(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result, verdict = run(pytester, kata_tree(tmp_path, "hardened"), "--kata-shim", "all")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()[-2000:]
    assert verdict["verdict"] == "accept" and verdict["totals"]["fail"] == 0 and verdict["totals"]["error"] == 0
    assert verdict["totals"]["pass"] > 200


def test_every_shipped_configuration_unless_narrowed(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A release gate judges every configuration the release ships (the nine real 4.1.0 files), grouped by
    file in the table; --kata-shim narrows to one."""
    tree = kata_tree(tmp_path, "upstream")
    result, verdict = run(pytester, tree)
    configs = {r["evidence"].get("config", "").rsplit("/", 1)[-1] for r in verdict["results"]}
    assert configs == {p.name for p in (CONFIGS / "upstream").rglob("configuration-*.toml")}
    assert len(configs) == 9 and verdict["verdict"] == "reject"
    assert by_id(verdict)["KATA-CFG-006[configuration-clh.toml]"]["status"] == "fail"
    table = result.stdout.str()
    headers = [line for line in table.splitlines() if line.startswith("== ")]
    assert "== share/defaults/kata-containers/configuration-clh.toml" in headers
    assert len(headers) == 9
    clh = table.index("== share/defaults/kata-containers/configuration-clh.toml")
    fc = table.index("== share/defaults/kata-containers/configuration-fc.toml")
    assert "KATA-CFG-006[configuration-clh.toml]" in table[clh:fc]
    _, verdict = run(pytester, tree, "--kata-shim", "clh")
    assert {r["id"].split("[")[1] for r in verdict["results"]} == {"configuration-clh.toml]"}
    result, _ = run(pytester, tree, "--kata-shim", "acrn")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "no shim 'acrn' in this bundle; known shims: clh, clh-runtime-rs" in result.stderr.str()


def test_fail_on_changes_verdict_and_exit_status(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "upstream")
    result, verdict = run(pytester, tree, "--kata-shim", "qemu", "--kata-fail-on", "critical")
    assert verdict["verdict"] == "accept" and result.ret == pytest.ExitCode.OK  # no critical finding upstream
    assert verdict["totals"]["fail"] > 0
    result, verdict = run(pytester, tree, "--kata-shim", "qemu", "--kata-fail-on", "high")
    assert verdict["verdict"] == "reject" and result.ret == pytest.ExitCode.TESTS_FAILED
    hardened = kata_tree(tmp_path, "hardened")
    result, verdict = run(
        pytester,
        hardened,
        "--kata-shim",
        "qemu-runtime-rs",
        "--kata-profile",
        "strict",
        "--kata-fail-on",
        "medium",
    )
    assert verdict["verdict"] == "reject" and result.ret == pytest.ExitCode.TESTS_FAILED
    assert {r.split(" ")[0] for r in verdict["reasons"]} == {
        "KATA-CFG-017[configuration-qemu-runtime-rs.toml]",
        "KATA-CFG-038[configuration-qemu-runtime-rs.toml]",
    }
    result, verdict = run(pytester, hardened, "--kata-shim", "qemu-runtime-rs", "--kata-profile", "strict")
    assert verdict["verdict"] == "accept" and result.ret == pytest.ExitCode.OK


def write_waivers(path: Path, *entries: str) -> Path:
    path.write_text("\n".join(entries))
    return path


def waiver(
    rule: str,
    expires: str = "2999-01-31",
    justification: str = "accepted: tracked in JIRA-1",
    scope: str = "configuration-qemu.toml",
) -> str:
    return f'[[waiver]]\nrule = "{rule}"\njustification = "{justification}"\nexpires = {expires}\nscope = "{scope}"\n'


def test_waivers_valid_expired_and_unjustified(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "upstream")
    valid = write_waivers(tmp_path / "w.toml", *(waiver(r) for r in ("KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-011")))
    result, verdict = run(pytester, tree, "--kata-shim", "qemu", "--kata-waivers", str(valid))
    results = by_id(verdict)
    assert results["KATA-CFG-006[configuration-qemu.toml]"]["status"] == "waived"
    assert (
        results["KATA-CFG-006[configuration-qemu.toml]"]["evidence"]["waiver"]["justification"]
        == "accepted: tracked in JIRA-1"
    )
    assert verdict["verdict"] == "accept" and result.ret == pytest.ExitCode.OK

    expired = write_waivers(tmp_path / "old.toml", waiver("KATA-CFG-006", expires="2020-01-31"))
    result, verdict = run(pytester, tree, "--kata-shim", "qemu", "--kata-waivers", str(expired))
    seccomp = by_id(verdict)["KATA-CFG-006[configuration-qemu.toml]"]
    assert seccomp["status"] == "error" and "expired on 2020-01-31" in seccomp["evidence"]["message"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED and "expired on 2020-01-31" in result.stdout.str()

    unjustified = tmp_path / "bad.toml"
    unjustified.write_text('[[waiver]]\nrule = "KATA-CFG-006"\nexpires = 2999-01-01\n')
    result, verdict = run(pytester, tree, "--kata-waivers", str(unjustified))
    assert result.ret == pytest.ExitCode.USAGE_ERROR and verdict == {}
    errors = [line for line in result.stderr.str().splitlines() if "justification" in line]
    assert errors == [
        f"ERROR: {unjustified}: waiver for KATA-CFG-006: missing 'justification' (say why the risk is accepted)"
    ]


@pytest.mark.parametrize(
    ("what", "body", "problem"),
    [
        ("waivers", "[[waiver]\n", "not valid TOML"),
        (
            "waivers",
            '[[waiver]]\nrule = "KATA-CFG-606"\njustification = "j"\nexpires = 2999-01-01\n',
            "unknown rule 'KATA-CFG-606'",
        ),
        ("installed-config", "[runtime\nenable_debug = true\n", "not valid TOML"),
    ],
)
def test_malformed_inputs_are_one_line_usage_errors(
    pytester: pytest.Pytester, tmp_path: Path, what: str, body: str, problem: str
) -> None:
    bad = tmp_path / "input.toml"
    bad.write_text(body)
    result, _ = run(pytester, kata_tree(tmp_path, "hardened"), f"--kata-{what}", str(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in result.stderr.str().splitlines() if line.strip() and not line.startswith("[kata")]
    assert len(lines) == 1 and problem in lines[0] and str(bad) in lines[0], lines


def test_malformed_configuration_in_candidate_is_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "hardened")
    (tree / DEFAULTS / "configuration-clh.toml").write_text("[hypervisor.clh\npath = 1\n")
    result, _ = run(pytester, tree, "--kata-shim", "all")
    assert result.ret != pytest.ExitCode.OK
    text = result.stdout.str() + result.stderr.str()
    assert "configuration-clh.toml: not valid TOML" in text and "Traceback" not in text


def test_profile_option_selects_rules(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "hardened")
    _, default = run(pytester, tree, "--kata-shim", "qemu-snp")
    _, confidential = run(pytester, tree, "--kata-shim", "qemu-snp", "--kata-profile", "confidential")
    assert by_id(default)["KATA-CFG-055[configuration-qemu-snp.toml]"]["status"] == "notapplicable"
    assert by_id(confidential)["KATA-CFG-055[configuration-qemu-snp.toml]"]["status"] == "fail"
    assert confidential["verdict"] == "reject" and default["verdict"] == "accept"


def test_drift_of_installed_config_is_evidence(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "hardened")
    installed = tmp_path / "etc" / "configuration.toml"  # SYSCONFIG name: compared with the default shim's
    installed.parent.mkdir()
    text = (CONFIGS / "hardened/runtime-rs/configuration-qemu-runtime-rs.toml").read_text()
    installed.write_text(text.replace("debug_console_enabled = false", "debug_console_enabled = true"))
    allure_dir = tmp_path / "allure"
    result, verdict = run(pytester, tree, "--kata-installed-config", str(installed), "--alluredir", str(allure_dir))
    drift = by_id(verdict)["KATA-CFG-060[configuration-qemu-runtime-rs.toml]"]
    assert drift["status"] == "fail" and drift["evidence"]["actual"] == [
        "agent.kata.debug_console_enabled: False -> True"
    ]
    assert verdict["verdict"] == "reject" and result.ret == pytest.ExitCode.TESTS_FAILED
    attachments = allure_attachments(allure_dir)
    diff = attachments["KATA-CFG-060[configuration-qemu-runtime-rs.toml]"]
    assert (
        "-debug_console_enabled = false\n+debug_console_enabled = true"
        in diff["diff shipped vs installed configuration-qemu-runtime-rs.toml"]
    )
    assert "share/defaults/kata-containers/runtime-rs/configuration-qemu-runtime-rs.toml" in diff  # the file too
    assert attachments["KATA-CFG-006[configuration-qemu-runtime-rs.toml]"] == {}  # passing items stay light
    installed.write_text(text)
    _, verdict = run(pytester, tree, "--kata-installed-config", str(installed))
    assert by_id(verdict)["KATA-CFG-060[configuration-qemu-runtime-rs.toml]"]["status"] == "pass"


def allure_attachments(allure_dir: Path) -> dict[str, dict[str, str]]:
    """allure-pytest's results: test title id -> {attachment name: body}."""
    out: dict[str, dict[str, str]] = {}
    for result in allure_dir.glob("*-result.json"):
        data = json.loads(result.read_text())
        rule_id = next(label["value"] for label in data["labels"] if label["name"] == "rule_id")
        out[rule_id] = {a["name"]: (allure_dir / a["source"]).read_text() for a in data.get("attachments", [])}
    return out


def test_without_candidate_the_suite_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(str(SUITE), "-rs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: the suites need a candidate: pass --kata-candidate PATH*"])


def test_broken_rule_file_is_one_line_not_a_traceback(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_kata.rules import model

    rules = tmp_path / "rules"
    rules.mkdir()
    for shipped_set in model.rules_dir().glob("*.toml"):
        (rules / shipped_set.name).write_text(shipped_set.read_text())
    shipped = (model.rules_dir() / "runtime-config.toml").read_text()
    (rules / "runtime-config.toml").write_text(shipped.replace('op = "no_pattern_matches"', 'op = "matches_none"', 1))
    monkeypatch.setattr(model, "rules_dir", lambda: rules)
    result, _ = run(pytester, kata_tree(tmp_path, "hardened"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = [line for line in result.stderr.str().splitlines() if line.strip() and not line.startswith("[kata")]
    assert lines == [
        f"ERROR: {rules / 'runtime-config.toml'}: rule KATA-CFG-011: unknown operator 'matches_none'; "
        "known: " + ", ".join(__import__("pytest_kata.rules.operators").rules.operators.OPERATORS)
    ]


def test_candidate_without_configuration_is_an_error(pytester: pytest.Pytester, tmp_path: Path) -> None:
    root = tmp_path / "kernel-only"
    (root / "opt/kata/share/kata-containers").mkdir(parents=True)
    (root / "opt/kata/VERSION").write_text("4.1.0\n")
    result, verdict = run(pytester, root)
    assert [(r["id"], r["status"], r["severity"]) for r in verdict["results"]] == [
        ("KATA-CFG-000[no-configuration]", "error", "high")
    ]
    assert verdict["verdict"] == "reject" and result.ret == pytest.ExitCode.TESTS_FAILED


def test_bad_shim_under_xdist_is_one_line(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Workers must not crash on an input error: the controller reports it before they start."""
    result = pytester.runpytest_subprocess(
        str(SUITE), "--kata-candidate", str(kata_tree(tmp_path, "hardened")), "--kata-shim", "acrn", "-n", "2"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert "no shim 'acrn' in this bundle" in result.stderr.str()


def test_xdist_verdict_equals_serial_verdict(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "upstream")
    _, serial = run(pytester, tree, "--kata-shim", "qemu")
    report = tmp_path / "parallel.json"
    result = pytester.runpytest_subprocess(
        str(SUITE), "--kata-candidate", str(tree), "--kata-shim", "qemu", "--kata-report", str(report), "-n", "2"
    )
    parallel = json.loads(report.read_text())
    assert result.ret == pytest.ExitCode.TESTS_FAILED and parallel["verdict"] == serial["verdict"] == "reject"
    assert {r["id"]: r["status"] for r in parallel["results"]} == {r["id"]: r["status"] for r in serial["results"]}


def test_config_d_dropins_are_checked_as_kata_merges_them(pytester: pytest.Pytester, tmp_path: Path) -> None:
    tree = kata_tree(tmp_path, "hardened")
    dropins = tree / DEFAULTS / "config.d"
    dropins.mkdir()
    (dropins / "90-site.toml").write_text("[runtime]\ndisable_guest_seccomp = true\n")
    allure_dir = tmp_path / "allure"
    result, verdict = run(pytester, tree, "--kata-shim", "qemu", "--alluredir", str(allure_dir))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    seccomp = by_id(verdict)["KATA-CFG-006[configuration-qemu.toml]"]
    assert seccomp["status"] == "fail" and verdict["verdict"] == "reject"
    attached = allure_attachments(allure_dir)["KATA-CFG-006[configuration-qemu.toml]"]
    diff = attached["diff configuration-qemu.toml vs effective (config.d drop-ins)"]
    assert "-disable_guest_seccomp = false\n+disable_guest_seccomp = true" in diff


SITE_HOOK = '''
EVENTS = "events.txt"

def pytest_kata_candidate_opened(bundle, config):
    with open(EVENTS, "a") as fh:
        fh.write(f"opened {id(bundle)}\\n")
    qemu = bundle.shim("qemu")
    qemu.config = qemu.config.with_changes({"runtime.disable_guest_seccomp": True})
    default = bundle.shim(None)  # its kernel_params are the guest kernel's command line
    default.config = default.config.with_changes({"hypervisor.qemu.kernel_params": "site.facts=1"})
    bundle.version = "4.1.0+site.7"

def pytest_itemcollected(item):
    with open(EVENTS, "a") as fh:
        fh.write(f"item {item.name}\\n")
'''


def test_candidate_opened_hook_fires_once_before_rule_items_and_its_facts_reach_them(
        pytester: pytest.Pytester, tmp_path: Path) -> None:
    """One bundle per session: what a site hook changes on it is what the configuration and kernel rules judge
    and what the verdict names, and the hook runs once, before any rule item exists."""
    candidate = kata_tree(tmp_path, "hardened")
    kernel_config = candidate / "opt/kata/share/kata-containers/config-6.1.0-site"
    kernel_config.parent.mkdir(parents=True, exist_ok=True)
    kernel_config.write_text("# Linux/x86 6.1.0 Kernel Configuration\nCONFIG_X86_64=y\nCONFIG_MODULES=y\n")
    kernel_suite = SUITE.parent / "test_guest_kernel.py"
    report = pytester.path / "verdict.json"

    def judge(*extra: str) -> dict[str, dict]:
        report.unlink(missing_ok=True)
        pytester.runpytest(str(SUITE), str(kernel_suite), "--kata-candidate", str(candidate), "--kata-report",
                           str(report), "-p", "no:cacheprovider", *extra)
        return json.loads(report.read_text())

    plain = judge()
    assert by_id(plain)["KATA-CFG-006[configuration-qemu.toml]"]["status"] == "pass"  # the negative control
    assert plain["candidate"]["version"] == "4.1.0"

    pytester.makepyfile(site_hook=SITE_HOOK.replace('"events.txt"', repr(str(pytester.path / "events.txt"))))
    pytester.syspathinsert()
    verdict = judge("-p", "site_hook")
    results = by_id(verdict)
    assert results["KATA-CFG-006[configuration-qemu.toml]"]["status"] == "fail"
    assert results["KATA-CFG-006[configuration-qemu-runtime-rs.toml]"]["status"] == "pass"
    kernel = [r for r in verdict["results"] if r["id"].endswith("[config-6.1.0-site]")]
    assert kernel and {r["evidence"]["kernel_cmdline"] for r in kernel} == {"site.facts=1"}
    assert verdict["candidate"]["version"] == "4.1.0+site.7"
    events = (pytester.path / "events.txt").read_text().splitlines()
    assert len([e for e in events if e.startswith("opened")]) == 1 and events[0].startswith("opened")
    assert any(e.startswith("item test_runtime_config[KATA-CFG-006") for e in events)
