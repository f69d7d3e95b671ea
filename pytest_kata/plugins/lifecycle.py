"""The run's life: a run id, a sweep of dead runs at the start, and this run's clean-up at the end.

An installed plugin is inert until asked: a session that sets no ``--kata-*`` option (command line, ini or
``kata.toml``) and uses no Kata fixture leaves no trace (no sweep, no pid file, no header). Only the
controller (not an xdist worker) owns the run. In ``pytest_configure``, before xdist spawns its workers (in
``pytest_sessionstart``), it reserves a run id in ``PYTEST_KATA_RUN_ID``, so that every worker inherits it and
labels its hosts, networks and daemons with it. The run starts (pid file, then the sweep of dead runs) right
away when Kata options are given, else on first use of the id by a fixture, in whichever process that is;
the pid file names the controller either way. The controller's end-of-run clean-up then also covers a worker
that crashed. The end runs in ``pytest_unconfigure``, which pytest also reaches on Ctrl-C; SIGTERM is turned
into the same path, and ``atexit`` is the last resort. A SIGKILL leaves the run's pid file pointing at a dead
process: the next run's sweep removes its leftovers. A failed run with ``--kata-keep-on-failure`` is left in
place and marked kept: later runs' sweeps skip it until ``pytest-kata sweep --run <id>`` removes it.

``PYTEST_KATA_NO_SWEEP=1`` skips the start-of-run sweep (the end-of-run clean-up always happens).
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from typing import Any

import pytest

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.options import KataSettings
from pytest_kata.plugins.settings import settings_of
from pytest_kata.progress import step
from pytest_kata.services import ensure_libvirtd
from pytest_kata.sweep import KEPT_MARK, SweepReport, sweep, used_libvirt

RUN = pytest.StashKey["RunLifecycle"]()
_START_REPORTS: dict[str, SweepReport] = {}  # run id -> what the start sweep removed, in the process that ran it


def _sweep_dead_runs(run_id: str) -> None:
    """First use of a run id in this process tree: sweep the leftovers of dead runs (not this one)."""
    if not os.environ.get("PYTEST_KATA_NO_SWEEP"):
        _START_REPORTS[run_id] = sweep(dead_only=True)


class RunLifecycle:
    """The controller's hold on the run: its id, what the start sweep removed, and the end clean-up."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.pid = os.getpid()  # a forked child (pyroute2 forks to create netns) must never clean the run
        self.previous_env = {name: os.environ.get(name) for name in (runid.ENV, runid.OWNER_ENV)}
        self.run_id = runid.reserve()  # a nested pytest (pytester) must never share its parent's run
        self.eager = settings_of(config).given
        self.end_report: SweepReport | None = None
        self.finished = False
        self.failed = False
        self._old_sigterm: Any = None
        atexit.register(self.finish)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.getsignal(signal.SIGTERM)
            if self._old_sigterm in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, self._sigterm_as_interrupt)

    @property
    def start_report(self) -> SweepReport | None:
        return _START_REPORTS.get(self.run_id)

    @property
    def started(self) -> bool:
        return runid.in_use(self.run_id)

    def _sigterm_as_interrupt(self, signum: int, frame: Any) -> None:
        """SIGTERM (CI timeouts, ``kill``) takes the Ctrl-C path, so that pytest_unconfigure cleans up.

        A forked child inherits the handler: there SIGTERM keeps its default meaning.
        """
        if os.getpid() != self.pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise KeyboardInterrupt(f"signal {signum}")

    def start(self) -> None:
        """Start now (Kata options given) rather than on first use of the id."""
        if self.eager:
            runid.current_run_id()

    def finish(self) -> None:
        """Remove everything carrying this run's id, unless ``--kata-keep-on-failure`` keeps a failed run."""
        if self.finished or os.getpid() != self.pid:
            return
        self.finished = True
        atexit.unregister(self.finish)
        try:
            if not self.started:
                pass  # nothing used the id: nothing to clean
            elif self.failed and _keep_on_failure(self.config):
                (runid.run_dir(self.run_id) / KEPT_MARK).write_text("kept by --kata-keep-on-failure\n")
                step("lifecycle", f"--kata-keep-on-failure: {self.run_id}'s hosts, networks and daemons are kept "
                     f"(later runs leave them alone); remove them with `pytest-kata sweep --run {self.run_id}`")
            else:
                self.end_report = sweep(dead_only=False, run_id=self.run_id, libvirt=used_libvirt(self.run_id))
        finally:
            if self.started:
                runid.unregister(self.run_id)
            _START_REPORTS.pop(self.run_id, None)
            for name, value in self.previous_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
            if self._old_sigterm in (signal.SIG_DFL, None) and \
                    threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(signal.SIGTERM) == self._sigterm_as_interrupt:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _keep_on_failure(config: pytest.Config) -> bool:
    try:
        return bool(settings_of(config).keep_on_failure)
    except Exception:
        return False


def _is_controller(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    runid.on_first_use(_sweep_dead_runs)  # also in workers: the run may start in one of them
    if not _is_controller(config):
        return  # workers inherit PYTEST_KATA_RUN_ID from the controller's environment
    lifecycle = RunLifecycle(config)
    config.stash[RUN] = lifecycle
    lifecycle.start()


def pytest_report_header(config: pytest.Config) -> list[str]:
    lifecycle = config.stash.get(RUN, None)
    if lifecycle is None or not lifecycle.started:
        return []
    return [_run_line(lifecycle)]


def _run_line(lifecycle: RunLifecycle) -> str:
    line = f"kata run: {lifecycle.run_id}"
    if lifecycle.start_report is not None and (lifecycle.start_report.removed or lifecycle.start_report.errors):
        line += f" (start sweep: {lifecycle.start_report.summary()})"
    return line


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    lifecycle = session.config.stash.get(RUN, None)
    if lifecycle is not None:
        lifecycle.failed = exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    lifecycle = config.stash.get(RUN, None)
    if lifecycle is None or not lifecycle.started:
        return
    if not lifecycle.eager:  # started by a fixture after the header was printed
        terminalreporter.write_line(f"{_run_line(lifecycle)} (started on first use by a Kata fixture)")
    report = lifecycle.start_report
    if report is not None and (report.removed or report.errors):
        terminalreporter.write_sep("-", f"kata sweep at start: {report.summary()}")
        for line in report.removed + [f"ERROR {e}" for e in report.errors]:
            terminalreporter.write_line(line)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    lifecycle = config.stash.get(RUN, None)
    if lifecycle is not None:
        lifecycle.finish()


@pytest.fixture(scope="session")
def kata_run_id() -> str:
    """This run's id (``kt-<8hex>``): put it in the name of anything the test creates on the machine."""
    return runid.current_run_id()


@pytest.fixture(scope="session")
def kata_libvirtd(kata_run_id: str, kata_settings: KataSettings) -> Any:
    """A libvirtd answering on ``--kata-libvirt-uri``: the running one, or one the run starts (stopped by pid
    at the end of the run, by the controller, so that xdist workers can share it)."""
    if os.geteuid() != 0:
        pytest.skip("starting or reaching the system libvirtd needs root")
    try:
        return ensure_libvirtd(kata_run_id, uri=kata_settings.libvirt_uri)
    except KataError as exc:
        pytest.fail(str(exc), pytrace=False)
