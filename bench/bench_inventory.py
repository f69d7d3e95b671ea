#!/usr/bin/env python3
"""Benchmark: inventory a real-size candidate bundle with ``open_bundle`` against the naive way.

The bundle is built once (cached in ``/var/tmp/pytest-kata-bench/``) from real parts of this machine: the
Debian kernel and its config from ``/boot``, ``qemu-system-x86_64``, qemu's firmware, the rendered Kata
configurations when ``../shared`` is present, and a few hundred MiB of incompressible data as the guest
image; tarred under ``./opt/kata`` and compressed as ``.tar.zst`` (zstandard level 3), like Kata 4.x ships.

Naive way, on the same file: ``tar -t`` (to look at the member names), ``tar -x`` into a directory,
``sha256sum`` of every extracted file and of the archive. pytest-kata: ``open_bundle`` with a cold cache
(one streaming pass: safety checks, extraction, every sha256 and the archive's), then warm ``open_bundle``
and ``identify`` (what the verdict calls). Run: ``python bench/bench_inventory.py [--image-mib N]``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PYTEST_KATA_QUIET", "1")

from pytest_kata.bundle import identify, open_bundle  # noqa: E402

WORK = Path("/var/tmp/pytest-kata-bench")
CONFIGS = REPO.parent / "shared" / "data" / "kata-configs"


def real_parts() -> dict[str, Path]:
    """Bundle path (under opt/kata) -> a real file on this machine."""
    parts: dict[str, Path] = {}
    for vmlinuz in sorted(glob.glob("/boot/vmlinuz-*"))[-1:]:
        release = vmlinuz.removeprefix("/boot/vmlinuz-")
        parts[f"share/kata-containers/vmlinuz-{release}-bench"] = Path(vmlinuz)
        if Path(f"/boot/config-{release}").exists():
            parts[f"share/kata-containers/config-{release}-bench"] = Path(f"/boot/config-{release}")
        if Path(f"/boot/initrd.img-{release}").exists():
            parts["share/kata-containers/kata-debian-12-bench.initrd"] = Path(f"/boot/initrd.img-{release}")
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        parts["bin/qemu-system-x86_64"] = Path(qemu)
    for rom in sorted(glob.glob("/usr/share/qemu/*.bin"))[:20]:
        parts[f"share/kata-qemu/qemu/{Path(rom).name}"] = Path(rom)
    if CONFIGS.is_dir():
        for cfg in sorted(CONFIGS.rglob("configuration-*.toml")):
            parts[f"share/defaults/kata-containers/{cfg.relative_to(CONFIGS)}"] = cfg
    return parts


def build_bundle(image_mib: int) -> Path:
    """Write the .tar.zst once; later runs reuse it (the name carries the image size)."""
    out = WORK / f"kata-static-9.9.9-bench{image_mib}-amd64.tar.zst"
    if out.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    print(f"building {out} (once) ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    with open(tmp, "wb") as raw, zstandard.ZstdCompressor(level=3).stream_writer(raw) as zst, \
            tarfile.open(fileobj=zst, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        def add_bytes(rel: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(f"./opt/kata/{rel}")
            info.size, info.mode = len(data), mode
            tar.addfile(info, _Bytes(data))

        def add_link(rel: str, target: str) -> None:
            info = tarfile.TarInfo(f"./opt/kata/{rel}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            tar.addfile(info)

        add_bytes("VERSION", b"9.9.9\n")
        for rel, src in real_parts().items():
            tar.add(src, arcname=f"./opt/kata/{rel}", recursive=False)
        image = "share/kata-containers/kata-debian-12-bench.image"
        info = tarfile.TarInfo(f"./opt/kata/{image}")
        info.size, info.mode = image_mib << 20, 0o644
        tar.addfile(info, _RandomStream(info.size))
        add_link("share/kata-containers/kata-containers.img", "kata-debian-12-bench.image")
        kernels = [r for r in real_parts() if "/vmlinuz-" in r]
        if kernels:
            add_link("share/kata-containers/vmlinuz.container", Path(kernels[0]).name)
        add_link("share/defaults/kata-containers/configuration.toml", "configuration-qemu.toml")
    os.replace(tmp, out)
    print(f"built {out.stat().st_size >> 20} MiB in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return out


class _Bytes:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        n = len(self.data) - self.pos if n < 0 else n
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk


class _RandomStream:
    """Incompressible content, produced as it is read (no giant buffer)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return os.urandom(n)


def naive(archive: Path) -> dict[str, float]:
    """tar -t, tar -x, sha256sum of every file and of the archive: what a script would do."""
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="kt-bench-naive-", dir=WORK) as dest:
        t = time.monotonic()
        subprocess.run(["tar", "--zstd", "-tf", str(archive)], check=True, stdout=subprocess.DEVNULL)
        times["tar -t"] = time.monotonic() - t
        t = time.monotonic()
        subprocess.run(["tar", "--zstd", "-xf", str(archive), "-C", dest], check=True)
        times["tar -x"] = time.monotonic() - t
        t = time.monotonic()
        subprocess.run(f"find {dest} -type f -print0 | xargs -0 sha256sum > /dev/null; sha256sum {archive}"
                       " > /dev/null", shell=True, check=True)
        times["sha256sum"] = time.monotonic() - t
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-mib", type=int, default=384, help="size of the random guest image (MiB)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each measurement; the best counts")
    args = parser.parse_args()
    archive = build_bundle(args.image_mib)
    subprocess.run(["cat", str(archive)], stdout=subprocess.DEVNULL, check=True)  # same page cache for all
    size_mib = archive.stat().st_size / (1 << 20)

    naive_runs = [naive(archive) for _ in range(args.repeat)]
    naive_times = min(naive_runs, key=lambda t: sum(t.values()))
    naive_total = sum(naive_times.values())

    t_cold = t_warm = t_ident = float("inf")
    for _ in range(args.repeat):
        cache = Path(tempfile.mkdtemp(prefix="kt-bench-cache-", dir=WORK))
        try:
            t = time.monotonic()
            cold = open_bundle(archive, cache=cache)
            t_cold = min(t_cold, time.monotonic() - t)
            t = time.monotonic()
            warm = open_bundle(archive, cache=cache)
            t_warm = min(t_warm, time.monotonic() - t)
            t = time.monotonic()
            ident = identify(archive, cache=cache)
            t_ident = min(t_ident, time.monotonic() - t)
            assert warm.sha256 == cold.sha256 == ident["sha256"]
            files = sum(1 for e in cold.files.values() if e.kind == "file")
            unpacked_mib = cold.total_size / (1 << 20)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    expected = hashlib.sha256()
    with open(archive, "rb") as fh:
        while chunk := fh.read(1 << 20):
            expected.update(chunk)
    assert cold.sha256 == expected.hexdigest(), "open_bundle's streaming hash is wrong"

    print(f"\nbundle: {archive.name}  {size_mib:.0f} MiB compressed, {unpacked_mib:.0f} MiB in {files} "
          f"files, version {ident['version']}")
    breakdown = ", ".join(f"{k} {v:.2f}s" for k, v in naive_times.items())
    print(f"best of {args.repeat} runs each; naive breakdown: {breakdown}")
    rows = [("naive: tar -t + tar -x + sha256sum (files + archive)", naive_total),
            ("open_bundle, cold cache (checks + extract + all sha256)", t_cold),
            ("open_bundle, warm cache", t_warm),
            ("identify, warm cache (the verdict's call)", t_ident)]
    print(f"\n{'what':<58} {'seconds':>9} {'naive / this':>13}")
    for what, secs in rows:
        print(f"{what:<58} {secs:9.4f} {naive_total / max(secs, 1e-6):12.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
