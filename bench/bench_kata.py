#!/usr/bin/env python3
"""A real Kata pod, start to output, against a plain qemu boot of the same kernel and initrd.

    python bench/bench_kata.py [--src ../shared/kata-src] [--version 1.11.5]

The bundle comes from ``pytest-kata build --from-source``'s cache (built first if missing). The pod figure is
``ctr run --rm`` through the containerd driver (handler ``kata``) until ``uname -r`` printed, a fresh VM per
pod, the private containerd already up; the floor is the same kernel + initrd booted by plain qemu until the
agent logs (:func:`pytest_kata.kata_build.smoke.boot_agent`). Here (no usable KVM) both run under TCG, and
the pod's figure includes the TCG wrapper's wait for the guest to open the agent's port.

With ``--libvirt-host`` (the default where libvirtd is installed) the same pod runs on a libvirt staging host
(TCG, ``<cpu mode='maximum'/>``): the release installed there by the installer and its pods KVM guests of the
host, Kata's argv unchanged but for the spelling of its bare ``-machine`` flags. Host boot and install are
reported apart and are not part of the pod figure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--src", type=Path, default=HERE.parent.parent / "shared" / "kata-src")
    parser.add_argument("--version", default="1.11.5")
    parser.add_argument("--libvirt-host", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the pod on a libvirt staging host (default: when libvirtd is installed)")
    parser.add_argument("--pods", type=int, default=3, help="pods timed on the libvirt host (median)")
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
    if args.libvirt_host is None:
        args.libvirt_host = shutil.which("libvirtd") is not None
    if args.libvirt_host:
        return pod_on_libvirt_host(bundle, args.version, pod, args.pods)
    return 0


def pod_on_libvirt_host(bundle: Any, version: str, local_pod: float, pods: int) -> int:
    """Pods of ``bundle`` on a fresh libvirt staging host, start to output (median of ``pods``), against the
    pod here (``local_pod`` seconds)."""
    from pytest_kata import runid, services
    from pytest_kata.hosts.provision import HostPool, PoolSettings
    from pytest_kata.install.installer import Installer, SystemdContainerd
    from pytest_kata.resources import cache_dir
    from pytest_kata.sandbox import Workload
    from pytest_kata.sandbox.containerd import ContainerdDriver, staging_host_changes
    from pytest_kata.sweep import clean_run

    run_id = runid.current_run_id()
    services.ensure_libvirtd(run_id)
    pool = HostPool(PoolSettings(log_dir=cache_dir() / "runs" / run_id / "logs"))
    driver = None
    try:
        changes = staging_host_changes(pool.spec(), version, bundle.shim(None).config)
        start = time.monotonic()
        host = pool.fresh(**changes)
        booted = time.monotonic() - start
        start = time.monotonic()
        Installer(host, "/", containerd=SystemdContainerd(host)).install(bundle)
        installed = time.monotonic() - start
        driver = ContainerdDriver("kata", bundle=bundle, host=host)
        driver.start()
        seconds = []
        for _ in range(pods):
            result = driver.run(Workload(), ["uname", "-r"])
            if result.rc != 0:
                print(f"bench kata: the pod on {host.name} failed: {result.stderr.strip()[-300:]}")
                return 1
            seconds.append(driver.last_seconds or 0.0)
        median = statistics.median(seconds)
        print(f"| Kata {version} pod start to output on a libvirt host ({pool.accel.upper()} host VM, "
              f"{driver.shim_config.changes.get('accel', '?') if driver.shim_config else '?'} pods; median of "
              f"{pods}) | {median:.1f} s | the same pod here | {local_pod:.1f} s | {median / local_pod:.1f}x |")
        print(f"| host boot / install of the release there | {booted:.1f} s / {installed:.1f} s | | | |")
        if driver.shim_config and driver.shim_config.rewrite_note:
            print(f"| hypervisor on the host | {driver.shim_config.rewrite_note[:60]}... | | | |")
    finally:
        if driver is not None:
            driver.stop()
        pool.close()
        clean_run(run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
