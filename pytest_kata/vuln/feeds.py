"""Vulnerability feeds, read from files only (no network): Debian Security Tracker JSON, the debsecan feed,
OSV records (a file, a directory or an ``all.zip`` per ecosystem), Alpine secdb, and Linux kernel CNA records
(CVE JSON 5). Each is normalised into :class:`PackageVuln` (OS packages) or kept as a kernel record.

The format is recognised from the content, not the file name; anything else is a one-line
:class:`~pytest_kata.errors.FeedError`. Large feeds (the full tracker JSON is ~70 MB) are indexed by package
and converted only for the packages a guest has.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import FeedError
from pytest_kata.resources import cache_dir

URGENCY_SEVERITY = {"unimportant": "info", "low": "low", "low*": "low", "medium": "medium", "medium*": "medium",
                    "high": "high", "high*": "high", "critical": "critical"}


@dataclass(frozen=True)
class Release:
    """The guest's distribution release, as feeds name it."""

    family: str  # debian, ubuntu, alpine
    version_id: str = ""  # "12", "3.18.4"
    codename: str = ""  # "bookworm"

    def osv_ecosystems(self) -> set[str]:
        if self.family == "debian":
            return {f"Debian:{self.version_id.split('.')[0]}"} if self.version_id else set()
        if self.family == "alpine":
            parts = self.version_id.split(".")
            return {f"Alpine:v{parts[0]}.{parts[1]}"} if len(parts) >= 2 else set()
        if self.family == "ubuntu":
            return {f"Ubuntu:{self.version_id}", f"Ubuntu:{self.version_id}:LTS"}
        return set()


@dataclass(frozen=True)
class Range:
    introduced: str | None = "0"  # "0": from the beginning
    fixed: str | None = None  # None: no fixed version known
    last_affected: str | None = None


@dataclass(frozen=True)
class PackageVuln:
    """One vulnerability of one (source) package in one release, normalised from any feed."""

    id: str
    package: str  # source package (Debian), origin (Alpine)
    ecosystem: str  # version scheme: deb, apk, rpm
    ranges: tuple[Range, ...] = (Range(),)
    versions: tuple[str, ...] = ()  # explicitly affected versions (OSV "versions")
    not_affected_versions: tuple[str, ...] = ()  # debsecan "other versions" (fixed in another suite)
    binary: bool = False  # the entry names a binary package (debsecan flag B)
    severity: str = ""  # "" unknown
    scope: str = ""  # local / remote (tracker), "" unknown
    nodsa: str = ""  # tracker nodsa_reason (ignored, postponed)
    aliases: tuple[str, ...] = ()
    summary: str = ""
    feed: str = ""

    @property
    def fix_available(self) -> bool:
        return any(r.fixed for r in self.ranges)

    @property
    def fixed_in(self) -> str | None:
        fixed = [r.fixed for r in self.ranges if r.fixed]
        return fixed[-1] if fixed else None


@dataclass
class KernelRecord:
    """A Linux kernel CNA record (CVE JSON 5), kept as it is; evaluated by :mod:`pytest_kata.vuln.kernel`."""

    id: str
    title: str
    program_files: list[str]
    affected: list[dict[str, Any]]
    source: str
    description: str = ""


class Feed:
    """A loaded feed: ``lookup(package, release)`` returns the vulnerabilities recorded for that package."""

    kind = "feed"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kernel_records: list[KernelRecord] = []

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        return []

    def has_package(self, package: str) -> bool:
        return False

    def releases(self) -> set[str]:
        """Release names this feed covers (for the 'feed does not cover the guest' warning)."""
        return set()

    def describe(self) -> str:
        return f"{self.kind} {self.path}"


# ------------------------------------------------------------------------------------------ Debian tracker
class DebianTrackerFeed(Feed):
    """``security-tracker.debian.org/tracker/data/json``: {source: {CVE: {scope, releases: {codename: {...}}}}}."""

    kind = "debian-tracker"

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        super().__init__(path)
        self.data = data
        self._cache: dict[tuple[str, str], list[PackageVuln]] = {}

    def has_package(self, package: str) -> bool:
        return package in self.data

    def releases(self) -> set[str]:
        out: set[str] = set()
        for cves in list(self.data.values())[:200]:
            for rec in cves.values() if isinstance(cves, dict) else ():
                out.update((rec.get("releases") or {}).keys())
        return out

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        key = (package, release.codename)
        if key in self._cache:
            return self._cache[key]
        out: list[PackageVuln] = []
        cves = self.data.get(package)
        if isinstance(cves, dict):
            for cve, rec in cves.items():
                if not isinstance(rec, dict):
                    raise FeedError(f"entry {package}/{cve} is not an object", path=self.path)
                rel = (rec.get("releases") or {}).get(release.codename)
                if not isinstance(rel, dict):
                    continue  # the tracker says nothing about this release
                status = rel.get("status")
                fixed = rel.get("fixed_version")
                if status == "resolved":
                    if not fixed or fixed == "0":
                        continue  # never affected in this release
                    ranges = (Range("0", str(fixed)),)
                elif status in ("open", "undetermined"):
                    ranges = (Range("0", None),)
                else:
                    raise FeedError(f"entry {package}/{cve}: unknown status {status!r}", path=self.path)
                out.append(PackageVuln(
                    id=cve, package=package, ecosystem="deb", ranges=ranges,
                    severity=URGENCY_SEVERITY.get(str(rel.get("urgency", "")).lower(), ""),
                    scope=str(rec.get("scope", "")), nodsa=str(rel.get("nodsa_reason", rel.get("nodsa", "")) or ""),
                    summary=str(rec.get("description", ""))[:300], feed=str(self.path)))
        self._cache[key] = out
        return out


class _SqliteSources:
    """Read-only mapping source -> CVE table, one JSON row per source package (the index of a big tracker
    file), so that a scan parses only the sources the guest has."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)

    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT body FROM src WHERE name = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def __contains__(self, key: object) -> bool:
        return self.conn.execute("SELECT 1 FROM src WHERE name = ?", (key,)).fetchone() is not None

    def meta(self, key: str) -> str:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else ""


class IndexedTrackerFeed(DebianTrackerFeed):
    """A Debian tracker JSON read through its on-disk index (built the first time the file is seen)."""

    def __init__(self, path: Path, index: Path) -> None:
        self.sources = _SqliteSources(index)
        super().__init__(path, self.sources)  # type: ignore[arg-type]
        self.index = index

    def releases(self) -> set[str]:
        return set(filter(None, self.sources.meta("releases").split(",")))

    def describe(self) -> str:
        return f"{self.kind} {self.path} (index {self.index.name})"


INDEX_MIN_BYTES = 4 * 1024 * 1024
INDEX_VERSION = "1"


def _index_path(p: Path) -> Path | None:
    try:
        st = p.stat()

        key = hashlib.sha256(f"{INDEX_VERSION}\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
        return cache_dir() / "feeds" / f"tracker-{key[:24]}.sqlite"
    except OSError:
        return None


def _write_index(feed: DebianTrackerFeed, target: Path) -> None:
    """Best effort: a cache that cannot be written only costs speed."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        tmp.unlink(missing_ok=True)
        conn = sqlite3.connect(tmp)
        conn.execute("CREATE TABLE src (name TEXT PRIMARY KEY, body TEXT NOT NULL)")
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.executemany("INSERT INTO src VALUES (?, ?)", ((k, json.dumps(v)) for k, v in feed.data.items()))
        conn.execute("INSERT INTO meta VALUES ('releases', ?)", (",".join(sorted(feed.releases())),))
        conn.commit()
        conn.close()
        os.replace(tmp, target)
    except (OSError, sqlite3.Error):
        try:
            tmp.unlink(missing_ok=True)
        except (OSError, UnboundLocalError):
            pass


# ------------------------------------------------------------------------------------------ debsecan feed
class DebsecanFeed(Feed):
    """debsecan's compact feed (zlib, ``VERSION 1``, three blank-line separated blocks), one file per suite."""

    kind = "debsecan"

    def __init__(self, path: Path, text: str) -> None:
        super().__init__(path)
        self.suite = path.name
        self.lines: dict[str, list[str]] = defaultdict(list)  # package -> raw lines, parsed on lookup
        self.entries: dict[str, list[PackageVuln]] = {}
        lines = text.split("\n")
        if not lines or lines[0] != "VERSION 1":
            raise FeedError("not a debsecan feed (first line is not 'VERSION 1')", path=path)
        try:
            blank = lines.index("", 1)
            self.names = [tuple(line.split(",", 2)[0::2]) for line in lines[1:blank]]
            end = lines.index("", blank + 1) if "" in lines[blank + 1:] else len(lines)
        except ValueError:
            raise FeedError("malformed debsecan feed: missing the blank line after the names", path=path) from None
        for line in lines[blank + 1:end]:
            package, sep, _ = line.partition(",")
            if not sep:
                raise FeedError(f"malformed debsecan feed line {line[:60]!r}", path=path)
            self.lines[package].append(line)

    def _parse(self, package: str) -> list[PackageVuln]:
        out = []
        for line in self.lines.get(package, []):
            try:
                package, vnum, flags, unstable, other = line.split(",", 4)
                cve, desc = self.names[int(vnum)]
                urgency = {"L": "low", "M": "medium", "H": "high"}.get(flags[1], "")
                scope = {"R": "remote", " ": "local"}.get(flags[2], "")
                binary = flags[0] == "B"
            except (ValueError, IndexError):
                raise FeedError(f"malformed debsecan feed line {line[:60]!r}", path=self.path) from None
            out.append(PackageVuln(
                id=cve, package=package, ecosystem="deb", ranges=(Range("0", unstable or None),),
                not_affected_versions=tuple(v for v in other.split(" ") if v), binary=binary,
                severity=urgency, scope=scope, summary=desc, feed=str(self.path)))
        return out

    def has_package(self, package: str) -> bool:
        return package in self.lines

    def releases(self) -> set[str]:
        return {self.suite}

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        if release.codename not in (self.suite, "") and self.suite != "GENERIC":
            return []
        if package not in self.entries:
            self.entries[package] = self._parse(package)
        return self.entries[package]


# ------------------------------------------------------------------------------------------ OSV
ECOSYSTEM_SCHEME = {"Debian": "deb", "Ubuntu": "deb", "Alpine": "apk", "Red Hat": "rpm", "Rocky Linux": "rpm",
                    "AlmaLinux": "rpm", "openSUSE": "rpm", "SUSE": "rpm", "Mageia": "rpm"}


class OsvFeed(Feed):
    """OSV records (https://ossf.github.io/osv-schema/), indexed by (ecosystem, package)."""

    kind = "osv"

    def __init__(self, path: Path, records: Iterable[dict[str, Any]]) -> None:
        super().__init__(path)
        self.index: dict[tuple[str, str], list[PackageVuln]] = defaultdict(list)
        self.ecosystems: set[str] = set()
        for rec in records:
            self._add(rec)

    def _add(self, rec: dict[str, Any]) -> None:
        if not isinstance(rec, dict) or "id" not in rec:
            raise FeedError("an OSV record has no 'id'", path=self.path)
        if rec.get("withdrawn"):
            return
        severity = _osv_severity(rec)
        for aff in rec.get("affected") or []:
            pkg = aff.get("package") or {}
            eco, name = str(pkg.get("ecosystem", "")), str(pkg.get("name", ""))
            scheme = ECOSYSTEM_SCHEME.get(eco.split(":")[0])
            if not scheme or not name:
                continue
            self.ecosystems.add(eco)
            ranges: list[Range] = []
            for rng in aff.get("ranges") or []:
                if rng.get("type") != "ECOSYSTEM":
                    continue
                ranges.extend(_osv_ranges(rng.get("events") or [], rec["id"], self.path))
            versions = tuple(str(v) for v in aff.get("versions") or [])
            if not ranges and not versions:
                continue
            self.index[(eco, name)].append(PackageVuln(
                id=rec["id"], package=name, ecosystem=scheme, ranges=tuple(ranges), versions=versions,
                severity=severity, aliases=tuple(rec.get("aliases") or ()), summary=str(rec.get("summary", ""))[:300],
                feed=str(self.path)))

    def has_package(self, package: str) -> bool:
        return any(name == package for _, name in self.index)

    def releases(self) -> set[str]:
        return set(self.ecosystems)

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        out: list[PackageVuln] = []
        for eco in release.osv_ecosystems():
            out.extend(self.index.get((eco, package), []))
        return out


def _osv_ranges(events: list[dict[str, Any]], rid: str, path: Path) -> Iterator[Range]:
    introduced: str | None = None
    for ev in events:
        if "introduced" in ev:
            if introduced is not None:
                yield Range(introduced, None)
            introduced = str(ev["introduced"])
        elif "fixed" in ev or "last_affected" in ev or "limit" in ev:
            if introduced is None:
                raise FeedError(f"OSV record {rid}: a range closes before it opens", path=path)
            if "fixed" in ev:
                yield Range(introduced, str(ev["fixed"]))
            elif "last_affected" in ev:
                yield Range(introduced, None, str(ev["last_affected"]))
            else:  # limit: affected below it (used for branches)
                yield Range(introduced, str(ev["limit"]))
            introduced = None
    if introduced is not None:
        yield Range(introduced, None)


def _osv_severity(rec: dict[str, Any]) -> str:
    spec = rec.get("database_specific") or {}
    for key in ("severity", "urgency"):
        value = str(spec.get(key, "")).lower()
        if value in URGENCY_SEVERITY:
            return URGENCY_SEVERITY[value]
        if value in ("moderate",):
            return "medium"
    for aff in rec.get("affected") or []:
        value = str((aff.get("ecosystem_specific") or {}).get("urgency", "")).lower()
        if value in URGENCY_SEVERITY:
            return URGENCY_SEVERITY[value]
    return ""


# ------------------------------------------------------------------------------------------ Alpine secdb
class AlpineSecdbFeed(Feed):
    """``secdb.alpinelinux.org/v3.xx/main.json``: fixed versions only ("0" = listed but not affected)."""

    kind = "alpine-secdb"

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        super().__init__(path)
        self.distroversion = str(data.get("distroversion", ""))
        self.entries: dict[str, list[PackageVuln]] = defaultdict(list)
        for item in data.get("packages") or []:
            pkg = (item or {}).get("pkg") or {}
            name = pkg.get("name")
            if not name:
                raise FeedError("an Alpine secdb package has no name", path=path)
            for fixed, cves in (pkg.get("secfixes") or {}).items():
                if str(fixed) == "0":
                    continue
                for cve in cves or []:
                    cve_id = str(cve).split()[0]
                    self.entries[name].append(PackageVuln(cve_id, name, "apk", (Range("0", str(fixed)),),
                                                          feed=str(path)))

    def has_package(self, package: str) -> bool:
        return package in self.entries

    def releases(self) -> set[str]:
        return {self.distroversion}

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        ecos = release.osv_ecosystems()
        if self.distroversion and ecos and f"Alpine:{self.distroversion}" not in ecos:
            return []
        return self.entries.get(package, [])


# ------------------------------------------------------------------------------------------ kernel CNA
class KernelFeed(Feed):
    kind = "kernel-cna"

    def __init__(self, path: Path, records: list[KernelRecord]) -> None:
        super().__init__(path)
        self.kernel_records = records


def _kernel_record(doc: dict[str, Any], source: str) -> KernelRecord:
    try:
        meta = doc["cveMetadata"]
        cna = doc["containers"]["cna"]
        files = sorted({f for a in cna.get("affected", []) for f in a.get("programFiles", [])})
        desc = next((d.get("value", "") for d in cna.get("descriptions", []) if d.get("lang", "en").startswith("en")),
                    "")
        return KernelRecord(meta["cveId"], str(cna.get("title", "")), files, list(cna.get("affected", [])), source,
                            desc[:500])
    except (KeyError, TypeError, AttributeError):
        raise FeedError("not a CVE JSON 5 record (cveMetadata/containers.cna missing)", path=source) from None


def _is_kernel_record(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("dataType") == "CVE_RECORD"


# ------------------------------------------------------------------------------------------ loading
def load_feed(path: str | Path) -> Feed:
    """Load one feed file or directory; the format is recognised from the content."""
    p = Path(path)
    if p.is_dir():
        return _load_dir(p)
    if not p.is_file():
        raise FeedError("no such feed file or directory", path=p)
    index = _index_path(p) if p.stat().st_size >= INDEX_MIN_BYTES else None
    if index is not None and index.is_file():
        return IndexedTrackerFeed(p, index)
    raw = p.read_bytes()
    if raw[:2] == b"PK":
        return _load_zip(p)
    if raw[:1] == b"\x78":  # zlib stream: debsecan
        try:
            text = zlib.decompress(raw).decode("utf-8")
        except (zlib.error, UnicodeDecodeError) as exc:
            raise FeedError(f"corrupt debsecan feed (zlib): {exc}", path=p) from None
        return DebsecanFeed(p, text)
    if raw.startswith(b"VERSION 1\n"):
        return DebsecanFeed(p, raw.decode("utf-8", "replace"))
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"not a recognised feed: invalid JSON ({exc})", path=p,
                        hint="expected Debian tracker JSON, OSV, Alpine secdb, CVE JSON 5 or a debsecan feed") \
            from None
    feed = _from_json(p, doc)
    if index is not None and isinstance(feed, DebianTrackerFeed):
        _write_index(feed, index)
    return feed


def _from_json(p: Path, doc: Any) -> Feed:
    if _is_kernel_record(doc):
        return KernelFeed(p, [_kernel_record(doc, str(p))])
    if isinstance(doc, dict) and "packages" in doc and ("distroversion" in doc or "reponame" in doc):
        return AlpineSecdbFeed(p, doc)
    if isinstance(doc, dict) and "id" in doc and ("affected" in doc or "modified" in doc):
        return OsvFeed(p, [doc])
    if isinstance(doc, list) and all(isinstance(r, dict) and "id" in r for r in doc):
        return OsvFeed(p, doc)
    if isinstance(doc, dict) and doc and _looks_like_tracker(doc):
        return DebianTrackerFeed(p, doc)
    raise FeedError("not a recognised feed", path=p,
                    hint="expected Debian tracker JSON, OSV, Alpine secdb, CVE JSON 5 or a debsecan feed")


def _looks_like_tracker(doc: dict[str, Any]) -> bool:
    """{source: {CVE-or-TEMP-id: {"releases": {...}}}} checked on a sample (the full file has 40k sources)."""
    sample = [v for v in list(doc.values())[:50]]
    if not all(isinstance(v, dict) for v in sample):
        return False
    recs = [r for v in sample for r in list(v.values())[:3]]
    return bool(recs) and all(isinstance(r, dict) and ("releases" in r or not r) for r in recs)


def _load_zip(p: Path) -> Feed:
    records: list[dict[str, Any]] = []
    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".json") and not info.is_dir():
                    records.append(json.loads(zf.read(info)))
    except (zipfile.BadZipFile, ValueError, UnicodeDecodeError) as exc:
        raise FeedError(f"corrupt OSV zip: {exc}", path=p) from None
    if records and all(_is_kernel_record(r) for r in records):
        return KernelFeed(p, [_kernel_record(r, f"{p}:{r.get('cveMetadata', {}).get('cveId')}") for r in records])
    return OsvFeed(p, records)


def _load_dir(p: Path) -> Feed:
    files = sorted(f for f in p.rglob("*") if f.is_file())
    if not files:
        raise FeedError("empty feed directory", path=p)
    jsons = [f for f in files if f.suffix == ".json"]
    if not jsons:
        # debsecan layout: one file per suite (e.g. feeds/debsecan/bookworm)
        feeds = [load_feed(f) for f in files]
        if len(feeds) == 1:
            return feeds[0]
        return MultiFeed(p, feeds)
    docs = []
    for f in jsons:
        try:
            docs.append((f, json.loads(f.read_bytes())))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FeedError(f"invalid JSON ({exc})", path=f) from None
    if all(_is_kernel_record(d) for _, d in docs):
        return KernelFeed(p, [_kernel_record(d, str(f)) for f, d in docs])
    if all(isinstance(d, dict) and "id" in d and not _is_kernel_record(d) for _, d in docs):
        return OsvFeed(p, [d for _, d in docs])
    return MultiFeed(p, [_from_json(f, d) for f, d in docs])


class MultiFeed(Feed):
    """Several feeds given as one directory."""

    kind = "multi"

    def __init__(self, path: Path, feeds: list[Feed]) -> None:
        super().__init__(path)
        self.feeds = feeds
        self.kernel_records = [r for f in feeds for r in f.kernel_records]

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        return [v for f in self.feeds for v in f.lookup(package, release)]

    def has_package(self, package: str) -> bool:
        return any(f.has_package(package) for f in self.feeds)

    def releases(self) -> set[str]:
        return {r for f in self.feeds for r in f.releases()}


@dataclass
class FeedSet:
    """All feeds of a scan."""

    feeds: list[Feed] = field(default_factory=list)

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> FeedSet:
        feeds = [load_feed(p) for p in paths]
        if not feeds:
            raise FeedError("no vulnerability feed given (--feed FILE)")
        return cls(feeds)

    @property
    def kernel_records(self) -> list[KernelRecord]:
        return [r for f in self.feeds for r in f.kernel_records]

    def lookup(self, package: str, release: Release) -> list[PackageVuln]:
        return [v for f in self.feeds for v in f.lookup(package, release)]

    def has_package(self, package: str) -> bool:
        return any(f.has_package(package) for f in self.feeds)
