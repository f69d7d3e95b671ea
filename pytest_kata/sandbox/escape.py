"""Static halves of the escape-regression checks: what the candidate's configuration and version say.

Each function takes the effective configuration (anything with ``.get(dotted_key, default)``, plus
``runtime_rs``/``hypervisor`` when it is a KataConfig) and the candidate version, and returns an
:class:`~pytest_kata.sandbox.checks.Outcome` whose evidence says ``mode: static``. They run when a driver
cannot reproduce the exploit's precondition (no shim, no agent), and alongside the dynamic test otherwise.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from pytest_kata.sandbox.checks import Outcome, annotation_enabled, combine, static_version, version_before

RESTRICTED = {"path": "valid_hypervisor_paths", "virtio_fs_daemon": "valid_virtio_fs_daemon_paths",
              "jailer_path": "valid_jailer_paths", "ctlpath": "valid_ctlpaths",
              "entropy_source": "valid_entropy_sources"}


def _ev(**kw: Any) -> dict[str, Any]:
    return {"mode": "static", **kw}


def _runtime_rs(config: Any) -> bool:
    return bool(getattr(config, "runtime_rs", False))


def _hypervisor(config: Any) -> str:
    return str(getattr(config, "hypervisor", "") or "")


def annotation_exec(config: Any, version: str | None) -> Outcome:
    """CVE-2020-27151: binary-path annotations must be disabled, or pinned to exact allowlisted paths."""
    problems, ev = [], {}
    for name, allow_key in RESTRICTED.items():
        hits = annotation_enabled(config, name)
        allow = config.get(f"hypervisor.*.{allow_key}", []) or []
        ev[name] = {"enabled_by": hits, allow_key: allow}
        if not allow:  # both runtimes reject every value of a restricted annotation without an allowlist
            ev[name]["note"] = f"{allow_key} empty or absent: every value of the annotation is rejected"
        elif hits and any(ch in str(p) for p in allow for ch in "*?["):
            problems.append(f"annotation '{name}' enabled by {hits} with a glob allowlist {allow}")
    config_outcome = Outcome("fail", "mode: static: " + "; ".join(problems), _ev(annotations=ev)) if problems else \
        Outcome("pass", "mode: static: binary-path annotations are disabled or pinned to exact paths",
                _ev(annotations=ev))
    return combine(config_outcome, static_version(version, "1.11.5", "CVE-2020-27151"))


def writable_image(config: Any, version: str | None, image: Path | None = None) -> Outcome:
    """GHSA-wwj6 / CVE-2020-2025: the guest image must be attached read-only and not writable on the host."""
    params = str(config.get("hypervisor.*.kernel_params", "") or "").split()
    hv, rs = _hypervisor(config), _runtime_rs(config)
    nvdimm = not bool(config.get("hypervisor.*.disable_image_nvdimm", False))
    driver = str(config.get("hypervisor.*.vm_rootfs_driver", "") or "")
    problems = []
    if "rw" in params:
        problems.append("kernel_params ask for a read-write guest root ('rw')")
    if hv == "clh" and nvdimm and version_before(version, "3.27.0"):
        problems.append(f"Cloud Hypervisor attaches the image as writable virtio-pmem before 3.27.0 ({version})")
    if rs and driver == "virtio-pmem" and version_before(version, "3.27.0"):
        problems.append(f"runtime-rs virtio-pmem rootfs without a read-only flag before 3.27.0 ({version})")
    mode = None
    if image is not None and image.exists():
        st = image.stat()
        mode = oct(stat.S_IMODE(st.st_mode))
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problems.append(f"the guest image {image} is writable by group/others ({mode})")
        if st.st_uid != 0:
            problems.append(f"the guest image {image} is not owned by root (uid {st.st_uid})")
    ev = _ev(kernel_params=" ".join(params), hypervisor=hv, runtime_rs=rs, nvdimm=nvdimm, vm_rootfs_driver=driver,
             image=str(image) if image else None, image_mode=mode, version=version)
    if problems:
        return Outcome("fail", "mode: static: " + "; ".join(problems), ev)
    return Outcome("pass", "mode: static: the configuration attaches the guest image read-only", ev)


def block_hotplug(config: Any, version: str | None) -> Outcome:
    """GHSA-5fc8-gg7w-3g5c: host block devices must not be hot-plugged for container rootfs."""
    value = config.get("hypervisor.*.disable_block_device_use", None)
    ev = _ev(disable_block_device_use=value, runtime_rs=_runtime_rs(config), version=version)
    if value is not True:
        return Outcome("fail", f"mode: static: disable_block_device_use is {value!r} (must be true)", ev)
    if _runtime_rs(config):
        return Outcome("pass", "mode: static: disable_block_device_use = true (runtime-rs: its single-layer rootfs "
                       "path does not check the flag upstream; run a no-layer image on a KVM host to be sure)", ev)
    return Outcome("pass", "mode: static: disable_block_device_use = true", ev)


def virtiofs_extra_args_annotation(config: Any, version: str | None) -> Outcome:
    """GHSA-rr59-xxvx-96qr (a): ``virtio_fs_extra_args`` must not be settable by annotation."""
    hits = annotation_enabled(config, "virtio_fs_extra_args")
    ev = _ev(enable_annotations=config.get("hypervisor.*.enable_annotations", []), matched_by=hits, version=version)
    if hits:
        return Outcome("fail", f"mode: static: enable_annotations {hits} let a pod set virtio_fs_extra_args "
                       "(e.g. -o source=/ --sandbox=none serves the host's / to the guest)", ev)
    return Outcome("pass", "mode: static: virtio_fs_extra_args cannot be set by annotation", ev)


def kernel_params_annotation(config: Any, version: str | None) -> Outcome:
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


def virtiofsd_sandbox(config: Any, version: str | None) -> Outcome:
    """GHSA-2gv2-cffp-j227: virtiofsd must keep its sandbox and seccomp filter."""
    args = [str(a) for a in config.get("hypervisor.*.virtio_fs_extra_args", []) or []]
    joined = " ".join(args)
    bad = [a for a in ("--sandbox=none", "--sandbox none", "--seccomp=none", "--seccomp none", "source=")
           if a in joined]
    ev = _ev(virtio_fs_extra_args=args, runtime_rs=_runtime_rs(config), version=version)
    if bad:
        return Outcome("fail", f"mode: static: virtio_fs_extra_args weaken virtiofsd: {', '.join(bad)}", ev)
    if _runtime_rs(config) and version_before(version, "3.31.0"):
        return Outcome("fail", f"mode: static: runtime-rs {version} hard-codes virtiofsd --sandbox none --seccomp "
                       "none (fixed in 3.31.0)", ev)
    return Outcome("pass", "mode: static: virtiofsd keeps its sandbox and seccomp", ev)


def sandbox_bind_mounts(config: Any, version: str | None) -> Outcome:
    """GHSA-7fhf-v3p3-rp56: no host paths bind-mounted into the guest share (and no annotation for it)."""
    mounts = config.get("runtime.sandbox_bind_mounts", []) or []
    ev = _ev(sandbox_bind_mounts=mounts, runtime_rs=_runtime_rs(config), version=version)
    if mounts:
        return Outcome("fail", f"mode: static: sandbox_bind_mounts shares host paths into the guest: {mounts}", ev)
    if _runtime_rs(config) and version_before(version, "4.0.0"):
        return Outcome("fail", f"mode: static: runtime-rs {version} honours the sandbox_bind_mounts annotation "
                       "(fixed in 4.0.0)", ev)
    return Outcome("pass", "mode: static: no sandbox bind mounts", ev)
