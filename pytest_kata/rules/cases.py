"""Rule cases: one (rule, subject) pair each, evaluated into a :class:`CaseResult` without pytest.

The suites turn each case into one pytest item (:mod:`pytest_kata.plugins.rules` records the result with the
check recorder); the ids are the rule's id and the subject's file (``KATA-CFG-005[configuration-qemu.toml]``).
Evidence carries the actual and expected values; attachments carry what a reviewer needs where a rule did not
pass (the configuration, a drift diff, kernel-hardening-checker's rows).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.kataconfig import dumps
from pytest_kata.rules import Profile, Rule, Waivers, load_rules
from pytest_kata.rules.subjects import (
    DRIFT_KEY,
    ConfigSubject,
    ImageSubject,
    KernelSubject,
    config_subjects,
    guest_cmdline,
    judge_subject,
    kernel_subjects,
)

Attachment = tuple[str, str, str]  # (name, body, mime)
STATUS_ORDER = ("notapplicable", "waived", "pass", "fail", "error")  # worst last


@dataclass
class CaseResult:
    """What a case concluded: the check's identity, its evidence and attachments, and the status with its
    message. ``skipped`` cases record nothing (the message says why)."""

    id: str
    title: str
    severity: str
    status: str
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)
    attachments: list[Attachment] = field(default_factory=list)
    suite: str | None = None


class Case(Protocol):
    id: str

    def evaluate(self, profile: Profile, waivers: Waivers | None) -> CaseResult: ...


@dataclass
class RuleCase:
    """One (rule, subject) pair: evaluated when the item runs."""

    rule: Rule
    subject: ConfigSubject | KernelSubject
    id: str
    evidence: dict[str, Any] = field(default_factory=dict)
    attachments: Callable[[str], list[Attachment]] | None = None
    extra_evidence: Callable[[], dict[str, Any]] | None = None  # computed when the item runs

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def evaluate(self, profile: Profile, waivers: Waivers | None) -> CaseResult:
        judgement = judge_subject(self.rule, self.subject, profile, waivers)
        evidence = {
            "rule": self.rule.id,
            "profile": profile.name,
            **self.evidence,
            **judgement.evidence(),
            **(self.extra_evidence() if self.extra_evidence is not None else {}),
        }
        return CaseResult(self.id, self.rule.title, judgement.severity, judgement.status,
                          f"{self.id}: {judgement.outcome.message}", evidence,
                          self.attachments(judgement.status) if self.attachments is not None else [])


@dataclass
class SkipCase:
    """Stands in when there is nothing to check (no candidate): the item skips and says why."""

    id: str
    reason: str

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def evaluate(self, profile: Profile, waivers: Waivers | None) -> CaseResult:
        return CaseResult(self.id, "", "", "skipped", self.reason)


@dataclass
class ErrorCase:
    """The subject a suite needs is missing from the candidate: an error in the verdict, not a silent skip."""

    id: str
    title: str
    reason: str
    severity: str = "high"  # an unverifiable guest kernel must not slip through the gate

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def evaluate(self, profile: Profile, waivers: Waivers | None) -> CaseResult:
        return CaseResult(self.id, self.title, self.severity, "error", self.reason, {"message": self.reason})


@dataclass
class ImageRuleCase:
    """One image rule on every guest image the candidate boots: the worst status decides, each image's
    judgement is in the evidence."""

    rule: Rule
    images: list[ImageSubject]

    @property
    def id(self) -> str:
        return self.rule.id

    def evaluate(self, profile: Profile, waivers: Waivers | None) -> CaseResult:
        per_image: dict[str, dict[str, Any]] = {}
        worst = None
        for img in self.images:
            judged = judge_subject(self.rule, img, profile, waivers)
            about = img.image_facts.about(self.rule.check.fact_keys())
            per_image[img.rel] = {**judged.evidence(), "status": judged.status, **({"about": about} if about else {})}
            if worst is None or STATUS_ORDER.index(judged.status) > STATUS_ORDER.index(worst.status):
                worst = judged
        if worst is None:
            raise KataError(f"{self.rule.id}: no guest image to judge")
        evidence: dict[str, Any] = {"images": per_image, "rationale": self.rule.rationale,
                                    "remediation": self.rule.remediation, "references": list(self.rule.references)}
        notes = sorted({n for img in self.images for n in img.image_facts.notes})
        if notes:
            evidence["notes"] = notes
        failing = [f"{rel}: {ev['message']}" + (f" ({_about_text(ev['about'])})" if ev.get("about") else "")
                   for rel, ev in per_image.items() if ev["status"] == worst.status]
        return CaseResult(self.rule.id, self.rule.title, worst.severity, worst.status,
                          f"{self.rule.id} {worst.status}: " + "; ".join(failing), evidence, suite="hardening")


def _about_text(about: dict[str, Any]) -> str:
    return "; ".join(f"{key}: {', '.join(map(str, value)) if isinstance(value, list) else value}"
                     for key, value in about.items())


# ------------------------------------------------------------------------------------ runtime configuration


def _config_attachments(subject: ConfigSubject, rule: Rule) -> Callable[[str], list[Attachment]]:
    """The drift diff on the drift rule's item; the configuration (and drop-in diff) where a rule did not pass."""

    def make(status: str) -> list[Attachment]:
        out: list[Attachment] = []
        if subject.installed is not None and DRIFT_KEY in rule.check.fact_keys():
            shipped = subject.config.path.read_text(encoding="utf-8", errors="replace").splitlines(True)
            node = subject.installed.path.read_text(encoding="utf-8", errors="replace").splitlines(True)
            diff = "".join(difflib.unified_diff(shipped, node, f"shipped/{subject.rel}", str(subject.installed.path)))
            out.append((f"diff shipped vs installed {subject.name}", diff or "(identical)\n", "text/x-diff"))
        if status == "pass" or status == "notapplicable":
            return out  # the full file only where a reviewer needs it
        if subject.config.dropins:
            base = dumps(subject.config.base_data).splitlines(True)
            merged = dumps(subject.config.data).splitlines(True)
            out.append(
                (
                    f"diff {subject.name} vs effective (config.d drop-ins)",
                    "".join(difflib.unified_diff(base, merged, subject.rel, "effective")),
                    "text/x-diff",
                )
            )
        out.append((subject.rel, subject.config.path.read_text(encoding="utf-8", errors="replace"), "text/plain"))
        return out

    return make


def runtime_config_cases(bundle: Bundle, shim: str | None, installed_config: str | None) -> list[Case]:
    """One case per runtime-config rule and selected configuration; an error case when the candidate ships
    none. An unknown ``shim`` raises the bundle's :class:`KataError`."""
    if not bundle.shims:
        reason = f"{bundle.label}: the candidate ships no runtime configuration (configuration-*.toml)"
        return [ErrorCase("KATA-CFG-000[no-configuration]", "Runtime configuration is available", reason)]
    subjects = config_subjects(bundle, shim, installed_config)
    cases: list[Case] = []
    for rule in load_rules("runtime-config"):
        for subject in subjects:
            cases.append(RuleCase(rule, subject, f"{rule.id}[{subject.name}]",
                                  evidence={"config": subject.rel, "shim": subject.shim},
                                  attachments=_config_attachments(subject, rule)))
    return cases


# ------------------------------------------------------------------------------------------ guest kernel


def _khc_evidence(subject: KernelSubject, rule: Rule) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        rows = subject.khc_rows(rule.check.fact_keys())
        if rows is None:
            return {}
        slim = [{k: r.get(k) for k in ("option_name", "desired_val", "check_result")} for r in rows]
        return {"kernel_hardening_checker": {"rows": slim, "note": "cross-check only, not used for the verdict"}}

    return make


def _kernel_attachments(subject: KernelSubject, rule: Rule) -> Callable[[str], list[Attachment]]:
    def make(status: str) -> list[Attachment]:
        out: list[Attachment] = []
        rows = subject.khc_rows(rule.check.fact_keys())
        if rows is not None:
            out.append(
                (
                    f"kernel-hardening-checker on {subject.name} (cross-check, not the verdict)",
                    json.dumps(rows, indent=1),
                    "application/json",
                )
            )
        if status not in ("pass", "notapplicable"):
            lines = [
                line for line in subject.kconfig.text.splitlines() if any(k in line for k in rule.check.fact_keys())
            ]
            out.append((f"{subject.name}: options read by {rule.id}", "\n".join(lines) + "\n", "text/plain"))
        return out

    return make


def kernel_cases(bundle: Bundle, shim: str | None) -> list[Case]:
    """One case per kernel rule and guest kernel configuration, judged with the guest's command line; an
    error case when the candidate ships no readable kernel configuration."""
    cmdline = guest_cmdline(bundle, shim)
    subjects, notes = kernel_subjects(bundle, cmdline)
    if not subjects:
        reason = "; ".join(notes) or "the candidate ships no guest kernel"
        return [ErrorCase("KATA-KCONF-000[no-kernel-config]", "Guest kernel configuration is available", reason)]
    cases: list[Case] = []
    for rule in load_rules("kernel"):
        for subject in subjects:
            cases.append(RuleCase(rule, subject, f"{rule.id}[{subject.name}]",
                                  evidence={"kernel_config": subject.rel, "source": subject.kconfig.source,
                                            "kernel_version": subject.kconfig.version, "kernel_cmdline": cmdline},
                                  attachments=_kernel_attachments(subject, rule),
                                  extra_evidence=_khc_evidence(subject, rule)))
    return cases
