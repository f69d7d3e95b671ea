"""Static halves of the escape-regression checks: what the candidate's configuration and version say.

Each function takes the effective configuration (anything with ``.get(dotted_key, default)``, plus
``runtime_rs``/``hypervisor`` when it is a KataConfig), the candidate version and the advisory feed, and
returns an :class:`~pytest_kata.sandbox.checks.Outcome` whose evidence says ``mode: static``. Whether a
version is affected is decided only by :func:`advisory_decision`, i.e. by the feed's ranges through the same
:func:`pytest_kata.advisories.decide` as the advisory gate, so a backport (1.10.5 carrying the CVE-2020-2023
fix) is judged right and no fixed version is written here. The configuration decides which mode an advisory
needs (runtime-rs, Cloud Hypervisor's pmem, an annotation), never which release fixed it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pytest_kata.advisories import Advisory, decide
from pytest_kata.errors import FeedError
from pytest_kata.sandbox.checks import Outcome, annotation_enabled, combine

RESTRICTED = {"path": "valid_hypervisor_paths", "virtio_fs_daemon": "valid_virtio_fs_daemon_paths",
              "jailer_path": "valid_jailer_paths", "ctlpath": "valid_ctlpaths",
              "entropy_source": "valid_entropy_sources"}


STATIC_EFFECT = "no exploit tried (static mode): decided from the candidate's configuration and the advisory feed"


def _ev(**kw: Any) -> dict[str, Any]:
    return {"mode": "static", "effect": STATIC_EFFECT, **kw}


def find_advisory(feed: Iterable[Advisory], advisory_id: str) -> Advisory | None:
    """The feed's record for ``advisory_id``, by its id or one of its aliases."""
    for advisory in feed:
        if advisory_id == advisory.id or advisory_id in advisory.aliases:
            return advisory
    return None


def advisory_decision(feed: Iterable[Advisory], advisory_id: str, version: str | None) -> Outcome:
    """Whether ``version`` is affected by ``advisory_id``, decided by the feed alone (as the advisory gate).

    An advisory missing from the feed or a version that is no release number cannot be judged: ``skipped``
    with the reason, never ``pass``; a record the gate cannot decide is an ``error`` there and here.
    """
    advisory = find_advisory(feed, advisory_id)
    ev = _ev(version=version, feed_record=advisory.id if advisory else None)
    if advisory is None:
        return Outcome("skipped", f"mode: static: {advisory_id} is not in the advisory feed, so the version is not "
                       "judged (pass --kata-advisories with a feed that has it)", ev)
    if not version:
        return Outcome("skipped", f"mode: static: the candidate's version is unknown; {advisory_id} is not judged",
                       ev)
    try:
        decision = decide(advisory, version)
    except FeedError as exc:
        return Outcome("skipped", f"mode: static: {exc}", ev)
    ev.update(decided_by=decision.evidence, fixed=decision.fixed, feed_source=advisory.source)
    if decision.undecided:
        return Outcome("error", f"mode: static: {advisory_id}: {decision.evidence}", ev)
    if decision.affected:
        return Outcome("fail", f"mode: static: {decision.version} is affected by {advisory_id} per the advisory "
                       f"feed ({decision.evidence}; fixed in {decision.fixed or 'no release yet'})", ev)
    return Outcome("pass", f"mode: static: {decision.version} is not affected by {advisory_id} per the advisory "
                   f"feed ({decision.evidence})", ev)


def _mode_affected(feed: Iterable[Advisory], advisory_id: str, version: str | None, mode: str,
                   problems: list[str], ev: dict[str, Any]) -> None:
    """Where the configuration enables the mode an advisory is about, the feed decides the version."""
    outcome = advisory_decision(feed, advisory_id, version)
    ev.setdefault("advisory_decisions", {})[advisory_id] = f"{outcome.status}: {outcome.message}"
    if outcome.status == "fail":
        problems.append(f"{mode}, and {outcome.message.removeprefix('mode: static: ')}")


def _runtime_rs(config: Any) -> bool:
    return bool(getattr(config, "runtime_rs", False))


def _hypervisor(config: Any) -> str:
    return str(getattr(config, "hypervisor", "") or "")


def annotation_exec(config: Any, version: str | None, feed: Iterable[Advisory]) -> Outcome:
    """CVE-2020-27151: binary-path annotations must be disabled, or pinned to exact allowlisted paths. An
    empty or absent allowlist refuses every value in the runtimes that have one (1.11.5 on); in the releases
    without one the feed's decision is what fails them."""
    problems, ev = [], {}
    for name, allow_key in RESTRICTED.items():
        hits = annotation_enabled(config, name)
        allow = config.get(f"hypervisor.*.{allow_key}", []) or []
        ev[name] = {"enabled_by": hits, allow_key: allow}
        globs = [str(p) for p in allow if any(ch in str(p) for ch in "*?[")]
        if not allow:  # both runtimes reject every value of a restricted annotation without an allowlist
            ev[name]["note"] = f"{allow_key} empty or absent: every value of the annotation is rejected"
        elif hits and globs:
            problems.append(f"annotation '{name}' enabled by {hits} with wildcard allowlist entries {globs}")
    config_outcome = Outcome("fail", "mode: static: " + "; ".join(problems), _ev(annotations=ev)) if problems else \
        Outcome("pass", "mode: static: binary-path annotations are disabled or pinned to exact paths (or none)",
                _ev(annotations=ev))
    return combine(config_outcome, advisory_decision(feed, "CVE-2020-27151", version))


def writable_image(config: Any, version: str | None, image: Path | None, feed: Iterable[Advisory]) -> Outcome:
    """GHSA-wwj6 / CVE-2020-2025: the guest image must be attached read-only and not writable on the host."""
    params = str(config.get("hypervisor.*.kernel_params", "") or "").split()
    hv, rs = _hypervisor(config), _runtime_rs(config)
    nvdimm = not bool(config.get("hypervisor.*.disable_image_nvdimm", False))
    driver = str(config.get("hypervisor.*.vm_rootfs_driver", "") or "")
    problems: list[str] = []
    decisions: dict[str, Any] = {}
    if "rw" in params:
        problems.append("kernel_params ask for a read-write guest root ('rw')")
    if hv == "clh" and nvdimm:
        _mode_affected(feed, "GHSA-wwj6-vghv-5p64", version, "Cloud Hypervisor attaches the image as virtio-pmem",
                       problems, decisions)
    if rs and driver == "virtio-pmem":
        _mode_affected(feed, "GHSA-wwj6-vghv-5p64", version, "runtime-rs attaches the rootfs as virtio-pmem",
                       problems, decisions)
    mode = None
    if image is not None and image.exists():
        st = image.stat()
        mode = oct(stat.S_IMODE(st.st_mode))
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problems.append(f"the guest image {image} is writable by group/others ({mode})")
        if st.st_uid != 0:
            problems.append(f"the guest image {image} is not owned by root (uid {st.st_uid})")
    ev = _ev(kernel_params=" ".join(params), hypervisor=hv, runtime_rs=rs, nvdimm=nvdimm, vm_rootfs_driver=driver,
             image=str(image) if image else None, image_mode=mode, version=version, **decisions)
    if problems:
        return Outcome("fail", "mode: static: " + "; ".join(problems), ev)
    return Outcome("pass", "mode: static: the configuration attaches the guest image read-only", ev)


def block_hotplug(config: Any, version: str | None, feed: Iterable[Advisory] = ()) -> Outcome:
    """GHSA-5fc8-gg7w-3g5c: host block devices must not be hot-plugged for container rootfs."""
    value = config.get("hypervisor.*.disable_block_device_use", None)
    ev = _ev(disable_block_device_use=value, runtime_rs=_runtime_rs(config), version=version)
    if value is not True:
        return Outcome("fail", f"mode: static: disable_block_device_use is {value!r} (must be true)", ev)
    if _runtime_rs(config):
        return Outcome("pass", "mode: static: disable_block_device_use = true (runtime-rs: its single-layer rootfs "
                       "path does not check the flag upstream; run a no-layer image on a KVM host to be sure)", ev)
    return Outcome("pass", "mode: static: disable_block_device_use = true", ev)


def virtiofs_extra_args_annotation(config: Any, version: str | None, feed: Iterable[Advisory] = ()) -> Outcome:
    """GHSA-rr59-xxvx-96qr (a): ``virtio_fs_extra_args`` must not be settable by annotation."""
    hits = annotation_enabled(config, "virtio_fs_extra_args")
    ev = _ev(enable_annotations=config.get("hypervisor.*.enable_annotations", []), matched_by=hits, version=version)
    if hits:
        return Outcome("fail", f"mode: static: enable_annotations {hits} let a pod set virtio_fs_extra_args "
                       "(e.g. -o source=/ --sandbox=none serves the host's / to the guest)", ev)
    return Outcome("pass", "mode: static: virtio_fs_extra_args cannot be set by annotation", ev)


def kernel_params_annotation(config: Any, version: str | None, feed: Iterable[Advisory] = ()) -> Outcome:
    """GHSA-rr59-xxvx-96qr (d): a pod must not be able to add ``agent.debug_console`` to the guest cmdline."""
    hits = annotation_enabled(config, "kernel_params")
    params = str(config.get("hypervisor.*.kernel_params", "") or "")
    console = bool(config.get("agent.kata.debug_console_enabled", False))
    ev = _ev(matched_by=hits, kernel_params=params, debug_console_enabled=console)
    problems = []
    if hits:
        problems.append(f"enable_annotations {hits} let a pod set kernel_params (agent.debug_console)")
    if "agent.debug_console" in params or console:
        problems.append("the debug console is enabled by the configuration itself")
    if problems:
        return Outcome("fail", "mode: static: " + "; ".join(problems), ev)
    return Outcome("pass", "mode: static: no annotation or setting enables the agent debug console", ev)


def virtiofsd_sandbox(config: Any, version: str | None, feed: Iterable[Advisory]) -> Outcome:
    """GHSA-2gv2-cffp-j227: virtiofsd must keep its sandbox and seccomp filter."""
    args = [str(a) for a in config.get("hypervisor.*.virtio_fs_extra_args", []) or []]
    joined = " ".join(args)
    bad = [a for a in ("--sandbox=none", "--sandbox none", "--seccomp=none", "--seccomp none", "source=")
           if a in joined]
    ev = _ev(virtio_fs_extra_args=args, runtime_rs=_runtime_rs(config), version=version)
    problems = [f"virtio_fs_extra_args weaken virtiofsd: {', '.join(bad)}"] if bad else []
    if _runtime_rs(config):
        _mode_affected(feed, "GHSA-2gv2-cffp-j227", version, "runtime-rs starts virtiofsd itself", problems, ev)
    if problems:
        return Outcome("fail", "mode: static: " + "; ".join(problems), ev)
    return Outcome("pass", "mode: static: virtiofsd keeps its sandbox and seccomp", ev)


def sandbox_bind_mounts(config: Any, version: str | None, feed: Iterable[Advisory]) -> Outcome:
    """GHSA-7fhf-v3p3-rp56: no host paths bind-mounted into the guest share (and no annotation for it)."""
    mounts = config.get("runtime.sandbox_bind_mounts", []) or []
    ev = _ev(sandbox_bind_mounts=mounts, runtime_rs=_runtime_rs(config), version=version)
    problems = [f"sandbox_bind_mounts shares host paths into the guest: {mounts}"] if mounts else []
    if _runtime_rs(config):
        outcome = advisory_decision(feed, "GHSA-7fhf-v3p3-rp56", version)
        if outcome.status != "pass":  # runtime-rs honours the annotation where the feed says it is affected
            config_outcome = Outcome("fail", "mode: static: " + "; ".join(problems), ev) if problems else \
                Outcome("pass", "mode: static: no sandbox bind mounts in the configuration", ev)
            return combine(config_outcome, outcome)
    if problems:
        return Outcome("fail", "mode: static: " + "; ".join(problems), ev)
    return Outcome("pass", "mode: static: no sandbox bind mounts", ev)
