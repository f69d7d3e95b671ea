"""Progress lines for long work (booting, building, installing, scanning), on stderr with elapsed time.

Library code calls :func:`step`; pytest shows the lines live with ``-s`` and the CLI always does. Set
``PYTEST_KATA_QUIET=1`` to silence them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_START = time.monotonic()


def step(area: str, message: str) -> None:
    """One progress line: ``[kata   12.3s] host: booting kt-1a2b3c4d-w0-h1 (TCG)``."""
    if os.environ.get("PYTEST_KATA_QUIET"):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    who = f" {worker}" if worker else ""
    print(f"[kata{who} {time.monotonic() - _START:7.1f}s] {area}: {message}", file=sys.stderr, flush=True)


@contextmanager
def timed(area: str, message: str) -> Iterator[None]:
    """``with timed("image", "building guest-minimal"):`` prints the start, and the end with its duration."""
    step(area, f"{message} ...")
    start = time.monotonic()
    try:
        yield
    except BaseException:
        step(area, f"{message} FAILED after {time.monotonic() - start:.1f}s")
        raise
    step(area, f"{message} done in {time.monotonic() - start:.1f}s")
