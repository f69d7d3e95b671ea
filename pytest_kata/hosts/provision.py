"""The hosts of one pytest process: booted once, snapshotted ``clean``, reverted before every test.

This is the library half of the ``make_kata_host``/``kata_host`` fixture pair (pytest-django's
``django_db_setup``/``db`` shape): booting a host costs 25-60 s under TCG, a revert ~3.5 s, so each xdist
worker boots its hosts on first use, calls the ``pytest_kata_host_ready`` hook, takes the internal snapshot
``clean`` of the running guest, and from then on hands out reverted hosts. A test that breaks its host
beyond repair (``kata_dirty``) gets a fresh, unshared host that is destroyed after it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.hosts.accel import detect_accel
from pytest_kata.hosts.base import Host, LocalHost
from pytest_kata.hosts.image import build_host_image, prebuilt_host_image
from pytest_kata.hosts.libvirt import HostSpec, LibvirtHost, connect
from pytest_kata.hosts.ssh import next_ssh_host
from pytest_kata.progress import step, timed
from pytest_kata.resources import LOCAL_LIBVIRT_URI
from pytest_kata.runid import worker_id

CLEAN = "clean"
AREA = "host"


@dataclass
class PoolSettings:
    """The ``--kata-*`` host options, as the pool needs them (no pytest here)."""

    provider: str = "libvirt"
    uri: str = LOCAL_LIBVIRT_URI
    host_image: str | None = None
    accel: str = "auto"
    boot_timeout: float = 240.0
    keep_on_failure: bool = False
    log_dir: Path = Path("/tmp/pytest-kata-hosts")
    memory_mib: int | None = None
    vcpus: int | None = None
    ssh_hosts: str | None = None  # --kata-ssh-hosts, for provider ssh

    @classmethod
    def from_settings(cls, settings: Any, log_dir: Path) -> PoolSettings:
        return cls(provider=settings.host_provider or "libvirt", uri=settings.libvirt_uri or LOCAL_LIBVIRT_URI,
                   host_image=settings.host_image, accel=settings.accel or "auto",
                   boot_timeout=float(settings.boot_timeout or 240.0),
                   keep_on_failure=bool(settings.keep_on_failure), log_dir=log_dir,
                   ssh_hosts=getattr(settings, "ssh_hosts", None))


@dataclass
class HostPool:
    """Clean hosts by index, fresh hosts on demand; ``on_ready(host)`` runs before the clean snapshot."""

    settings: PoolSettings
    on_ready: Callable[[Host], None] | None = None
    hosts: list[Host] = field(default_factory=list)
    used: set[str] = field(default_factory=set)  # names of hosts a test touched since their last revert
    kept: list[Host] = field(default_factory=list)
    accel: str | None = None
    accel_reason: str = ""
    _spec: Any = None
    _conn: Any = None
    _fresh: list[Host] = field(default_factory=list)

    # ------------------------------------------------------------------------------------------ booting
    def spec(self) -> Any:
        """The HostSpec every libvirt host of this pool boots from (image built or reused from the cache)."""
        if self._spec is None:
            s = self.settings
            image = prebuilt_host_image(Path(s.host_image)) if s.host_image else build_host_image()
            self._conn = connect(s.uri)
            self.accel, self.accel_reason = detect_accel(s.accel, self._conn, s.uri)
            step(AREA, f"hosts on {s.uri} use {self.accel.upper()}: {self.accel_reason}")
            self._spec = HostSpec(image=image.image, kernel=image.kernel, initrd=image.initrd,
                                  cmdline=image.cmdline, prompt=image.prompt, image_format=image.image_format,
                                  memory_mib=s.memory_mib or image.memory_mib, vcpus=s.vcpus or image.vcpus,
                                  accel=self.accel, boot_timeout=s.boot_timeout, log_dir=s.log_dir)
        return self._spec

    def boot(self, **changes: Any) -> Host:
        """A new host, ready (hook called), not snapshotted. ``changes`` override HostSpec fields."""
        provider = self.settings.provider
        if provider == "local":
            host: Host = LocalHost()
        elif provider == "ssh":
            host = next_ssh_host(self.settings.ssh_hosts, taken=len(self.hosts) + len(self._fresh))
        else:
            spec = self.spec()
            host = LibvirtHost.boot(spec.with_changes(**changes) if changes else spec, self.settings.uri,
                                    conn=self._conn)
        if self.on_ready is not None:
            try:
                self.on_ready(host)
            except BaseException:
                host.close()
                raise
        return host

    def host(self, index: int = 0) -> Host:
        """Clean host number ``index`` (booting the missing ones); not reverted: see :meth:`checkout`."""
        while len(self.hosts) <= index:
            host = self.boot()
            if isinstance(host, LocalHost) or self.settings.provider == "ssh":  # no snapshots: used as they are
                self.hosts.append(host)
                continue
            with timed(AREA, f"snapshot {CLEAN!r} of {host.name}"):
                try:
                    host.snapshot(CLEAN)
                except BaseException:
                    host.close()
                    raise
            self.hosts.append(host)
        return self.hosts[index]

    def checkout(self, count: int = 1) -> list[Host]:
        """``count`` hosts, each back at its clean snapshot, marked as used by the caller."""
        hosts = [self.host(i) for i in range(count)]
        for host in hosts:
            self.reset(host)
            self.used.add(host.name)
        return hosts

    def reset(self, host: Host) -> None:
        """Revert a used host to ``clean`` (a host nobody touched since its snapshot is left as it is)."""
        if host.name not in self.used or isinstance(host, LocalHost) or self.settings.provider == "ssh":
            return
        start = time.monotonic()
        host.revert(CLEAN)
        self.used.discard(host.name)
        step(AREA, f"{host.name} reverted to {CLEAN!r} in {time.monotonic() - start:.1f}s")

    def fresh(self, **changes: Any) -> Host:
        """An unshared host for a ``kata_dirty`` test; give it back with :meth:`release`. ``changes`` override
        HostSpec fields (e.g. more memory for the sandbox VMs it will run)."""
        host = self.boot(**changes)
        self._fresh.append(host)
        return host

    def release(self, host: Host, *, failed: bool = False) -> str | None:
        """Done with a fresh host: destroy it, or keep it (returns how to reach it) after a failure."""
        if host in self._fresh:
            self._fresh.remove(host)
        return self._retire(host, failed)

    def retire(self, host: Host, *, failed: bool = False) -> str | None:
        """Take a clean host out of the pool (it failed a test and is kept, or it is broken)."""
        if host in self.hosts:
            self.hosts.remove(host)
            self.used.discard(host.name)
        return self._retire(host, failed)

    def _retire(self, host: Host, failed: bool) -> str | None:
        if failed and self.settings.keep_on_failure and hasattr(host, "keep"):
            how = host.keep()
            self.kept.append(host)
            host.close()  # closes the console; the domain stays
            return how
        host.close()
        return None

    def close(self) -> None:
        for host in [*self._fresh, *self.hosts]:
            try:
                host.close()
            except Exception as exc:
                step(AREA, f"closing {host.name} failed: {exc}")
        self._fresh.clear()
        self.hosts.clear()
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def describe(self) -> str:
        s = self.settings
        if s.provider != "libvirt":
            return f"provider {s.provider}"
        accel = f"{self.accel.upper()} ({self.accel_reason})" if self.accel else "not decided yet"
        return f"provider libvirt, {s.uri}, accel {accel}, worker {worker_id()}"
