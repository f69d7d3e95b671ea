"""Rule-driven suites: one pytest item per (rule, subject), from the candidate bundle, profile and waivers.

A suite test asks for ``kata_config_case`` (runtime configuration rules) or ``kata_kernel_case`` (guest
kernel rules); :func:`pytest_generate_tests` expands it into one item per rule and configuration file /
kernel config, with ids like ``KATA-CFG-005[configuration-qemu.toml]``. Each case records its evidence in
``kata_result`` and concludes with the rule's status, so the verdict sees pass/fail/error/notapplicable/
waived with actual and expected values.

The profile and the waivers file are read at start-up: a malformed one stops the run with one line.
"""

from __future__ import annotations

import difflib
import json
import posixpath
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.errors import KataError
from pytest_kata.kataconfig import KataConfig, dumps, load_config
from pytest_kata.options import KataSettings
from pytest_kata.recorder import CheckRecorder
from pytest_kata.resources import suites_dir
from pytest_kata.rules import (
    Facts,
    FactSource,
    Profile,
    Rule,
    Waivers,
    judge,
    load_profile,
    load_rules,
    load_waivers,
    rule_sets,
)
from pytest_kata.rules.kconfig import KernelConfig, extract_ikconfig, load_kconfig, run_kernel_hardening_checker

RULES_STATE = pytest.StashKey["RulesState"]()
CANDIDATE_FREE_SUITE = "isolation"
DRIFT_KEY = "kata.drift"


@dataclass
class RulesState:
    """What every rule-driven item shares: loaded once per process (controller and each xdist worker)."""

    profile: Profile
    waivers: Waivers
    bundle: Any = None
    bundle_error: str | None = None
    opened: bool = False
    usage_error: str | None = None  # a bad --kata-candidate/--kata-shim found while collecting


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    from pytest_kata.plugin import settings_of

    settings = settings_of(config)
    try:
        profile = load_profile(settings.profile)
        waivers = load_waivers(settings.waivers)
        known, broken = _known_rule_ids()
        try:
            profile.validate(known)
            waivers.validate(known)
        except KataError:
            if broken is not None:
                raise broken from None  # the real cause: a rule set that does not load
            raise
        if settings.installed_config:
            load_config(settings.installed_config)  # malformed: one line now, not 50 errors later
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[RULES_STATE] = RulesState(profile, waivers)


def _known_rule_ids() -> tuple[set[str], KataError | None]:
    """Ids of every shipped rule that loads, and the first broken rule set's error (reported when a waiver
    or profile needs its ids, else when its suite is collected)."""
    known: set[str] = set()
    broken: KataError | None = None
    for name in rule_sets():
        try:
            known |= {r.id for r in load_rules(name)}
        except KataError as exc:
            broken = broken or exc
    return known, broken


# ------------------------------------------------------------------------------------------------ subjects


@dataclass
class ConfigSubject:
    """One runtime configuration of the candidate, as the rules see it."""

    name: str  # file name, the item id suffix: configuration-qemu.toml
    rel: str  # path inside the bundle
    shim: str
    config: KataConfig
    installed: KataConfig | None = None
    runtime_rs: bool = False  # from the bundle's shim inventory (layout-aware)

    @property
    def context(self) -> dict[str, Any]:
        return {
            "runtime": "runtime-rs" if self.runtime_rs or self.config.runtime_rs else "go",
            "hypervisor": self.config.hypervisor,
            "confidential": self.config.confidential,
            "shim": self.shim,
            "config": self.name,
        }

    @property
    def scopes(self) -> list[str]:
        return [self.name, self.rel, self.shim]

    def facts(self) -> FactSource:
        overlay = {DRIFT_KEY: drift(self.config, self.installed)} if self.installed is not None else {}
        return Facts({}, overlay=overlay, base=self.config)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def drift(shipped: KataConfig, installed: KataConfig) -> list[str]:
    """Every effective value that differs, as ``key: shipped -> installed`` lines."""
    a, b = flatten(shipped.data), flatten(installed.data)
    missing = "<not set>"
    return [
        f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


def config_subjects(bundle: Any, shim: str | None, installed_path: str | None) -> list[ConfigSubject]:
    """The configurations to check: every shipped one (default, or ``all``), or the one ``shim`` names."""
    shims = list(bundle.shims.values()) if shim in (None, "", "all") else [bundle.shim(shim)]
    installed = load_config(installed_path) if installed_path else None
    if installed is not None:
        target = _installed_target(bundle, installed)
        if target is not None and all(s.config_path != target.config_path for s in shims):
            shims.append(target)  # the drift check must see the configuration the node uses
    subjects: list[ConfigSubject] = []
    seen: set[Path] = set()
    for info in shims:
        if info.config_path in seen:
            continue
        seen.add(info.config_path)
        try:
            rel = info.config_path.relative_to(bundle.root).as_posix()
        except ValueError:
            rel = info.config_path.name
        match = installed is not None and _installed_target(bundle, installed) is info
        subjects.append(
            ConfigSubject(
                info.config_path.name, rel, info.name, info.config, installed if match else None, bool(info.runtime_rs)
            )
        )
    return subjects


def _installed_target(bundle: Any, installed: KataConfig) -> Any:
    """The shipped configuration an installed file corresponds to: same file name, else the default shim's."""
    for info in bundle.shims.values():
        if info.config_path.name == installed.path.name:
            return info
    if installed.path.name == "configuration.toml" and bundle.default_shim:
        return bundle.shim(None)
    return None


def _state(config: pytest.Config) -> RulesState:
    return config.stash[RULES_STATE]


def _open_candidate(config: pytest.Config) -> tuple[Any, str | None]:
    state = _state(config)
    if not state.opened:
        from pytest_kata.bundle import open_bundle
        from pytest_kata.plugin import settings_of

        state.opened = True
        settings = settings_of(config)
        if not settings.candidate:
            state.bundle_error = (
                "no candidate given: pass --kata-candidate PATH (a kata-static tarball or an /opt/kata tree)"
            )
        else:
            try:
                state.bundle = open_bundle(settings.candidate)
            except KataError as exc:
                state.usage_error = state.bundle_error = str(exc)
    return state.bundle, state.bundle_error


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class RuleCase:
    """One (rule, subject) pair: evaluated and recorded when the item runs."""

    rule: Rule
    subject: Any
    id: str
    facts: Callable[[], FactSource]
    context: dict[str, Any]
    scopes: list[str]
    evidence: dict[str, Any] = field(default_factory=dict)
    attachments: Callable[[str], list[tuple[str, str, str]]] | None = None
    extra_evidence: Callable[[], dict[str, Any]] | None = None  # computed when the item runs

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def run(self, recorder: CheckRecorder, profile: Profile, waivers: Waivers) -> None:
        judgement = judge(self.rule, self.facts(), self.context, profile=profile, waivers=waivers, scopes=self.scopes)
        recorder.record(
            id=self.id,
            severity=judgement.severity,
            title=self.rule.title,
            rule=self.rule.id,
            profile=profile.name,
            **self.evidence,
            **judgement.evidence(),
            **(self.extra_evidence() if self.extra_evidence is not None else {}),
        )
        if self.attachments is not None:
            for name, body, mime in self.attachments(judgement.status):
                recorder.attach(name, body, mime)
        recorder.conclude(judgement.status, f"{self.id}: {judgement.outcome.message}")


@dataclass
class SkipCase:
    """Stands in when there is nothing to check (no candidate): the item skips and says why."""

    id: str
    reason: str

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def run(self, recorder: CheckRecorder, profile: Profile, waivers: Waivers) -> None:
        pytest.skip(self.reason)


def _config_attachments(subject: ConfigSubject, rule: Rule) -> Callable[[str], list[tuple[str, str, str]]]:
    """The drift diff on the drift rule's item; the configuration (and drop-in diff) where a rule did not pass."""

    def make(status: str) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
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


def runtime_config_cases(config: pytest.Config) -> list[Any]:
    from pytest_kata.plugin import settings_of

    settings: KataSettings = settings_of(config)
    bundle, why = _open_candidate(config)
    if bundle is None:
        return [SkipCase("no-candidate", why or "no candidate")]
    if not bundle.shims:
        reason = f"{bundle.label}: the candidate ships no runtime configuration (configuration-*.toml)"
        return [ErrorCase("KATA-CFG-000[no-configuration]", "Runtime configuration is available", reason)]
    try:
        subjects = config_subjects(bundle, settings.shim, settings.installed_config)
    except KataError as exc:  # an unknown --kata-shim: a usage error, reported after collection
        _state(config).usage_error = str(exc)
        return [SkipCase("bad-option", str(exc))]
    cases: list[Any] = []
    for rule in load_rules("runtime-config"):
        for subject in subjects:
            cases.append(
                RuleCase(
                    rule,
                    subject,
                    f"{rule.id}[{subject.name}]",
                    subject.facts,
                    subject.context,
                    subject.scopes,
                    evidence={"config": subject.rel, "shim": subject.shim},
                    attachments=_config_attachments(subject, rule),
                )
            )
    return cases


# ------------------------------------------------------------------------------------------ guest kernel


@dataclass
class KernelSubject:
    """One guest kernel configuration of the candidate: a shipped ``config-*`` or a kernel's IKCONFIG."""

    name: str
    rel: str
    kconfig: KernelConfig
    _khc: list[dict[str, Any]] | None = None
    _khc_done: bool = False

    def khc_rows(self, keys: list[str]) -> list[dict[str, Any]] | None:
        """kernel-hardening-checker's view of the options a rule reads (cross-check only)."""
        if not self._khc_done:
            self._khc_done = True
            with tempfile.TemporaryDirectory(prefix="kt-khc-") as tmp:
                path = Path(tmp) / self.name
                path.write_text(self.kconfig.text, encoding="utf-8")
                self._khc = run_kernel_hardening_checker(path)
        if self._khc is None:
            return None
        wanted = {k.removeprefix("CONFIG_") for k in keys}
        return [r for r in self._khc if str(r.get("option_name", "")).removeprefix("CONFIG_") in wanted]


def kernel_subjects(bundle: Any) -> tuple[list[KernelSubject], list[str]]:
    """Shipped ``config-*`` files, then IKCONFIG of kernels without one; plus notes on what was not found."""
    subjects: list[KernelSubject] = []
    notes: list[str] = []
    seen: set[str] = set()
    for rel in bundle.kernel_configs:
        real = bundle.resolve(rel) or rel
        if real in seen:
            continue
        seen.add(real)
        try:
            subjects.append(KernelSubject(posixpath.basename(real), real, load_kconfig(bundle.root / real)))
        except KataError as exc:
            notes.append(str(exc))
    covered = {s.name.removeprefix("config-") for s in subjects}
    for rel in bundle.kernels:
        real = bundle.resolve(rel) or rel
        base = posixpath.basename(real)
        if real in seen or base.split("-", 1)[-1] in covered:
            continue
        seen.add(real)
        try:
            found = extract_ikconfig(bundle.root / real)
        except KataError as exc:
            notes.append(str(exc))
            continue
        if found is None:
            notes.append(f"{real}: no config-* beside it and no IKCONFIG inside")
        else:
            subjects.append(KernelSubject(f"{base}.ikconfig", real, found))
    return subjects, notes


def _khc_evidence(subject: KernelSubject, rule: Rule) -> Callable[[], dict[str, Any]]:
    def make() -> dict[str, Any]:
        rows = subject.khc_rows(rule.check.fact_keys())
        if rows is None:
            return {}
        slim = [{k: r.get(k) for k in ("option_name", "desired_val", "check_result")} for r in rows]
        return {"kernel_hardening_checker": {"rows": slim, "note": "cross-check only, not used for the verdict"}}

    return make


def _kernel_attachments(subject: KernelSubject, rule: Rule) -> Callable[[str], list[tuple[str, str, str]]]:
    def make(status: str) -> list[tuple[str, str, str]]:
        out: list[tuple[str, str, str]] = []
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


def _guest_cmdline(bundle: Any, shim: str | None) -> str | None:
    """``kernel_params`` of the configuration that boots the kernel (the chosen shim, else the default)."""
    try:
        info = bundle.shim(None if shim in (None, "all") else shim)
    except KataError:
        return None
    value = info.config.get("hypervisor.*.kernel_params", None)
    return str(value) if value is not None else None


def _kernel_facts(kconfig: KernelConfig, cmdline: str | None) -> Callable[[], FactSource]:
    if cmdline is None:
        return lambda: kconfig
    return lambda: Facts({}, overlay={"kernel.cmdline": cmdline}, base=kconfig)


def kernel_cases(config: pytest.Config) -> list[Any]:
    from pytest_kata.plugin import settings_of

    bundle, why = _open_candidate(config)
    if bundle is None:
        return [SkipCase("no-candidate", why or "no candidate")]
    subjects, notes = kernel_subjects(bundle)
    cmdline = _guest_cmdline(bundle, settings_of(config).shim)
    if not subjects:
        reason = "; ".join(notes) or "the candidate ships no guest kernel"
        return [ErrorCase("KATA-KCONF-000[no-kernel-config]", "Guest kernel configuration is available", reason)]
    cases: list[Any] = []
    for rule in load_rules("kernel"):
        for subject in subjects:
            cases.append(
                RuleCase(
                    rule,
                    subject,
                    f"{rule.id}[{subject.name}]",
                    _kernel_facts(subject.kconfig, cmdline),
                    subject.kconfig.context,
                    [subject.name, subject.rel],
                    evidence={
                        "kernel_config": subject.rel,
                        "source": subject.kconfig.source,
                        "kernel_version": subject.kconfig.version,
                        "kernel_cmdline": cmdline,
                    },
                    attachments=_kernel_attachments(subject, rule),
                    extra_evidence=_khc_evidence(subject, rule),
                )
            )
    return cases


@dataclass
class ErrorCase:
    """The subject a suite needs is missing from the candidate: an error in the verdict, not a silent skip."""

    id: str
    title: str
    reason: str
    severity: str = "high"  # an unverifiable guest kernel must not slip through the gate

    def __repr__(self) -> str:  # the allure parameter and pytest's -v: the id, not the whole subject
        return self.id

    def run(self, recorder: CheckRecorder, profile: Profile, waivers: Waivers) -> None:
        recorder.record(id=self.id, severity=self.severity, title=self.title, message=self.reason)
        recorder.conclude("error", self.reason)


CASE_FACTORIES: dict[str, Callable[[pytest.Config], list[Any]]] = {
    "kata_config_case": runtime_config_cases,
    "kata_kernel_case": kernel_cases,
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    for fixture_name, factory in CASE_FACTORIES.items():
        if fixture_name in metafunc.fixturenames:
            try:
                cases = factory(metafunc.config)
            except KataError as exc:  # a broken rule file: one line at the end of collection
                _state(metafunc.config).usage_error = str(exc)
                cases = [SkipCase("broken-rules", str(exc))]
            metafunc.parametrize(fixture_name, cases, ids=[c.id for c in cases])


def pytest_sessionstart(session: pytest.Session) -> None:
    """Under xdist, check --kata-candidate/--kata-shim on the controller before workers start: an input error
    raised inside a worker's collection would crash it instead of printing one line."""
    config = session.config
    if hasattr(config, "workerinput") or getattr(config.option, "dist", "no") == "no":
        return
    if RULES_STATE not in config.stash:
        return
    from pytest_kata.bundle import open_bundle
    from pytest_kata.plugin import settings_of

    settings = settings_of(config)
    if not settings.candidate and _targets_suites(config):
        raise pytest.UsageError("the suites need a candidate: pass --kata-candidate PATH "
                                "(a kata-static tarball or an /opt/kata tree)")
    if settings.baseline:
        try:
            open_bundle(settings.baseline)
        except KataError as exc:
            raise pytest.UsageError(f"--kata-baseline: {exc}") from None
    bundle, _ = _open_candidate(config)
    shim = settings.shim
    error = _state(config).usage_error
    if error is None and bundle is not None and bundle.shims and shim not in (None, "all"):
        try:
            bundle.shim(shim)
        except KataError as exc:
            error = str(exc)
    if error:
        raise pytest.UsageError(error)


def _targets_suites(config: pytest.Config) -> bool:
    """Whether the run names a shipped suite that judges the candidate (a path inside the suites, or
    ``--pyargs pytest_kata.suites...``): the controller of an xdist run collects nothing, so it judges by the
    arguments. The isolation suite alone can run without one (its runc/runsc controls)."""
    suites = suites_dir().resolve()
    for arg in config.args:
        target = arg.split("::", 1)[0]
        if config.option.pyargs and target.startswith("pytest_kata.suites"):
            parts = target.split(".")[2:3]
        else:
            path = (Path(config.invocation_params.dir) / target).resolve()
            if path != suites and suites not in path.parents:
                continue
            parts = list(path.relative_to(suites).parts[:1])
        if parts != [CANDIDATE_FREE_SUITE]:
            return True
    return False


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config) -> None:
    """Raise input errors found while generating items here, where pytest prints them as one line (inside a
    collector they would become a collection error with a traceback)."""
    error = config.stash[RULES_STATE].usage_error if RULES_STATE in config.stash else None
    if error:
        raise pytest.UsageError(error)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def kata_profile(pytestconfig: pytest.Config) -> Profile:
    """The rule profile chosen with ``--kata-profile`` (its ``extends`` chain merged)."""
    return _state(pytestconfig).profile


@pytest.fixture(scope="session")
def kata_waivers(pytestconfig: pytest.Config) -> Waivers:
    """The user's waivers (``--kata-waivers``), validated against the known rule ids."""
    return _state(pytestconfig).waivers


@pytest.fixture
def kata_rule_check(kata_result: CheckRecorder, kata_profile: Profile, kata_waivers: Waivers) -> Callable[[Any], None]:
    """Run one generated rule case: evaluate, record evidence and attachments, conclude with its status."""

    def run(case: Any) -> None:
        case.run(kata_result, kata_profile, kata_waivers)

    return run
