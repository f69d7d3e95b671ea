"""Sandbox fixtures: one sandbox per session (boot once, probe many times) and the host's view around it.

- ``kata_sandbox`` (session): the driver chosen by ``--kata-driver``/``--kata-runtime``, started once; skips
  with the driver's reason when it cannot run here (e.g. a kata handler on a bundle without a shim).
- ``kata_probe(privileged=..., writes=...)`` (session): probe results, cached per workload, so the isolation
  suite's dozen checks cost one or two probe runs.
- ``kata_host_baseline`` (session): host invariants captured *before* the sandbox started (candidate image,
  kernel and hypervisor hashes; mount table; core_pattern/uevent_helper), compared by the suites after
  hostile workloads.
- ``kata_host_facts`` (session): the host's identity (kernel, boot id, hostname, processes, devices,
  addresses) that the workload must not see.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kata import runid
from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.hosts.base import LocalHost
from pytest_kata.install.installer import Installer, SystemdContainerd
from pytest_kata.kataconfig import KataConfig
from pytest_kata.options import KataSettings
from pytest_kata.plugins.candidate import opened_bundle
from pytest_kata.progress import step
from pytest_kata.resources import cache_dir, sandbox_dir
from pytest_kata.sandbox import (
    HostInvariants,
    ProbeFacts,
    SandboxDriver,
    SandboxError,
    SandboxUnavailable,
    Workload,
    candidate_config,
    candidate_version,
    choose_driver,
)
from pytest_kata.sandbox.containerd import staging_host_changes
from pytest_kata.sandbox.direct import map_path
from pytest_kata.sandbox.exploits import Scratch
from pytest_kata.sandbox.probe import host_facts

COMMON_COMMS = {"sh", "bash", "ash", "dash", "busybox", "init", "sleep", "cat", "awk", "sed", "ls", "dd", "wc",
                "tr", "head", "tail", "grep", "sort", "timeout", "su", "setpriv", "env", "ps", "systemd", "agetty",
                "kata-agent", "login", "getty", "udevd", "systemd-udevd", "systemd-journal", "dbus-daemon", "nc",
                "socat", "mount", "readlink", "id", "uname", "dmesg", "sync", "xargs", "find", "chmod", "mkdir"}


def sandbox_dirs() -> list[str]:
    """Where sandboxes put their files and mounts: excluded from the host mount-table comparison."""
    return [sandbox_dir(), str(cache_dir()), "/run/netns",
            "/run/containerd", "/run/pytest-kata", "/var/lib/containerd"]


@pytest.fixture(scope="session")
def kata_sandbox_candidate(pytestconfig: pytest.Config) -> Bundle | None:
    """The session's candidate for the sandbox drivers (None without one: the runc/runsc controls need none)."""
    try:
        return opened_bundle(pytestconfig, "candidate")
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def kata_sandbox_config(kata_sandbox_candidate: Bundle | None, kata_settings: KataSettings) -> KataConfig | None:
    """The effective runtime configuration the sandbox follows (None without a candidate: static checks skip);
    ``--kata-shim all`` means the default one here (one sandbox per session)."""
    try:
        return candidate_config(kata_sandbox_candidate, Bundle.selection(kata_settings.shim))
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture(scope="session")
def kata_sandbox_version(kata_sandbox_candidate: Bundle | None) -> str | None:
    return candidate_version(kata_sandbox_candidate)


@pytest.fixture(scope="session")
def kata_sandbox_host(request: pytest.FixtureRequest, kata_settings: KataSettings,
                      kata_sandbox_candidate: Bundle | None, kata_sandbox_config: KataConfig | None
                      ) -> Iterator[Any]:
    """Where the sandbox runs: None for this machine; a fresh libvirt staging host (from the host pool) when
    ``--kata-host-provider libvirt`` is given explicitly with the containerd driver. A Kata handler's
    candidate is installed there first (the recorded install, registered with the host's containerd), as a
    staging host runs it. With ``--kata-keep-on-failure`` a session with failures leaves it running."""
    explicit = kata_settings.sources.get("host_provider") not in (None, "default")
    wants_containerd = bool(kata_settings.runtime) or kata_settings.driver == "containerd"
    if not (explicit and kata_settings.host_provider == "libvirt" and wants_containerd):
        yield None
        return
    pool = request.getfixturevalue("make_kata_host")
    changes: dict[str, Any] = {}
    if kata_sandbox_config is not None:
        changes = staging_host_changes(pool.spec(), candidate_version(kata_sandbox_candidate), kata_sandbox_config)
    host = pool.fresh(**changes)
    if kata_sandbox_candidate is not None and (kata_settings.runtime or "kata").startswith("kata"):
        try:
            Installer(host, "/", containerd=SystemdContainerd(host)).install(kata_sandbox_candidate)
        except KataError as exc:
            pool.release(host, failed=True)
            pytest.fail(f"cannot install the candidate on {host.name}: {exc}", pytrace=False)
    yield host
    kept = pool.release(host, failed=request.session.testsfailed > 0)
    if kept:
        step("sandbox", f"kept the staging host {host.name}: {kept}")


def _remote(host: Any) -> bool:
    return host is not None


@pytest.fixture(scope="session")
def kata_host_marker(kata_sandbox_host: Any) -> Iterator[str]:
    """A file that exists only on the host: its visibility from inside is an isolation failure."""
    base = sandbox_dir()
    marker = f"{base}/{runid.current_run_id()}-host-marker-{os.getpid()}"
    if _remote(kata_sandbox_host):
        kata_sandbox_host.run(f"mkdir -p {base} && echo 'host only' > {marker}", timeout=60, check=True)
        yield marker
        kata_sandbox_host.run(["rm", "-f", marker], timeout=60)
        return
    Path(base).mkdir(parents=True, exist_ok=True)
    Path(marker).write_text("host only\n")
    yield marker
    Path(marker).unlink(missing_ok=True)


@pytest.fixture(scope="session")
def kata_host_facts(kata_sandbox_host: Any) -> dict[str, Any]:
    """The host's own identity, processes, devices and addresses (what no workload may see), read by running
    the probe on the host itself."""
    try:
        facts = host_facts(kata_sandbox_host)
    except SandboxError as exc:
        pytest.fail(f"cannot read the host's own facts: {exc}", pytrace=False)
    facts["process_comms"] = sorted(set(facts["user_processes"]) - COMMON_COMMS)
    return facts


@pytest.fixture(scope="session")
def kata_host_baseline(kata_sandbox_candidate: Bundle | None, kata_sandbox_config: KataConfig | None,
                       kata_sandbox_host: Any) -> HostInvariants:
    """Host invariants before any sandbox starts: the candidate's image/kernel/hypervisor hashes, the runtime
    binaries, the mount table and kernel knobs (on the sandbox's host)."""
    files: list[str] = []
    if kata_sandbox_candidate is not None and kata_sandbox_config is not None and not _remote(kata_sandbox_host):
        root = Path(kata_sandbox_candidate.root)
        for key in ("image", "initrd", "kernel", "path"):
            value = kata_sandbox_config.get(f"hypervisor.*.{key}", "")
            if value:
                files.append(str(map_path(root, str(value)).resolve()))
    runner = kata_sandbox_host
    if runner is None:
        runner = LocalHost()
    for tool in ("runc", "containerd-shim-runc-v2", "qemu-system-x86_64", "containerd-shim-kata-v2"):
        found = runner.run(f"readlink -f \"$(command -v {tool})\"", timeout=60).stdout.strip()
        if found:
            files.append(found)
    return HostInvariants.capture(files, exclude=sandbox_dirs(), host=kata_sandbox_host)


@pytest.fixture(scope="session")
def kata_sandbox(kata_settings: KataSettings, kata_sandbox_candidate: Bundle | None, kata_host_baseline: HostInvariants,
                 kata_sandbox_host: Any) -> Iterator[SandboxDriver]:
    """The session's sandbox (started once; stopped at the end of the session, or kept with
    ``--kata-keep-on-failure`` when something failed)."""
    try:
        driver = choose_driver(kata_settings.driver or "auto", kata_settings.runtime, kata_sandbox_candidate,
                               shim=Bundle.selection(kata_settings.shim), accel=kata_settings.accel or "auto",
                               boot_timeout=float(kata_settings.boot_timeout or 240), host=kata_sandbox_host)
    except SandboxUnavailable as exc:
        pytest.skip(f"sandbox unavailable: {exc}")
    except KataError as exc:
        raise pytest.UsageError(str(exc)) from None
    try:
        driver.start()
    except SandboxUnavailable as exc:
        driver.stop()
        pytest.skip(f"sandbox unavailable: {exc}")
    except SandboxError as exc:
        pytest.fail(f"sandbox did not start: {exc}", pytrace=False)
    try:
        yield driver
    finally:
        driver.stop()


@pytest.fixture(autouse=True)
def _kata_sandbox_evidence(request: pytest.FixtureRequest) -> None:
    """Every result of a test that used the session's sandbox carries what the sandbox says of itself (e.g.
    that Kata's hypervisor argv was rewritten for TCG), whatever the test records."""
    if "kata_sandbox" not in request.fixturenames:
        return
    sandbox = request.getfixturevalue("kata_sandbox")
    extra = sandbox.evidence()
    if extra:
        request.getfixturevalue("kata_result").record(**extra)


@pytest.fixture(scope="session")
def kata_probe(kata_sandbox: SandboxDriver, kata_host_marker: str) -> Callable[..., ProbeFacts]:
    """``kata_probe(privileged=False, writes=False, targets=(), mounts=(), annotations=None)`` → facts (cached)."""
    cache: dict[tuple[Any, ...], ProbeFacts | SandboxError] = {}
    mark = runid.current_run_id()

    def probe(privileged: bool = False, writes: bool = False, targets: tuple[str, ...] = (),
              mounts: tuple[Any, ...] = (), annotations: dict[str, str] | None = None,
              host_paths: tuple[str, ...] = ()) -> ProbeFacts:
        key = (privileged, writes, tuple(targets), tuple(mounts), tuple(sorted((annotations or {}).items())),
               tuple(host_paths))
        if key not in cache:
            workload = Workload(privileged=privileged, writes=writes, targets=list(targets), mounts=list(mounts),
                                annotations=dict(annotations or {}),
                                host_paths=[kata_host_marker, *host_paths], mark=mark)
            try:
                cache[key] = kata_sandbox.probe(workload)
            except SandboxError as exc:
                cache[key] = exc
        result = cache[key]
        if isinstance(result, SandboxError):
            pytest.fail(f"probe failed: {result}", pytrace=False)
        return result

    return probe


@pytest.fixture(scope="session")
def kata_probe_targets(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Addresses on the run's own test network (a peer with a TCP listener) that the workload must not reach.

    The listener is proven reachable from a second peer first, so "unreachable from the workload" means
    something. Without test networks (not root), only an address-free list is returned.
    """
    try:
        make = request.getfixturevalue("make_kata_network")
        net = make("iso")
    except pytest.skip.Exception as exc:
        yield {"targets": [], "note": f"no test network: {exc}"}
        return
    except pytest.FixtureLookupError:
        yield {"targets": [], "note": "no test network module"}
        return
    target = net.add_peer("target")
    witness = net.add_peer("witness")
    listener = target.popen(["socat", "TCP-LISTEN:8080,fork,reuseaddr", "SYSTEM:echo kata-iso"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reachable = False
        for _ in range(30):
            proc = witness.run(["socat", "-T2", "-", f"TCP:{target.ip}:8080,connect-timeout=2"], timeout=10)
            if "kata-iso" in proc.stdout:
                reachable = True
                break
            time.sleep(0.1)
        yield {"targets": [target.ip, f"{target.ip}:8080"], "witness_reached": reachable,
               "network": str(net.subnet), "note": ""}
    finally:
        listener.kill()
        listener.wait()
        net.remove_peer(witness)
        net.remove_peer(target)


@pytest.fixture(scope="session")
def kata_escape_scratch() -> Iterator[Any]:
    """A run-owned host directory (``cache_dir()/runs/<run-id>/escape-<pid>``) for the escape checks' markers
    and volumes; removed at the end of the session (and swept with the run if it crashes)."""
    scratch = Scratch()
    yield scratch
    scratch.remove()


@pytest.fixture(scope="session")
def kata_candidate_image(kata_sandbox_candidate: Bundle | None, kata_sandbox_config: KataConfig | None
                         ) -> Path | None:
    """The guest image file the candidate's configuration names (None: initrd-only or no candidate)."""
    if kata_sandbox_candidate is None or kata_sandbox_config is None:
        return None
    value = kata_sandbox_config.get("hypervisor.*.image", "")
    if not value:
        return None
    return map_path(Path(kata_sandbox_candidate.root), str(value))
