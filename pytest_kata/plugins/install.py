"""Install fixtures: makers of install targets (an Installer on a host), used by ``suites/rollback``.

With ``--kata-host-provider libvirt`` (the default) a target is a pool host (``make_kata_host``) reverted to
its clean snapshot, driven as a real host: ``/`` with its systemd containerd. With ``local`` a target is a
scratch sysroot of this machine with a private containerd (when containerd is installed and we are root), so
that the real installer, a real containerd and real files are exercised without touching the machine's own
``/opt`` or ``/etc``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from pytest_kata.bundle import Bundle
from pytest_kata.hosts.base import LocalHost
from pytest_kata.install.installer import Installer, NoContainerd, SysrootContainerd, SystemdContainerd
from pytest_kata.options import KataSettings
from pytest_kata.sandbox.containerd import staging_host_changes


class InstallTargets:
    """``targets.one(name)`` / ``targets.many(n, name)``: fresh install targets for a test."""

    def __init__(self, request: pytest.FixtureRequest, settings: KataSettings, tmp: pytest.TempPathFactory) -> None:
        self.provider = "libvirt" if settings.host_provider == "libvirt" else "local"
        self.pool = request.getfixturevalue("make_kata_host") if self.provider == "libvirt" else None
        self.tmp = tmp
        self.started: list[SysrootContainerd] = []

    def one(self, name: str = "target", *, layout: str = "versioned", runs: Bundle | None = None) -> Installer:
        """One target. ``runs``: a release whose real Kata pods the target must run; on libvirt that is a fresh
        host booted for it (:func:`~pytest_kata.sandbox.containerd.staging_host_changes`)."""
        if self.pool is not None and runs is not None and runs.ships_shim():
            host = self.pool.fresh(**staging_host_changes(self.pool.spec(), runs.version, runs.shim(None).config))
            return self._describe(Installer(host, "/", containerd=SystemdContainerd(host), layout=layout),
                                  f"libvirt host {host.name} (booted for {runs.version} pods)")
        return self.many(1, name, layout=layout)[0]

    def many(self, count: int, name: str = "target", *, layout: str = "versioned") -> list[Installer]:
        """``count`` targets; on libvirt the pool's first ``count`` hosts, each reverted to clean."""
        if self.pool is not None:
            return [self._describe(Installer(h, "/", containerd=SystemdContainerd(h), layout=layout),
                                   f"libvirt host {h.name}") for h in self.pool.checkout(count)]
        return [self._sysroot(f"{name}-{i}" if count > 1 else name, layout) for i in range(count)]

    def _sysroot(self, name: str, layout: str) -> Installer:
        sysroot = self.tmp.mktemp(f"sysroot-{name}")
        containerd: Any
        if shutil.which("containerd") and os.geteuid() == 0:
            # a mount namespace of its own: Kata shims need / shared, and no rootfs mount reaches the machine's
            containerd = SysrootContainerd.prepare(sysroot, private_mounts=True)
            containerd.start()
            self.started.append(containerd)
        else:
            containerd = NoContainerd("containerd is not installed here or we are not root")
        installer = Installer(LocalHost(f"local-{name}"), str(sysroot), containerd=containerd, layout=layout)
        return self._describe(installer, f"local sysroot {sysroot} ({containerd.description})")

    @staticmethod
    def _describe(installer: Installer, text: str) -> Installer:
        installer.target_description = text  # type: ignore[attr-defined]
        return installer

    def close(self) -> None:
        for service in self.started:
            service.stop()
        self.started.clear()


@pytest.fixture(scope="session")
def make_kata_install_target(request: pytest.FixtureRequest, kata_settings: KataSettings,
                             tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstallTargets]:
    """Install targets for this session (libvirt pool hosts or local sysroots); all stopped at the end."""
    targets = InstallTargets(request, kata_settings, tmp_path_factory)
    yield targets
    targets.close()
