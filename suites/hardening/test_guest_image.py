"""Guest image hardening: one item per rule of ``image.toml`` (KATA-IMG-xxx), judged on the guest image(s) the
candidate's configuration boots, plus the attack-surface budget against the baseline release.

Run: ``pytest suites/hardening -k image --kata-candidate BUNDLE [--kata-baseline OLD] [--kata-shim qemu]``.
The image is read without root (debugfs / cpio); the kernel command line the facts see is the one Kata
would pass: the runtime's root parameters, ``kernel_params`` and the agent debug switches of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.errors import KataError
from pytest_kata.images.facts import ImageFacts, image_facts, root_attachment, sysctl_values, with_booted_sysctls
from pytest_kata.images.read import open_image
from pytest_kata.options import SEVERITIES
from pytest_kata.recorder import CheckRecorder
from pytest_kata.rules import judge as judge_rule
from pytest_kata.rules import load_rules
from pytest_kata.sandbox import SandboxError
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec

STATUS_ORDER = ("notapplicable", "waived", "pass", "fail", "error")  # worst last


@dataclass
class GuestImage:
    """One guest image or initrd of the candidate, with its facts and rule context."""

    rel: str
    kind: str
    facts: ImageFacts
    context: dict[str, Any]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "image_rule" in metafunc.fixturenames:
        try:
            rules = load_rules("image")
        except KataError as exc:
            raise pytest.UsageError(str(exc)) from None
        metafunc.parametrize("image_rule", [pytest.param(r, id=r.id) for r in rules])


def _host_path(bundle: Any, configured: str | None) -> str | None:
    """A config path like /opt/kata/share/kata-containers/kata-containers.img -> the bundle's relative path."""
    if not configured:
        return None
    text = str(configured)
    for prefix in ("/opt/kata/",):
        if text.startswith(prefix):
            return text[len(prefix):]
    return None


def candidate_images(bundle: Any, settings: Any) -> list[GuestImage]:
    """The images the selected shim's configuration boots (all shipped images if it names none we have)."""
    try:
        shim = bundle.shim(settings.shim if settings.shim not in (None, "all") else None)
        config = shim.config
    except (KataError, AttributeError):
        config = None
    chosen: list[tuple[str, str]] = []
    if config is not None:
        for key, kind in (("image", "image"), ("initrd", "initrd")):
            rel = _host_path(bundle, config.get(f"hypervisor.*.{key}", None))
            if rel and bundle.path(rel).exists():
                chosen.append((rel, kind))
    if not chosen:
        chosen = [(r, "image") for r in getattr(bundle, "images", [])] + \
                 [(r, "initrd") for r in getattr(bundle, "initrds", [])]
    out = []
    seen: set[Path] = set()
    for rel, kind in chosen:
        path = Path(bundle.path(rel)).resolve()
        if path in seen:
            continue
        seen.add(path)
        with open_image(path) as root:
            verity = config.get("hypervisor.*.kernel_verity_params", "") if config is not None else ""
            attachment = root_attachment(config, is_image=kind == "image") if config is not None else None
            cmdline = attachment.cmdline(config) if attachment is not None else None
            facts = image_facts(root, cmdline=cmdline, verity_params=verity, attachment=attachment)
            context = {"image_kind": root.kind, "init": facts.get("init.kind"),
                       "confidential": bool(config.confidential) if config is not None else None}
        out.append(GuestImage(rel, root.kind, facts, context))
    return out


@pytest.fixture(scope="session")
def kata_guest_images(kata_candidate: Any, kata_settings: Any) -> list[GuestImage]:
    """Facts of the candidate's guest image(s), read once per session."""
    try:
        images = candidate_images(kata_candidate, kata_settings)
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    if not images:
        pytest.skip("the candidate ships no guest image or initrd")
    return images


def test_image_rule(image_rule: Any, kata_guest_images: list[GuestImage], kata_result: CheckRecorder,
                    kata_profile: Any, kata_waivers: Any) -> None:
    """The candidate's guest image(s) satisfy this image hardening rule (under --kata-profile/--kata-waivers)."""
    profile, waivers = kata_profile, kata_waivers
    per_image = {}
    worst = None
    for img in kata_guest_images:
        judged = judge_rule(image_rule, img.facts, img.context, profile=profile, waivers=waivers,
                            scopes=[img.rel, Path(img.rel).name])
        about = img.facts.about(image_rule.check.fact_keys())
        per_image[img.rel] = {**judged.evidence(), "status": judged.status, **({"about": about} if about else {})}
        if worst is None or STATUS_ORDER.index(judged.status) > STATUS_ORDER.index(worst.status):
            worst = judged
    assert worst is not None
    kata_result.record(id=image_rule.id, severity=worst.severity, title=image_rule.title, suite="hardening",
                       images=per_image, rationale=image_rule.rationale, remediation=image_rule.remediation,
                       references=list(image_rule.references))
    notes = sorted({n for img in kata_guest_images for n in img.facts.notes})
    if notes:
        kata_result.record(notes=notes)
    failing = [f"{rel}: {ev['message']}" + (f" ({_about_text(ev['about'])})" if ev.get("about") else "")
               for rel, ev in per_image.items() if ev["status"] == worst.status]
    kata_result.conclude(worst.status, f"{image_rule.id} {worst.status}: " + "; ".join(failing))


def _about_text(about: dict[str, Any]) -> str:
    return "; ".join(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
                     for key, value in about.items())


@pytest.mark.kata_check("KATA-IMG-100", severity="medium",
                        title="Guest image attack surface within budget of the baseline release")
def test_surface_budget(kata_candidate: Any, kata_baseline: Any, kata_settings: Any,
                        kata_result: CheckRecorder) -> None:
    """The candidate's guest image does not grow its attack surface beyond --kata-surface-budget percent."""
    from pytest_kata.images.surface import measure, over_budget, table

    budget = float(kata_settings.surface_budget)
    cand = candidate_images(kata_candidate, kata_settings)
    base = candidate_images(kata_baseline, kata_settings)
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



def _sysctl_keys(rule: Any) -> list[str]:
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
def test_boot_sysctls_read_back(kata_candidate: Any, kata_settings: Any, kata_guest_images: list[GuestImage],
                                kata_result: CheckRecorder, kata_profile: Any, kata_waivers: Any) -> None:
    """The sysctl rules judged by effect: a fresh guest of the candidate (its kernel, image and kernel_params,
    booted by the direct driver, before any workload) is asked for /proc/sys, and each KATA-IMG sysctl rule is
    judged again on what it says. Skipped with the reason when no guest can boot here."""
    shim = kata_settings.shim if kata_settings.shim not in (None, "", "all") else None
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
    static = booted_image.facts
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
                            scopes=[booted_image.rel, Path(booted_image.rel).name])
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
