"""Kata advisories in OSV form: load a feed, decide whether a release is affected, and say why.

The trap this module exists for: GitHub and the Go vulnerability database publish Kata ranges as Go
*pseudo-versions* (``fixed: 0.0.0-20260219090056-6a672503973b``) because Kata tags (``3.27.0``) are not Go
module versions. Semver sorts ``3.2.0`` *after* ``0.0.0-2026...``, so a naive range check says "not affected"
for every release. Such ranges are therefore never compared with a release number; the decision comes from
an explicit ``affected[].versions`` enumeration (OSV's recommended form, which the shipped feed carries on a
``GIT`` entry), from ``database_specific.x_kata_harness.first_release_with_fix`` (Kata is a rolling release:
every release below the first fixed one is affected), or from ``SEMVER``/``ECOSYSTEM`` ranges whose bounds
are real release numbers (the 1.x records). A record with none of these cannot be decided and says so.

The same module reads GitHub releases Atom feeds (``releases.atom``) for announcement monitoring.
"""

from __future__ import annotations

import html
import io
import json
import re
import subprocess
import tomllib
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import total_ordering
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pytest_kata.bundle import Bundle
from pytest_kata.errors import FeedError, KataError
from pytest_kata.images.read import open_image
from pytest_kata.resources import data_path

DEFAULT_FEED = data_path("advisories", "kata-osv.json")
KATA_REPO = "https://github.com/kata-containers/kata-containers"
RELEASES_ATOM = KATA_REPO + "/releases.atom"
PSEUDO_VERSION = re.compile(r"\d{14}-[0-9a-f]{12}$")
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)
_MAX_FEED_BYTES = 256 << 20

# ---------------------------------------------------------------------------------------------------------
# versions


@total_ordering
@dataclass(frozen=True)
class ReleaseVersion:
    """A Kata release number (``3.27.0``, ``v1.11.0``, ``3.0.0-rc1``) ordered by SemVer 2.0 precedence."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    text: str = ""

    _RE = re.compile(r"^v?(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

    @classmethod
    def parse(cls, text: str) -> ReleaseVersion | None:
        m = cls._RE.match(str(text).strip())
        if not m:
            return None
        pre = tuple(m.group(4).split(".")) if m.group(4) else ()
        return cls(int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), pre, str(text).strip())

    def _key(self) -> tuple[Any, ...]:
        # no pre-release sorts above any pre-release; numeric identifiers sort below alphanumeric ones
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, ReleaseVersion):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ReleaseVersion) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        core = f"{self.major}.{self.minor}.{self.patch}"
        return core + ("-" + ".".join(self.prerelease) if self.prerelease else "")

    @property
    def is_prerelease(self) -> bool:
        return bool(self.prerelease)


def is_pseudo_version(text: str) -> bool:
    """A Go pseudo-version (``0.0.0-20260219090056-6a672503973b``): a commit, not a release number."""
    return bool(PSEUDO_VERSION.search(str(text)))


def normalise_release(version: str) -> str:
    """``v3.2.0`` -> ``3.2.0``; other text is returned stripped (and then fails to parse, loudly)."""
    text = str(version).strip()
    return text[1:] if text[:1] in "vV" and text[1:2].isdigit() else text


def full_release_problem(version: str) -> str | None:
    """Why ``version`` is no full release number (X.Y.Z, optionally -pre), or None: a partial one like ``4.1``
    names a series whose releases differ in the advisories that affect them."""
    text = normalise_release(version)
    release = ReleaseVersion.parse(text)
    if release is None:
        return "is not a Kata release number"
    if text.split("-", 1)[0].count(".") != 2:
        return f"is not a full release number: it names the {text} series, whose releases are affected differently"
    return None


# ---------------------------------------------------------------------------------------------------------
# records


SEVERITY_LABELS = {"none": "info", "info": "info", "informational": "info", "negligible": "info",
                   "unimportant": "info", "low": "low", "moderate": "medium", "medium": "medium",
                   "high": "high", "important": "high", "critical": "critical"}
UNKNOWN_SEVERITY = "high"  # a record that states none must not slip under the default --kata-fail-on


@dataclass
class Advisory:
    """One OSV record, with the fields the gate needs lifted out and the raw record kept."""

    id: str
    summary: str
    aliases: list[str]
    severity: str  # info / low / medium / high / critical
    severity_source: str
    cvss_score: float | None
    published: str | None
    modified: str | None
    affected: list[dict[str, Any]]
    references: list[str]
    source: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def __repr__(self) -> str:  # short: it is the allure parameter of each advisory item
        return f"Advisory({self.id!r})"

    @property
    def title(self) -> str:
        return self.summary or self.id

    @property
    def url(self) -> str | None:
        if self.id.startswith("GHSA-"):
            return f"https://github.com/advisories/{self.id}"
        return self.references[0] if self.references else None

    @property
    def first_release_with_fix(self) -> str | None:
        for entry in self.affected:
            fixed = _harness(entry).get("first_release_with_fix")
            if fixed:
                return str(fixed)
        fixed = _harness(self.raw).get("first_release_with_fix")
        return str(fixed) if fixed else None

    @property
    def fixed_in(self) -> str | None:
        """The first fixed release, or every release-number ``fixed`` bound of the ranges (1.x records)."""
        if self.first_release_with_fix:
            return self.first_release_with_fix
        bounds = {next(iter(e.values())) for entry in self.affected for rng in entry.get("ranges") or []
                  if rng.get("type") != "GIT" for e in rng["events"] if "fixed" in e}
        parsed = (ReleaseVersion.parse(b) for b in bounds if not is_pseudo_version(b))
        releases = sorted(v for v in parsed if v)
        return ", ".join(str(v) for v in releases) or None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "summary": self.summary, "aliases": self.aliases, "severity": self.severity,
                "severity_source": self.severity_source, "cvss_score": self.cvss_score,
                "published": self.published, "modified": self.modified, "url": self.url,
                "first_release_with_fix": self.first_release_with_fix, "fixed_in": self.fixed_in,
                "source": self.source}


def _harness(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj.get("database_specific")
    inner = spec.get("x_kata_harness") if isinstance(spec, dict) else None
    return inner if isinstance(inner, dict) else {}


def _score_band(score: float) -> str:
    if score <= 0:
        return "info"
    if score < 4:
        return "low"
    if score < 7:
        return "medium"
    if score < 9:
        return "high"
    return "critical"


def _cvss_score(vector: str) -> float | None:
    """Base score of a CVSS v3/v4 vector (the ``cvss`` library); None when it cannot be read."""
    try:
        from cvss import CVSS3, CVSS4

        if vector.startswith("CVSS:4"):
            return float(CVSS4(vector).base_score)
        if vector.startswith("CVSS:3"):
            return float(CVSS3(vector).base_score)
    except Exception:
        return None
    try:
        return float(vector)  # some feeds put the number itself in "score"
    except ValueError:
        return None


def _severity(record: dict[str, Any]) -> tuple[str, str, float | None]:
    """(normalised severity, where it came from, CVSS base score) following the monitor's policy:
    the GitHub DB label first, then our recorded labels, then the CVSS vector, then a conservative default."""
    score: float | None = None
    for entry in record.get("severity") or []:
        if isinstance(entry, dict) and isinstance(entry.get("score"), str):
            score = _cvss_score(entry["score"])
            if score is not None:
                score_source = f"{entry.get('type', 'CVSS')} {entry['score']} -> base score {score:g}"
                break
    if score is None and isinstance(_harness(record).get("cvss_v4_base_score_computed"), int | float):
        score = float(_harness(record)["cvss_v4_base_score_computed"])
        score_source = f"database_specific.x_kata_harness.cvss_v4_base_score_computed {score:g}"
    spec = record.get("database_specific")
    label = spec.get("severity") if isinstance(spec, dict) else None
    if isinstance(label, str) and label.strip().lower() in SEVERITY_LABELS:
        return SEVERITY_LABELS[label.strip().lower()], f"database_specific.severity {label}", score
    for key in ("github_severity_label", "kata_severity_label"):
        label = _harness(record).get(key)
        if isinstance(label, str) and label.strip().lower() in SEVERITY_LABELS:
            return (SEVERITY_LABELS[label.strip().lower()], f"database_specific.x_kata_harness.{key} {label}",
                    score)
    if score is not None:
        return _score_band(score), score_source, score
    for entry in record.get("severity") or []:  # e.g. {"type": "Ubuntu", "score": "medium"}
        text = str(entry.get("score", "")).strip().lower() if isinstance(entry, dict) else ""
        if text in SEVERITY_LABELS:
            return SEVERITY_LABELS[text], f"severity[].score {text}", None
    return UNKNOWN_SEVERITY, f"not stated in the record: treated as {UNKNOWN_SEVERITY} so it blocks", None


def _check_schema(record: Any, where: str) -> None:
    """The parts of OSV 1.x the gate relies on; anything else is passed through untouched."""
    if not isinstance(record, dict):
        raise FeedError(f"{where}: expected an OSV record (a JSON object), got {type(record).__name__}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise FeedError(f"{where}: OSV record without a string 'id' (is this an OSV file?)")
    where = f"{where} ({record['id']})"
    affected = record.get("affected", [])
    if not isinstance(affected, list):
        raise FeedError(f"{where}: 'affected' must be a list")
    for i, entry in enumerate(affected):
        if not isinstance(entry, dict):
            raise FeedError(f"{where}: affected[{i}] must be an object")
        versions = entry.get("versions", [])
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            raise FeedError(f"{where}: affected[{i}].versions must be a list of strings")
        ranges = entry.get("ranges", [])
        if not isinstance(ranges, list):
            raise FeedError(f"{where}: affected[{i}].ranges must be a list")
        for j, rng in enumerate(ranges):
            if not isinstance(rng, dict) or rng.get("type") not in ("SEMVER", "ECOSYSTEM", "GIT"):
                raise FeedError(f"{where}: affected[{i}].ranges[{j}].type must be SEMVER, ECOSYSTEM or GIT")
            events = rng.get("events")
            if not isinstance(events, list) or not events:
                raise FeedError(f"{where}: affected[{i}].ranges[{j}].events must be a non-empty list")
            for k, event in enumerate(events):
                if (not isinstance(event, dict) or len(event) != 1
                        or next(iter(event)) not in ("introduced", "fixed", "last_affected", "limit")
                        or not isinstance(next(iter(event.values())), str)):
                    raise FeedError(f"{where}: affected[{i}].ranges[{j}].events[{k}] must be one of "
                                    "{introduced|fixed|last_affected|limit: \"version\"}")
    for key in ("aliases", "references", "severity"):
        if key in record and not isinstance(record[key], list):
            raise FeedError(f"{where}: '{key}' must be a list")


def advisory_from_record(record: dict[str, Any], source: str = "") -> Advisory:
    """An :class:`Advisory` from one OSV record already checked by :func:`_check_schema`."""
    return _to_advisory(record, source)


def _to_advisory(record: dict[str, Any], source: str) -> Advisory:
    severity, severity_source, score = _severity(record)
    refs = [r["url"] for r in record.get("references") or []
            if isinstance(r, dict) and isinstance(r.get("url"), str)]
    return Advisory(id=record["id"], summary=str(record.get("summary") or "").strip(),
                    aliases=[str(a) for a in record.get("aliases") or []], severity=severity,
                    severity_source=severity_source, cvss_score=score, published=record.get("published"),
                    modified=record.get("modified"), affected=list(record.get("affected") or []),
                    references=refs, source=source, raw=record)


# ---------------------------------------------------------------------------------------------------------
# loading


def _is_url(text: str) -> bool:
    return bool(_URL.match(text))


def fetch(url: str, *, timeout: float = 30.0) -> bytes:
    """GET a feed (OSV JSON, a zip dump, or an Atom feed); one-line FeedError when it cannot be had."""
    request = urllib.request.Request(url, headers={"User-Agent": "pytest-kata advisory monitor"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(_MAX_FEED_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise FeedError(f"cannot fetch: {getattr(exc, 'reason', exc)}", path=url) from None
    if len(data) > _MAX_FEED_BYTES:
        raise FeedError(f"larger than {_MAX_FEED_BYTES >> 20} MiB", path=url)
    return data


def _records_from_bytes(data: bytes, where: str) -> list[Any]:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FeedError(f"malformed JSON: {exc}", path=where) from None
    if isinstance(doc, dict) and isinstance(doc.get("vulns"), list):  # an osv.dev query response
        return list(doc["vulns"])
    if isinstance(doc, dict):
        return [doc]
    if isinstance(doc, list):
        return doc
    raise FeedError("expected an OSV record or a JSON array of them", path=where)


def _mentions_kata(data: bytes) -> bool:
    return b"kata-containers" in data.lower()


def _iter_source(source: str) -> Iterator[tuple[str, list[Any]]]:
    """(where, records) per file of one feed source: a file, a .zip dump, a directory tree or a URL.

    In directories and zips (e.g. a GitHub advisory-database checkout with 100k+ files) only records that
    mention kata-containers are read; a single file is read whole.
    """
    if _is_url(source):
        data = fetch(source)
        if data[:2] == b"PK":
            yield from _iter_zip(data, source)
        else:
            yield source, _records_from_bytes(data, source)
        return
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.json") if p.is_file())
        if not files:
            raise FeedError("no .json advisory files in this directory", path=path)
        for file in files:
            data = _read_file(file)
            if _mentions_kata(data):
                yield str(file), _records_from_bytes(data, str(file))
        return
    data = _read_file(path)
    if path.suffix == ".zip":
        yield from _iter_zip(data, str(path))
    else:
        yield str(path), _records_from_bytes(data, str(path))


def _iter_zip(data: bytes, where: str) -> Iterator[tuple[str, list[Any]]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        for info in archive.infolist():
            if info.filename.endswith(".json") and info.file_size <= _MAX_FEED_BYTES:
                body = archive.read(info)
                if _mentions_kata(body):
                    yield f"{where}!{info.filename}", _records_from_bytes(body, f"{where}!{info.filename}")
    except zipfile.BadZipFile as exc:
        raise FeedError(f"not a readable zip: {exc}", path=where) from None


def _read_file(path: Path) -> bytes:
    try:
        if path.stat().st_size > _MAX_FEED_BYTES:
            raise FeedError(f"larger than {_MAX_FEED_BYTES >> 20} MiB", path=path)
        return path.read_bytes()
    except FileNotFoundError:
        raise FeedError("no such advisory feed file or directory", path=path) from None
    except IsADirectoryError:
        raise FeedError("is a directory", path=path) from None
    except OSError as exc:
        raise FeedError(f"cannot read: {exc.strerror or exc}", path=path) from None


def load_feed(paths: Sequence[str | Path] | str | Path | None = None) -> list[Advisory]:
    """Every advisory in the given feeds (None: the feed shipped with pytest-kata), sorted by id.

    Withdrawn records are dropped; a record present in several feeds is kept once (newest ``modified``).
    """
    if paths is None or paths == [] or paths == ():
        paths = [DEFAULT_FEED]
    elif isinstance(paths, str | Path):
        paths = [paths]
    by_id: dict[str, Advisory] = {}
    for source in paths:
        for where, records in _iter_source(str(source)):
            for index, record in enumerate(records):
                _check_schema(record, f"{where}: record {index}")
                if record.get("withdrawn"):
                    continue
                advisory = _to_advisory(record, where)
                known = by_id.get(advisory.id)
                if known is None or (advisory.modified or "") > (known.modified or ""):
                    by_id[advisory.id] = advisory
    return sorted(by_id.values(), key=lambda a: (a.published or "", a.id), reverse=True)


def merge_records(known: dict[str, Any], incoming: dict[str, Any]) -> dict[str, Any]:
    """One record from a known and a newer copy: the newer wins, but keeps the known copy's explicit
    ``affected[].versions`` enumerations and harness data (scope, first fixed release) that it lacks, because
    upstream GHSA/Go records carry only pseudo-version ranges, which cannot decide a release."""
    if (incoming.get("modified") or "") < (known.get("modified") or ""):
        incoming, known = known, incoming
    merged = json.loads(json.dumps(incoming))
    if not any(e.get("versions") for e in merged.get("affected") or []):
        merged.setdefault("affected", []).extend(json.loads(json.dumps(e)) for e in known.get("affected") or []
                                                 if e.get("versions"))
    known_harness = _harness(known)
    if known_harness:
        spec = merged.setdefault("database_specific", {})
        if isinstance(spec, dict):
            harness = spec.setdefault("x_kata_harness", {})
            for key, value in known_harness.items():
                harness.setdefault(key, value)
    return merged


def merge_feed(existing: Sequence[dict[str, Any]], incoming: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The existing feed with incoming records added or merged in (see :func:`merge_records`), by id."""
    by_id = {r["id"]: r for r in existing}
    for record in incoming:
        by_id[record["id"]] = merge_records(by_id[record["id"]], record) if record["id"] in by_id else record
    return [by_id[i] for i in sorted(by_id)]


# ---------------------------------------------------------------------------------------------------------
# decisions


@dataclass
class Decision:
    """Whether one advisory affects one release, the evidence that decided, and the fixed release."""

    advisory: Advisory
    affected: bool
    evidence: str
    fixed: str | None
    version: str = ""
    undecided: bool = False  # no usable evidence: neither an enumeration nor a release-number range
    notes: list[str] = field(default_factory=list)  # evidence considered but not used (pseudo-versions, GIT)
    applicable: bool = True  # False: the candidate does not ship or enable what the advisory is about
    backported: str | None = None  # the vendor backport that makes an affected base release not affected

    @property
    def status(self) -> str:
        if not self.applicable:
            return "notapplicable"
        return "undecided" if self.undecided else ("affected" if self.affected else "not-affected")

    def to_json(self) -> dict[str, Any]:
        return {**self.advisory.to_json(), "version": self.version, "status": self.status,
                "affected": self.affected, "decided_by": self.evidence, "fixed": self.fixed,
                "notes": self.notes, "backported": self.backported}


def _entry_kind(entry: dict[str, Any]) -> str:
    package = entry.get("package") if isinstance(entry.get("package"), dict) else None
    if package:
        return f"{package.get('ecosystem', '?')} {package.get('name', '?')}"
    kinds = {r.get("type") for r in entry.get("ranges") or []}
    return "GIT entry" if "GIT" in kinds else "entry without package"


def _intervals(events: list[dict[str, str]]) -> list[tuple[ReleaseVersion | None, str, str | None]]:
    """Turn OSV events into (introduced, closing kind, closing value) intervals, in version order."""
    def key(event: dict[str, str]) -> tuple[int, Any]:
        value = next(iter(event.values()))
        parsed = ReleaseVersion.parse(value)
        return (0, ()) if value == "0" else (1, parsed._key() if parsed else ())

    out: list[tuple[ReleaseVersion | None, str, str | None]] = []
    start: ReleaseVersion | str | None = "none"
    for event in sorted(events, key=key):
        kind, value = next(iter(event.items()))
        if kind == "introduced":
            start = None if value == "0" else ReleaseVersion.parse(value)
        elif kind in ("fixed", "last_affected", "limit") and start != "none":
            out.append((start, kind, value))  # type: ignore[arg-type]
            start = "none"
    if start != "none":
        out.append((start, "open", None))  # type: ignore[arg-type]
    return out


def _check_range(version: ReleaseVersion, rng: dict[str, Any],
                 name: str) -> tuple[bool | None, str, str | None]:
    """(affected or None when not comparable, evidence text, fixed release)."""
    events: list[dict[str, str]] = rng["events"]
    values = [next(iter(e.values())) for e in events]
    pseudo = [v for v in values if is_pseudo_version(v)]
    label = f"{rng['type']} range on {name}"
    if rng["type"] == "GIT":
        return None, f"{label}: commit range, not comparable with a release number", None
    if pseudo:
        return None, (f"{label} uses Go pseudo-version {pseudo[0]}: a commit, never compared with a release "
                      "number (semver would put every release after it)"), None
    if any(v != "0" and ReleaseVersion.parse(v) is None for v in values):
        return None, f"{label}: bounds {values} are not release numbers", None
    text = " ".join(f"{next(iter(e))} {next(iter(e.values()))}" for e in events)
    for start, kind, end in _intervals(events):
        if start is not None and version < start:
            continue
        end_version = ReleaseVersion.parse(end) if end else None
        inside = (end_version is None or (version <= end_version if kind == "last_affected" else
                                          version < end_version))
        if inside:
            fixed = end if kind == "fixed" else None
            return True, f"{version.text} inside {label}: {text}", fixed
    return False, f"{version.text} outside {label}: {text}", None


def decide(advisory: Advisory, version: str) -> Decision:
    """OSV's IsVulnerable for a Kata release number, minus the pseudo-version trap, with its evidence."""
    release = ReleaseVersion.parse(normalise_release(version))
    if release is None:
        raise FeedError(f"{version!r} is not a Kata release number (expected X.Y.Z, e.g. 3.27.0)")
    wanted = str(release)
    notes: list[str] = []
    not_affected: list[str] = []
    fixed_hint = advisory.first_release_with_fix
    for index, entry in enumerate(advisory.affected):
        name, kind = f"affected[{index}]", _entry_kind(entry)
        listed = [normalise_release(v) for v in entry.get("versions") or []]
        if listed:
            if wanted in listed or version.strip() in entry.get("versions", []):
                fixed = _harness(entry).get("first_release_with_fix") or fixed_hint
                return Decision(advisory, True, f"{wanted} listed in {name}.versions ({kind})", fixed, wanted,
                                notes=notes)
            not_affected.append(f"{wanted} not in {name}.versions ({kind}: {len(listed)} releases, "
                                f"{listed[0]} .. {listed[-1]})")
        for rng in entry.get("ranges") or []:
            affected, text, fixed = _check_range(release, rng, f"{name} ({kind})")
            if affected is None:
                notes.append(text)
            elif affected:
                return Decision(advisory, True, text, fixed or fixed_hint, wanted, notes=notes)
            else:
                not_affected.append(text)
    first_fixed = ReleaseVersion.parse(fixed_hint) if fixed_hint else None
    if first_fixed is not None and release < first_fixed:
        # an unlisted release (e.g. a patch release cut after the enumeration) below the first fix:
        # Kata is a rolling release with no backports, so it cannot contain the fix
        return Decision(advisory, True, f"{wanted} below first_release_with_fix {fixed_hint} (rolling "
                        "release: no backport branches)", fixed_hint, wanted, notes=notes + not_affected)
    if not_affected:
        return Decision(advisory, False, "; ".join(not_affected), fixed_hint, wanted, notes=notes)
    return Decision(advisory, False, "cannot decide: no affected[].versions list and no range on release "
                    "numbers"
                    + (f" ({notes[0]})" if notes else "") + "; refresh the feed with versions enumerated "
                    "(pytest-kata advisories refresh)", fixed_hint, wanted, undecided=True, notes=notes)


def check_version(advisories: Iterable[Advisory], version: str) -> list[Decision]:
    """One decision per advisory for the release ``version``."""
    return [decide(a, version) for a in advisories]


# ---------------------------------------------------------------------------------------------------------
# scope: which component and mode an advisory is about, and what the candidate deploys


# runtime-rs (and Dragonball inside it) first shipped in 3.0.0 (inferred from tags: src/runtime-rs is absent
# from every 1.x and 2.x tag); a release below it cannot be affected by a runtime-rs-only flaw
RUNTIME_FIRST_RELEASE = {"rs": "3.0.0"}
RUNTIME_NAMES = {"go": "the Go runtime", "rs": "runtime-rs"}
# Confidential Containers (a confidential guest, an agent policy, genpolicy) is absent from the last 1.x
# sources (kata-runtime and kata-agent 1.11.5: no confidential_guest, no policy engine), so no 1.x release
# has it. 2.0.0 is a lower bound, not the release that added it: only releases below it are narrowed.
COCO_FIRST_RELEASE = "2.0.0"


@dataclass(frozen=True)
class Scope:
    """What an advisory affects, from the record's component data (empty fields: not narrowed)."""

    runtimes: tuple[str, ...] = ()  # "go" / "rs"
    hypervisors: tuple[str, ...] = ()  # hypervisor table names: qemu, clh, dragonball, firecracker
    shared_fs: tuple[str, ...] = ()  # the flaw needs one of these shared filesystems (e.g. virtio-fs)
    coco_only: bool = False  # only where the host is untrusted (Confidential Containers)
    why: str = ""

    def describe(self) -> str:
        parts = []
        if self.runtimes:
            parts.append(" or ".join(RUNTIME_NAMES.get(r, r) for r in self.runtimes))
        if self.hypervisors:
            parts.append("hypervisor " + "/".join(self.hypervisors))
        if self.shared_fs:
            parts.append("shared_fs " + "/".join(self.shared_fs))
        if self.coco_only:
            parts.append("Confidential Containers configurations only")
        return ", ".join(parts) or "any deployment"


def scope_of(advisory: Advisory) -> Scope:
    """The ``x_kata_harness.scope`` of a record; a record without one affects any deployment."""
    raw = _harness(advisory.raw).get("scope")
    if not isinstance(raw, dict):
        return Scope()

    def names(key: str) -> tuple[str, ...]:
        value = raw.get(key) or []
        return tuple(str(v) for v in value) if isinstance(value, list) else (str(value),)

    return Scope(runtimes=names("runtimes"), hypervisors=names("hypervisors"), shared_fs=names("shared_fs"),
                 coco_only=bool(raw.get("coco_only")), why=str(raw.get("why") or ""))


def coco_mode(data: dict[str, Any]) -> str | None:
    """Why a configuration runs Confidential Containers (untrusted host), from its content; None if not."""
    tables = data.get("hypervisor")
    first: Any = next(iter(tables.values()), {}) if isinstance(tables, dict) and tables else {}
    hv: dict[str, Any] = first if isinstance(first, dict) else {}
    if hv.get("confidential_guest") is True:
        return "confidential_guest = true"
    if "cc_init_data" in (hv.get("enable_annotations") or []):
        return "the cc_init_data (initdata) annotation is enabled"
    runtime = data.get("runtime")
    if isinstance(runtime, dict) and runtime.get("emptydir_mode") == "block-encrypted":
        return "emptydir_mode = block-encrypted"
    return None


@dataclass(frozen=True)
class DeployedConfig:
    """One configuration the candidate ships, reduced to what advisory scoping needs."""

    file: str
    runtime: str  # "go" / "rs"
    hypervisor: str | None
    shared_fs: str | None
    coco: str | None

    @classmethod
    def from_config(cls, config: Any, file: str | None = None) -> DeployedConfig:
        """From a :class:`pytest_kata.kataconfig.KataConfig` (drop-ins merged)."""
        data = config.data
        hv_name = config.hypervisor
        hv = data.get("hypervisor", {}).get(hv_name, {}) if hv_name else {}
        shared = hv.get("shared_fs") if isinstance(hv, dict) else None
        if shared is None and hv_name in ("qemu", "clh"):
            shared = "virtio-fs"  # both runtimes' default for an absent key with these hypervisors
        return cls(file or config.name, "rs" if config.runtime_rs else "go", hv_name,
                   str(shared) if shared else None, coco_mode(data))

    def matches(self, scope: Scope) -> bool:
        return ((not scope.runtimes or self.runtime in scope.runtimes)
                and (not scope.hypervisors or self.hypervisor in scope.hypervisors)
                and (not scope.shared_fs or self.shared_fs in scope.shared_fs)
                and (not scope.coco_only or self.coco is not None))


@dataclass
class Deployment:
    """The configurations a candidate ships (the ones this run judges)."""

    configs: list[DeployedConfig]

    @classmethod
    def from_bundle(cls, bundle: Bundle, shim: str | None = None) -> Deployment | None:
        """Every shipped configuration, or the one ``shim`` names; None when the bundle ships none."""
        shims = bundle.selected_shims(shim)
        configs = []
        for info in sorted(shims, key=lambda s: s.name):
            try:
                rel = info.config_path.relative_to(bundle.root).as_posix()
            except ValueError:
                rel = info.config_path.name
            configs.append(DeployedConfig.from_config(info.config, rel))
        return cls(configs) if configs else None


def applicability(advisory: Advisory, deployment: Deployment | None = None,
                  release: ReleaseVersion | None = None) -> tuple[bool, str]:
    """(applies, why): the advisory's scope against the component's first release and the deployment."""
    scope = scope_of(advisory)
    if scope.runtimes and release is not None:
        firsts = [ReleaseVersion.parse(RUNTIME_FIRST_RELEASE[r]) for r in scope.runtimes
                  if r in RUNTIME_FIRST_RELEASE]
        if len(firsts) == len(scope.runtimes) and all(f is not None and release < f for f in firsts):
            first = min(f for f in firsts if f is not None)
            return False, (f"{advisory.id} affects {scope.describe()}; "
                           f"{' and '.join(RUNTIME_NAMES[r] for r in scope.runtimes)} first shipped in {first}, "
                           f"so {release.text or release} does not have it")
    coco_first = ReleaseVersion.parse(COCO_FIRST_RELEASE)
    if scope.coco_only and release is not None and coco_first is not None and release < coco_first:
        why = f" ({scope.why})" if scope.why else ""
        return False, (f"{advisory.id} affects {scope.describe()}{why}; no 1.x release has Confidential "
                       f"Containers (no confidential guest, no agent policy before {COCO_FIRST_RELEASE}), so "
                       f"{release.text or release} cannot run the affected mode")
    if deployment is None:
        return True, f"affects {scope.describe()}" + ("" if not scope.runtimes and not scope.hypervisors
                                                      and not scope.shared_fs and not scope.coco_only
                                                      else "; the candidate ships no configuration to "
                                                      "narrow this by")
    hit = [c.file for c in deployment.configs if c.matches(scope)]
    if hit:
        return True, f"affects {scope.describe()}: shipped in {', '.join(hit)}"
    shipped = "; ".join(f"{c.file} ({RUNTIME_NAMES[c.runtime]}, {c.hypervisor or '?'}, shared_fs "
                        f"{c.shared_fs or 'none'}{', CoCo' if c.coco else ''})" for c in deployment.configs)
    why = f" ({scope.why})" if scope.why else ""
    return False, f"{advisory.id} affects {scope.describe()}{why}; none of the candidate's configurations is: " \
                  + shipped


# ---------------------------------------------------------------------------------------------------------
# builds that are not plain releases: commits (pseudo-versions, git describe) and vendor builds


GO_PSEUDO = re.compile(r"^v?(?P<base>\d+\.\d+\.\d+)(?:-[0-9A-Za-z.]+)?-(?:0\.)?(?P<time>\d{14})"
                       r"-(?P<hash>[0-9a-f]{12})$")
GIT_DESCRIBE = re.compile(r"^v?(?P<base>\d+\.\d+\.\d+(?:-(?:rc|alpha|beta)\d+)?)-(?P<ahead>\d+)"
                          r"-g(?P<hash>[0-9a-f]{7,40})(?:-dirty)?$")
VENDOR_BUILD = re.compile(r"^v?(?P<base>\d+\.\d+\.\d+)[.+~_](?P<vendor>[A-Za-z][0-9A-Za-z.+~_-]*)$")
COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


@dataclass(frozen=True)
class BuildVersion:
    """What identifies a candidate build: a release, a commit (with the tag it descends from), or a vendor
    build of a release."""

    text: str
    release: ReleaseVersion | None = None  # the release, or the upstream base of a vendor build / describe
    commit: str | None = None  # the build's commit (pseudo-version hash, describe hash, --kata-commit)
    vendor: str | None = None  # ``kata2`` of ``3.19.1.kata2``
    kind: str = "release"  # release / pseudo-version / git-describe / commit / vendor

    @classmethod
    def parse(cls, text: str, commit: str | None = None) -> BuildVersion | None:
        """``3.27.0``, ``0.0.0-20260219090056-6a672503973b``, ``3.26.0-15-g6a672503``, ``3.19.1.kata2``;
        with ``commit`` (``--kata-commit``) the commit decides whatever the version says."""
        text = str(text or "").strip()
        if commit:
            if not COMMIT.match(commit.strip().lower()):
                raise FeedError(f"{commit!r} is not a commit id (7 to 40 hex digits)")
            base = ReleaseVersion.parse(normalise_release(text)) if text else None
            return cls(text or commit, base, commit.strip().lower(), kind="commit")
        m = GO_PSEUDO.match(text)
        if m:
            base = ReleaseVersion.parse(m["base"])
            return cls(text, None if base == ReleaseVersion(0, 0, 0) else base, m["hash"], kind="pseudo-version")
        m = GIT_DESCRIBE.match(text)
        if m:
            return cls(text, ReleaseVersion.parse(m["base"]), m["hash"], kind="git-describe")
        m = VENDOR_BUILD.match(text)
        if m:
            return cls(text, ReleaseVersion.parse(m["base"]), vendor=m["vendor"], kind="vendor")
        release = ReleaseVersion.parse(normalise_release(text))
        return cls(text, release) if release else None


def fix_commits(advisory: Advisory) -> list[str]:
    """The commits that fix an advisory: GIT ranges' ``fixed`` and the hashes of pseudo-version bounds."""
    out: list[str] = []
    for entry in advisory.affected:
        for rng in entry.get("ranges") or []:
            for event in rng["events"]:
                value = event.get("fixed")
                if not value:
                    continue
                if rng["type"] == "GIT" and COMMIT.match(value.lower()):
                    out.append(value.lower())
                elif is_pseudo_version(value):
                    out.append(value[-12:])
    return list(dict.fromkeys(out))


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FeedError(f"git failed: {exc}", path=repo) from None


def resolve_commit(repo: Path, commit: str) -> str | None:
    """The full id of ``commit`` in ``repo`` (None when the repository does not have it)."""
    proc = _git(repo, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def contains_commit(repo: Path, build: str, fix: str) -> bool | None:
    """Whether ``fix`` is an ancestor of (or is) ``build`` in ``repo``; None when ``fix`` is not there."""
    full_fix = resolve_commit(repo, fix)
    if full_fix is None:
        return None
    proc = _git(repo, "merge-base", "--is-ancestor", full_fix, build)
    if proc.returncode not in (0, 1):
        raise FeedError(f"git merge-base failed: {proc.stderr.strip()}", path=repo)
    return proc.returncode == 0


def _decide_commit(advisory: Advisory, build: BuildVersion, repo: Path | None) -> Decision:
    """A commit build: affected when no fix commit of the record is an ancestor of the build's commit."""
    assert build.commit is not None
    fixes = fix_commits(advisory)
    first = advisory.first_release_with_fix
    first_fixed = ReleaseVersion.parse(first) if first else None
    label = f"commit {build.commit[:12]} ({build.kind} {build.text})"
    if build.release is not None and first_fixed is not None and build.release >= first_fixed \
            and build.kind == "git-describe":
        return Decision(advisory, False, f"{label} descends from tag {build.release}, at or after the first "
                        f"fixed release {first}", first, build.text)
    if not fixes:
        if build.release is not None and build.kind in ("git-describe", "commit"):
            return decide(advisory, str(build.release))
        return Decision(advisory, False, f"cannot decide {label}: the record names no fix commit",
                        first, build.text, undecided=True)
    if repo is None:
        if any(build.commit.startswith(f) or f.startswith(build.commit) for f in fixes):
            return Decision(advisory, False, f"{label} is the fix commit {fixes[0]}", first, build.text)
        return Decision(advisory, False, f"cannot decide {label} without the repository: pass --kata-repo PATH "
                        f"(a kata-containers clone) to check whether fix {', '.join(fixes)} is an ancestor",
                        first, build.text, undecided=True)
    head = resolve_commit(repo, build.commit)
    if head is None:
        raise FeedError(f"commit {build.commit} is not in the repository", path=repo)
    missing: list[str] = []
    for fix in fixes:
        inside = contains_commit(repo, head, fix)
        if inside:
            return Decision(advisory, False, f"{label}: fix commit {fix} is an ancestor (git merge-base "
                            f"--is-ancestor in {repo})", first, build.text)
        if inside is None:
            missing.append(fix)
    known = [f for f in fixes if f not in missing]
    if not known:
        return Decision(advisory, False, f"cannot decide {label}: fix commit(s) {', '.join(fixes)} not in "
                        f"{repo} (fetch the upstream history)", first, build.text, undecided=True)
    return Decision(advisory, True, f"{label}: fix commit {', '.join(known)} is not an ancestor (git "
                    f"merge-base --is-ancestor in {repo})", first, build.text)


def load_backports(path: str | Path) -> dict[str, str]:
    """A vendor's backport list: ``[backports]`` table of advisory id (or alias) = what was backported."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeedError("no such backport list", path=path) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise FeedError(f"cannot read the backport list: {exc}", path=path) from None
    table = data.get("backports")
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise FeedError('expected a [backports] table of "ADVISORY-ID" = "what was backported (commit)"',
                        path=path)
    return {canonical_id(str(k)): v for k, v in table.items()}


def decide_build(advisory: Advisory, build: BuildVersion | str, *, repo: str | Path | None = None,
                 backports: dict[str, str] | None = None, deployment: Deployment | None = None,
                 backports_file: str | None = None) -> Decision:
    """The full decision for one candidate build: scope, then release / commit ancestry / vendor backports."""
    if isinstance(build, str):
        parsed = BuildVersion.parse(build)
        if parsed is None:
            raise FeedError(f"{build!r} is not a Kata release number, Go pseudo-version, git describe output "
                            "or vendor build (X.Y.Z, e.g. 3.27.0)")
        build = parsed
    applies, why = applicability(advisory, deployment, build.release)
    if not applies:
        return Decision(advisory, False, why, advisory.first_release_with_fix, build.text, applicable=False)
    if build.commit is not None:
        decision = _decide_commit(advisory, build, Path(repo) if repo else None)
    elif build.release is None:
        raise FeedError(f"{build.text!r} has no release number to decide by")
    else:
        decision = decide(advisory, str(build.release))
        decision.version = build.text
    if build.kind == "vendor":
        decision.evidence = f"vendor build {build.text} judged by its upstream base {build.release}: " \
                            + decision.evidence
        ids = [advisory.id, *advisory.aliases]
        backported = next((canonical_id(i) for i in ids if canonical_id(i) in (backports or {})), None)
        if decision.affected and backported is not None:
            where = f" ({backports_file})" if backports_file else ""
            decision.affected = False
            decision.backported = f"{backported}: {(backports or {})[backported]}"
            decision.evidence += f"; fix backported per the vendor's backport list{where}: " \
                                 f"{decision.backported}"
    if deployment is not None or scope_of(advisory) != Scope():
        decision.notes.append(f"scope: {why}")
    return decision


@dataclass
class CandidateBuild:
    """The version that decides for a candidate, where it came from, and what its binaries say."""

    build: BuildVersion | None
    source: str  # which evidence gave the deciding version
    binaries: dict[str, str] = field(default_factory=dict)  # "<binary> --version" / agent.version -> value
    notes: list[str] = field(default_factory=list)  # binaries that could not be asked, and why

    @property
    def mismatches(self) -> list[str]:
        """Each binary whose version differs from the deciding one, naming both."""
        if self.build is None or self.build.kind == "commit":
            return []
        wanted = normalise_release(self.build.text)
        return [f"{where} says {value} but {self.source} says {self.build.text}"
                for where, value in self.binaries.items() if normalise_release(value) != wanted]

    def to_json(self) -> dict[str, Any]:
        return {"version": self.build.text if self.build else None, "kind": self.build.kind if self.build else None,
                "commit": self.build.commit if self.build else None, "source": self.source,
                "binaries": self.binaries, "binary_notes": self.notes, "mismatches": self.mismatches}


OSBUILDER_RECORD = "/var/lib/osbuilder/osbuilder.yaml"


def _agent_versions(bundle: Bundle) -> tuple[dict[str, str], list[str]]:
    """``agent.version`` of each guest image's osbuilder record, where it is a release number."""
    import yaml

    found: dict[str, str] = {}
    notes: list[str] = []
    seen: set[str] = set()
    for rel in [*bundle.images, *bundle.initrds]:
        real = bundle.resolve(rel) or rel  # kata-containers.img is usually a link to the versioned image
        if real in seen:
            continue
        seen.add(real)
        where = f"agent.version in {real}:{OSBUILDER_RECORD}"
        try:
            with open_image(bundle.path(real)) as root:
                text = root.read_text(OSBUILDER_RECORD)
        except KataError as exc:
            notes.append(f"{real}: cannot read the guest image ({exc})")
            continue
        try:
            record = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            record = None
        agent = record.get("agent") if isinstance(record, dict) else None
        version = str(agent.get("version", "")).strip() if isinstance(agent, dict) else ""
        if BuildVersion.parse(version) is not None:
            found[where] = version
        else:
            notes.append(f"{where}: {version or 'absent'!r} is not a version; not compared")
    return found, notes


def candidate_build(bundle: Bundle, *, commit: str | None = None) -> CandidateBuild:
    """The build to judge (``commit`` wins: ``--kata-commit``) and the versions its binaries report."""
    version = str(bundle.version or "")
    source = next((k for k, v in bundle.version_evidence.items() if v.strip().removeprefix("v") == version),
                  "the bundle")
    build = BuildVersion.parse(version, commit)
    if commit:
        source = "--kata-commit"
    binaries = {k: v for k, v in bundle.version_evidence.items() if "--version" in k and k != source}
    notes = [n for n in bundle.notes if "--version" in n]
    if not any(k.startswith("containerd-shim-kata-v2") for k in bundle.version_evidence):
        notes.append("the candidate ships no runnable containerd-shim-kata-v2: its version was not "
                     "cross-checked against the shim")
    agents, agent_notes = _agent_versions(bundle)
    return CandidateBuild(build, source, {**binaries, **agents}, notes + agent_notes)


def affects(advisory_id: str, version: str, *, feed: Sequence[Advisory] | None = None,
            repo: str | Path | None = None) -> Decision:
    """Is ``version`` (a release, pseudo-version or git describe) affected by advisory ``advisory_id``
    (its id or an alias) per the feed? The simple entry point for other suites' static checks."""
    advisories = list(feed) if feed is not None else load_feed()
    wanted = canonical_id(advisory_id)
    for advisory in advisories:
        if wanted in {canonical_id(i) for i in (advisory.id, *advisory.aliases)}:
            return decide_build(advisory, version, repo=repo)
    raise FeedError(f"advisory {advisory_id} is not in the feed")


# ---------------------------------------------------------------------------------------------------------
# GitHub releases Atom feed (announcement monitoring)


ATOM = "{http://www.w3.org/2005/Atom}"
SECURITY_HEADING = re.compile(r"<h[1-6][^>]*>[^<]*\bsecurity\b|^\s{0,3}#{1,6}\s*[^\n]*\bsecurity\b",
                              re.I | re.M)
SECURITY_ID = re.compile(r"\b(?:CVE-\d{4}-\d{4,}|GHSA(?:-[23456789cfghjmpqrvwx]{4}){3})\b", re.I)


def canonical_id(text: str) -> str:
    """``ghsa-WWJ6-...`` -> ``GHSA-wwj6-...`` (GitHub's spelling); CVE ids upper-case."""
    return "GHSA-" + text[5:].lower() if text[:5].upper() == "GHSA-" else text.upper()


@dataclass
class Release:
    """One entry of a releases feed: the tag, when, where, and what security content its body has."""

    tag: str
    title: str
    updated: str
    url: str
    security_ids: list[str]
    security_heading: bool

    @property
    def version(self) -> ReleaseVersion | None:
        return ReleaseVersion.parse(normalise_release(self.tag))

    @property
    def has_security_section(self) -> bool:
        return self.security_heading or bool(self.security_ids)

    def to_json(self) -> dict[str, Any]:
        return {"tag": self.tag, "title": self.title, "updated": self.updated, "url": self.url,
                "security_ids": self.security_ids, "security_heading": self.security_heading,
                "has_security_section": self.has_security_section}


def parse_releases_atom(data: bytes, where: str = "releases.atom") -> list[Release]:
    """Releases from a GitHub ``releases.atom`` feed, newest first as GitHub lists them."""
    try:
        root = ElementTree.fromstring(data)  # expat >= 2.4: no external entities, entity expansion limited
    except ElementTree.ParseError as exc:
        raise FeedError(f"malformed Atom XML: {exc}", path=where) from None
    if root.tag != f"{ATOM}feed":
        raise FeedError(f"not an Atom feed (root element {root.tag!r})", path=where)
    releases: list[Release] = []
    for entry in root.findall(f"{ATOM}entry"):
        url = ""
        for link in entry.findall(f"{ATOM}link"):
            if link.get("rel", "alternate") == "alternate":
                url = link.get("href", "")
        entry_id = (entry.findtext(f"{ATOM}id") or "").strip()
        tag = url.rstrip("/").rsplit("/tag/", 1)[-1] if "/tag/" in url else entry_id.rsplit("/", 1)[-1]
        tag = tag.strip()
        body_el = entry.find(f"{ATOM}content")
        body = body_el.text or "" if body_el is not None else ""
        if body_el is not None and body_el.get("type") in ("html", "text/html"):
            body = html.unescape(body) if "&lt;" in body else body
        ids = sorted({canonical_id(m.group(0)) for m in SECURITY_ID.finditer(body)})
        releases.append(Release(tag=tag, title=(entry.findtext(f"{ATOM}title") or tag).strip(),
                                updated=(entry.findtext(f"{ATOM}updated") or "").strip(), url=url,
                                security_ids=ids,
                                security_heading=bool(SECURITY_HEADING.search(body))))
    if not releases and root.find(f"{ATOM}title") is None:
        raise FeedError("Atom feed without entries or title", path=where)
    return releases


def load_releases(source: str | Path) -> list[Release]:
    """Read a releases Atom feed from a file or URL."""
    text = str(source)
    data = fetch(text) if _is_url(text) else _read_file(Path(text))
    return parse_releases_atom(data, text)


@dataclass
class ReleaseWatch:
    """What the monitor reports: releases newer than the installed one and those with security content."""

    current: str | None
    newer: list[Release]
    security: list[Release]  # newer (or, without --current, any) releases with a security section
    unknown_ids: list[str]  # advisory ids named in those releases that the advisory feed does not know

    @property
    def exit_status(self) -> int:
        """0 nothing to do; 1 a release with security content to act on; 3 a newer release, no security."""
        if self.security:
            return 1
        return 3 if self.newer else 0

    def to_json(self) -> dict[str, Any]:
        return {"current": self.current, "newer": [r.to_json() for r in self.newer],
                "security": [r.to_json() for r in self.security], "unknown_ids": self.unknown_ids,
                "exit_status": self.exit_status}


def watch_releases(releases: Sequence[Release], current: str | None, *, known_ids: Iterable[str] = (),
                   include_prereleases: bool = False) -> ReleaseWatch:
    """Compare a releases feed with the installed release (prereleases ignored unless asked for)."""
    base = ReleaseVersion.parse(normalise_release(current)) if current else None
    if current and base is None:
        raise FeedError(f"--current {current!r} is not a Kata release number (expected X.Y.Z)")
    newer: list[Release] = []
    for release in releases:
        v = release.version
        if v is None or (v.is_prerelease and not include_prereleases):
            continue
        if base is not None and v > base:
            newer.append(release)
    newer.sort(key=lambda r: r.version, reverse=True)  # type: ignore[arg-type,return-value]
    pool = newer if base is not None else list(releases)
    security = [r for r in pool if r.has_security_section]
    known = {canonical_id(k) for k in known_ids}
    unknown = sorted({i for r in security for i in r.security_ids if i not in known})
    return ReleaseWatch(current, newer, security, unknown)


__all__ = ["DEFAULT_FEED", "Advisory", "BuildVersion", "Decision", "DeployedConfig", "Deployment", "Release",
           "ReleaseVersion", "ReleaseWatch", "Scope", "affects", "applicability", "check_version", "decide",
           "decide_build", "fix_commits", "is_pseudo_version", "load_backports", "load_feed", "load_releases",
           "parse_releases_atom", "scope_of", "watch_releases"]
