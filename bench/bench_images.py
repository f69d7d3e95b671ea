"""Guest image build: cold (mmdebstrap + mkfs.ext4 -d + initrd) against a content-hash cache hit.

    python bench/bench_images.py [RECIPE]     # default: reference (~20 s cold)

Runs in a private cache directory (removed afterwards) so the machine's cache is neither used nor touched.
Prints one table: cold build, cache hit with the apt answer memoised (what every later test run pays), cache
hit after the apt lists changed (re-resolving package versions), and a forced rebuild, which must give
bit-identical outputs (same package versions -> same bytes; exit status 1 otherwise).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    recipe = sys.argv[1] if len(sys.argv) > 1 else "reference"
    cache = Path(tempfile.mkdtemp(prefix="pytest-kata-bench-", dir="/var/tmp"))
    os.environ["PYTEST_KATA_CACHE"] = str(cache)
    os.environ.setdefault("PYTEST_KATA_QUIET", "1")
    from pytest_kata.images.guest import CACHE_KIND, build_guest

    try:
        start = time.perf_counter()
        cold = build_guest(recipe)
        cold_s = time.perf_counter() - start
        assert cold.built
        hits = []
        for _ in range(5):
            start = time.perf_counter()
            warm = build_guest(recipe)
            hits.append(time.perf_counter() - start)
            assert not warm.built and warm.key == cold.key
        hit_s = min(hits)
        for memo in (cache / CACHE_KIND).glob(".versions-*.json"):
            memo.unlink()  # as after `apt-get update`: versions are resolved again with apt-cache
        start = time.perf_counter()
        again = build_guest(recipe)
        resolve_s = time.perf_counter() - start
        assert not again.built and again.key == cold.key
        size = sum(p.stat().st_size for p in cold.dir.iterdir() if p.is_file()) / 1e6
        digests = [_sha256(p) for p in (cold.image, cold.initrd) if p]
        start = time.perf_counter()
        forced = build_guest(recipe, force=True)  # same package versions: must give the same bytes
        forced_s = time.perf_counter() - start
        identical = digests == [_sha256(p) for p in (forced.image, forced.initrd) if p]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print(f"guest-{recipe} image build ({size:.0f} MB of outputs)")
    print(f"{'case':<44} {'seconds':>9} {'ratio':>10}")
    print(f"{'cold build (mmdebstrap, ext4 disk, initrd)':<44} {cold_s:>9.2f} {1:>9.0f}x")
    print(f"{'cache hit (apt answer memoised)':<44} {hit_s:>9.3f} {cold_s / hit_s:>9.0f}x")
    print(f"{'cache hit after apt lists changed':<44} {resolve_s:>9.2f} {cold_s / resolve_s:>9.0f}x")
    print(f"{'forced rebuild, same package versions':<44} {forced_s:>9.2f} {cold_s / forced_s:>9.1f}x  "
          f"bit-identical image+initrd: {'yes' if identical else 'NO'}")
    return 0 if identical else 1


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
