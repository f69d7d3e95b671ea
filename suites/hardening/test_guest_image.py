"""Guest image hardening: one item per rule of ``image.toml`` (KATA-IMG-xxx), judged on the guest image(s) the
candidate's configuration boots, plus the attack-surface budget against the baseline release.

Run: ``pytest suites/hardening -k image --kata-candidate BUNDLE [--kata-baseline OLD] [--kata-shim qemu]``.
The image is read without root (debugfs / cpio); the kernel command line the facts see is the one Kata
would pass: the runtime's root parameters, ``kernel_params`` and the agent debug switches of the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.images.surface import measure, over_budget, table
from pytest_kata.options import KataSettings
from pytest_kata.plugins.recorder import CheckRecorder
from pytest_kata.rules import Rule, load_rules
from pytest_kata.rules.cases import Case, ImageRuleCase
from pytest_kata.rules.subjects import ImageSubject, image_subjects


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

