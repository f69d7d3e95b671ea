"""Host fixtures: ``make_kata_host`` (session, boots once per worker) and ``kata_host``/``kata_hosts`` (per test).

A thin layer over :class:`pytest_kata.hosts.provision.HostPool`. Per test it also records where each host's
console log stood when the test began, so that a failure attaches only what the test caused (console,
``journalctl -b --since``, dmesg, the qemu log), and a kernel panic/oops in a passing test's host still
fails it (``--kata-host-panic``). ``--kata-keep-on-failure`` leaves a failed host running and says how to
reach it.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.hosts import accel as host_accel
from pytest_kata.hosts.base import Host, HostError
from pytest_kata.hosts.libvirt import scan_for_panics
from pytest_kata.hosts.provision import HostPool, PoolSettings
from pytest_kata.options import KataSettings
from pytest_kata.plugins.settings import settings_of

POOL = pytest.StashKey[HostPool]()
USES = pytest.StashKey[list["HostUse"]]()
REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()
NOTES = pytest.StashKey[list[tuple[str, str]]]()


class HostKernelWarning(UserWarning):
    """A host's kernel printed a panic, oops, BUG or call trace during a test (``--kata-host-panic warn``)."""


@dataclass
class HostUse:
    host: Host
    started: float  # wall clock, for journalctl --since
    console_offset: int
    fresh: bool = False
    artefacts: dict[str, str] = field(default_factory=dict)

    def console_since_start(self) -> str:
        return self.host.console_log()[self.console_offset:]


class HostList(list):
    """The hosts of a multi-host test; ``kata_hosts(n)`` returns the first ``n`` (booting more if needed)."""

    def __init__(self, hosts: list[Host], take: Any) -> None:
        super().__init__(hosts)
        self._take = take

    def __call__(self, count: int) -> list[Host]:
        if count < 1:
            raise ValueError("kata_hosts(n) needs n >= 1")
        if count > len(self):
            self.extend(self._take(count)[len(self):])
        return list(self[:count])


# ---------------------------------------------------------------------------------------------- header
def pytest_report_header(config: pytest.Config) -> list[str]:
    s = settings_of(config)
    if not s.given:
        return []  # no libvirt probing in a session that does not ask for Kata
    if s.host_provider != "libvirt":
        return [f"kata hosts: provider {s.host_provider}"]
    try:
        accel = host_accel.detect_accel_description(s.accel, s.libvirt_uri)
    except ValueError as exc:
        accel = str(exc)
    return [f"kata hosts: libvirt {s.libvirt_uri}, accel {accel}, boot timeout {s.boot_timeout:g} s"]


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def make_kata_host(request: pytest.FixtureRequest, kata_settings: KataSettings,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostPool]:
    """The worker's host pool: ``make_kata_host()`` is host 0, booted on first use and snapshotted ``clean``
    right after the ``pytest_kata_host_ready`` hook; ``make_kata_host.fresh()`` boots an unshared one."""
    config = request.config
    log_dir = tmp_path_factory.getbasetemp() / "kata-hosts"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = PoolSettings.from_settings(kata_settings, log_dir)
    daemon = None
    if settings.provider == "libvirt":
        daemon = request.getfixturevalue("kata_libvirtd")  # the running or a run-owned libvirtd

    def ready(host: Host) -> None:
        config.hook.pytest_kata_host_ready(host=host, config=config)

    pool = HostPool(settings, on_ready=ready)
    pool.daemon = daemon  # type: ignore[attr-defined]
    config.stash[POOL] = pool
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def kata_host(request: pytest.FixtureRequest, make_kata_host: HostPool) -> Iterator[Host]:
    """A booted host back at its clean snapshot (or, for a ``kata_dirty`` test, a fresh unshared host)."""
    hosts = _take(request.node, make_kata_host, 1)
    yield hosts[0]


@pytest.fixture
def kata_hosts(request: pytest.FixtureRequest, make_kata_host: HostPool, kata_settings: KataSettings) -> HostList:
    """``n`` clean hosts: n from the ``kata_hosts(n)`` marker, else ``--kata-hosts``; call it for more."""
    marker = request.node.get_closest_marker("kata_hosts")
    count = marker.args[0] if marker else int(kata_settings.hosts or 1)
    return HostList(_take(request.node, make_kata_host, count),
                    lambda n: _take(request.node, make_kata_host, n))


def _take(item: pytest.Item, pool: HostPool, count: int) -> list[Host]:
    """Hosts for this test: reverted shared ones (each once per test) or fresh ones for kata_dirty."""
    uses = item.stash.setdefault(USES, [])
    if item.get_closest_marker("kata_dirty"):
        fresh = [u.host for u in uses if u.fresh]
        while len(fresh) < count:
            host = pool.fresh()
            uses.append(_use(host, fresh=True))
            fresh.append(host)
        _register_teardown(item, pool)
        return fresh[:count]
    taken = {u.host.name for u in uses}
    hosts = []
    for index in range(count):
        host = pool.host(index)
        if host.name not in taken:
            pool.reset(host)
            pool.used.add(host.name)
            uses.append(_use(host))
        hosts.append(host)
    _register_teardown(item, pool)
    return hosts


def _use(host: Host, fresh: bool = False) -> HostUse:
    if hasattr(host, "note"):
        host.note(f"test start ({'fresh host' if fresh else 'reverted to clean'})")
    return HostUse(host, time.time(), len(host.console_log()), fresh)


def _register_teardown(item: pytest.Item, pool: HostPool) -> None:
    if getattr(item, "_kata_hosts_finalizer", False):
        return
    item._kata_hosts_finalizer = True  # type: ignore[attr-defined]
    item.addfinalizer(lambda: _finish(item, pool))


def _finish(item: pytest.Item, pool: HostPool) -> None:
    """After the test: kernel trouble check, then give the hosts back (or keep failed ones)."""
    uses = item.stash.get(USES, [])
    failed = any(r.failed for r in item.stash.get(REPORTS, {}).values())
    policy = settings_of(item.config).host_panic
    trouble: list[str] = []
    for use in uses:
        if policy != "ignore":
            trouble += [f"{use.host.name}: {line}" for line in _kernel_trouble(use)]
    notes = item.stash.setdefault(NOTES, [])
    for use in uses:
        if use.host.name.startswith("local"):
            continue
        how = pool.release(use.host, failed=failed) if use.fresh else \
            (pool.retire(use.host, failed=True) if failed and pool.settings.keep_on_failure else None)
        if how:
            notes.append((KEPT_TITLE, f"{use.host.name} left running for inspection: {how}"))
    if trouble:
        message = "kernel trouble on the host during the test: " + " | ".join(trouble[:8])
        if policy == "fail":
            pytest.fail(message, pytrace=False)
        warnings.warn(HostKernelWarning(message), stacklevel=1)


def _kernel_trouble(use: HostUse) -> list[str]:
    text = use.console_since_start()
    if hasattr(use.host, "dom"):
        try:
            journal = use.host.run(f"journalctl -k -q --no-pager -o short-monotonic --since @{int(use.started)}",
                                   timeout=60)
            text += "\n" + journal.stdout
        except HostError:
            pass  # the console is gone (a panic): the console text says why
    return scan_for_panics(text)


# ---------------------------------------------------------------------------------------------- reports
@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    if report.failed and report.when in ("setup", "call"):
        for title, body in _failure_artefacts(item, call):
            report.sections.append((title, body))
            _allure_attach(title, body)
    if report.when == "teardown":
        for title, body in item.stash.get(NOTES, []):
            report.sections.append((title, body))
    return report


KEPT_TITLE = "kata kept host"
KEPT = pytest.StashKey[list[str]]()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Controller side too (xdist ships the sections): remember kept hosts for the summary."""
    kept = [body for title, body in report.sections if title == KEPT_TITLE]
    if kept:
        _kept_lines.extend(f"{report.nodeid}: {line}" for line in kept)


_kept_lines: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _kept_lines:
        terminalreporter.write_sep("=", "kata hosts kept for inspection (--kata-keep-on-failure)")
        for line in _kept_lines:
            terminalreporter.write_line(line)
        _kept_lines.clear()


def _failure_artefacts(item: pytest.Item, call: pytest.CallInfo[None]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    error = call.excinfo.value if call.excinfo else None
    for attribute, label in (("console_log_path", "console"), ("serial_log_path", "serial log from power-on")):
        boot_log = getattr(error, attribute, None)
        if isinstance(error, HostError) and boot_log and Path(boot_log).exists():
            out.append((f"kata host {label} (boot failure) {Path(boot_log).name}",
                        Path(boot_log).read_text(errors="replace")[-200_000:]))
    for use in item.stash.get(USES, []):
        host, name = use.host, use.host.name
        if not hasattr(host, "dom"):
            continue
        out.append((f"kata host {name}: console since test start", use.console_since_start()[-200_000:]))
        for label, cmd in (("journal since test start",
                            f"journalctl -b -q --no-pager -o short-precise --since @{int(use.started)}"),
                           ("dmesg", "dmesg -T | tail -n 400")):
            try:
                result = host.run(cmd, timeout=60)
                out.append((f"kata host {name}: {label}", result.stdout[-200_000:] or result.stderr))
            except HostError as exc:
                out.append((f"kata host {name}: {label}", f"unavailable: {exc}"))
        qemu = host.qemu_log() if hasattr(host, "qemu_log") else ""
        if qemu:
            out.append((f"kata host {name}: qemu log", qemu[-50_000:]))
        out.append((f"kata host {name}: how to look", f"console log: {getattr(host, 'console_log_path', '?')}"
                    + (" | kept running: virsh -c "
                       f"{getattr(host, 'uri', '')} console {name}" if getattr(host, "kept", False) else "")))
    pool = item.config.stash.get(POOL, None)
    daemon_log = getattr(getattr(pool, "daemon", None), "log", None)
    if out and daemon_log and Path(daemon_log).exists():
        out.append(("libvirtd log (tail)", "\n".join(Path(daemon_log).read_text(errors="replace")
                                                     .splitlines()[-200:])))
    return out


def _allure_attach(name: str, body: str) -> None:
    try:
        import allure

        allure.attach(body, name=name, attachment_type=allure.attachment_type.TEXT)
    except Exception:  # allure not active: the report section has it
        pass
