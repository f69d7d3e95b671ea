#!/usr/bin/env python3
"""Per-test reset of a host: revert to the clean snapshot vs a fresh boot of the same host, in one run.

    python bench/bench_hosts.py [--reverts 3] [--boots 1] [--workers]

Boots one libvirt host from the cached host image (TCG here), takes the ``clean`` snapshot, then for each
round dirties the host and resets it both ways: ``revert('clean')`` (what ``kata_host`` does) and
destroy + new overlay + boot (what a harness without snapshots does). Prints boot-to-ready, snapshot time
and the ratio. ``--workers`` also times a 4-test module on 2 hosts with ``pytest -n 1`` vs ``-n 2``
(several minutes on 2 cores). Needs root and libvirtd (started here if none runs, and stopped again).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--reverts", type=int, default=3, help="resets by revert (default 3)")
    parser.add_argument("--boots", type=int, default=1, help="resets by fresh boot (default 1: ~40-60 s each)")
    parser.add_argument("--workers", action="store_true", help="also time pytest -n 1 vs -n 2 on two hosts")
    args = parser.parse_args()
    os.environ.setdefault("PYTEST_KATA_QUIET", "1")

    from pytest_kata import runid, services
    from pytest_kata.hosts.provision import HostPool, PoolSettings
    from pytest_kata.resources import cache_dir
    from pytest_kata.sweep import sweep

    run_id = runid.current_run_id()
    daemon = services.ensure_libvirtd(run_id)
    log_dir = cache_dir() / "runs" / run_id / "logs"  # removed by the sweep at the end
    pool = HostPool(PoolSettings(log_dir=log_dir))
    rows: list[tuple[str, float]] = []
    try:
        pool.spec()  # image build (cached) and accelerator choice are not part of the timings
        start = time.monotonic()
        host = pool.boot()
        first_boot = time.monotonic() - start
        start = time.monotonic()
        host.snapshot("clean")
        rows += [("boot to ready (first host)", first_boot), ("snapshot 'clean' (running, RAM+disk)",
                                                               time.monotonic() - start)]
        reverts, boots = [], []
        for round_ in range(args.reverts):
            host.run(f"touch /root/dirty-{round_}", check=True)
            start = time.monotonic()
            host.revert("clean")
            reverts.append(time.monotonic() - start)
            assert host.run(f"test -e /root/dirty-{round_}").rc == 1, "revert did not reset the host"
        for _ in range(args.boots):
            start = time.monotonic()
            host.close()
            host = pool.boot()
            boots.append(time.monotonic() - start)
        host.close()
        rows += [(f"reset by revert (mean of {len(reverts)})", statistics.mean(reverts)),
                 (f"reset by fresh boot (mean of {len(boots)})", statistics.mean(boots))]
        ratio = statistics.mean(boots) / statistics.mean(reverts)
        if args.workers:
            rows += workers_rows()
    finally:
        pool.close()
        sweep(dead_only=False, run_id=run_id)
        daemon.stop()
        runid.unregister(run_id)
    print(f"\nhost reset benchmark ({pool.describe()})")
    for label, seconds in rows:
        print(f"  {label:<44} {seconds:8.1f} s")
    print(f"  {'fresh boot / revert':<44} {ratio:8.1f} x  (revert is {ratio:.1f} times faster)")
    return 0


def workers_rows() -> list[tuple[str, float]]:
    """A module of 4 host tests marked for 2 hosts, with 1 and 2 xdist workers."""
    module = textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("n", range(4))
        def test_work(kata_host, n):
            kata_host.run("for i in $(seq 200); do echo $i > /root/f$i; done; sync", check=True)
    """)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "test_bench_hosts.py").write_text(module)
        for workers in (1, 2):
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers),
                            tmp], check=True, capture_output=True)
            rows.append((f"4 host tests, pytest -n {workers} (incl. boots)", time.monotonic() - start))
    return rows


if __name__ == "__main__":
    sys.exit(main())
