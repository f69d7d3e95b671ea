"""The real ``debsecan``, run offline as the oracle the scanner is cross-checked against (tests, bench)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

_FINDING = re.compile(r"^(CVE-\d+-\d+|TEMP-\S+)(?:\s|$)")
_INSTALLED = re.compile(r"^\s+installed: (\S+) ")


def run_debsecan(status: Path, feed_dir: Path, suite: str = "bookworm") -> set[tuple[str, str]]:
    """(vulnerability id, binary package) pairs debsecan reports for a dpkg status file and a local feed."""
    proc = subprocess.run(["debsecan", "--suite", suite, "--source", f"file://{feed_dir}/", "--status",
                           str(status), "--format", "detail"], capture_output=True, text=True, check=True)
    return parse_detail(proc.stdout)


def parse_detail(text: str) -> set[tuple[str, str]]:
    """Pairs from ``debsecan --format detail``: an id line, then ``installed: PACKAGE VERSION`` lines."""
    pairs: set[tuple[str, str]] = set()
    current = None
    for line in text.splitlines():
        if m := _FINDING.match(line):
            current = m.group(1)
        if (m := _INSTALLED.match(line)) and current:
            pairs.add((current, m.group(1)))
    return pairs
