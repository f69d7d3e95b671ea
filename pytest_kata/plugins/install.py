"""Install fixtures: a maker of fresh install targets (an Installer on a host), used by ``suites/rollback``.

Targets are scratch sysroots of this machine, each with a private containerd (when containerd is installed
and we are root), so that the real installer, a real containerd and real files are exercised without
touching the machine's own ``/opt`` or ``/etc``. (Libvirt hosts plug in through the same Installer with
``SystemdContainerd``; the suite does not boot them yet.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_kata.hosts.base import LocalHost
from pytest_kata.install.installer import Installer, NoContainerd, SysrootContainerd


@pytest.fixture(scope="session")
def make_kata_install_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Installer]]:
    """``make(name, layout="versioned") -> Installer`` on a fresh sysroot; every containerd stopped at the end."""
    started: list[SysrootContainerd] = []

    def make(name: str = "target", *, layout: str = "versioned") -> Installer:
        sysroot = tmp_path_factory.mktemp(f"sysroot-{name}")
        containerd: Any
        if shutil.which("containerd") and os.geteuid() == 0:
            containerd = SysrootContainerd.prepare(sysroot)
            containerd.start()
            started.append(containerd)
        else:
            containerd = NoContainerd("containerd is not installed here or we are not root")
        installer = Installer(LocalHost(f"local-{name}"), str(sysroot), containerd=containerd, layout=layout)
        installer.target_description = f"local sysroot {sysroot} ({containerd.description})"  # type: ignore
        return installer

    yield make
    for service in started:
        service.stop()
