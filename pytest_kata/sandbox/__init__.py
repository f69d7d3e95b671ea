"""Sandboxes: start one from the candidate (or a control runtime), probe it, read the host side, stop.

:func:`choose_driver` turns the ``--kata-driver``/``--kata-runtime`` options into a driver; the suites only
see the :class:`~pytest_kata.sandbox.base.SandboxDriver` interface.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.kataconfig import KataConfig
from pytest_kata.sandbox.base import (
    HostInvariants,
    HostView,
    Mount,
    ProbeFacts,
    SandboxDriver,
    SandboxError,
    SandboxUnavailable,
    Workload,
)
from pytest_kata.sandbox.containerd import ContainerdDriver
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec

__all__ = ["HostInvariants", "HostView", "Mount", "ProbeFacts", "SandboxDriver", "SandboxError",
           "SandboxUnavailable", "Workload", "candidate_config", "candidate_version", "choose_driver"]


def _has_shim(candidate: Bundle, shim: str | None) -> bool:
    try:
        return bool(candidate.shim(shim).binary)
    except KataError:
        return False


def choose_driver(driver: str = "auto", runtime: str | None = None, candidate: Bundle | None = None, *,
                  shim: str | None = None, accel: str = "auto", boot_timeout: float = 240.0,
                  host: Any = None) -> SandboxDriver:
    """The driver the options ask for; :class:`SandboxUnavailable` (a skip) when it cannot run here."""
    if runtime and driver == "direct":
        raise KataError("--kata-runtime selects a containerd runtime handler; drop it or use --kata-driver "
                        "containerd", path="--kata-driver direct")
    if runtime or driver == "containerd" or (driver == "auto" and candidate is not None
                                             and _has_shim(candidate, shim) and Path("/dev/vhost-vsock").exists()):
        handler = runtime or f"kata-{shim or (candidate.default_shim if candidate is not None else None) or 'qemu'}"
        return ContainerdDriver(handler, bundle=candidate if handler.startswith("kata") else None, shim=shim,
                                host=host, accel=accel)
    if host is not None:
        raise KataError("the direct driver boots the guest on this machine; a staging host needs --kata-driver "
                        "containerd (with --kata-runtime)", path="--kata-host-provider")
    if candidate is None:
        raise SandboxUnavailable("no candidate given: pass --kata-candidate PATH (or --kata-runtime runc for the "
                                 "negative control)", path="--kata-candidate")
    return DirectDriver(GuestSpec.from_bundle(candidate, shim, accel=accel), boot_timeout=boot_timeout)


def candidate_config(candidate: Bundle | None, shim: str | None = None) -> KataConfig | None:
    """The candidate's effective configuration for ``shim`` (None without a candidate)."""
    return None if candidate is None else candidate.shim(shim).config


def candidate_version(candidate: Bundle | None) -> str | None:
    return None if candidate is None else candidate.version
