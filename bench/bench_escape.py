"""The escape suite's dynamic checks on one release: a session sandbox with pods reused where the checks
allow it, against a fresh sandbox (containerd, probe image, holder pod) for every check.

    python bench/bench_escape.py [--version 1.11.5] [--runtime kata|runc]

Reuse is what the suite does: one sandbox per session; one CAP_MKNOD root-device attempt judged by
KATA-ESC-001 (CVE-2020-2023), KATA-ESC-017 and KATA-ESC-003 (CVE-2020-2025); one hostile pod for the
shared-directory exploits KATA-ESC-016, KATA-ESC-002 (CVE-2020-2024) and KATA-ESC-004 (CVE-2020-2026); one
probe pod per workload (the privileged root-device writes of KATA-ESC-007, the privileged probe of
KATA-ESC-008 and KATA-ESC-102). The annotation exploits and the read-only volume need a pod of their own
either way. Rows run in the suite's order and print the check's status; the probe rows whose verdict the
suite's own test code draws (KATA-ESC-007, KATA-ESC-102) print ``probed``. ``--version`` builds (cached) the
bundle from ../shared/kata-src; ``--runtime runc`` times the same schedule with the control runtime (no
Kata: the runtime-flaw checks are skipped, the probes still run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTEST_KATA_QUIET", "1")

from pytest_kata.runid import current_run_id  # noqa: E402
from pytest_kata.sandbox import SandboxError, Workload, checks, exploits  # noqa: E402
from pytest_kata.sandbox.containerd import ContainerdDriver  # noqa: E402
from pytest_kata.sandbox.probe import host_facts  # noqa: E402


class Session:
    """What the suite's fixtures share between checks in one sandbox, made on first use: probe facts per
    workload (``kata_probe``), the root-device attempt (``guest_root_attempt``) and the hostile pod
    (``kata_hostile_pod``, removed by :meth:`close`)."""

    def __init__(self, driver: ContainerdDriver, scratch: exploits.Scratch, host: dict[str, Any]) -> None:
        self.driver, self.scratch, self.host = driver, scratch, host
        self.facts: dict[tuple[bool, bool], Any] = {}
        self.attempt: exploits.RootDeviceAttempt | None = None
        self.pods = contextlib.ExitStack()
        self.pod: exploits.HostilePod | str | None = None

    def probe(self, privileged: bool, writes: bool) -> Any:
        """The probe's facts for this workload (the error text when the probe failed)."""
        key = (privileged, writes)
        if key not in self.facts:
            try:
                self.facts[key] = self.driver.probe(Workload(privileged=privileged, writes=writes,
                                                             mark=current_run_id()))
            except SandboxError as exc:
                self.facts[key] = f"probe failed: {str(exc)[-120:]}"
        return self.facts[key]

    def root_attempt(self) -> exploits.RootDeviceAttempt:
        if self.attempt is None:
            self.attempt = exploits.guest_root_attempt(self.driver, current_run_id())
        return self.attempt

    def hostile(self) -> exploits.HostilePod | str:
        if self.pod is None:
            self.pod = self.pods.enter_context(exploits.hostile_pod(self.driver))
        return self.pod

    def close(self) -> None:
        self.pods.close()


Check = Callable[[Session], str]


def status(outcome: checks.Outcome) -> str:
    return outcome.status if outcome.status == "pass" else f"{outcome.status}: {outcome.message[:90]}"


def root_device(judge: Callable[[exploits.RootDeviceAttempt], checks.Outcome]) -> Check:
    return lambda s: status(judge(s.root_attempt()))


def on_hostile_pod(judge: Callable[[exploits.HostilePod, Session], checks.Outcome]) -> Check:
    def run(s: Session) -> str:
        pod = s.hostile()
        return status(exploits.cannot_observe(pod) if isinstance(pod, str) else judge(pod, s))
    return run


def root_device_writes(s: Session) -> str:
    """KATA-ESC-007's workload: skipped where the guest has no root device, else the privileged probe."""
    why = exploits.root_device_missing(s.driver)
    facts = None if why else s.probe(True, True)
    if facts is not None and not isinstance(facts, str):
        why = exploits.root_device_missing(s.driver, facts)
    return f"skipped: {why[:90]}" if why else facts if isinstance(facts, str) else "probed"


def block_devices(s: Session) -> str:
    why = exploits.kata_runtime_missing(s.driver, "block-device hot-plug of a container rootfs")
    if why:
        return f"skipped: {why[:90]}"
    facts = s.probe(True, False)
    return facts if isinstance(facts, str) else status(
        checks.host_devices(facts, s.host["block_devices"], s.host["dev_nodes"]))


def probe(privileged: bool) -> Check:
    def run(s: Session) -> str:
        facts = s.probe(privileged, False)
        return facts if isinstance(facts, str) else "probed"
    return run


def outcome(fn: Callable[[Session], checks.Outcome]) -> Check:
    return lambda s: status(fn(s))


def annotation(route: exploits.AnnotationRoute, hypervisor: str = "") -> Check:
    return lambda s: status(exploits.annotation_exec(s.driver, route, s.scratch, hypervisor=hypervisor))


SCHEDULE: list[tuple[str, Check]] = [
    ("KATA-ESC-001 (CVE-2020-2023, root device)", root_device(exploits.root_device_cgroup)),
    ("KATA-ESC-017 (disk around the root partition)", root_device(exploits.root_disk_cgroup)),
    ("KATA-ESC-016 (guest writes the share)",
     on_hostile_pod(lambda pod, s: exploits.guest_writes_share(pod, current_run_id()))),
    ("KATA-ESC-002 (CVE-2020-2024, teardown unmount)",
     on_hostile_pod(lambda pod, s: exploits.symlink_redirects_unmount(pod, s.scratch))),
    ("KATA-ESC-003 (CVE-2020-2025, host image)", root_device(exploits.root_device_host_image)),
    ("KATA-ESC-004 (CVE-2020-2026, symlink bind)",
     on_hostile_pod(lambda pod, s: exploits.symlink_redirects_mount(pod, s.scratch))),
    *[(f"KATA-ESC-005 ({route.name})", annotation(route, hypervisor="qemu"))
      for route in exploits.ANNOTATION_EXEC_ROUTES],
    *[(f"KATA-ESC-015 ({route.name})", annotation(route)) for route in exploits.ANNOTATION_ASSET_ROUTES],
    ("KATA-ESC-006 (read-only volume)", outcome(lambda s: exploits.readonly_volume(s.driver, s.scratch))),
    ("KATA-ESC-007 (privileged root-device writes)", root_device_writes),
    ("KATA-ESC-008 (guest block devices)", block_devices),
    ("KATA-ESC-010 (kernel_params)", outcome(lambda s: exploits.kernel_params_annotation(s.driver,
                                                                                           current_run_id()))),
    ("KATA-ESC-012 (config_path)", outcome(lambda s: exploits.config_path_exec(s.driver, s.scratch))),
    ("KATA-ESC-102 (fds, unprivileged)", probe(False)),
    ("KATA-ESC-102 (fds, privileged)", probe(True)),
]


def driver_for(runtime: str, bundle: Any) -> ContainerdDriver:
    return ContainerdDriver(runtime, bundle=bundle) if runtime != "runc" else ContainerdDriver("runc")


def run_checks(runtime: str, bundle: Any, scratch: exploits.Scratch, host: dict[str, Any],
               schedule: list[tuple[str, Check]]) -> list[str]:
    """Start one sandbox, run ``schedule`` in it sharing what the suite shares, stop it; each check's status."""
    driver = driver_for(runtime, bundle)
    statuses: list[str] = []
    try:
        driver.start()
        session = Session(driver, scratch, host)
        try:
            for _, check in schedule:
                try:
                    statuses.append(check(session))
                except SandboxError as exc:
                    statuses.append(f"error: {str(exc)[-90:]}")
        finally:
            session.close()
    finally:
        driver.stop()
    return statuses


def timed(fn: Callable[[], list[str]]) -> tuple[float, list[str]]:
    start = time.monotonic()
    statuses = fn()
    return time.monotonic() - start, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="1.11.5", help="Kata release built from ../shared/kata-src")
    parser.add_argument("--runtime", default="kata", choices=("kata", "runc"))
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_escape: needs root (containerd)", file=sys.stderr)
        return 0
    bundle = None
    if args.runtime == "kata":
        source = REPO.parent / "shared" / "kata-src"
        if not source.is_dir():
            print(f"bench_escape: {source} is missing; nothing to time", file=sys.stderr)
            return 0
        from pytest_kata.bundle import open_bundle
        from pytest_kata.kata_build.build import build_bundle
        from pytest_kata.kata_build.sources import discover

        bundle = open_bundle(build_bundle(discover(source, args.version)).root / "opt" / "kata")
    host = host_facts()
    scratch = exploits.Scratch()
    try:
        reused, together = timed(lambda: run_checks(args.runtime, bundle, scratch, host, SCHEDULE))
        fresh, alone = timed(lambda: [status for check in SCHEDULE
                                      for status in run_checks(args.runtime, bundle, scratch, host, [check])])
    finally:
        scratch.remove()
    label = f"Kata {args.version}" if args.runtime == "kata" else "runc (control)"
    print(f"escape suite, dynamic checks, {label}: {len(SCHEDULE)} checks (status reused | per check)")
    for (name, _), one, other in zip(SCHEDULE, together, alone, strict=True):
        print(f"  {name:<48} {one}" + ("" if one == other else f" | {other}"))
    print(f"{'session sandbox, pods reused where checks allow':<50} {reused:8.1f} s")
    print(f"{'a fresh sandbox per check':<50} {fresh:8.1f} s")
    print(f"{'ratio (per check / reused)':<50} {fresh / reused:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
