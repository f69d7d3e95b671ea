"""What the rules judge: the candidate's runtime configurations, guest kernel configurations and guest images.

A subject gives the engine its facts, its context (which decides applicability) and its scopes (which waivers
may cover it). The subjects come from an opened :class:`~pytest_kata.bundle.Bundle` (the suites) or from one
file (``pytest-kata rules check``); either way they are judged the same, by :func:`judge_subject`.
"""

from __future__ import annotations

import posixpath
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pytest_kata.bundle import Bundle, ShimInfo, bundle_relative
from pytest_kata.errors import ConfigError, KataError
from pytest_kata.images.facts import ImageFacts, image_facts, root_attachment
from pytest_kata.images.read import open_image
from pytest_kata.kataconfig import KataConfig, load_config
from pytest_kata.rules import Facts, FactSource, Judgement, Profile, Rule, Waivers, judge
from pytest_kata.rules.kconfig import KernelConfig, extract_ikconfig, load_kconfig, run_kernel_hardening_checker

DRIFT_KEY = "kata.drift"


class Subject(Protocol):
    @property
    def context(self) -> dict[str, Any]: ...

    @property
    def scopes(self) -> list[str]: ...

    def facts(self) -> FactSource: ...


def judge_subject(rule: Rule, subject: Subject, profile: Profile, waivers: Waivers | None) -> Judgement:
    """One rule on one subject, under the profile and the waivers: the same for the suites and the CLI."""
    return judge(rule, subject.facts(), subject.context, profile=profile, waivers=waivers, scopes=subject.scopes)


# ------------------------------------------------------------------------------------ runtime configuration


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


def config_subjects(bundle: Bundle, shim: str | None, installed_path: str | None) -> list[ConfigSubject]:
    """The configurations to check: every shipped one (default, or ``all``), or the one ``shim`` names."""
    shims = bundle.selected_shims(shim)
    installed = load_config(installed_path) if installed_path else None
    if installed is not None:
        target = installed_target(bundle, installed)
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
        match = installed is not None and installed_target(bundle, installed) is info
        subjects.append(
            ConfigSubject(
                info.config_path.name, rel, info.name, info.config, installed if match else None, bool(info.runtime_rs)
            )
        )
    return subjects


def installed_target(bundle: Bundle, installed: KataConfig) -> ShimInfo | None:
    """The shipped configuration an installed file corresponds to: same file name, else the default shim's."""
    for info in bundle.shims.values():
        if info.config_path.name == installed.path.name:
            return info
    if installed.path.name == "configuration.toml" and bundle.default_shim:
        return bundle.shim(None)
    return None


# ------------------------------------------------------------------------------------------ guest kernel


@dataclass
class KernelSubject:
    """One guest kernel configuration of the candidate: a shipped ``config-*`` or a kernel's IKCONFIG, with the
    command line the guest boots with (``kernel_params``, when known)."""

    name: str
    rel: str
    kconfig: KernelConfig
    cmdline: str | None = None
    _khc: list[dict[str, Any]] | None = None
    _khc_done: bool = False

    @property
    def context(self) -> dict[str, Any]:
        return self.kconfig.context

    @property
    def scopes(self) -> list[str]:
        return [self.name, self.rel]

    def facts(self) -> FactSource:
        if self.cmdline is None:
            return self.kconfig
        return Facts({}, overlay={"kernel.cmdline": self.cmdline}, base=self.kconfig)

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


def kernel_subjects(bundle: Bundle, cmdline: str | None = None) -> tuple[list[KernelSubject], list[str]]:
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
            subjects.append(KernelSubject(posixpath.basename(real), real, load_kconfig(bundle.root / real), cmdline))
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
            subjects.append(KernelSubject(f"{base}.ikconfig", real, found, cmdline))
    return subjects, notes


def guest_cmdline(bundle: Bundle, shim: str | None) -> str | None:
    """``kernel_params`` of the configuration that boots the kernel (the chosen shim, else the default)."""
    try:
        info = bundle.shim(Bundle.selection(shim))
    except KataError:
        return None
    value = info.config.get("hypervisor.*.kernel_params", None)
    return str(value) if value is not None else None


# ------------------------------------------------------------------------------------------- one file (CLI)


def file_subject(path: Path, cmdline: str | None = None) -> tuple[str, ConfigSubject | KernelSubject]:
    """A file given on its own: ``*.toml`` is a runtime configuration, anything else a kernel config; with the
    name of the rule set that judges it."""
    if path.is_file() and not path.read_bytes().strip():
        raise ConfigError("empty file: nothing to check", path=path)
    if path.suffix == ".toml":
        config = load_config(path)
        if not config.data.get("hypervisor"):
            raise ConfigError("no [hypervisor.<name>] table: not a Kata runtime configuration", path=path)
        return "runtime-config", ConfigSubject(config.name, config.name, config.shim, config)
    kconfig = load_kconfig(path)
    return "kernel", KernelSubject(kconfig.name, kconfig.name, kconfig, cmdline)


# -------------------------------------------------------------------------------------------- guest image


@dataclass
class ImageSubject:
    """One guest image or initrd of the candidate, with its facts and rule context."""

    rel: str
    kind: str
    image_facts: ImageFacts
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def scopes(self) -> list[str]:
        return [self.rel, Path(self.rel).name]

    def facts(self) -> FactSource:
        return self.image_facts


def booted_images(bundle: Bundle, shim: str | None) -> tuple[KataConfig | None, list[tuple[str, str]]]:
    """The configuration that boots the guest (the selected shim's, else the default's) and the images and
    initrds it names that the bundle ships, as ``(path in the bundle, "image" | "initrd")``; every shipped
    image and initrd when it names none of them."""
    try:
        config: KataConfig | None = bundle.shim(Bundle.selection(shim)).config
    except KataError:
        config = None
    chosen: list[tuple[str, str]] = []
    if config is not None:
        for key in ("image", "initrd"):
            configured = config.get(f"hypervisor.*.{key}", None)
            rel = bundle_relative(str(configured)) if configured else None
            if rel and bundle.path(rel).exists():
                chosen.append((rel, key))
    if not chosen:
        chosen = [(r, "image") for r in bundle.images] + [(r, "initrd") for r in bundle.initrds]
    return config, chosen


def image_subjects(bundle: Bundle, shim: str | None) -> list[ImageSubject]:
    """The images the selected shim's configuration boots, read once each (without root), with the kernel
    command line Kata would pass them."""
    config, chosen = booted_images(bundle, shim)
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
        out.append(ImageSubject(rel, root.kind, facts, context))
    return out
