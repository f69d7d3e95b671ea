"""Kata 1.x built from upstream source into a kata-static bundle (``pytest-kata build --from-source``).

:mod:`~pytest_kata.kata_build.sources` finds and checks the sources of one release (archives or checkouts,
version read from the runtime's ``VERSION``); :mod:`~pytest_kata.kata_build.kernel` picks the guest kernel
(Debian's, or ``--kernel PATH``); :mod:`~pytest_kata.kata_build.build` runs upstream's Makefiles with
Debian's Go and assembles ``/opt/kata``, cached by content hash.
"""

from __future__ import annotations

from pytest_kata.kata_build.build import BuildResult, build_bundle, publish, tarball_name
from pytest_kata.kata_build.kernel import guest_kernel
from pytest_kata.kata_build.sources import REPOS, Source, SourceError, SourceSet, discover

__all__ = ["REPOS", "BuildResult", "Source", "SourceError", "SourceSet", "build_bundle", "discover",
           "guest_kernel", "publish", "tarball_name"]
