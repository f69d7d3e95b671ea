#!/usr/bin/env python3
"""Sandbox start-to-guest-ready of the direct driver: TCG here vs KVM (and TCG) inside a libvirt host VM.

    python bench/bench_nested.py [--runs 2] [--tcg-inside-runs 1] [--tcg-inside-limit 90] [--no-host]

This machine's /dev/kvm is PVM, so the direct driver boots sandboxes under TCG. A libvirt host (TCG,
``<cpu mode='maximum'/>``) can load ``kvm_amd`` and give its own sandboxes real KVM; this measures what that
buys. The guest is the reference candidate's (``fixtures/reference.py``): its kernel, its initrd as the loader
and its read-only image, with the QEMU arguments the direct driver builds (``GuestSpec.argv``; only the
accelerator and the file paths change). Every cell is timed the same way, by the same shell loop run where
the VM runs (here, or inside the host with the host's own clock): from launching qemu until
``KATA-GUEST-READY`` appears on the serial console. Host boot and file copies are not part of any figure.
Here the host itself runs under TCG, so its "KVM" is SVM emulated by TCG: expect KVM inside the host to be
slower than TCG here (the ratio is below 1); TCG inside TCG is cut off and reported as a lower bound.

Needs root and libvirtd (started here if none runs, and stopped again). Cleans up on failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTEST_KATA_QUIET", "1")

READY = "KATA-GUEST-READY"
HOST_QEMU = "qemu-system-x86_64"  # the host image's own QEMU (Debian's, on PATH there)
BOOT_LIMIT = 150  # seconds a single guest boot may take before it counts as failed
TCG_INSIDE_LIMIT = 90  # TCG inside a TCG host does not reach ready in 150 s here: report a lower bound

# Launch qemu in the background, poll its serial log for the ready line, stop it. The same loop runs here
# and inside the host, so both sides pay the same polling granularity (50 ms) and clock source.
TIMING_SCRIPT = """log={log}
rm -f "$log"
t0=$(date +%s.%N)
timeout {limit} {argv} </dev/null >"$log" 2>&1 &
pid=$!
until grep -q {ready} "$log" 2>/dev/null; do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
t1=$(date +%s.%N)
kill $pid 2>/dev/null; wait $pid 2>/dev/null
if grep -q {ready} "$log"; then echo "BN-READY $t0 $t1"; else echo "BN-FAILED"; tail -n 8 "$log"; fi
rm -f "$log"
"""


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def timing_script(argv: list[str], log: str, limit: float = BOOT_LIMIT) -> str:
    return TIMING_SCRIPT.format(log=shlex.quote(log), limit=f"{limit:g}", argv=shlex.join(argv), ready=READY)


def parse_timing(where: str, output: str, limit: float = BOOT_LIMIT) -> float:
    for line in output.splitlines():
        if line.startswith("BN-READY "):
            _, t0, t1 = line.split()
            return float(t1) - float(t0)
    tail = " | ".join(line.strip() for line in output.strip().splitlines()[-8:])
    raise BenchError(f"{where}: the guest did not print {READY} within {limit:g} s: {tail or '(no output)'}")


def guest_argv(spec, *, accel: str, name: str, kernel: str, initrd: str | None, image: str | None,
               qemu: str) -> list[str]:
    """The direct driver's QEMU argv for ``spec`` with another accelerator and file locations.

    Left out: the vhost-vsock device the driver adds only where /dev/vhost-vsock exists (host-specific)."""
    changed = spec.with_changes(accel=accel, qemu=Path(qemu), kernel=Path(kernel),
                                initrd=Path(initrd) if initrd else None, image=Path(image) if image else None,
                                qemu_data_dir=None)
    argv = changed.argv(name)
    while "vhost-vsock-pci,guest-cid=3" in argv:
        index = argv.index("vhost-vsock-pci,guest-cid=3")
        del argv[index - 1:index + 1]
    return argv


def run_local(argv: list[str], workdir: Path) -> float:
    """One boot on this machine, timed by the shared shell loop (own process group: killed on any exit)."""
    script = timing_script(argv, str(workdir / "serial.log"))
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=BOOT_LIMIT + 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return parse_timing("TCG here", output)


def measure_here(spec, runs: int, run_id: str) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory(prefix=f"{run_id}-bench-nested-") as tmp:
        for n in range(runs):
            argv = guest_argv(spec, accel="tcg", name=f"{run_id}-bench-nested-here-{n}", kernel=str(spec.kernel),
                              initrd=str(spec.initrd) if spec.initrd else None,
                              image=str(spec.image) if spec.image else None, qemu=str(spec.qemu))
            times.append(run_local(argv, Path(tmp)))
            print(f"  TCG here, run {n + 1}: {times[-1]:.2f} s", flush=True)
    return times


def measure_inside(host, spec, remote: dict[str, str | None], accel: str, runs: int, run_id: str,
                   limit: float = BOOT_LIMIT) -> list[float]:
    times = []
    for n in range(runs):
        argv = guest_argv(spec, accel=accel, name=f"{run_id}-bench-nested-{accel}-{n}", qemu=HOST_QEMU,
                          kernel=str(remote["kernel"]), initrd=remote["initrd"], image=remote["image"])
        result = host.run(timing_script(argv, f"{remote['dir']}/serial.log", limit), timeout=limit + 60)
        times.append(parse_timing(f"{accel.upper()} inside {host.name}", result.stdout + result.stderr, limit))
        print(f"  {accel.upper()} inside the host, run {n + 1}: {times[-1]:.2f} s", flush=True)
    return times


def prepare_host(host, spec, run_id: str) -> dict[str, str | None]:
    """Load kvm_amd (kvm_intel) and copy the guest's kernel, initrd and image into the host."""
    loaded = host.run("grep -qw svm /proc/cpuinfo && modprobe kvm_amd || modprobe kvm_intel; test -c /dev/kvm")
    if not loaded.ok:
        raise BenchError(f"{host.name}: no /dev/kvm after modprobe kvm_amd/kvm_intel: {loaded.stderr.strip()}")
    directory = f"/var/tmp/{run_id}-bench-nested"  # the host's root disk: cache=none needs O_DIRECT (not tmpfs)
    remote: dict[str, str | None] = {"dir": directory, "kernel": f"{directory}/vmlinuz", "initrd": None,
                                     "image": None}
    files = [("kernel", spec.kernel, "vmlinuz"), ("initrd", spec.initrd, "initrd.img"),
             ("image", spec.image, "guest.img")]
    # put() hard-links a large file into its transfer tree and pins its mtime there: hand it private copies,
    # never the bundle's files (vmlinuz.container is a symlink, which would arrive as a dangling link)
    with tempfile.TemporaryDirectory(prefix=f"{run_id}-bench-nested-put-", dir="/var/tmp") as tmp:
        for key, local, name in files:
            if local is None:
                continue
            copy = Path(tmp) / name
            shutil.copyfile(local, copy)
            remote[key] = f"{directory}/{name}"
            host.put(copy, remote[key])
    return remote


def interrupted(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2, help="boots per cell (default 2)")
    parser.add_argument("--tcg-inside-runs", type=int, default=1,
                        help="boots under TCG inside the host (default 1: TCG in TCG is the slowest cell)")
    parser.add_argument("--tcg-inside-limit", type=float, default=TCG_INSIDE_LIMIT,
                        help=f"seconds before a TCG-inside boot is cut off (default {TCG_INSIDE_LIMIT:g})")
    parser.add_argument("--vcpus", type=int, default=2, help="host vCPUs (default 2)")
    parser.add_argument("--no-host", action="store_true", help="only the TCG-here cell")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, interrupted)

    from fixtures.reference import ensure_reference
    from pytest_kata import runid
    from pytest_kata.bundle import open_bundle
    from pytest_kata.resources import cache_dir
    from pytest_kata.sandbox.direct import GuestSpec

    run_id = runid.current_run_id()
    spec = GuestSpec.from_bundle(open_bundle(ensure_reference("candidate", "hardened")), accel="tcg")
    started = time.monotonic()
    rows: list[tuple[str, list[float]]] = []
    lower_bounds: dict[str, float] = {}  # cells that did not reach ready: "more than this many seconds"
    host_boot = None
    daemon = pool = host = None
    failure = None
    notes: list[str] = []
    try:
        print(f"guest: {spec.kernel.name} ({spec.kernel_release}) + {spec.initrd.name if spec.initrd else '-'}"
              f" + {spec.image.name if spec.image else '-'}, -m {spec.memory_mb} -smp {spec.vcpus}", flush=True)
        rows.append(("TCG here (this machine)", measure_here(spec, args.runs, run_id)))
        if not args.no_host:
            from pytest_kata import services
            from pytest_kata.hosts.provision import HostPool, PoolSettings

            daemon = services.ensure_libvirtd(run_id)
            # the guest asks for 2 GiB: give the host room for it on top of its own
            pool = HostPool(PoolSettings(accel="tcg", log_dir=cache_dir() / "runs" / run_id / "logs",
                                         memory_mib=spec.memory_mb + 1024, vcpus=args.vcpus))
            pool.spec()
            boot_start = time.monotonic()
            host = pool.boot()
            host_boot = time.monotonic() - boot_start
            print(f"  host {host.name} ready in {host_boot:.1f} s ({args.vcpus} vCPU, TCG, cpu maximum)", flush=True)
            remote = prepare_host(host, spec, run_id)
            rows.append(("KVM inside the host (L2, -cpu host)",
                         measure_inside(host, spec, remote, "kvm", args.runs, run_id)))
            try:  # TCG inside TCG may not make the deadline at all: that is a result, not a failure
                rows.append(("TCG inside the host (L2, -cpu max)",
                             measure_inside(host, spec, remote, "tcg", args.tcg_inside_runs, run_id,
                                            args.tcg_inside_limit)))
            except BenchError as exc:
                rows.append(("TCG inside the host (L2, -cpu max)", []))
                lower_bounds["TCG inside the host"] = args.tcg_inside_limit
                notes.append(f"TCG inside the host: {exc}")
    except (Exception, KeyboardInterrupt) as exc:  # report, clean up, still print what was measured
        failure = f"{type(exc).__name__}: {exc}"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if host is not None:
            host.close()
        if pool is not None:
            pool.close()
        if daemon is not None:
            from pytest_kata.sweep import sweep

            sweep(dead_only=False, run_id=run_id)
            daemon.stop()
        runid.unregister(run_id)
    print_table(rows, lower_bounds, host_boot, time.monotonic() - started)
    for note in notes:
        print(f"NOTE: {note}")
    if failure:
        print(f"FAILED: {failure}")
        return 1
    return 0


def print_table(rows: list[tuple[str, list[float]]], lower_bounds: dict[str, float], host_boot: float | None,
                total: float) -> None:
    if not rows:
        return
    print("\nstart-to-KATA-GUEST-READY, reference candidate guest (kernel + initrd loader + read-only image)")
    print(f"  {'where the sandbox VM runs':<38} {'runs':>4} {'mean s':>8} {'min s':>7} {'runs s':>16}")
    means: dict[str, float] = {}
    for label, times in rows:
        key = label.split(" (")[0]
        if times:
            means[key] = statistics.mean(times)
            each = " ".join(f"{t:.1f}" for t in times)
            print(f"  {label:<38} {len(times):>4} {means[key]:8.2f} {min(times):7.2f} {each:>16}")
        elif key in lower_bounds:
            bound = f"> {lower_bounds[key]:g}"
            print(f"  {label:<38} {1:>4} {bound:>8} {bound:>7} {'not ready':>16}")

    def value(key: str) -> tuple[float, str] | None:
        if key in means:
            return means[key], ""
        return (lower_bounds[key], ">") if key in lower_bounds else None

    print("ratios (mean / mean):")
    for top, bottom, why in (("TCG here", "KVM inside the host", ""),
                             ("TCG inside the host", "KVM inside the host", "  (same host, same clock)"),
                             ("TCG inside the host", "TCG here", "  (cost of nesting TCG)")):
        a, b = value(top), value(bottom)
        if a and b and not b[1]:
            label = f"{top} / {bottom}"
            print(f"  {label:<42} {a[1] or ' '}{a[0] / b[0]:6.2f}x{why}")
    extra = f"host boot {host_boot:.1f} s (not in any figure), " if host_boot is not None else ""
    print(f"  ({extra}benchmark total {total:.0f} s)")

if __name__ == "__main__":
    sys.exit(main())
