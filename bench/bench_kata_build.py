#!/usr/bin/env python3
"""A Kata 1.x bundle built from source: cold build vs cached build, and a plain qemu boot to the agent.

    python bench/bench_kata_build.py [--src ../shared/kata-src] [--version 1.11.5] [--cold]

``--cold`` first builds in a private, empty cache (empty Go build cache too: minutes on 2 cores); without
it the first figure is a ``--force`` rebuild with Go's build cache warm (what CI pays after a change to the
builder), and the rebuilt tarball is compared byte for byte with the cached one (reproducible build). Then
it builds again with the cache (the content-hash hit every later run pays) and boots the bundle's kernel +
initrd with plain qemu (TCG) until the real agent logs, the floor any Kata pod start here sits on.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--src", type=Path, default=HERE.parent.parent / "shared" / "kata-src")
    parser.add_argument("--version", default="1.11.5")
    parser.add_argument("--cold", action="store_true", help="cold build in an empty private cache (slow)")
    args = parser.parse_args()
    os.environ.setdefault("PYTEST_KATA_QUIET", "1")
    if not args.src.is_dir():
        print(f"bench kata_build: {args.src} is absent, nothing to measure")
        return 0
    if args.cold:
        os.environ["PYTEST_KATA_CACHE"] = tempfile.mkdtemp(prefix="kt-bench-kata-build-")

    from pytest_kata.bundle import open_bundle
    from pytest_kata.hashing import sha256_file
    from pytest_kata.kata_build.build import build_bundle
    from pytest_kata.kata_build.smoke import boot_agent
    from pytest_kata.kata_build.sources import discover

    sources = discover(args.src, args.version)
    before = build_bundle(sources).tarball
    before_sha = sha256_file(before) if before.exists() else None
    start = time.monotonic()
    first = build_bundle(sources, force=not args.cold)
    cold = time.monotonic() - start
    start = time.monotonic()
    again = build_bundle(sources)
    cached = time.monotonic() - start
    assert not again.built and again.tarball == first.tarball
    same = sha256_file(first.tarball) == before_sha
    bundle = open_bundle(first.tarball)
    boot = boot_agent(bundle.root)
    what = "cold (empty caches)" if args.cold else "rebuild (--force, Go build cache warm)"
    print(f"| build {args.version} | {what}: {cold:.1f} s | cached: {cached:.2f} s | {cold / cached:,.0f}x |")
    if not args.cold:
        print(f"| rebuilt tarball byte-identical to the cached one | {same} | | |")
    print(f"| plain qemu boot (TCG) to the agent's first log line | {boot.seconds_to_agent:.1f} s | "
          f"gRPC server up: {boot.grpc_started} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
