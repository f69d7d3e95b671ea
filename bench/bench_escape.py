"""The escape suite's dynamic checks on one release: a session sandbox with pods reused where the checks
allow it, against a fresh sandbox (containerd, probe image, holder pod) for every check.

    python bench/bench_escape.py [--version 1.11.5] [--runtime kata|runc]

Reuse is what the suite does: one sandbox per session, and checks that need the same workload (the
root-device writes of ESC-003 and ESC-007, the privileged probe of ESC-008 and ESC-102) share one pod. The
exploit checks (annotations, a read-only volume) need a pod of their own either way. ``--version`` builds
(cached) the bundle from ../shared/kata-src; ``--runtime runc`` times the same schedule with the control
runtime (no Kata: the runtime-flaw checks are skipped, the probes still run).
"""

from __future__ import annotations

import argparse
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
from pytest_kata.sandbox import SandboxError, Workload, exploits  # noqa: E402
from pytest_kata.sandbox.containerd import ContainerdDriver  # noqa: E402

Check = Callable[[Any, exploits.Scratch, dict[tuple[bool, bool], Any]], str]


def probe(privileged: bool, writes: bool) -> Check:
    """A probe-workload check: reuses the pod's facts when the same workload already ran (``cache``)."""
    def run(driver: Any, scratch: exploits.Scratch, cache: dict[tuple[bool, bool], Any]) -> str:
        key = (privileged, writes)
        if key not in cache:
            try:
                cache[key] = driver.probe(Workload(privileged=privileged, writes=writes, mark=current_run_id()))
            except SandboxError as exc:
                cache[key] = f"probe failed: {str(exc)[-120:]}"
        return "probed" if not isinstance(cache[key], str) else cache[key]
    return run


def outcome(fn: Callable[[Any, exploits.Scratch], Any]) -> Check:
    return lambda driver, scratch, cache: fn(driver, scratch).status


SCHEDULE: list[tuple[str, Check]] = [
    ("KATA-ESC-001 (unprivileged root-device writes)", probe(False, True)),
    ("KATA-ESC-003 (privileged root-device writes)", probe(True, True)),
    ("KATA-ESC-007 (privileged root-device writes)", probe(True, True)),
    ("KATA-ESC-008 (guest block devices)", probe(True, False)),
    ("KATA-ESC-102 (fds, unprivileged)", probe(False, False)),
    ("KATA-ESC-102 (fds, privileged)", probe(True, False)),
    *[(f"KATA-ESC-005 ({route.name})",
       outcome(lambda d, s, route=route: exploits.annotation_exec(d, route, s, hypervisor="qemu")))
      for route in exploits.ANNOTATION_EXEC_ROUTES + exploits.ANNOTATION_ASSET_ROUTES],
    ("KATA-ESC-006 (read-only volume)", outcome(exploits.readonly_volume)),
    ("KATA-ESC-010 (kernel_params)", outcome(lambda d, s: exploits.kernel_params_annotation(d, current_run_id()))),
    ("KATA-ESC-012 (config_path)", outcome(exploits.config_path_exec)),
]


def driver_for(runtime: str, bundle: Any) -> ContainerdDriver:
    return ContainerdDriver(runtime, bundle=bundle) if runtime != "runc" else ContainerdDriver("runc")


def shared(runtime: str, bundle: Any, scratch: exploits.Scratch) -> tuple[float, list[tuple[str, str]]]:
    start = time.monotonic()
    driver = driver_for(runtime, bundle)
    cache: dict[tuple[bool, bool], Any] = {}
    try:
        driver.start()
        rows = [(name, check(driver, scratch, cache)) for name, check in SCHEDULE]
    finally:
        driver.stop()
    return time.monotonic() - start, rows


def per_check(runtime: str, bundle: Any, scratch: exploits.Scratch) -> float:
    start = time.monotonic()
    for _, check in SCHEDULE:
        driver = driver_for(runtime, bundle)
        try:
            driver.start()
            check(driver, scratch, {})
        finally:
            driver.stop()
    return time.monotonic() - start


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
    scratch = exploits.Scratch()
    try:
        reused, rows = shared(args.runtime, bundle, scratch)
        fresh = per_check(args.runtime, bundle, scratch)
    finally:
        scratch.remove()
    label = f"Kata {args.version}" if args.runtime == "kata" else "runc (control)"
    print(f"escape suite, dynamic checks, {label}: {len(SCHEDULE)} checks")
    for name, status in rows:
        print(f"  {name:<52} {status}")
    print(f"{'session sandbox, pods reused where checks allow':<52} {reused:8.1f} s")
    print(f"{'a fresh sandbox per check':<52} {fresh:8.1f} s")
    print(f"{'ratio (per check / reused)':<52} {fresh / reused:8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
