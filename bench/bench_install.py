"""Benchmark: state capture cost as the number of files grows, and install/capture/rollback of a bundle.

    python bench/bench_install.py [--files 10000,100000] [--size 4096]

Capture is compared in the same run with the naive way (``find -printf`` for the metadata plus
``find | xargs sha256sum`` for the content, what a shell script would do) and with the floor (reading and
hashing the same bytes with no metadata at all). The ratio "per 10x files" shows linearity (10.0 = linear).
The install part uses the reference baseline/candidate trees when ``fixtures/out`` has them (built by
``fixtures/build-reference``), otherwise a synthetic bundle.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTEST_KATA_QUIET", "1")

from pytest_kata.hosts.base import LocalHost  # noqa: E402
from pytest_kata.install.state import capture_state  # noqa: E402
from pytest_kata.install.workloads import WorkloadProbe  # noqa: E402


def make_tree(root: Path, files: int, size: int) -> None:
    base = root / "opt/kata-releases/1.0.0-bench"
    payload = os.urandom(size)
    for i in range(files):
        d = base / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:06d}").write_bytes(payload[: size - 8] + i.to_bytes(8, "little"))
    (root / "opt/kata").symlink_to("kata-releases/1.0.0-bench")


def drop_nothing() -> None:
    """Caches stay warm on purpose: every method reads the same warm files, so the comparison is fair."""


def timed(fn, repeat: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def naive(root: Path) -> None:
    tree = str(root / "opt")
    subprocess.run(f"find {tree} -printf '%y %m %U %G %s %p %l\\n' > /dev/null && "
                   f"find {tree} -type f -print0 | xargs -0 sha256sum > /dev/null", shell=True, check=True)


def file_list(root: Path) -> list[str]:
    return [os.path.join(d, n) for d, _dirs, names in os.walk(root / "opt/kata-releases") for n in names]


def floor(paths: list[str]) -> None:
    """Open, read and hash each file, from a ready list: no listing, no stat, no record. The floor."""
    for path in paths:
        with open(path, "rb") as fh:
            hashlib.sha256(fh.read()).digest()


def bench_capture(counts: list[int], size: int) -> None:
    print(f"state capture, files of {size} bytes (best of 2 below 50k files, warm cache)")
    print(f"{'files':>8} {'capture s':>10} {'us/file':>8} {'find+sha256sum s':>17} {'naive/ours':>10} "
          f"{'read+hash floor s':>18} {'ours/floor':>10} {'shell path s':>13}")
    previous = None
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp:
            root = Path(tmp)
            make_tree(root, count, size)
            repeat = 2 if count < 50_000 else 1
            paths = file_list(root)
            raw = timed(lambda: floor(paths), repeat)  # noqa: B023
            ours = timed(lambda: capture_state(LocalHost(), str(root)), repeat)  # noqa: B023
            tool = timed(lambda: naive(root), repeat)  # noqa: B023
            shell = timed(lambda: capture_state(ShellHost(), str(root)), 1)  # noqa: B023
            state = capture_state(LocalHost(), str(root))
            assert sum(1 for e in state.entries.values() if e.kind == "file") == count
            growth = f"  x{ours / previous:.1f} for 10x files" if previous else ""
            print(f"{count:>8} {ours:>10.2f} {ours / count * 1e6:>8.1f} {tool:>17.2f} {tool / ours:>9.2f}x "
                  f"{raw:>18.2f} {ours / raw:>9.2f}x {shell:>13.2f}{growth}")
            previous = ours


class ShellHost:
    """This machine through ``run`` only: the path a remote host takes (find + sha256sum on the host)."""

    name = "shell"

    def __init__(self) -> None:
        self.local = LocalHost("shell")

    def run(self, cmd, **kwargs):  # type: ignore[no-untyped-def]
        return self.local.run(cmd, **kwargs)


def bench_install() -> None:
    from pytest_kata.bundle import open_bundle
    from pytest_kata.install import Installer, SysrootContainerd

    out = REPO / "fixtures/out"
    pair = (out / "reference-baseline-hardened", out / "reference-candidate-hardened")
    if not all(p.is_dir() for p in pair):
        print("install: reference trees absent (run fixtures/build-reference); skipped")
        return
    baseline, candidate = open_bundle(pair[0]), open_bundle(pair[1])
    size = sum(e.size for e in candidate.files.values() if e.kind == "file")
    print(f"\ninstall/rollback of the reference bundles ({len(candidate.files)} entries, {size / 1e6:.0f} MB)")
    with tempfile.TemporaryDirectory(prefix="kt-bench-") as tmp:
        service = None
        if shutil.which("containerd") and os.geteuid() == 0:
            service = SysrootContainerd.prepare(tmp)
            service.start()
        try:
            inst = Installer(LocalHost(), tmp, containerd=service)
            t0 = time.perf_counter()
            inst.install(baseline)
            t1 = time.perf_counter()
            workloads = WorkloadProbe(inst) if service is not None else None
            workload_line = "  workload check: no containerd here"
            plant = time.perf_counter()
            if workloads is not None:
                workloads.plant()
            plant = time.perf_counter() - plant
            t1b = time.perf_counter()
            report = inst.install(candidate)
            t2 = time.perf_counter()
            capture = timed(inst.capture)
            t3 = time.perf_counter()
            rollback = inst.rollback()
            t4 = time.perf_counter()
            if workloads is not None:
                verify = time.perf_counter()
                results = workloads.verify().results
                verify = time.perf_counter() - verify
                workloads.cleanup()
                ran = sum(r.status == "pass" for r in results)
                total = t4 - t1b + t1 - t0
                workload_line = (f"  workload check ({len(results)} workloads, {ran} started again): plant "
                                 f"{plant:.2f}s + verify {verify:.2f}s = {(plant + verify) / total:.2f}x of "
                                 "install+upgrade+rollback")
            copy = timed(lambda: subprocess.run(["cp", "-a", str(candidate.root), f"{tmp}/plain-copy"],
                                                check=True) and shutil.rmtree(f"{tmp}/plain-copy"), 1)
            print(f"  install baseline {t1 - t0:.2f}s, upgrade {t2 - t1b:.2f}s (steps {report.timings}), "
                  f"capture {capture:.2f}s, rollback+verify {t4 - t3:.2f}s (restored={rollback.restored})")
            print(f"  naive: plain `cp -a` of the tree {copy:.2f}s -> upgrade costs {(t2 - t1b) / copy:.1f}x a copy "
                  "(it adds pack+stage, journal, two captures, containerd restart and verification)")
            print(workload_line)
        finally:
            if service is not None:
                service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", default="10000,100000")
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    bench_capture([int(x) for x in args.files.split(",")], args.size)
    bench_install()


if __name__ == "__main__":
    main()
