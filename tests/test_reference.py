"""The reference candidate (fixtures/build-reference): kata-static layout, real versions, tarball hygiene.

Builds are cached by content hash; the first run builds the ``reference`` guest image (~20 s) and each
bundle (~1 s), later runs reuse them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "fixtures"))

from reference import (  # noqa: E402
    KERNEL_PATH_REWRITES,
    ensure_reference,
    reference_tarball,
)

from pytest_kata.errors import KataError  # noqa: E402
from pytest_kata.images.common import host_kernel  # noqa: E402

pytestmark = pytest.mark.slow
SHARE = "opt/kata/share/kata-containers"


@pytest.fixture(scope="module")
def candidate() -> Path:
    return ensure_reference("candidate", "hardened")


@pytest.fixture(scope="module")
def baseline() -> Path:
    return ensure_reference("baseline", "hardened")


def test_layout_and_versions(candidate: Path) -> None:
    kata = candidate / "opt/kata"
    assert (kata / "VERSION").read_text().strip() == "4.1.0"
    krel = host_kernel().release
    share = candidate / SHARE
    assert (share / "vmlinuz.container").resolve() == (share / f"vmlinuz-{krel}-ref").resolve()
    assert (share / f"config-{krel}-ref").read_bytes() == host_kernel().config.read_bytes()
    assert (share / "kata-containers.img").resolve().name == "kata-debian-12-ref.image"
    assert (share / "kata-containers-initrd.img").resolve().name == "kata-debian-12-ref.initrd"
    assert (kata / "bin/qemu-system-x86_64").read_bytes() == Path("/usr/bin/qemu-system-x86_64").read_bytes()
    versions = yaml.safe_load((kata / "versions.yaml").read_text())
    kernel_pkg = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", f"linux-image-{krel}"],
                                capture_output=True, text=True).stdout
    assert versions["assets"]["kernel"]["version"] == "v" + kernel_pkg.split("-")[0]
    qemu_line = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout
    assert versions["assets"]["hypervisor"]["qemu"]["version"].lstrip("v") in qemu_line
    ref = json.loads((kata / "kata-reference.json").read_text())
    assert ref["reference"] is True and ref["version"] == "4.1.0"
    assert {"containerd-shim-kata-v2", "kata-agent", "virtiofsd"} <= set(ref["missing"])
    assert not (kata / "bin/containerd-shim-kata-v2").exists()


def test_configs_point_at_the_bundle(candidate: Path) -> None:
    defaults = candidate / "opt/kata/share/defaults/kata-containers"
    assert (defaults / "configuration.toml").resolve().name == "configuration-qemu.toml"
    assert (defaults / "runtime-rs/configuration.toml").resolve().name == "configuration-qemu-runtime-rs.toml"
    text = (defaults / "configuration-qemu.toml").read_text()
    assert "SPDX-License-Identifier" in text or "Copyright" in text  # licence header kept
    for old in KERNEL_PATH_REWRITES:
        assert old not in text
    from pytest_kata.kataconfig import load_config

    cfg = load_config(defaults / "configuration-qemu.toml")
    for key in ("kernel", "image", "path"):
        value = cfg.get(f"hypervisor.qemu.{key}")
        assert value.startswith("/opt/kata/") and (candidate / value.lstrip("/")).exists(), (key, value)
    hardened = (REPO / "fixtures/configs/hardened/configuration-qemu.toml").read_text()
    assert text == hardened.replace('"/opt/kata/share/kata-containers/vmlinux.container"',
                                    '"/opt/kata/share/kata-containers/vmlinuz.container"')


def test_bundle_opens_with_the_inventory(candidate: Path) -> None:
    bundle_mod = pytest.importorskip("pytest_kata.bundle")
    bundle = bundle_mod.open_bundle(candidate)
    assert bundle.version == "4.1.0"
    assert "bin/qemu-system-x86_64" in bundle.hypervisors
    assert any(k.endswith("vmlinuz.container") for k in bundle.kernels)
    assert "containerd-shim-kata-v2" in bundle.missing
    assert bundle.shim("qemu").config.get("hypervisor.qemu.kernel").endswith("vmlinuz.container")


def test_tarball_is_rooted_owned_by_root_and_sorted(candidate: Path) -> None:
    tarball = reference_tarball("candidate", "hardened")
    assert tarball.name == "kata-static-4.1.0-reference-hardened-amd64.tar.zst"
    assert (REPO / "fixtures/out" / tarball.name).exists()
    import zstandard

    with open(tarball, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream, \
            tarfile.open(fileobj=stream, mode="r|") as tar:
        members = [(m.name, m.uid, m.gid, m.mtime, m.type) for m in tar]
    names = [m[0] for m in members]
    assert names == sorted(names)
    assert all(n in (".", "./opt") or n.startswith("./opt/kata") for n in names)
    assert {m[1] for m in members} == {0} and {m[2] for m in members} == {0}
    assert len({m[3] for m in members}) == 1  # one fixed mtime
    assert f"./{SHARE}/kata-debian-12-ref.image" in names
    assert all(t in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE) for *_, t in members)


def test_baseline_reuses_its_variants_guest_image(candidate: Path, baseline: Path) -> None:
    assert (baseline / "opt/kata/VERSION").read_text().strip() == "3.30.0"
    refs = [json.loads((root / "opt/kata/kata-reference.json").read_text()) for root in (baseline, candidate)]
    assert refs[0]["components"]["guest-image-key"] == refs[1]["components"]["guest-image-key"]
    image = f"{SHARE}/kata-debian-12-ref.image"
    assert (baseline / image).read_bytes() == (candidate / image).read_bytes()
    assert baseline != candidate


def test_variants_ship_their_own_guest_image(candidate: Path) -> None:
    """The hardened variant ships the hardened guest (vm-images/guest/minimal.toml: no package manager,
    module loading locked at boot); the upstream variant keeps the ordinary one (reference.toml, with dpkg)."""
    upstream = ensure_reference("candidate", "upstream")
    cfg = "opt/kata/share/defaults/kata-containers/configuration-qemu.toml"
    assert (upstream / cfg).read_text() != (candidate / cfg).read_text()
    assert (upstream / "opt/kata/VERSION").read_text() == (candidate / "opt/kata/VERSION").read_text()
    refs = {name: json.loads((root / "opt/kata/kata-reference.json").read_text())["components"]
            for name, root in (("hardened", candidate), ("upstream", upstream))}
    assert refs["hardened"]["guest-recipe"] == "minimal" and refs["upstream"]["guest-recipe"] == "reference"
    assert "dpkg" not in refs["hardened"]["guest-packages"] and "dpkg" in refs["upstream"]["guest-packages"]
    from pytest_kata.images.facts import image_facts
    from pytest_kata.images.read import open_image

    facts = {}
    for name, root in (("hardened", candidate), ("upstream", upstream)):
        with open_image(root / SHARE / "kata-containers.img") as image:
            facts[name] = image_facts(image)
    assert facts["hardened"]["image.package_managers"] == []
    assert facts["hardened"]["sysctl.kernel.modules_disabled"] == 1
    assert facts["upstream"]["image.package_managers"] == ["/usr/bin/dpkg"]
    assert "sysctl.kernel.modules_disabled" not in facts["upstream"]


def test_bad_arguments_are_one_line() -> None:
    with pytest.raises(KataError, match="unknown reference build"):
        ensure_reference("nightly")
    with pytest.raises(KataError, match="unknown reference variant"):
        ensure_reference("candidate", "insecure")


def test_build_script_runs_and_reports(candidate: Path) -> None:
    proc = subprocess.run([str(REPO / "fixtures/build-reference"), "--which", "candidate", "--variant",
                           "hardened"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4.1.0" in proc.stdout and "kata-static-4.1.0-reference-hardened-amd64.tar.zst" in proc.stdout
    assert "reference candidate 4.1.0 (hardened)" in proc.stderr  # progress
    bad = subprocess.run([str(REPO / "fixtures/build-reference"), "--which", "nightly"], capture_output=True,
                         text=True)
    assert bad.returncode == 2


# The static gates on the reference bundles, as the demo runs them (the other suites boot VMs).
# The Debian kernel's Kconfig the hardened reference cannot change without building its own kernel.
HARDENED_KCONF_WARNINGS = {f"KATA-KCONF-{n:03d}" for n in (2, 4, 7, 10, 16, 18, 20, 44)}
# Kconfig rules whose effect a kernel parameter gives (KSPP command line, or a sysctl the kernel sets
# before init and KATA-IMG-101 reads back from a booted guest).
KCONF_BY_CMDLINE = {"KATA-KCONF-005": "sysctl.kernel.kexec_load_disabled=1", "KATA-KCONF-006": "nohibernate",
                    "KATA-KCONF-011": "sysctl.vm.unprivileged_userfaultfd=0", "KATA-KCONF-017": "sysctl.kernel.sysrq=0",
                    "KATA-KCONF-021": "sysctl.dev.tty.ldisc_autoload=0", "KATA-KCONF-036": "init_on_free=1",
                    "KATA-KCONF-038": "slab_nomerge"}
UPSTREAM_REJECT_REASONS = {"KATA-CFG-006", "KATA-CFG-007", "KATA-CFG-008", "KATA-CFG-011", "KATA-CFG-030",
                           "KATA-KCONF-001"}


@pytest.mark.parametrize("variant", ["upstream", "hardened"])
def test_kconfig_rules_take_the_real_kernel_params_equivalents(variant: str) -> None:
    """The Debian guest kernel's Kconfig fails these rules alone; the hardened 4.1.0 kernel_params give their
    effect on the command line (each rule's own remediation), so they pass there and fail with upstream's."""
    from pytest_kata.kataconfig import load_config
    from pytest_kata.rules import Facts, evaluate, load_rules
    from pytest_kata.rules.kconfig import load_kconfig

    kconfig = load_kconfig(host_kernel().config)
    params = str(load_config(REPO / "fixtures/configs" / variant / "configuration-qemu.toml").get(
        "hypervisor.qemu.kernel_params", ""))
    rules = {r.id: r for r in load_rules("kernel") if r.id in KCONF_BY_CMDLINE}
    assert set(rules) == set(KCONF_BY_CMDLINE)
    for rid, param in KCONF_BY_CMDLINE.items():
        assert evaluate(rules[rid], kconfig, kconfig.context).status == "fail", rid  # the Kconfig alone
        outcome = evaluate(rules[rid], Facts({}, overlay={"kernel.cmdline": params}, base=kconfig), kconfig.context)
        assert (param in params.split()) == (variant == "hardened")
        assert outcome.status == ("pass" if variant == "hardened" else "fail"), (rid, outcome.message)


def static_verdict(pytester: pytest.Pytester, root: Path, baseline: Path) -> tuple[Any, dict[str, Any]]:
    report = pytester.path / "verdict.json"
    report.unlink(missing_ok=True)
    result = pytester.runpytest_subprocess(
        str(REPO / "suites" / "hardening"), str(REPO / "suites" / "advisories"), "-p", "no:cacheprovider",
        "--kata-candidate", str(root), "--kata-baseline", str(baseline), "--kata-report", str(report))
    return result, json.loads(report.read_text())


def test_demo_verdicts_hardened_accepted_upstream_rejected_for_the_readme_reasons(
        pytester: pytest.Pytester, candidate: Path, baseline: Path) -> None:
    """Every shipped configuration judged: the hardened reference is accepted with no blocking result and no
    advisory finding; the upstream one is rejected for exactly the README's reasons (seccomp off in the guest,
    no QEMU seccomp sandbox, kernel_params annotation, block-device hot-plug) plus the guest kernel taking
    unsigned modules (upstream kernel_params lack module.sig_enforce=1)."""
    result, verdict = static_verdict(pytester, candidate, baseline)
    assert verdict["verdict"] == "accept" and result.ret == 0, verdict["reasons"]
    configs = {r["evidence"]["config"].rsplit("/", 1)[-1] for r in verdict["results"] if "config" in r["evidence"]}
    assert len(configs) == 9
    assert not [r["id"] for r in verdict["results"] if r["suite"] == "advisories" and r["status"] != "pass"
                and r["status"] != "notapplicable"]
    assert not [r["id"] for r in verdict["results"] if r["id"].startswith("KATA-CFG") and r["status"] == "fail"]
    # what is left below the gate is the Debian distribution kernel's Kconfig (no guest kernel is built for
    # the reference: README, "the hardened reference's remaining warnings"); the hardened guest image passes
    # every image rule
    warnings = {r["id"].split("[")[0] for r in verdict["results"] if r["status"] == "fail"}
    assert warnings == HARDENED_KCONF_WARNINGS
    upstream = ensure_reference("candidate", "upstream")
    result, verdict = static_verdict(pytester, upstream, ensure_reference("baseline", "upstream"))
    assert verdict["verdict"] == "reject" and result.ret == 1
    assert {reason.split("[")[0] for reason in verdict["reasons"]} == UPSTREAM_REJECT_REASONS
    # the upstream variant's guest keeps dpkg and leaves module loading open: warnings below the gate
    upstream_image = {r["id"] for r in verdict["results"] if r["id"].startswith("KATA-IMG") and r["status"] == "fail"}
    assert {"KATA-IMG-007", "KATA-IMG-027"} <= upstream_image
