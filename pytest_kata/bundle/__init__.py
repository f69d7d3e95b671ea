"""Candidate bundles: open a Kata release (tarballs or an ``/opt/kata`` tree) safely and inventory it.

A candidate arrives as a ``kata-static`` tarball (``.tar.zst`` since 4.x, ``.tar.xz``/``.tar.gz`` before),
as the split 4.1 tarballs (``kata-static`` + ``kata-go-static`` + ``kata-tools-static``) given together,
or as an unpacked tree. Everything downstream (rules, install, rollback, the verdict) works on one
:class:`Bundle`: a real directory equal to the bundle's ``/opt/kata`` plus an inventory of every file.

Why it is built this way:

* Archives are untrusted input. Members are checked one by one *before* anything is written: no ``..``,
  no absolute names, nothing outside ``opt/kata`` (Kata's ``assert-tarball-host-safe.sh`` rule: the merged
  tarball is unpacked with ``tar -C /``), no device/fifo files, no link that leaves the tree (checked
  lexically per member and again by following every link through the finished tree), no oversize member.
  Files land as 0644/0755 (setuid, setgid, sticky and group/world write bits dropped), owned by the
  unpacking user. These checks stand on their own: ``tarfile.data_filter`` (Python 3.11.4+, absent from
  Debian 12's 3.11.2) runs too where it exists, as a second opinion.
* One read of the archive: the raw bytes are hashed while they stream through the decompressor into
  ``tarfile``; each member is hashed while it is written. The extracted tree lands atomically in
  ``cache_dir()/bundles/<sha256>/`` with its inventory, so a second open (and :func:`identify` in the
  verdict) costs a few ``stat`` calls.
* Every failure a user can cause is a one-line :class:`~pytest_kata.errors.BundleError` naming the file.

Modules, each below the next: :mod:`.model` (Bundle, FileEntry, ShimInfo), :mod:`.cache` (the store),
:mod:`.evidence` (the release version), :mod:`.archives` (safe streaming extraction), :mod:`.directories`,
:mod:`.merging`, :mod:`.analysis` (shims, classes, layouts), :mod:`.api` (:func:`open_bundle`,
:func:`identify`). Import the public names from here.
"""

from __future__ import annotations

from pytest_kata.bundle.analysis import human_size
from pytest_kata.bundle.api import identify, open_bundle
from pytest_kata.bundle.archives import COUNT_LIMIT, MEMBER_LIMIT, TOTAL_LIMIT, unpack_archive
from pytest_kata.bundle.cache import INVENTORY_FORMAT
from pytest_kata.bundle.model import (
    ALL_SHIMS,
    DEFAULTS_DIR,
    KATA_RUNTIME,
    PREFIX,
    SHIM_GO,
    SHIM_RS,
    Bundle,
    FileEntry,
    ShimInfo,
    bundle_relative,
)

__all__ = ["ALL_SHIMS", "COUNT_LIMIT", "DEFAULTS_DIR", "INVENTORY_FORMAT", "KATA_RUNTIME", "MEMBER_LIMIT", "PREFIX",
           "SHIM_GO", "SHIM_RS", "TOTAL_LIMIT", "Bundle", "FileEntry", "ShimInfo", "bundle_relative", "human_size",
           "identify", "open_bundle", "unpack_archive"]
