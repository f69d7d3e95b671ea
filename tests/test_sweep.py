"""Clean-up that cannot be forgotten: a run killed mid-way is swept by the next run; a run cleans itself at
its end (also on Ctrl-C and SIGTERM); live runs and names without a run id are never touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_kata import network, runid, services
from pytest_kata.cli import main as cli_main
from pytest_kata.resources import cache_dir
from pytest_kata.sweep import KEPT_MARK, sweep

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces, bridges and daemons need root")

# A run that builds a network with a peer, registers a fake daemon (a detached `sleep`), creates scratch
# files, tells the outer test what it made, then waits to be killed or interrupted.
VICTIM = textwrap.dedent("""
    import faulthandler, json, os, pathlib, signal, subprocess, time
    from pytest_kata import services
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the outer test asks where a slow end hangs
    # a user's terminal delivers Ctrl-C; an xdist worker's children may inherit SIGINT ignored or blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from pytest_kata.resources import cache_dir

    def test_victim(kata_network, kata_run_id):
        peer = kata_network.add_peer("victim")
        fake = subprocess.Popen(["sleep", "600"], start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        services.register_daemon(kata_run_id, "fake-daemon", fake.pid)
        scratch = cache_dir() / "runs" / kata_run_id
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "overlay.qcow2").write_bytes(b"x")
        state = {"run_id": kata_run_id, "netns": peer.netns, "links": [kata_network.bridge, peer.link],
                 "daemon": fake.pid, "scratch": str(scratch), "worker_env": os.environ.get("PYTEST_KATA_RUN_ID")}
        pathlib.Path("state.tmp").write_text(json.dumps(state))
        os.rename("state.tmp", "state.json")
        time.sleep(float(os.environ.get("VICTIM_SLEEP", "600")))
""")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != runid.ENV}
    env["PYTEST_KATA_QUIET"] = ""
    return env


def _start_victim(pytester: pytest.Pytester, *, sleep: float = 600) -> tuple[subprocess.Popen, dict]:
    pytester.makepyfile(test_victim=VICTIM)
    env = {**_env(), "VICTIM_SLEEP": str(sleep)}
    with open(pytester.path / "victim.log", "w") as log:  # a file, not a pipe: a killed run can't hang us
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-s",
                                 "test_victim.py"], cwd=pytester.path, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    state_file = pytester.path / "state.json"
    deadline = time.monotonic() + 90
    while not state_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"the victim run did not get ready:\n{_log(pytester)}")
        time.sleep(0.1)
    return proc, json.loads(state_file.read_text())


def _log(pytester: pytest.Pytester) -> str:
    return (pytester.path / "victim.log").read_text(errors="replace")[-3000:]


def _leftovers(state: dict) -> dict[str, object]:
    """What of the victim's resources still exists."""
    return {
        "netns": state["netns"] in network.netns_names(),
        "links": sorted(set(state["links"]) & set(network.link_names())),
        "daemon": services.process_starttime(state["daemon"]) is not None,
        "scratch": Path(state["scratch"]).exists(),
        "state": (runid.state_dir() / state["run_id"]).exists(),
        "pidfile": (runid.state_dir() / f"{state['run_id']}.pid").exists(),
    }


NOTHING = {"netns": False, "links": [], "daemon": False, "scratch": False, "state": False, "pidfile": False}


def test_a_run_killed_mid_way_is_swept_by_the_next_run(pytester: pytest.Pytester) -> None:
    victim, state = _start_victim(pytester)
    rid = state["run_id"]
    try:
        assert runid.is_alive(rid)
        assert all(v for v in _leftovers(state).values()), "the victim made its resources"
        # negative control: a sweep leaves a live run alone
        report = sweep(dead_only=True, run_id=rid)
        assert rid in report.live and not report.removed
        assert _leftovers(state)["netns"]
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    assert not runid.is_alive(rid)
    left = _leftovers(state)
    # SIGKILL gives the run no chance to clean up. (Checked loosely: on a shared machine another run's
    # start sweep may already be removing them, which is the same mechanism at work.)
    assert any(left.values()), "the killed run's resources outlive it until a sweep"

    pytester.makepyfile(test_next="def test_next():\n    pass\n")
    nxt = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_next.py",
                          "--kata-fail-on", "high"],  # a session that asks for Kata (an unrelated one is inert)
                         cwd=pytester.path, env=_env(), capture_output=True, text=True, timeout=300)
    assert nxt.returncode == 0, nxt.stdout + nxt.stderr
    assert _leftovers(state) == NOTHING, nxt.stdout + nxt.stderr
    # On a shared machine any other pytest run that starts meanwhile sweeps too (it is the same plugin), so
    # the report is checked only when the next run was the one that found the leftovers.
    if f"{rid}: netns" in nxt.stdout:
        assert f"{rid}: daemon fake-daemon (pid {state['daemon']})" in nxt.stdout
        assert "kata sweep at start" in nxt.stdout


@pytest.mark.parametrize("how", ["normal end", "SIGINT", "SIGTERM"])
def test_a_run_cleans_its_own_resources_at_its_end(pytester: pytest.Pytester, how: str) -> None:
    victim, state = _start_victim(pytester, sleep=0 if how == "normal end" else 600)
    if how != "normal end":
        victim.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
    try:
        victim.wait(timeout=120)
    except subprocess.TimeoutExpired:
        victim.send_signal(signal.SIGUSR1)  # every thread's stack into the log, then stop it
        time.sleep(2)
        victim.kill()
        victim.wait()
        pytest.fail(f"the run did not end within 120 s of {how}; its log and stacks:\n{_log(pytester)}")
    out = _log(pytester)
    assert _leftovers(state) == NOTHING, out
    if how != "normal end":
        assert "KeyboardInterrupt" in out, "the run was interrupted, not finished"


def test_keep_on_failure_keeps_a_failed_run_until_swept_by_name(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(textwrap.dedent("""
        import json, pathlib

        def test_fails(kata_network, kata_run_id):
            peer = kata_network.add_peer("kept")
            pathlib.Path("kept.json").write_text(json.dumps({"netns": peer.netns, "run": kata_run_id}))
            assert False, "a failure to inspect"
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--kata-keep-on-failure"],
                            cwd=pytester.path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-3000:]
    kept = json.loads((pytester.path / "kept.json").read_text())
    rid = kept["run"]
    try:
        assert not runid.is_alive(rid)
        assert kept["netns"] in network.netns_names(), "the failed run's network is kept for inspection"
        assert f"pytest-kata sweep --run {rid}" in result.stderr
        report = sweep(dead_only=True)
        assert rid in report.kept and kept["netns"] in network.netns_names(), "later runs leave it alone"
    finally:
        removed = sweep(dead_only=True, run_id=rid).removed
    assert f"{rid}: netns {kept['netns']}" in removed
    assert kept["netns"] not in network.netns_names() and not (runid.state_dir() / rid).exists()


def test_xdist_workers_share_the_controllers_run_id(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(textwrap.dedent("""
        import os, pathlib
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_env(n, kata_run_id):
            assert kata_run_id == os.environ["PYTEST_KATA_RUN_ID"]
            pathlib.Path(f"seen-{n}").write_text(kata_run_id + " " + os.environ.get("PYTEST_XDIST_WORKER", "-"))
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2"],
                            cwd=pytester.path, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = [(pytester.path / f"seen-{n}").read_text().split() for n in range(4)]
    run_ids = {s[0] for s in seen}
    workers = {s[1] for s in seen}
    assert len(run_ids) == 1 and workers <= {"gw0", "gw1"} and "-" not in workers
    (rid,) = run_ids
    assert f"kata run: {rid}" in result.stdout, "the controller's id is the one the workers use"
    assert not runid.is_alive(rid) and not (runid.state_dir() / f"{rid}.pid").exists()


def test_the_controller_cleans_up_after_a_crashed_xdist_worker(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(textwrap.dedent("""
        import json, os, pathlib, signal

        def test_crash(kata_network):
            peer = kata_network.add_peer("crash")
            pathlib.Path("crash.json").write_text(json.dumps({"netns": peer.netns, "bridge": kata_network.bridge,
                                                              "run": os.environ["PYTEST_KATA_RUN_ID"]}))
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies without any teardown

        def test_after():
            pass
    """))
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "1"],
                            cwd=pytester.path, env=_env(), capture_output=True, text=True, timeout=300)
    assert "crashed" in result.stdout, result.stdout[-3000:]
    crash = json.loads((pytester.path / "crash.json").read_text())
    assert crash["netns"] not in network.netns_names()
    assert crash["bridge"] not in network.link_names()
    assert not (runid.state_dir() / crash["run"]).exists()


def _spare_link(name: str) -> None:
    """A link to sweep (a bridge: this kernel has no dummy driver)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.link("add", ifname=name, kind="bridge")


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _new_run() -> str:
    """A run id registered to this process: live, so that concurrent sweeps on a shared machine leave what
    the test builds alone until :func:`_kill_run` makes it dead."""
    rid = runid.new_run_id()
    runid.register(rid)
    return rid


def _kill_run(rid: str) -> None:
    """Make the run dead, marked kept: other runs' start sweeps on a shared machine skip it, so only the
    test's own ``sweep(run_id=rid)`` removes its resources."""
    runid.register(rid, pid=_dead_pid())
    (runid.run_dir(rid) / KEPT_MARK).write_text("test\n")


def test_dry_run_lists_without_removing_then_a_sweep_removes(capsys: pytest.CaptureFixture[str]) -> None:
    from pyroute2 import netns

    rid = _new_run()
    ns, link = f"{rid}-leftover", f"k{rid[3:]}1"
    netns.create(ns)
    _spare_link(link)
    scratch = cache_dir() / "runs" / rid
    scratch.mkdir(parents=True)
    _kill_run(rid)
    try:
        assert cli_main(["sweep", "--dry-run", "--run", rid]) == 0
        out = capsys.readouterr().out
        for what in (f"netns {ns}", f"link {link}", f"directory {scratch}"):
            assert f"would remove {rid}: {what}" in out
        assert ns in network.netns_names() and link in network.link_names() and scratch.exists()
        assert cli_main(["sweep", "--run", rid]) == 0
        assert f"removed {rid}: netns {ns}" in capsys.readouterr().out
        assert ns not in network.netns_names() and link not in network.link_names() and not scratch.exists()
    finally:
        network.delete_netns(ns)
        network.delete_link(link)


def test_live_runs_and_names_without_a_run_id_are_never_touched() -> None:
    from pyroute2 import netns

    live = runid.new_run_id()
    runid.register(live)  # owned by this (live) process
    live_ns = f"{live}-busy"
    lookalikes = ["ktx-notarun", "kt-NOTHEX12-x", "kt-1234567-short"]
    lookalike_link = "k1234567z1"
    for name in (live_ns, *lookalikes):
        netns.create(name)
    _spare_link(lookalike_link)
    try:
        report = sweep(dead_only=True)
        assert live in report.live
        assert not [r for r in report.removed if r.startswith(live)]
        names = network.netns_names()
        assert live_ns in names and all(n in names for n in lookalikes)
        assert lookalike_link in network.link_names()
        # the end of that run (dead_only=False) does remove it
        assert f"{live}: netns {live_ns}" in sweep(dead_only=False, run_id=live).removed
        assert live_ns not in network.netns_names()
    finally:
        runid.unregister(live)
        for name in (live_ns, *lookalikes):
            network.delete_netns(name)
        network.delete_link(lookalike_link)


def test_cli_rejects_a_bad_run_id(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["sweep", "--run", "kt-xyz"]) == 2
    assert "not a run id" in capsys.readouterr().err


@pytest.mark.slow
def test_libvirt_domain_of_a_dead_run_is_destroyed_and_undefined(kata_libvirtd: services.Daemon) -> None:
    import libvirt

    rid = _new_run()
    other = _new_run()  # a live run's domain must survive the same sweep
    conn = libvirt.open(kata_libvirtd.uri)
    xml = """<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
      <os><type arch='x86_64'>hvm</type></os><devices><memballoon model='none'/></devices></domain>"""
    doomed = conn.defineXML(xml.format(name=f"{rid}-h0"))
    conn.defineXML(xml.format(name=f"{other}-h0"))
    try:
        doomed.create()
        assert doomed.isActive()
        qemu = [pid for pid, argv in services.process_cmdlines() if any(rid in a for a in argv)]
        assert qemu, "libvirt's qemu carries the run id in its command line"
        _kill_run(rid)
        overview = sweep(dead_only=True, dry_run=True)
        assert rid in overview.kept and other in overview.live
        report = sweep(dead_only=True, run_id=rid)
        assert f"{rid}: libvirt domain {rid}-h0" in report.removed
        assert rid + "-h0" not in [d.name() for d in conn.listAllDomains(0)]
        assert other + "-h0" in [d.name() for d in conn.listAllDomains(0)]
        time.sleep(0.5)
        assert not [pid for pid in qemu if services.process_starttime(pid) is not None]
        assert not list(Path("/var/log/libvirt/qemu").glob(f"{rid}*")), "its libvirt log is removed too"
    finally:
        runid.unregister(other)
        sweep(dead_only=True, run_id=other)
        for name in (f"{rid}-h0", f"{other}-h0"):
            try:
                dom = conn.lookupByName(name)
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
            except libvirt.libvirtError:
                pass
        conn.close()


def test_a_dead_runs_libvirtd_still_used_by_a_live_run_is_handed_over() -> None:
    """The sweep must not pull the machine's one libvirtd from under a live run (a `sleep` stands in)."""
    dead, live = _new_run(), _new_run()
    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        record = services.register_daemon(dead, "libvirtd", daemon.pid)
        (runid.run_dir(live) / services.LIBVIRT_USER_MARK).write_text(f"{daemon.pid} {record.starttime}\n")
        _kill_run(dead)
        report = sweep(dead_only=True, run_id=dead)
        assert f"{dead}: daemon libvirtd (pid {daemon.pid}): handed over to live run {live}" in report.removed
        assert daemon.poll() is None
        assert [r.pid for r in services.daemon_records(live)] == [daemon.pid]
        _kill_run(live)  # now the heir is dead too: its sweep stops the daemon
        assert f"{live}: daemon libvirtd (pid {daemon.pid})" in sweep(dead_only=True, run_id=live).removed
        assert daemon.wait(timeout=10) is not None
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for rid in (dead, live):
            runid.unregister(rid)
            sweep(dead_only=True, run_id=rid)


@pytest.mark.xdist_group("kata-hosts")  # libvirtd is frozen for a few seconds: not while this worker's hosts run
def test_ctrl_c_ends_a_run_that_never_used_libvirt_even_when_libvirtd_hangs(
        pytester: pytest.Pytester, kata_libvirtd: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frozen libvirtd (SIGSTOP: it accepts connections and never answers, as an overloaded one can) must
    not keep a run that never used libvirt from ending on Ctrl-C (its own resources are still removed), and a
    sweep gives libvirt up after its timeout instead of hanging."""
    pid = services.serving_libvirtd_pid()
    if pid is None:
        pytest.skip("no libvirtd pid file to freeze")
    victim, state = _start_victim(pytester)
    assert not (runid.state_dir() / state["run_id"] / services.LIBVIRT_USED_MARK).exists()
    os.kill(pid, signal.SIGSTOP)
    try:
        monkeypatch.setattr("pytest_kata.sweep.LIBVIRT_TIMEOUT", 2.0)
        start = time.monotonic()
        frozen = sweep(dead_only=True, dry_run=True)  # a start-of-run sweep gives libvirt up, does the rest
        assert time.monotonic() - start < 15 and state["run_id"] in frozen.live
        victim.send_signal(signal.SIGINT)
        start = time.monotonic()
        try:
            victim.wait(timeout=30)
        except subprocess.TimeoutExpired:
            victim.kill()
            victim.wait()
            pytest.fail(f"the run waited on the frozen libvirtd instead of ending:\n{_log(pytester)}")
        seconds = time.monotonic() - start
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _leftovers(state) == NOTHING, _log(pytester)
    assert seconds < 30


def test_a_sweep_from_a_private_state_dir_leaves_a_live_machine_run_alone(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A process whose ``$PYTEST_KATA_STATE`` points elsewhere (a test's private directory, a second user's
    setting) knows none of the machine's pid files there; a run registered in the machine's state directory
    must still count as alive, or that process's start sweep would destroy its hosts and pods."""
    run = runid.new_run_id()
    runid.register(run)
    scratch = cache_dir() / "runs" / run
    scratch.mkdir(parents=True)
    try:
        monkeypatch.setenv("PYTEST_KATA_STATE", str(tmp_path / "state"))
        assert runid.is_alive(run)
        report = sweep(dead_only=True)
        assert scratch.is_dir() and not any(run in line for line in report.removed), report.removed
        monkeypatch.delenv("PYTEST_KATA_STATE")
        runid.unregister(run)
        assert not runid.is_alive(run)  # negative control: unregistered, the same scratch is a dead run's
        assert any(run in line for line in sweep(dead_only=True, run_id=run).removed) and not scratch.exists()
    finally:
        runid.unregister(run)
        if scratch.exists():
            scratch.rmdir()
