"""Version comparison per package ecosystem, always through a maintained library (never by hand).

dpkg: python-debian's ``Version`` (Debian Policy 5.6.12, the same order as apt_pkg and debsecan); apk and rpm:
univers. Versions a library refuses (apk ``_git`` suffixes, garbage) raise :class:`Undetermined`, which the
matcher reports as an undetermined finding rather than guessing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


class Undetermined(Exception):
    """The versions cannot be compared reliably."""


@lru_cache(maxsize=65536)
def parse(ecosystem: str, version: str) -> Any:
    try:
        if ecosystem == "deb":
            from debian.debian_support import Version

            return Version(version)
        if ecosystem == "apk":
            from univers.versions import AlpineLinuxVersion

            return AlpineLinuxVersion(version)
        if ecosystem == "rpm":
            from univers.versions import RpmVersion

            return RpmVersion(version)
        if ecosystem == "kernel":
            from packaging.version import Version as PyVersion

            return PyVersion(version)
    except Exception as exc:  # each library has its own error type
        raise Undetermined(f"{ecosystem} version {version!r} cannot be parsed: {exc}") from None
    raise Undetermined(f"no version comparison for ecosystem {ecosystem!r}")


@lru_cache(maxsize=262144)
def compare(ecosystem: str, a: str, b: str) -> int:
    """-1, 0 or 1 as ``a`` sorts before, equal to, or after ``b`` (cached: a DSA fixes many CVEs of one
    source at one version, so the same pairs recur)."""
    va, vb = parse(ecosystem, a), parse(ecosystem, b)
    return (va > vb) - (va < vb)
