"""Guest kernel rules: Kconfig parsing, IKCONFIG extraction, every rule on mutated facts, the real Debian 6.1
config (version-aware: no false FAIL for 6.9+ option names), the kata-guest structural waivers, the external
kernel-hardening-checker cross-check, and the suite end to end with pytester."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import shutil
from pathlib import Path

import pytest
import zstandard

from pytest_kata.errors import ConfigError, KataError
from pytest_kata.images.common import host_kernel
from pytest_kata.rules import Facts, evaluate, judge, load_profile, load_rules
from pytest_kata.rules.kconfig import extract_ikconfig, load_kconfig, parse_kconfig, run_kernel_hardening_checker

REPO = Path(__file__).resolve().parents[1]
try:
    DEBIAN_KERNEL, DEBIAN_CONFIG = host_kernel().vmlinuz, host_kernel().config
except KataError:  # no Debian kernel installed: the tests that need one skip and say so
    DEBIAN_KERNEL, DEBIAN_CONFIG = Path("/boot/vmlinuz-amd64"), Path("/boot/config-amd64")
RULES = load_rules("kernel")
needs_debian = pytest.mark.skipif(not DEBIAN_CONFIG.is_file(), reason=f"{DEBIAN_CONFIG} absent (Debian kernel)")


def context(version: str = "6.12.0") -> dict:
    return {"kernel_version": version, "arch": "x86_64"}


def test_every_kernel_rule_carries_mutation_data() -> None:
    lacking = [r.id for r in RULES if not (isinstance(r.test.get("bad"), dict) and r.test.get("good"))]
    assert not lacking and len(RULES) >= 40


@pytest.mark.parametrize("rule", RULES, ids=[r.id for r in RULES])
def test_kernel_rule_fails_on_bad_and_passes_on_good(rule) -> None:
    ctx = context(rule.test.get("kernel_version", "6.12.0"))
    bad, good = evaluate(rule, Facts(rule.test["bad"]), ctx), evaluate(rule, Facts(rule.test["good"]), ctx)
    assert bad.status == "fail", f"{rule.id} bad: {bad.message}"
    assert good.status == "pass", f"{rule.id} good: {good.message}"


@pytest.fixture(scope="module")
def debian():
    if not DEBIAN_CONFIG.is_file():
        pytest.skip(f"{DEBIAN_CONFIG} absent (Debian kernel)")
    return load_kconfig(DEBIAN_CONFIG)


def outcomes(kconfig, profile: str = "default", cmdline: str | None = None) -> dict[str, tuple[str, str]]:
    facts = Facts({}, overlay={"kernel.cmdline": cmdline}, base=kconfig) if cmdline is not None else kconfig
    prof = load_profile(profile)
    return {r.id: ((j := judge(r, facts, kconfig.context, profile=prof)).status, j.severity) for r in RULES}


def test_debian_config_parses_with_version_and_arch(debian) -> None:
    assert debian.version == "6.1.192" and debian.arch == "x86_64" and len(debian.options) > 8000
    assert debian.get("CONFIG_MODULES") == "y" and debian.get("MODULE_SIG_FORCE") == "n"
    assert debian.get("CONFIG_DOES_NOT_EXIST") is None


def test_debian_kernel_is_rejected_for_unenforced_module_signatures(debian) -> None:
    result = outcomes(debian)
    high = {rid for rid, (status, sev) in result.items() if status in ("fail", "error") and sev in ("high", "critical")}
    assert high == {"KATA-KCONF-001"}
    enforced = outcomes(debian, cmdline="cgroup_no_v1=all module.sig_enforce=1")
    assert enforced["KATA-KCONF-001"][0] == "pass"


def test_version_aware_rules_do_not_false_fail_on_6_1(debian) -> None:
    result = outcomes(debian)
    assert result["KATA-KCONF-046"][0] == "notapplicable"  # MITIGATION_* names exist from 6.9
    assert result["KATA-KCONF-045"][0] == "pass"  # PAGE_TABLE_ISOLATION, RETPOLINE, CPU_MITIGATIONS
    assert result["KATA-KCONF-041"][0] == "notapplicable" and result["KATA-KCONF-042"][0] == "pass"


def test_kata_guest_profile_waives_structural_needs_only(debian) -> None:
    result = outcomes(debian)
    waived = {rid for rid, (status, _) in result.items() if status == "waived"}
    assert waived == {"KATA-KCONF-008", "KATA-KCONF-012", "KATA-KCONF-013", "KATA-KCONF-014", "KATA-KCONF-015"}
    assert result["KATA-KCONF-009"][0] == "pass"  # the compensating control is checked, not waived
    strict = outcomes(debian, "strict")
    assert strict["KATA-KCONF-022"][0] == "fail" and strict["KATA-KCONF-008"][0] == "waived"


@needs_debian
@pytest.mark.parametrize(
    ("line", "rule", "severity"),
    [
        ("CONFIG_SECCOMP_FILTER=n", "KATA-KCONF-050", "critical"),
        ("# CONFIG_STACKPROTECTOR_STRONG is not set", "KATA-KCONF-030", "high"),
        ("# CONFIG_BPF_UNPRIV_DEFAULT_OFF is not set", "KATA-KCONF-009", "high"),
        ("# CONFIG_VMAP_STACK is not set", "KATA-KCONF-033", "medium"),
    ],
)
def test_mutated_debian_config_fails_the_matching_rule(line: str, rule: str, severity: str) -> None:
    key = line.split("=")[0].removeprefix("# ").split(" ")[0]
    text = "\n".join(ln for ln in DEBIAN_CONFIG.read_text().splitlines() if not ln.startswith((f"{key}=", f"# {key} ")))
    mutated = parse_kconfig(text + "\n" + line + "\n", "config-mutated")
    before, after = outcomes(load_kconfig(DEBIAN_CONFIG)), outcomes(mutated)
    assert before[rule][0] == "pass" and after[rule] == ("fail", severity)


def test_not_a_kernel_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config-x"
    path.write_text("hello\n")
    with pytest.raises(ConfigError, match=r"config-x: not a kernel config \(no CONFIG_ lines\)$"):
        load_kconfig(path)
    with pytest.raises(ConfigError, match="cannot read kernel config"):
        load_kconfig(tmp_path / "absent")


def test_gzipped_config_like_proc_config_gz(tmp_path: Path) -> None:
    path = tmp_path / "config.gz"
    path.write_bytes(gzip.compress(b"# Linux/x86 6.6.1 Kernel Configuration\nCONFIG_MODULES=y\n"))
    assert load_kconfig(path).get("CONFIG_MODULES") == "y" and load_kconfig(path).version == "6.6.1"


# -------------------------------------------------------------------------------------------- IKCONFIG

CONFIG_TEXT = (
    b"# Linux/x86 6.6.8 Kernel Configuration\nCONFIG_IKCONFIG=y\nCONFIG_SECCOMP=y\n# CONFIG_KEXEC is not set\n"
)


def vmlinux_with_ikconfig(text: bytes = CONFIG_TEXT) -> bytes:
    """What the kernel build embeds: the gzip of .config between IKCFG_ST and IKCFG_ED, in the kernel text."""
    return os.urandom(4096) + b"IKCFG_ST" + gzip.compress(text) + b"IKCFG_ED" + os.urandom(4096)


@pytest.mark.parametrize(
    "pack",
    [
        lambda b: b,  # an uncompressed vmlinux
        gzip.compress,
        lambda b: lzma.compress(b, format=lzma.FORMAT_XZ),
        bz2.compress,
        lambda b: zstandard.ZstdCompressor().compress(b),
    ],
    ids=["vmlinux", "gzip", "xz", "bzip2", "zstd"],
)
def test_ikconfig_is_found_in_plain_and_compressed_kernels(tmp_path: Path, pack) -> None:
    kernel = tmp_path / "vmlinuz-6.6.8-test"
    kernel.write_bytes(b"MZ" + b"\0" * 510 + b"HdrS" + pack(vmlinux_with_ikconfig()) + b"\0" * 64)
    found = extract_ikconfig(kernel)
    assert found is not None and found.version == "6.6.8" and found.get("CONFIG_SECCOMP") == "y"
    assert found.get("CONFIG_KEXEC") == "n" and found.source == "ikconfig:vmlinuz-6.6.8-test"


def test_kernel_without_ikconfig_gives_none(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"MZ" + gzip.compress(os.urandom(20000)))
    assert extract_ikconfig(kernel) is None


@pytest.mark.skipif(not DEBIAN_KERNEL.is_file(), reason="no Debian kernel in /boot")
def test_real_debian_kernel_has_no_ikconfig_and_that_is_reported() -> None:
    assert extract_ikconfig(DEBIAN_KERNEL) is None  # Debian builds with IKCONFIG off (its config says so)


# ------------------------------------------------------------------------------ kernel-hardening-checker


@pytest.fixture
def fake_khc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in kernel-hardening-checker that claims every option is OK (a liar: must not sway verdicts)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    program = bindir / "kernel-hardening-checker"
    rows = [
        {"option_name": "CONFIG_MODULES", "type": "kconfig", "desired_val": "is not set", "check_result": "OK"},
        {"option_name": "CONFIG_KEXEC", "type": "kconfig", "desired_val": "is not set", "check_result": "OK"},
    ]
    program.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(rows)}\nEOF\nexit 0\n")
    program.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return program


def test_khc_rows_are_read_when_installed(fake_khc: Path, tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text(CONFIG_TEXT.decode())
    rows = run_kernel_hardening_checker(config)
    assert rows is not None and rows[0]["option_name"] == "CONFIG_MODULES"


def test_khc_absent_or_broken_gives_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert run_kernel_hardening_checker(tmp_path / "config") is None
    broken = tmp_path / "kernel-hardening-checker"
    broken.write_text("#!/bin/sh\necho '[+] Special report format: not json'\n")
    broken.chmod(0o755)
    assert run_kernel_hardening_checker(tmp_path / "config") is None


# ------------------------------------------------------------------------------------- suite (pytester)

SUITE = REPO / "suites" / "hardening" / "test_guest_kernel.py"


def kernel_tree(base: Path, configs: str, *, kernel_config: bytes | None = None, kernel: bytes | None = None) -> Path:
    root = base / f"candidate-{configs}"
    shutil.copytree(REPO / "fixtures" / "configs" / configs, root / "opt/kata/share/defaults/kata-containers")
    share = root / "opt/kata/share/kata-containers"
    share.mkdir(parents=True)
    if kernel_config is not None:
        (share / "config-6.1.0-56-amd64-ref").write_bytes(kernel_config)
    if kernel is not None:
        (share / "vmlinuz-6.6.8-ikc").write_bytes(kernel)
        (share / "vmlinuz.container").symlink_to("vmlinuz-6.6.8-ikc")
    (root / "opt/kata/VERSION").write_text("4.1.0\n")
    return root


def run_suite(pytester: pytest.Pytester, tree: Path, *args: str) -> tuple[pytest.RunResult, dict]:
    report = pytester.path / "v.json"
    report.unlink(missing_ok=True)
    result = pytester.runpytest(str(SUITE), "--kata-candidate", str(tree), "--kata-report", str(report), *args)
    return result, json.loads(report.read_text())


@pytest.fixture
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_KATA_CACHE", str(tmp_path_factory.mktemp("cache")))


@needs_debian
def test_suite_on_debian_kernel_follows_the_configuration(pytester: pytest.Pytester, tmp_path: Path, _cache) -> None:
    config = DEBIAN_CONFIG.read_bytes()
    result, verdict = run_suite(pytester, kernel_tree(tmp_path, "upstream", kernel_config=config))
    results = {r["id"]: r for r in verdict["results"]}
    modules = results["KATA-KCONF-001[config-6.1.0-56-amd64-ref]"]
    assert modules["status"] == "fail" and modules["evidence"]["kernel_version"] == "6.1.192"
    assert verdict["verdict"] == "reject" and result.ret == pytest.ExitCode.TESTS_FAILED
    assert results["KATA-KCONF-008[config-6.1.0-56-amd64-ref]"]["status"] == "waived"
    assert len(results) == len(RULES)
    # the hardened configuration enforces module signatures on the guest command line
    result, verdict = run_suite(pytester, kernel_tree(tmp_path, "hardened", kernel_config=config))
    assert verdict["verdict"] == "accept" and result.ret == pytest.ExitCode.OK


@needs_debian
def test_khc_cross_check_is_attached_but_never_decides(
    pytester: pytest.Pytester, tmp_path: Path, _cache, fake_khc: Path
) -> None:
    _, verdict = run_suite(pytester, kernel_tree(tmp_path, "upstream", kernel_config=DEBIAN_CONFIG.read_bytes()))
    modules = {r["id"]: r for r in verdict["results"]}["KATA-KCONF-001[config-6.1.0-56-amd64-ref]"]
    assert modules["evidence"]["kernel_hardening_checker"]["rows"][0]["check_result"] == "OK"
    assert modules["status"] == "fail" and verdict["verdict"] == "reject"  # the liar did not sway it


def test_suite_reads_ikconfig_when_no_config_is_shipped(pytester: pytest.Pytester, tmp_path: Path, _cache) -> None:
    kernel = b"MZ" + zstandard.ZstdCompressor().compress(vmlinux_with_ikconfig())
    _, verdict = run_suite(pytester, kernel_tree(tmp_path, "hardened", kernel=kernel))
    results = {r["id"]: r for r in verdict["results"]}
    seccomp = results["KATA-KCONF-050[vmlinuz-6.6.8-ikc.ikconfig]"]
    assert seccomp["status"] == "fail" and seccomp["evidence"]["source"] == "ikconfig:vmlinuz-6.6.8-ikc"
    assert len(results) == len(RULES)  # the symlink is not a second kernel


def test_suite_without_kernel_config_is_an_error(pytester: pytest.Pytester, tmp_path: Path, _cache) -> None:
    result, verdict = run_suite(pytester, kernel_tree(tmp_path, "hardened", kernel=b"MZ" + os.urandom(5000)))
    assert [r["status"] for r in verdict["results"]] == ["error"]
    assert "no config-* beside it and no IKCONFIG inside" in verdict["results"][0]["evidence"]["message"]
    assert result.ret == pytest.ExitCode.TESTS_FAILED


def test_device_cgroup_without_bpf_fails_when_the_real_config_disables_cgroup_v1() -> None:
    """The real 4.1.0 QEMU configuration boots with cgroup_no_v1=all: then only CGROUP_BPF (cgroup v2's eBPF
    device controller) enforces device access; CGROUP_DEVICE alone is enough only while cgroup v1 is on."""
    from pytest_kata.kataconfig import load_config

    cmdline = load_config(REPO / "fixtures/configs/upstream/configuration-qemu.toml").get(
        "hypervisor.qemu.kernel_params")
    assert "cgroup_no_v1=all" in cmdline
    real = sorted(Path("/boot").glob("config-*")) or sorted(REPO.glob("fixtures/out/reference-candidate*/**/config-*"))
    assert real, "a real kernel config (the Debian kernel's, as the reference candidate ships it)"
    text = "\n".join(ln for ln in real[-1].read_text().splitlines()
                     if not ln.startswith(("CONFIG_CGROUP_BPF=", "# CONFIG_CGROUP_BPF ")))
    no_bpf = parse_kconfig(text + "\n# CONFIG_CGROUP_BPF is not set\nCONFIG_CGROUP_DEVICE=y\n", "config-no-bpf")
    assert outcomes(no_bpf, cmdline=cmdline)["KATA-KCONF-051"][0] == "fail"
    assert outcomes(no_bpf, cmdline="systemd.unified_cgroup_hierarchy=0")["KATA-KCONF-051"][0] == "pass"
    assert outcomes(load_kconfig(real[-1]), cmdline=cmdline)["KATA-KCONF-051"][0] == "pass"
