"""Find and check the upstream Kata 1.x sources of one release: archives or git checkouts.

A release is five repositories (``runtime``, ``agent``, ``proxy``, ``osbuilder``, ``packaging``). They come
as upstream's exported archives ``kata-<repo>-<V>.tar.xz`` whose top directory is ``kata-<repo>-<V>/``, or
as checkouts (a directory holding the repository's files). The version is read from the sources (the
runtime's ``VERSION`` file, the one the release process bumps), never from a table of known releases, so
any 1.x release with this layout builds; ``--version`` only chooses which archives to take and must agree
with what the sources say.
"""

from __future__ import annotations

import lzma
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from pytest_kata.errors import KataError

REPOS = ("runtime", "agent", "proxy", "osbuilder", "packaging")
# What the bundle is built from; osbuilder and packaging are recorded (and hashed) when present.
REQUIRED = ("runtime", "agent", "proxy")
ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar.zst", ".tar")
# Kata 1.x: the Go runtime, agent and proxy with vendored dependencies that build offline in GOPATH mode.
_VERSION = re.compile(r"^1\.\d+\.\d+(?:-(?:rc|alpha|beta)\d+)?$")
_ARCHIVE = re.compile(r"^kata-(?P<repo>[a-z]+)-(?P<version>\d[^/]*?)(?P<suffix>\.tar\.xz|\.tar\.gz|\.tgz"
                      r"|\.tar\.zst|\.tar)$")
VERSION_FILE_LIMIT = 4096


class SourceError(KataError):
    """The Kata sources given to the builder are missing, inconsistent or not a Kata 1.x release."""


@dataclass(frozen=True)
class Source:
    """One repository's sources: an archive (``top`` is its top directory) or a checkout directory."""

    repo: str
    path: Path
    kind: str  # "archive" | "checkout"
    top: str | None = None

    def read_text(self, rel: str) -> str | None:
        """A small file of the sources (``None``: absent), without unpacking the whole archive."""
        if self.kind == "checkout":
            target = self.path / rel
            if not target.is_file():
                return None
            return target.read_bytes()[:VERSION_FILE_LIMIT].decode("utf-8", "replace")
        wanted = f"{self.top}/{rel}"
        try:
            with tarfile.open(self.path, mode="r|*") as archive:
                for member in archive:
                    if member.name.removeprefix("./") == wanted and member.isreg():
                        reader = archive.extractfile(member)
                        assert reader is not None
                        return reader.read(VERSION_FILE_LIMIT).decode("utf-8", "replace")
        except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
            raise SourceError(f"cannot read the archive: {exc}", path=self.path,
                              hint="re-download or re-export it") from None
        return None


@dataclass(frozen=True)
class SourceSet:
    """The sources of one release, checked: ``version`` is what the runtime's ``VERSION`` file says."""

    version: str
    sources: dict[str, Source]

    def __getitem__(self, repo: str) -> Source:
        return self.sources[repo]


def first_line(text: str | None) -> str:
    return (text or "").strip().splitlines()[0].strip() if (text or "").strip() else ""


def _archive_for(directory: Path, repo: str, version: str) -> Path | None:
    for suffix in ARCHIVE_SUFFIXES:
        candidate = directory / f"kata-{repo}-{version}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _checkout_for(directory: Path, repo: str, version: str) -> Path | None:
    for name in (f"kata-{repo}-{version}", repo):
        candidate = directory / name
        if candidate.is_dir():
            return candidate
    return None


def versions_in(directory: Path) -> list[str]:
    """The versions of the runtime archives in ``directory`` (what ``--version`` can choose from)."""
    found = set()
    for path in directory.iterdir():
        match = _ARCHIVE.match(path.name)
        if match and match["repo"] == "runtime":
            found.add(match["version"])
    return sorted(found)


def _top_dir(path: Path, repo: str, version: str) -> str:
    """The archive's single top directory, which must be ``kata-<repo>-<version>``."""
    expected = f"kata-{repo}-{version}"
    try:
        with tarfile.open(path, mode="r|*") as archive:
            first = archive.next()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise SourceError(f"not a readable tar archive: {exc}", path=path, hint="re-download it") from None
    if first is None:
        raise SourceError("empty archive", path=path)
    top = first.name.removeprefix("./").split("/")[0]
    if top != expected:
        raise SourceError(f"top directory is {top!r}, expected {expected!r}", path=path,
                          hint="upstream archives are exported with the prefix kata-<repo>-<version>/")
    return top


def _source(repo: str, path: Path, version: str | None) -> Source:
    if path.is_dir():
        return Source(repo, path, "checkout")
    if not path.is_file():
        raise SourceError(f"no {repo} sources here (no such file or directory)", path=path)
    match = _ARCHIVE.match(path.name)
    top_version = version or (match["version"] if match else None)
    if top_version is None:
        raise SourceError(f"cannot tell the version from the archive name (expected kata-{repo}-<version>"
                          f".tar.xz)", path=path)
    return Source(repo, path, "archive", _top_dir(path, repo, top_version))


def discover(directory: Path | None, version: str | None = None,
             overrides: dict[str, Path] | None = None) -> SourceSet:
    """The sources of release ``version`` in ``directory`` (archives or checkouts), checked.

    ``overrides`` maps a repository to its own archive or checkout (``--agent-src PATH``); it wins over
    ``directory``. Without ``version``, ``directory`` must hold exactly one release's runtime archive.
    Every problem is one :class:`SourceError` line naming the file.
    """
    overrides = {repo: Path(p) for repo, p in (overrides or {}).items()}
    unknown = sorted(set(overrides) - set(REPOS))
    if unknown:
        raise SourceError(f"unknown Kata repository {', '.join(unknown)} (known: {', '.join(REPOS)})")
    if directory is not None and not directory.is_dir():
        raise SourceError("not a directory of Kata sources", path=directory,
                          hint="expected kata-<repo>-<version>.tar.xz archives or checkouts")
    if version is not None and not _VERSION.match(version.removeprefix("v")):
        raise SourceError(f"--version {version!r} is not a Kata 1.x release (like 1.11.5)",
                          hint="2.x and later agents are Rust and cannot be built here")
    version = version.removeprefix("v") if version else None
    if version is None and directory is not None and "runtime" not in overrides:
        versions = versions_in(directory)
        if len(versions) != 1:
            found = ", ".join(versions) or "none"
            raise SourceError(f"pick a release with --version (runtime archives found: {found})", path=directory)
        version = versions[0]
    sources: dict[str, Source] = {}
    for repo in REPOS:
        path = overrides.get(repo)
        if path is None and directory is not None and version is not None:
            path = _archive_for(directory, repo, version) or _checkout_for(directory, repo, version)
        if path is None:
            if repo in REQUIRED:
                where = directory if directory is not None else "the command line"
                raise SourceError(f"missing the {repo} sources: no kata-{repo}-{version or '<version>'}.tar.xz "
                                  f"and no checkout", path=where, hint=f"give --{repo}-src PATH")
            continue
        sources[repo] = _source(repo, path, version)
    runtime = sources["runtime"]
    said = first_line(runtime.read_text("VERSION"))
    where = runtime.path / "VERSION" if runtime.kind == "checkout" else runtime.path
    if not said:
        raise SourceError("no VERSION file in the runtime sources (not a Kata runtime tree?)", path=where)
    if not _VERSION.match(said):
        raise SourceError(f"the runtime's VERSION says {said!r}: not a Kata 1.x release", path=where,
                          hint="2.x and later agents are Rust and cannot be built here")
    if version is not None and said != version:
        raise SourceError(f"--version {version} but the runtime's VERSION says {said}", path=where)
    for repo, source in sources.items():
        if repo == "runtime":
            continue
        other = first_line(source.read_text("VERSION"))
        if other and other != said:
            raise SourceError(f"the {repo} sources are version {other}, the runtime is {said}",
                              path=source.path if source.kind == "archive" else source.path / "VERSION",
                              hint="give the sources of one release")
    return SourceSet(said, sources)
