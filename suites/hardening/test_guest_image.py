"""Guest image hardening: one item per rule of ``image.toml`` (KATA-IMG-xxx), judged on the guest image(s) the
candidate's configuration boots, plus the attack-surface budget against the baseline release.

Run: ``pytest suites/hardening -k image --kata-candidate BUNDLE [--kata-baseline OLD] [--kata-shim qemu]``.
The image is read without root (debugfs / cpio); the kernel command line the facts see is the one Kata
would pass: the runtime's root parameters, ``kernel_params`` and the agent debug switches of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.images.facts import sysctl_values, with_booted_sysctls
from pytest_kata.images.surface import measure, over_budget, table
from pytest_kata.options import KataSettings
from pytest_kata.plugins.recorder import CheckRecorder
from pytest_kata.rules import Rule, load_rules
from pytest_kata.rules import judge as judge_rule
from pytest_kata.rules.cases import Case, ImageRuleCase
from pytest_kata.rules.subjects import ImageSubject, image_subjects
from pytest_kata.sandbox import SandboxError
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec
from pytest_kata.severities import SEVERITIES


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "image_rule" in metafunc.fixturenames:
        try:
            rules = load_rules("image")
        except KataError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("image_rule", [pytest.param(r, id=r.id) for r in rules])


@pytest.fixture(scope="session")
def kata_guest_images(kata_candidate: Bundle, kata_settings: KataSettings) -> list[ImageSubject]:
    """Facts of the candidate's guest image(s), read once per session."""
    try:
        images = image_subjects(kata_candidate, kata_settings.shim)
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not images:
        pytest.skip("the candidate ships no guest image or initrd")
    return images


def test_image_rule(image_rule: Rule, kata_guest_images: list[ImageSubject],
                    kata_rule_check: Callable[[Case], None]) -> None:
    """The candidate's guest image(s) satisfy this image hardening rule (under --kata-profile/--kata-waivers)."""
    kata_rule_check(ImageRuleCase(image_rule, kata_guest_images))


@pytest.mark.kata_check("KATA-IMG-100", severity="medium",
                        title="Guest image attack surface within budget of the baseline release")
def test_surface_budget(kata_candidate: Bundle, kata_baseline: Bundle, kata_settings: KataSettings,
                        kata_result: CheckRecorder) -> None:
    """The candidate's guest image does not grow its attack surface beyond --kata-surface-budget percent."""
    budget = float(kata_settings.surface_budget)
    cand = image_subjects(kata_candidate, kata_settings.shim)
    base = image_subjects(kata_baseline, kata_settings.shim)
    if not cand or not base:
        kata_result.conclude("notapplicable", "candidate or baseline ships no guest image")
    problems: list[str] = []
    tables = []
    for c_img in cand:
        b_img = next((b for b in base if b.kind == c_img.kind), None)
        if b_img is None:
            continue
        b_surface = measure(kata_baseline.path(b_img.rel), f"baseline:{Path(b_img.rel).name}")
        c_surface = measure(kata_candidate.path(c_img.rel), f"candidate:{Path(c_img.rel).name}")
        tables.append(table(b_surface, c_surface))
        problems += [f"{c_img.rel}: {p}" for p in over_budget(b_surface, c_surface, budget)]
        kata_result.record(**{f"surface:{c_img.rel}": {"baseline": b_surface.metrics,
                                                        "candidate": c_surface.metrics}})
    kata_result.record(budget_percent=budget)
    if tables:
        kata_result.attach("attack-surface.txt", "\n\n".join(tables))
    if problems:
        kata_result.conclude("fail", "guest image surface grew beyond the budget: " + "; ".join(problems))
    kata_result.conclude("pass", f"no surface metric grew by more than {budget:g}%")


def _sysctl_keys(rule: Rule) -> list[str]:
    keys = [*rule.check.fact_keys(), *(rule.when.fact_keys() if rule.when is not None else [])]
    return [k[len("sysctl."):] for k in keys if k.startswith("sysctl.") and k != "sysctl.decided"]


def read_sysctls(driver: DirectDriver, names: list[str]) -> dict[str, str | None]:
    """/proc/sys values in the running guest (None: no such sysctl there), a few per console line."""
    out: dict[str, str | None] = dict.fromkeys(names)
    for start in range(0, len(names), 8):
        paths = " ".join(n.replace(".", "/") for n in names[start:start + 8])
        # "S""YSCTL": the echoed command line never matches what is parsed
        _rc, text = driver.run(f"for k in {paths}; do if [ -r /proc/sys/$k ]; then "
                               f"echo \"S\"\"YSCTL $k=$(tr '\\t' ' ' < /proc/sys/$k)\"; fi; done")
        for line in text.replace("\r", "").splitlines():
            if line.startswith("SYSCTL ") and "=" in line:
                key, _, value = line[len("SYSCTL "):].partition("=")
                out[key.replace("/", ".")] = value.strip()
    return out


@pytest.mark.vm
@pytest.mark.kata_check("KATA-IMG-101", severity="medium",
                        title="The boot sysctls hold in the booted guest (read back from /proc/sys)")
def test_boot_sysctls_read_back(kata_candidate: Bundle, kata_settings: KataSettings,
                                kata_guest_images: list[ImageSubject], kata_result: CheckRecorder,
                                kata_profile: Any, kata_waivers: Any) -> None:
    """The sysctl rules judged by effect: a fresh guest of the candidate (its kernel, image and kernel_params,
    booted by the direct driver, before any workload) is asked for /proc/sys, and each KATA-IMG sysctl rule is
    judged again on what it says. Skipped with the reason when no guest can boot here."""
    shim = Bundle.selection(kata_settings.shim)
    try:
        spec = GuestSpec.from_bundle(kata_candidate, shim, accel=kata_settings.accel or "auto")
    except (SandboxError, KataError) as exc:
        kata_result.conclude("skipped", f"no guest of the candidate can be booted here: {exc}")
    booted_image = next((img for img in kata_guest_images if spec.image is not None and
                         Path(kata_candidate.path(img.rel)).resolve() == spec.image.resolve()), None)
    booted_image = booted_image or (kata_guest_images[0] if len(kata_guest_images) == 1 else None)
    if booted_image is None:
        kata_result.conclude("skipped", "cannot tell which of the candidate's guest images the direct driver boots")
        return  # conclude raised the skip
    rules = [r for r in load_rules("image") if _sysctl_keys(r)]
    static = booted_image.image_facts
    names = sorted({k for r in rules for k in _sysctl_keys(r)} | set(sysctl_values(static)))
    driver = DirectDriver(spec, boot_timeout=float(kata_settings.boot_timeout or 240))
    try:
        driver.start()
        booted = read_sysctls(driver, names)
    except SandboxError as exc:
        kata_result.conclude("skipped", f"the candidate's guest did not boot here, so /proc/sys cannot be read: {exc}")
    finally:
        driver.stop()
    live = with_booted_sysctls(static, booted, f"/proc/sys of {driver.vm_name} (cmdline: {spec.cmdline()})")
    predicted = sysctl_values(static)
    differs = {k: {"files_and_cmdline": predicted[k], "booted": booted[k]} for k in names
               if k in predicted and str(predicted[k]) != str(booted[k])}
    failing = []
    severity = "medium"
    for rule in rules:
        judged = judge_rule(rule, live, booted_image.context, profile=kata_profile, waivers=kata_waivers,
                            scopes=booted_image.scopes)
        if judged.status == "fail":
            failing.append(f"{rule.id}: {judged.evidence()['message']}")
            severity = max(severity, judged.severity, key=SEVERITIES.index)
    kata_result.record(severity=severity, image=booted_image.rel, booted=booted, differs_from_static=differs,
                       boot_seconds=driver.boot_seconds, kernel_cmdline=spec.cmdline(), qemu=str(spec.qemu),
                       accel=f"{spec.accel} ({spec.accel_reason})")
    if failing:
        kata_result.conclude("fail", f"the booted guest ({booted_image.rel}) fails {len(failing)} sysctl rule(s) "
                                     "on what /proc/sys says: " + "; ".join(failing))
    kata_result.conclude("pass", f"{sum(v is not None for v in booted.values())} sysctls read back from the booted "
                                 f"guest ({booted_image.rel}) satisfy every sysctl rule"
                                 + (f"; differing from the static reading: {differs}" if differs else ""))
