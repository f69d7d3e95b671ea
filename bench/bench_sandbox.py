"""Benchmark the sandbox drivers: one probe round per driver, and start-to-probe time of the direct driver.

The design choice measured: boot (or start) a sandbox once per session and probe it many times, against the
naive way of a fresh sandbox per probe. Both sides are measured in this one run.

    python bench/bench_sandbox.py [--rounds 3]

KVM inside a host VM (helper E's libvirt hosts: a TCG L1 with kvm_amd) is not measured here: it needs a
provisioned host; the direct driver picks KVM by itself where it works (``detect_accel``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTEST_KATA_QUIET", "1")

from pytest_kata.bundle import open_bundle  # noqa: E402
from pytest_kata.sandbox import Workload  # noqa: E402
from pytest_kata.sandbox.containerd import ContainerdDriver  # noqa: E402
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec  # noqa: E402
from pytest_kata.sandbox.variants import stand_in_tree  # noqa: E402


def timed(fn):
    start = time.monotonic()
    value = fn()
    return time.monotonic() - start, value


def bench_direct(rounds: int, tree: Path) -> list[tuple[str, float, float]]:
    spec = GuestSpec.from_bundle(open_bundle(tree))
    rows = []
    # naive: a fresh VM per probe
    naive = 0.0
    first_probe = []
    for _ in range(rounds):
        driver = DirectDriver(spec)
        t0 = time.monotonic()
        try:
            driver.start()
            driver.probe(Workload(privileged=True))
            first_probe.append(time.monotonic() - t0)
        finally:
            driver.stop()
        naive += time.monotonic() - t0
    # the harness: boot once, probe `rounds` times
    driver = DirectDriver(spec)
    t0 = time.monotonic()
    try:
        boot, _ = timed(driver.start)
        probes = [timed(lambda: driver.probe(Workload(privileged=True)))[0] for _ in range(rounds)]
    finally:
        driver.stop()
    reused = time.monotonic() - t0
    start_to_probe = min(first_probe)
    rows.append((f"direct ({spec.accel.upper()}): start-to-probe, boot {boot:.1f}s + probe {probes[0]:.1f}s",
                 start_to_probe, start_to_probe))
    rows.append((f"direct ({spec.accel.upper()}): {rounds} probes, fresh VM each vs one VM", naive, reused))
    return rows


def bench_containerd(rounds: int) -> list[tuple[str, float, float]]:
    if os.geteuid() != 0 or not (shutil.which("containerd") and shutil.which("runc")):
        return [("containerd/runc: skipped (needs root, containerd, runc)", 0.0, 0.0)]
    naive = 0.0
    for _ in range(rounds):
        t0 = time.monotonic()
        driver = ContainerdDriver("runc")
        try:
            driver.start()
            driver.probe()
        finally:
            driver.stop()
        naive += time.monotonic() - t0
    t0 = time.monotonic()
    driver = ContainerdDriver("runc")
    try:
        driver.start()
        per_probe = [timed(driver.probe)[0] for _ in range(rounds)]
    finally:
        driver.stop()
    reused = time.monotonic() - t0
    return [(f"containerd/runc: one probe round ({min(per_probe):.2f}s per ctr run)", min(per_probe), min(per_probe)),
            (f"containerd/runc: {rounds} probes, fresh containerd each vs one", naive, reused)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    hardened = REPO / "fixtures" / "configs" / "hardened" / "configuration-qemu.toml"
    with tempfile.TemporaryDirectory(prefix="bench-sandbox-") as tmp:
        tree = stand_in_tree(Path(tmp), hardened, version="4.1.0", image=True)
        rows = bench_direct(args.rounds, tree) + bench_containerd(args.rounds)
    rows.append(("direct (KVM inside a host VM): not measured (needs a provisioned KVM host)", 0.0, 0.0))
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{width}}  {'naive s':>8}  {'harness s':>9}  {'ratio':>6}")
    for name, naive, harness in rows:
        ratio = f"{naive / harness:5.1f}x" if harness and naive != harness else "   -"
        cells = f"{naive:8.2f}  {harness:9.2f}" if harness else f"{'-':>8}  {'-':>9}"
        print(f"{name:<{width}}  {cells}  {ratio:>6}")


if __name__ == "__main__":
    main()
