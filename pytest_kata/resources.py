"""Where the run-time data lives, in a checkout and in an installed wheel.

In the wheel, ``suites/`` and ``vm-images/`` are shipped inside the package (``pytest_kata/suites``,
``pytest_kata/vm_images``); in a checkout they sit at the repository root. Rule data, profiles and the
default advisory feed always live in ``pytest_kata/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DATA_DIR = PACKAGE_DIR / "data"
_CHECKOUT_ROOT = PACKAGE_DIR.parent


def _first_existing(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def suites_dir() -> Path:
    """The validation suites (``pytest $(pytest-kata paths suites)`` runs them)."""
    return _first_existing(PACKAGE_DIR / "suites", _CHECKOUT_ROOT / "suites")


def vm_images_dir() -> Path:
    """The image recipes (guest and host images)."""
    return _first_existing(PACKAGE_DIR / "vm_images", _CHECKOUT_ROOT / "vm-images")


def data_path(*parts: str) -> Path:
    """A file shipped under ``pytest_kata/data``."""
    return DATA_DIR.joinpath(*parts)


def cache_dir() -> Path:
    """Where built images and bundles are cached by content hash (``$PYTEST_KATA_CACHE`` overrides)."""
    env = os.environ.get("PYTEST_KATA_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        # libvirt's qemu user must be able to traverse to the images: /root/.cache is closed to it.
        return Path("/var/cache/pytest-kata")
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pytest-kata"


# Fixed names on the machines a candidate is installed on and tested from.
def sandbox_dir() -> str:
    """Where sandboxes keep their files on the host that runs them (``$PYTEST_KATA_SANDBOX_DIR``): on
    /var/tmp, because a staging host may mount /run noexec and the Kata shim runs a wrapper from there."""
    return os.environ.get("PYTEST_KATA_SANDBOX_DIR", "/var/tmp/pytest-kata")


KATA_PREFIX = "/opt/kata"  # where a Kata release lives (kata-static's layout; every shipped path names it)
LOCAL_LIBVIRT_URI = "qemu:///system"  # this machine's libvirtd (the default hypervisor URI)
