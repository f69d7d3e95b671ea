#!/usr/bin/env python3
"""A real Kata pod, start to output, against a plain qemu boot of the same kernel and initrd.

    python bench/bench_kata.py [--src ../shared/kata-src] [--version 1.11.5]

The bundle comes from ``pytest-kata build --from-source``'s cache (built first if missing). The pod figure is
``ctr run --rm`` through the containerd driver (handler ``kata``) until ``uname -r`` printed, a fresh VM per
pod, the private containerd already up; the floor is the same kernel + initrd booted by plain qemu until the
agent logs (:func:`pytest_kata.kata_build.smoke.boot_agent`). Here (no usable KVM) both run under TCG, and
the pod's figure includes the TCG wrapper's wait for the guest to open the agent's port.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--src", type=Path, default=HERE.parent.parent / "shared" / "kata-src")
    parser.add_argument("--version", default="1.11.5")
    args = parser.parse_args()
    os.environ.setdefault("PYTEST_KATA_QUIET", "1")
    if not args.src.is_dir():
        print(f"bench kata: {args.src} is absent, nothing to measure")
        return 0
    if os.geteuid() != 0:
        print("bench kata: a Kata pod needs root, nothing measured")
        return 0

    from pytest_kata import runid
    from pytest_kata.bundle import open_bundle
    from pytest_kata.kata_build.build import build_bundle
    from pytest_kata.kata_build.smoke import boot_agent
    from pytest_kata.kata_build.sources import discover
    from pytest_kata.sandbox import Workload
    from pytest_kata.sandbox.containerd import ContainerdDriver
    from pytest_kata.sweep import clean_run

    bundle = open_bundle(build_bundle(discover(args.src, args.version)).tarball)
    boot = boot_agent(bundle.root)
    driver = ContainerdDriver("kata", bundle=bundle)
    try:
        start = time.monotonic()
        driver.start()
        first = time.monotonic() - start
        result = driver.run(Workload(), ["uname", "-r"])
        pod = driver.last_seconds or 0.0
        if result.rc != 0:
            print(f"bench kata: the pod failed: {result.stderr.strip()[-300:]}")
            return 1
    finally:
        driver.stop()
        clean_run(runid.current_run_id())
    print(f"| Kata {args.version} pod start to output ({result.stdout.strip()}) | {pod:.1f} s | "
          f"plain qemu boot of the same kernel+initrd to the agent | {boot.seconds_to_agent:.1f} s | "
          f"{pod / boot.seconds_to_agent:.1f}x |")
    print(f"| first pod incl. private containerd start and probe image import | {first:.1f} s | | | |")
    print(f"| hypervisor | {driver.evidence().get('hypervisor_rewrite', 'as configured (KVM)')[:60]}... | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
