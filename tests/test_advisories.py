"""The advisory gate: OSV loading, release decisions (and the Go pseudo-version trap), the CLI, Atom
monitoring, feed refresh, and the ``suites/advisories`` suite run with pytester on a real /opt/kata tree."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from pytest_kata.advisories import (
    DEFAULT_FEED,
    Deployment,
    ReleaseVersion,
    affects,
    check_version,
    decide,
    decide_build,
    load_backports,
    load_feed,
    parse_releases_atom,
    scope_of,
    watch_releases,
)
from pytest_kata.cli import main
from pytest_kata.errors import FeedError

REPO = Path(__file__).resolve().parents[1]
FIXED_IN_4_0_0 = {"GHSA-mp2j-xm59-qfgw", "GHSA-fgm4-mv68-h344", "GHSA-h8jv-63p2-496x", "GHSA-7fhf-v3p3-rp56"}
ADVISORIES_2026 = {"GHSA-wwj6-vghv-5p64", "GHSA-q49m-57vm-c8cc", "GHSA-rr59-xxvx-96qr", "GHSA-2gv2-cffp-j227",
                   "GHSA-fmg6-v47x-52wr", "GHSA-5fc8-gg7w-3g5c"} | FIXED_IN_4_0_0
PSEUDO = "0.0.0-20260219090056-6a672503973b"


def affected_ids(version: str, feed: Any = None) -> set[str]:
    return {d.advisory.id for d in check_version(feed or load_feed(), version) if d.affected}


def record(**changes: Any) -> dict[str, Any]:
    """A small OSV record about Kata (a template for the trap and range tests)."""
    base: dict[str, Any] = {
        "schema_version": "1.7.5", "id": "GHSA-2345-6789-cfgh", "modified": "2026-01-01T00:00:00Z",
        "summary": "test advisory", "database_specific": {"severity": "HIGH"},
        "affected": [{"package": {"ecosystem": "Go", "name": "github.com/kata-containers/kata-containers"},
                      "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": PSEUDO}]}]}],
    }
    base.update(changes)
    return base


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------------------
# decisions on the shipped feed (the must-shows)


def test_3_2_0_is_affected_by_every_2026_advisory_with_the_enumeration_as_evidence() -> None:
    decisions = {d.advisory.id: d for d in check_version(load_feed(), "3.2.0")}
    assert {i for i, d in decisions.items() if d.affected} == ADVISORIES_2026
    assert decisions["GHSA-wwj6-vghv-5p64"].evidence == "3.2.0 listed in affected[1].versions (GIT entry)"
    assert {i: decisions[i].fixed for i in ADVISORIES_2026} == {
        "GHSA-wwj6-vghv-5p64": "3.27.0", "GHSA-q49m-57vm-c8cc": "3.29.0", "GHSA-rr59-xxvx-96qr": "3.31.0",
        "GHSA-2gv2-cffp-j227": "3.31.0", "GHSA-fmg6-v47x-52wr": "4.1.0", "GHSA-5fc8-gg7w-3g5c": "3.26.0",
        **dict.fromkeys(FIXED_IN_4_0_0, "4.0.0")}
    # the 1.x records are decided by their release-number ranges, not by accident
    assert "outside ECOSYSTEM range" in decisions["CVE-2020-2024"].evidence
    assert not any(d.undecided for d in decisions.values())


def test_4_1_0_is_affected_by_none() -> None:
    decisions = check_version(load_feed(), "4.1.0")
    assert not [d for d in decisions if d.affected or d.undecided]
    fmg6 = next(d for d in decisions if d.advisory.id == "GHSA-fmg6-v47x-52wr")
    assert fmg6.evidence.startswith("4.1.0 not in affected[0].versions")


@pytest.mark.parametrize(("version", "expected"), [
    ("3.27.0", ADVISORIES_2026 - {"GHSA-wwj6-vghv-5p64", "GHSA-5fc8-gg7w-3g5c"}),
    ("3.31.0", {"GHSA-fmg6-v47x-52wr"} | FIXED_IN_4_0_0),
    ("v4.0.0", {"GHSA-fmg6-v47x-52wr"}),
    ("1.11.0", ADVISORIES_2026 | {"CVE-2020-2023", "CVE-2020-2026", "CVE-2020-27151", "CVE-2020-28914"}),
    ("1.11.1", ADVISORIES_2026 | {"CVE-2020-27151", "CVE-2020-28914"}),
])
def test_reference_table_of_affected_releases(version: str, expected: set[str]) -> None:
    assert affected_ids(version) == expected


def test_shipped_feed_holds_the_reference_data(shared_dir: Path) -> None:
    """Every reference record is shipped with only the harness's scope added; the five §7 advisories the
    reference data lacks are added, with ranges marked as inferred from tags."""
    shared = json.loads((shared_dir / "data/advisories/kata-osv.json").read_text())
    shipped = {r["id"]: r for r in json.loads(DEFAULT_FEED.read_text())}
    for record in shared:
        ours = copy.deepcopy(shipped[record["id"]])
        assert ours["database_specific"]["x_kata_harness"].pop("scope")
        assert ours == record
    added = set(shipped) - {r["id"] for r in shared}
    assert added == {"GHSA-5fc8-gg7w-3g5c"} | FIXED_IN_4_0_0
    for advisory_id in added:
        entry = shipped[advisory_id]["affected"][0]
        assert entry["database_specific"]["x_kata_harness"]["range_inferred_from_tags"] is True
        assert "INFERRED FROM TAGS" in entry["database_specific"]["x_kata_harness"]["derived"]
    assert (DEFAULT_FEED.parent / "README.md").read_text().count("advisories refresh") >= 1


def test_severities_are_normalised_from_the_record() -> None:
    by_id = {a.id: a for a in load_feed()}
    assert by_id["GHSA-wwj6-vghv-5p64"].severity == "medium"
    assert by_id["GHSA-2gv2-cffp-j227"].severity == "high"
    assert by_id["GHSA-wwj6-vghv-5p64"].cvss_score == 5.2  # computed from the CVSS v4 vector
    assert by_id["GHSA-fmg6-v47x-52wr"].severity == "high"  # Kata release notes label
    vector_only = load_feed_from([record(database_specific={}, severity=[
        {"type": "CVSS_V4", "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:H/SI:H/SA:H"}])])
    assert vector_only[0].severity == "critical" and "base score" in vector_only[0].severity_source
    silent = load_feed_from([record(database_specific={})])
    assert silent[0].severity == "high" and "not stated" in silent[0].severity_source


def load_feed_from(records: list[dict[str, Any]]) -> list[Any]:
    """Load records through a real feed file (the same path users take)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "feed.json"
        path.write_text(json.dumps(records))
        return load_feed([path])


# ---------------------------------------------------------------------------------------------------------
# the Go pseudo-version trap and OSV range semantics


def test_pseudo_version_trap_is_real_and_avoided() -> None:
    # the trap: semver puts every release after the pseudo-version, so a naive range check says "not affected"
    assert ReleaseVersion.parse("3.2.0") > ReleaseVersion.parse(PSEUDO)  # type: ignore[operator]
    only_pseudo = load_feed_from([record()])[0]
    decision = decide(only_pseudo, "3.2.0")
    assert decision.undecided and not decision.affected, "a pseudo-version range must never clear a release"
    assert "pseudo-version" in decision.evidence and "cannot decide" in decision.evidence
    # with the enumeration next to it, the enumeration decides and the pseudo range is only a note
    enumerated = copy.deepcopy(record())
    enumerated["affected"].append({"ranges": [{"type": "GIT", "repo": "https://github.com/kata-containers/x",
                                               "events": [{"introduced": "0"}, {"fixed": "a" * 40}]}],
                                   "versions": ["3.1.0", "3.2.0"]})
    advisory = load_feed_from([enumerated])[0]
    hit = decide(advisory, "3.2.0")
    assert hit.affected and hit.evidence == "3.2.0 listed in affected[1].versions (GIT entry)"
    assert any("pseudo-version" in n for n in hit.notes)
    assert not decide(advisory, "3.3.0").affected


def test_undecidable_record_makes_the_cli_gate_fail(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    feed = tmp_path / "pseudo.json"
    feed.write_text(json.dumps(record()))
    rc, out, _ = run_cli(capsys, "advisories", "--version", "3.2.0", "--feed", str(feed))
    assert rc == 1 and "cannot decide" in out and "GHSA-2345-6789-cfgh" in out


def test_semver_ranges_with_fixed_last_affected_and_reintroduction() -> None:
    adv = load_feed_from([record(affected=[{"package": {"ecosystem": "Go", "name": "kata"}, "ranges": [
        {"type": "SEMVER", "events": [{"introduced": "3.0.0"}, {"fixed": "3.5.0"}, {"introduced": "3.8.0"},
                                      {"last_affected": "3.9.1"}]}]}])])[0]
    states = {v: decide(adv, v) for v in ("2.9.9", "3.0.0", "3.4.9", "3.5.0", "3.8.0", "3.9.1", "3.9.2")}
    assert {v for v, d in states.items() if d.affected} == {"3.0.0", "3.4.9", "3.8.0", "3.9.1"}
    assert states["3.4.9"].fixed == "3.5.0" and "inside SEMVER range" in states["3.4.9"].evidence
    assert "outside SEMVER range" in states["3.5.0"].evidence


def test_unlisted_release_below_the_first_fix_is_affected() -> None:
    # 3.26.1 is no tag in the enumeration, but a rolling release below 3.27.0 cannot carry the fix
    d = decide(next(a for a in load_feed() if a.id == "GHSA-wwj6-vghv-5p64"), "3.26.1")
    assert d.affected and "below first_release_with_fix 3.27.0" in d.evidence


def test_bad_release_number_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FeedError):
        decide(load_feed()[0], "latest")
    rc, _, err = run_cli(capsys, "advisories", "--version", "latest")
    assert rc == 2 and err.count("\n") == 1 and "not a Kata release number" in err


# ---------------------------------------------------------------------------------------------------------
# feeds: forms and errors


def test_directory_and_github_advisory_database_layout(tmp_path: Path) -> None:
    shipped = json.loads(DEFAULT_FEED.read_text())
    tree = tmp_path / "advisory-database" / "advisories" / "github-reviewed"
    for rec in shipped:
        if rec["id"].startswith("GHSA-"):
            month = (rec.get("published") or "2026-08-01")[:7].replace("-", "/")
            d = tree / month / rec["id"]
            d.mkdir(parents=True)
            (d / f"{rec['id']}.json").write_text(json.dumps(rec))
    other = tree / "2026/03/GHSA-3333-4444-5555"  # an advisory about another project: ignored
    other.mkdir(parents=True)
    (other / "GHSA-3333-4444-5555.json").write_text(json.dumps(
        {"id": "GHSA-3333-4444-5555", "modified": "2026-03-01T00:00:00Z",
         "affected": [{"package": {"ecosystem": "npm", "name": "left-pad"}, "versions": ["3.2.0"]}]}))
    feed = load_feed([tmp_path / "advisory-database"])
    assert {a.id for a in feed} == ADVISORIES_2026
    assert affected_ids("3.2.0", feed) == ADVISORIES_2026 and affected_ids("4.1.0", feed) == set()
    # one object per file, an array, and a plain directory of files load the same records
    flat = tmp_path / "flat"
    flat.mkdir()
    for rec in shipped:
        (flat / f"{rec['id']}.json").write_text(json.dumps(rec))
    assert {a.id for a in load_feed([flat])} == {a.id for a in load_feed()}


def test_withdrawn_records_are_dropped_and_duplicates_kept_once(tmp_path: Path) -> None:
    old, new = record(), record(modified="2026-06-01T00:00:00Z", summary="newer text")
    gone = record(id="GHSA-cccc-cccc-cccc", withdrawn="2026-02-01T00:00:00Z")
    (tmp_path / "a.json").write_text(json.dumps([old, gone]))
    (tmp_path / "b.json").write_text(json.dumps(new))
    feed = load_feed([tmp_path / "a.json", tmp_path / "b.json"])
    assert [(a.id, a.summary) for a in feed] == [("GHSA-2345-6789-cfgh", "newer text")]


@pytest.mark.parametrize(("content", "message"), [
    ('[{"id": "GHSA-x", "modified": ', "malformed JSON"),
    ('{"vulnerabilities": []}', "without a string 'id'"),
    ('[{"id": "GHSA-x", "affected": [{"ranges": [{"type": "SEMVER", "events": "0"}]}]}]', "events must be"),
    ('[{"id": "GHSA-x", "affected": [{"versions": [3, 2]}]}]', "versions must be a list of strings"),
    ('"just a string"', "expected an OSV record"),
])
def test_malformed_feed_is_one_line_error_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          content: str, message: str) -> None:
    feed = tmp_path / "feed.json"
    feed.write_text(content)
    rc, out, err = run_cli(capsys, "advisories", "--version", "3.2.0", "--feed", str(feed))
    assert rc == 2 and out == ""
    assert err.startswith(f"pytest-kata: error: {feed}") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_feed_and_empty_directory_are_one_line_errors(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "advisories", "--version", "3.2.0", "--feed", str(tmp_path / "nope.json"))
    missing = tmp_path / "nope.json"
    assert rc == 2 and err == f"pytest-kata: error: {missing}: no such advisory feed file or directory\n"
    rc, _, err = run_cli(capsys, "advisories", "--version", "3.2.0", "--feed", str(tmp_path))
    assert rc == 2 and "no .json advisory files" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------------
# the CLI


def test_cli_version_gate(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "advisories", "--version", "3.2.0")
    assert rc == 1 and "AFFECTED by 10 of 16" in out
    for advisory in ADVISORIES_2026:
        assert advisory in out
    assert "upgrade to 4.1.0 or later" in out and "decided by: 3.2.0 listed in affected[1].versions" in out
    rc, out, _ = run_cli(capsys, "advisories", "--version", "4.1.0")
    assert rc == 0 and "not affected by any of 16" in out and "GHSA-" not in out
    rc, out, _ = run_cli(capsys, "advisories", "--version", "3.31.0", "--json")
    data = json.loads(out)
    by_id = {d["id"]: d for d in data["decisions"]}
    assert rc == 1 and set(by_id) == {"GHSA-fmg6-v47x-52wr"} | FIXED_IN_4_0_0
    assert by_id["GHSA-fmg6-v47x-52wr"]["fixed"] == "4.1.0" and by_id["GHSA-fmg6-v47x-52wr"]["severity"] == "high"


def test_cli_bundle_gate_reads_the_bundle_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_kata_tree(tmp_path / "b", "3.30.0")
    rc, out, err = run_cli(capsys, "advisories", "--bundle", str(tree))
    assert rc == 1, err
    assert "release 3.30.0" in out and "GHSA-2gv2-cffp-j227" in out and "GHSA-wwj6-vghv-5p64" not in out


# ---------------------------------------------------------------------------------------------------------
# announcement monitoring (GitHub releases Atom feed)

RELEASES_ATOM = """<?xml version="1.0" encoding="UTF-8"?>
<feed xmlns="http://www.w3.org/2005/Atom" xmlns:media="http://search.yahoo.com/mrss/" xml:lang="en-US">
  <id>tag:github.com,2008:https://github.com/kata-containers/kata-containers/releases</id>
  <link type="text/html" rel="alternate" href="https://github.com/kata-containers/kata-containers/releases"/>
  <link type="application/atom+xml" rel="self"
        href="https://github.com/kata-containers/kata-containers/releases.atom"/>
  <title>Release notes from kata-containers</title>
  <updated>2026-08-22T10:12:40Z</updated>
  <entry>
    <id>tag:github.com,2008:Repository/105055381/4.1.0</id>
    <updated>2026-08-22T10:12:40Z</updated>
    <link rel="alternate" type="text/html" href="https://github.com/kata-containers/kata-containers/releases/tag/4.1.0"/>
    <title>Kata Containers 4.1.0</title>
    <content type="html">&lt;h2&gt;Security&lt;/h2&gt;
&lt;p&gt;This release fixes &lt;a
href="https://github.com/kata-containers/kata-containers/security/advisories/GHSA-fmg6-v47x-52wr"&gt;GHSA-fmg6-v47x-52wr&lt;/a&gt;
and GHSA-9q9q-9q9q-9q9q.&lt;/p&gt;
&lt;h2&gt;What's Changed&lt;/h2&gt;&lt;ul&gt;&lt;li&gt;genpolicy: don't match image pull storages to mounts
by @kata-bot&lt;/li&gt;&lt;/ul&gt;</content>
    <author><name>katabuilder</name></author>
    <media:thumbnail height="30" width="30" url="https://avatars.githubusercontent.com/u/1?s=60&amp;v=4"/>
  </entry>
  <entry>
    <id>tag:github.com,2008:Repository/105055381/4.1.0-rc0</id>
    <updated>2026-08-15T09:00:00Z</updated>
    <link rel="alternate" type="text/html"
          href="https://github.com/kata-containers/kata-containers/releases/tag/4.1.0-rc0"/>
    <title>Kata Containers 4.1.0-rc0</title>
    <content type="html">&lt;p&gt;Release candidate.&lt;/p&gt;</content>
    <author><name>katabuilder</name></author>
  </entry>
  <entry>
    <id>tag:github.com,2008:Repository/105055381/4.0.0</id>
    <updated>2026-07-20T10:00:00Z</updated>
    <link rel="alternate" type="text/html" href="https://github.com/kata-containers/kata-containers/releases/tag/4.0.0"/>
    <title>Kata Containers 4.0.0</title>
    <content type="html">&lt;h2&gt;What's Changed&lt;/h2&gt;&lt;ul&gt;&lt;li&gt;runtime-rs: default hypervisor
by @dev&lt;/li&gt;&lt;/ul&gt;</content>
    <author><name>katabuilder</name></author>
  </entry>
  <entry>
    <id>tag:github.com,2008:Repository/105055381/3.31.0</id>
    <updated>2026-06-10T10:00:00Z</updated>
    <link rel="alternate" type="text/html" href="https://github.com/kata-containers/kata-containers/releases/tag/3.31.0"/>
    <title>Kata Containers 3.31.0</title>
    <content type="html">&lt;ul&gt;&lt;li&gt;runtime: validate virtio_fs_extra_args annotations
(CVE-2026-44210) by @dev&lt;/li&gt;&lt;/ul&gt;</content>
    <author><name>katabuilder</name></author>
  </entry>
  <entry>
    <id>tag:github.com,2008:Repository/105055381/3.30.0</id>
    <updated>2026-05-12T10:00:00Z</updated>
    <link rel="alternate" type="text/html" href="https://github.com/kata-containers/kata-containers/releases/tag/3.30.0"/>
    <title>Kata Containers 3.30.0</title>
    <content type="html">&lt;ul&gt;&lt;li&gt;docs: fix typo by @dev&lt;/li&gt;&lt;/ul&gt;</content>
    <author><name>katabuilder</name></author>
  </entry>
</feed>
"""


def test_atom_feed_is_parsed_with_tags_and_security_sections() -> None:
    releases = parse_releases_atom(RELEASES_ATOM.encode())
    assert [r.tag for r in releases] == ["4.1.0", "4.1.0-rc0", "4.0.0", "3.31.0", "3.30.0"]
    by_tag = {r.tag: r for r in releases}
    assert by_tag["4.1.0"].security_heading and by_tag["4.1.0"].security_ids == [
        "GHSA-9q9q-9q9q-9q9q", "GHSA-fmg6-v47x-52wr"]
    assert by_tag["3.31.0"].security_ids == ["CVE-2026-44210"] and not by_tag["3.31.0"].security_heading
    assert not by_tag["4.0.0"].has_security_section and not by_tag["3.30.0"].has_security_section
    assert by_tag["4.1.0"].url.endswith("/releases/tag/4.1.0")
    assert by_tag["4.1.0"].updated.startswith("2026-08")


def test_release_watch_newer_security_and_unknown_ids() -> None:
    releases = parse_releases_atom(RELEASES_ATOM.encode())
    known = [i for a in load_feed() for i in (a.id, *a.aliases)]
    watch = watch_releases(releases, "3.30.0", known_ids=known)
    assert [r.tag for r in watch.newer] == ["4.1.0", "4.0.0", "3.31.0"]  # rc ignored by default
    assert [r.tag for r in watch.security] == ["4.1.0", "3.31.0"] and watch.exit_status == 1
    assert watch.unknown_ids == ["GHSA-9q9q-9q9q-9q9q"]  # named in 4.1.0's notes, not in the feed
    assert watch_releases(releases, "4.1.0").exit_status == 0
    no_security = [r for r in releases if r.tag != "4.1.0"]
    plain = watch_releases(no_security, "3.31.0")
    assert [r.tag for r in plain.newer] == ["4.0.0"] and plain.exit_status == 3
    assert [r.tag for r in watch_releases(releases, "4.0.0", include_prereleases=True).newer] == [
        "4.1.0", "4.1.0-rc0"]


def test_cli_atom_monitor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    atom = tmp_path / "releases.atom"
    atom.write_text(RELEASES_ATOM)
    rc, out, _ = run_cli(capsys, "advisories", "--atom", str(atom), "--current", "3.30.0")
    assert rc == 1 and "NEWER RELEASES than 3.30.0: 4.1.0, 4.0.0, 3.31.0" in out
    assert "SECURITY 4.1.0" in out and "not in the advisory feed (refresh it): GHSA-9q9q-9q9q-9q9q" in out
    rc, out, _ = run_cli(capsys, "advisories", "--atom", str(atom), "--current", "4.1.0", "--json")
    assert rc == 0 and json.loads(out)["newer"] == []
    atom.write_text(RELEASES_ATOM[:300])
    rc, _, err = run_cli(capsys, "advisories", "--atom", str(atom), "--current", "3.30.0")
    assert rc == 2 and "malformed Atom XML" in err and err.count("\n") == 1
    atom.write_text("<rss><channel/></rss>")
    rc, _, err = run_cli(capsys, "advisories", "--atom", str(atom))
    assert rc == 2 and "not an Atom feed" in err


# ---------------------------------------------------------------------------------------------------------
# refresh


def test_refresh_validates_then_writes_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "feed.json"
    rc, out, _ = run_cli(capsys, "advisories", "refresh", "--from", str(DEFAULT_FEED), "--to", str(target))
    assert rc == 0 and "wrote 16 advisories" in out and "16 added" in out
    assert {a.id for a in load_feed([target])} == {a.id for a in load_feed()}
    before = target.read_bytes()
    changed = json.loads(DEFAULT_FEED.read_text())[:3]
    changed[0]["modified"] = "2027-01-01T00:00:00Z"
    source = tmp_path / "new.json"
    source.write_text(json.dumps(changed))
    rc, out, _ = run_cli(capsys, "advisories", "refresh", "--from", str(source), "--to", str(target),
                         "--dry-run")
    assert rc == 0 and "would write 16" in out and "0 removed" in out and "1 changed" in out and "13 kept" in out
    assert target.read_bytes() == before
    source.write_text("[{broken")
    rc, _, err = run_cli(capsys, "advisories", "refresh", "--from", str(source), "--to", str(target))
    assert rc == 2 and "malformed JSON" in err and target.read_bytes() == before
    source.write_text("[]")
    rc, _, err = run_cli(capsys, "advisories", "refresh", "--from", str(source), "--to", str(target))
    assert rc == 2 and "refusing" in err and target.read_bytes() == before


# ---------------------------------------------------------------------------------------------------------
# the suite, run with pytester on a real /opt/kata tree


def make_kata_tree(root: Path, version: str | None) -> Path:
    """A tiny /opt/kata tree: enough for the bundle inventory to find the release number."""
    kata = root / "opt" / "kata"
    (kata / "bin").mkdir(parents=True)
    (kata / "bin" / "kata-runtime").write_text("#!/bin/sh\necho placeholder\n")
    if version:
        (kata / "VERSION").write_text(version + "\n")
    return kata


def run_suite(pytester: pytest.Pytester, tree: Path, *extra: str) -> tuple[Any, dict[str, Any]]:
    result = pytester.runpytest_subprocess(str(REPO / "suites" / "advisories"), "--kata-candidate", str(tree),
                                           "--kata-report", str(pytester.path / "verdict.json"), "-q", *extra)
    report = pytester.path / "verdict.json"
    return result, json.loads(report.read_text()) if report.exists() else {}


def test_suite_rejects_3_30_0_and_accepts_4_1_0(pytester: pytest.Pytester, tmp_path: Path) -> None:
    result, verdict = run_suite(pytester, make_kata_tree(tmp_path / "old", "3.30.0"))
    assert result.ret == 1, result.stdout.str()
    by_id = {r["id"]: r for r in verdict["results"]}
    assert set(by_id) == {a.id for a in load_feed()}, "one item per advisory, named by its id"
    assert {i for i, r in by_id.items() if r["status"] == "fail"} == {
        "GHSA-rr59-xxvx-96qr", "GHSA-2gv2-cffp-j227", "GHSA-fmg6-v47x-52wr"} | FIXED_IN_4_0_0
    escape = by_id["GHSA-2gv2-cffp-j227"]
    assert escape["severity"] == "high" and escape["suite"] == "advisories"
    assert escape["evidence"]["decided_by"] == "3.30.0 listed in affected[1].versions (GIT entry)"
    assert escape["evidence"]["fixed"] == "3.31.0" and escape["evidence"]["version"] == "3.30.0"
    assert by_id["GHSA-wwj6-vghv-5p64"]["status"] == "pass" and verdict["verdict"] == "reject"
    assert verdict["candidate"]["version"] == "3.30.0"

    result, verdict = run_suite(pytester, make_kata_tree(tmp_path / "new", "4.1.0"))
    assert result.ret == 0, result.stdout.str()
    assert verdict["verdict"] == "accept" and verdict["totals"]["pass"] == len(load_feed())


def test_suite_unknown_version_is_an_error_saying_how_to_fix(pytester: pytest.Pytester,
                                                             tmp_path: Path) -> None:
    result, verdict = run_suite(pytester, make_kata_tree(tmp_path / "nover", None))
    assert result.ret == 1 and verdict["verdict"] == "reject"
    assert {r["status"] for r in verdict["results"]} == {"error"}
    result.stdout.fnmatch_lines(["*Kata release of * is unknown; put the release number (X.Y.Z) in "
                                 "opt/kata/VERSION*"])


def test_suite_uses_kata_advisories_feed(pytester: pytest.Pytester, tmp_path: Path) -> None:
    feed = tmp_path / "mine.json"
    feed.write_text(json.dumps([record(id="GHSA-2222-3333-4444", affected=[{"versions": ["4.1.0"]}])]))
    tree = make_kata_tree(tmp_path / "t", "4.1.0")
    result, verdict = run_suite(pytester, tree, "--kata-advisories", str(feed))
    assert result.ret == 1
    assert [(r["id"], r["status"]) for r in verdict["results"]] == [("GHSA-2222-3333-4444", "fail")]
    feed.write_text("{oops")
    result, _ = run_suite(pytester, tree, "--kata-advisories", str(feed))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: --kata-advisories: {feed}: malformed JSON*"])
    assert "Traceback" not in result.stderr.str()


# ---------------------------------------------------------------------------------------------------------
# advisories as a deployment sees them: scope, severity, commit builds, binaries, vendor builds


RUNTIME_RS_ONLY = {"GHSA-2gv2-cffp-j227", "GHSA-7fhf-v3p3-rp56", "GHSA-fgm4-mv68-h344"}
COCO_ONLY = {"GHSA-fmg6-v47x-52wr", "GHSA-q49m-57vm-c8cc", "GHSA-h8jv-63p2-496x"}


def upstream_configs() -> Path:
    configs = REPO / "fixtures" / "configs" / "upstream"
    assert (configs / "configuration-qemu.toml").is_file(), f"{configs}: the real 4.1.0 configurations"
    return configs


def make_shipping_tree(root: Path, version: str, *, go: tuple[str, ...] = (), rs: tuple[str, ...] = (),
                       shim_says: str | None = None) -> Path:
    """A /opt/kata tree shipping the named real 4.1.0 configurations (and, optionally, a stand-in Go shim
    binary whose ``--version`` prints ``shim_says``)."""
    from tests.test_bundle import tiny_elf

    kata = make_kata_tree(root, version)
    defaults = kata / "share" / "defaults" / "kata-containers"
    (defaults / "runtime-rs").mkdir(parents=True)
    for name in go:
        (defaults / f"configuration-{name}.toml").write_bytes(
            (upstream_configs() / f"configuration-{name}.toml").read_bytes())
    for name in rs:
        (defaults / "runtime-rs" / f"configuration-{name}.toml").write_bytes(
            (upstream_configs() / "runtime-rs" / f"configuration-{name}.toml").read_bytes())
    if shim_says is not None:
        shim = kata / "bin" / "containerd-shim-kata-v2"
        shim.write_bytes(tiny_elf(f'Kata Containers containerd shim (Golang): id: "io.containerd.kata.v2", '
                                  f"version: {shim_says}, commit: 0123456789\n"))
        shim.chmod(0o755)
    return kata


def test_runtime_rs_advisory_is_not_applicable_to_releases_before_runtime_rs_existed() -> None:
    """1.9.3 is in GHSA-2gv2's tag enumeration (the tag does not contain the fix) but has no runtime-rs."""
    old = affects("GHSA-2gv2-cffp-j227", "1.9.3")
    assert old.status == "notapplicable" and not old.affected
    assert "runtime-rs first shipped in 3.0.0" in old.evidence and "1.9.3" in old.evidence
    assert affects("CVE-2026-47243", "3.0.0").status == "affected"  # by alias, from the first runtime-rs
    assert affects("GHSA-2gv2-cffp-j227", "3.31.0").status == "not-affected"
    with pytest.raises(FeedError, match="GHSA-9999-9999-9999 is not in the feed"):
        affects("GHSA-9999-9999-9999", "3.2.0")


def test_bare_1_x_version_is_not_affected_by_confidential_containers_advisories(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The CoCo records' tag lists include 1.9.3, but no 1.x release has a confidential guest or an agent
    policy: a bare 1.9.3 is notapplicable to them with the record's component as the reason. A 3.x release
    could run CoCo, so without configurations to narrow by it stays affected, and so do 1.9.3's real matches
    (the Go runtime's annotations, block hot-plug, virtiofsd arguments)."""
    for advisory in COCO_ONLY:
        old = affects(advisory, "1.9.3")
        assert old.status == "notapplicable" and not old.affected, old.evidence
        assert "Confidential Containers" in old.evidence and "no 1.x release" in old.evidence
        assert "agent policy" in old.evidence and "1.9.3" in old.evidence
        assert affects(advisory, "2.0.0").status != "notapplicable"
    assert affects("GHSA-q49m-57vm-c8cc", "3.28.0").status == "affected"
    assert affects("GHSA-h8jv-63p2-496x", "3.30.0").status == "affected"
    assert affects("GHSA-fmg6-v47x-52wr", "4.0.0").status == "affected"
    for advisory in ("GHSA-mp2j-xm59-qfgw", "GHSA-5fc8-gg7w-3g5c", "GHSA-rr59-xxvx-96qr", "CVE-2020-27151",
                     "CVE-2020-2023"):
        assert affects(advisory, "1.9.3").status == "affected", advisory
    rc, out, _ = run_cli(capsys, "advisories", "--version", "1.9.3")
    assert rc == 1 and "AFFECTED by 10 of 16 advisories; 6 not applicable" in out
    assert not any(a in out for a in COCO_ONLY | RUNTIME_RS_ONLY)
    rc, out, _ = run_cli(capsys, "advisories", "--version", "1.9.3", "--all")
    assert "[not applicable] kata-agent MemAgentMemcgSet" in out and "no 1.x release has Confidential" in out


def test_advisories_scoped_to_what_the_real_4_1_0_configurations_ship(tmp_path: Path) -> None:
    """Go QEMU alone: the runtime-rs, Dragonball, CoCo and CLH advisories do not apply, each with its reason;
    every shipped configuration (real 4.1.0 files) brings them back."""
    from pytest_kata.bundle import open_bundle

    feed = {a.id: a for a in load_feed()}
    go_qemu = Deployment.from_bundle(open_bundle(make_shipping_tree(tmp_path / "q", "3.30.0", go=("qemu",))))
    assert go_qemu is not None and [c.file for c in go_qemu.configs] == [
        "share/defaults/kata-containers/configuration-qemu.toml"]
    status = {i: decide_build(a, "3.30.0", deployment=go_qemu) for i, a in feed.items()}
    assert {i for i, d in status.items() if d.status == "notapplicable"} == RUNTIME_RS_ONLY | COCO_ONLY | {
        "GHSA-wwj6-vghv-5p64", "CVE-2020-2025"}
    assert "affects runtime-rs" in status["GHSA-2gv2-cffp-j227"].evidence
    assert "configuration-qemu.toml (the Go runtime, qemu, shared_fs virtio-fs)" in \
        status["GHSA-2gv2-cffp-j227"].evidence
    assert "Confidential Containers" in status["GHSA-fmg6-v47x-52wr"].evidence
    assert {i for i, d in status.items() if d.affected} == {"GHSA-rr59-xxvx-96qr", "GHSA-mp2j-xm59-qfgw"}

    everything = Deployment.from_bundle(open_bundle(make_shipping_tree(
        tmp_path / "all", "3.30.0", go=("qemu", "clh", "fc", "qemu-coco-dev", "qemu-snp", "qemu-tdx"),
        rs=("qemu-runtime-rs", "clh-runtime-rs", "dragonball"))))
    assert everything is not None and len(everything.configs) == 9
    coco = {c.file.rsplit("/", 1)[-1]: c.coco for c in everything.configs if c.coco}
    assert coco == {"configuration-qemu-coco-dev.toml": "the cc_init_data (initdata) annotation is enabled",
                    "configuration-qemu-snp.toml": "confidential_guest = true",
                    "configuration-qemu-tdx.toml": "confidential_guest = true"}
    status = {i: decide_build(a, "3.30.0", deployment=everything) for i, a in feed.items()}
    assert {i for i, d in status.items() if d.affected} == {
        "GHSA-rr59-xxvx-96qr", "GHSA-2gv2-cffp-j227", "GHSA-fmg6-v47x-52wr"} | FIXED_IN_4_0_0
    assert "configuration-dragonball.toml" in " ".join(status["GHSA-fgm4-mv68-h344"].notes)


def test_suite_judges_every_shipped_configuration_and_narrows_with_kata_shim(pytester: pytest.Pytester,
                                                                             tmp_path: Path) -> None:
    tree = make_shipping_tree(tmp_path / "t", "3.30.0", go=("qemu", "qemu-snp"), rs=("qemu-runtime-rs",))
    _, verdict = run_suite(pytester, tree)
    by_id = {r["id"]: r for r in verdict["results"]}
    assert by_id["GHSA-2gv2-cffp-j227"]["status"] == "fail"
    assert by_id["GHSA-fmg6-v47x-52wr"]["status"] == "fail"
    _, verdict = run_suite(pytester, tree, "--kata-shim", "qemu")
    by_id = {r["id"]: r for r in verdict["results"]}
    assert by_id["GHSA-2gv2-cffp-j227"]["status"] == "notapplicable"
    assert by_id["GHSA-fmg6-v47x-52wr"]["status"] == "notapplicable"
    assert "affects Confidential Containers configurations only" in by_id["GHSA-fmg6-v47x-52wr"]["evidence"][
        "decided_by"]


def test_medium_advisory_rejects_under_fail_on_high(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """wwj6 and rr59 are MODERATE/Medium: an affected candidate is still rejected at --kata-fail-on high."""
    feed_path = tmp_path / "medium.json"
    medium = [a.raw for a in load_feed() if a.id in ("GHSA-wwj6-vghv-5p64", "GHSA-rr59-xxvx-96qr")]
    feed_path.write_text(json.dumps(medium))
    tree = make_shipping_tree(tmp_path / "t", "3.26.0", go=("clh",))
    result, verdict = run_suite(pytester, tree, "--kata-advisories", str(feed_path), "--kata-fail-on", "high")
    assert {r["id"]: (r["status"], r["severity"]) for r in verdict["results"]} == {
        "GHSA-wwj6-vghv-5p64": ("fail", "medium"), "GHSA-rr59-xxvx-96qr": ("fail", "medium")}
    assert verdict["verdict"] == "reject" and result.ret == 1


def git(repo: Path, *args: str) -> str:
    import subprocess

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.org", "PATH": "/usr/bin:/bin", "HOME": str(repo)}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.fixture
def fix_history(tmp_path: Path) -> dict[str, Any]:
    """A git repository made here: tag 3.26.0, a commit before the fix, the fix, a commit after it; and a
    feed whose record names the fix commit by a GIT range and a pseudo-version (as GHSA records do)."""
    repo = tmp_path / "kata"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    commits = {}
    for name in ("base", "before", "fix", "after"):
        (repo / "f").write_text(name)
        git(repo, "add", "f")
        git(repo, "commit", "-q", "-m", name)
        commits[name] = git(repo, "rev-parse", "HEAD")
        if name == "base":
            git(repo, "tag", "3.26.0")
    git(repo, "checkout", "-q", "-b", "side", commits["before"])  # a branch that never got the fix
    (repo / "g").write_text("side")
    git(repo, "add", "g")
    git(repo, "commit", "-q", "-m", "side")
    commits["side"] = git(repo, "rev-parse", "HEAD")
    fix = commits["fix"]
    pseudo = f"0.0.0-20260219090056-{fix[:12]}"
    rec = record(id="GHSA-2345-6789-cfgh", database_specific={"severity": "MODERATE"}, affected=[
        {"package": {"ecosystem": "Go", "name": "github.com/kata-containers/kata-containers"},
         "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": pseudo}]}]},
        {"ranges": [{"type": "GIT", "repo": "https://github.com/kata-containers/kata-containers",
                     "events": [{"introduced": "0"}, {"fixed": fix}]}]}])
    feed = tmp_path / "feed.json"
    feed.write_text(json.dumps([rec]))
    return {"repo": repo, "commits": commits, "feed": feed, "advisory": load_feed([feed])[0]}


def test_commit_builds_are_decided_by_ancestry_in_both_directions(fix_history: dict[str, Any]) -> None:
    advisory, repo, c = fix_history["advisory"], fix_history["repo"], fix_history["commits"]
    for name, affected in (("before", True), ("fix", False), ("after", False), ("side", True)):
        pseudo = f"0.0.0-20260301000000-{c[name][:12]}"
        describe = f"3.26.0-{3 if name == 'after' else 1}-g{c[name][:9]}"
        for version in (pseudo, describe):
            decision = decide_build(advisory, version, repo=repo)
            assert (decision.affected, decision.undecided) == (affected, False), (name, version, decision)
            assert ("is not an ancestor" if affected else "is an ancestor") in decision.evidence
    # without the repository a commit build cannot be decided (and says how to fix that) ...
    undecided = decide_build(advisory, f"0.0.0-20260301000000-{c['after'][:12]}")
    assert undecided.undecided and "--kata-repo" in undecided.evidence
    # ... and a commit the repository lacks is a one-line error
    with pytest.raises(FeedError, match="commit 1234567890ab is not in the repository"):
        decide_build(advisory, "0.0.0-20260301000000-1234567890ab", repo=repo)


def test_suite_commit_build_with_kata_commit_and_kata_repo(pytester: pytest.Pytester, tmp_path: Path,
                                                           fix_history: dict[str, Any]) -> None:
    tree = make_kata_tree(tmp_path / "t", "3.26.0")
    c = fix_history["commits"]
    args = ("--kata-advisories", str(fix_history["feed"]), "--kata-repo", str(fix_history["repo"]))
    result, verdict = run_suite(pytester, tree, *args, "--kata-commit", c["after"])
    assert verdict["results"][0]["status"] == "pass", result.stdout.str()
    assert "is an ancestor" in verdict["results"][0]["evidence"]["decided_by"]
    assert verdict["verdict"] == "accept"
    result, verdict = run_suite(pytester, tree, *args, "--kata-commit", c["before"])
    assert verdict["results"][0]["status"] == "fail" and verdict["verdict"] == "reject"
    assert verdict["results"][0]["evidence"]["build"]["commit"] == c["before"]


def test_version_is_checked_against_the_shim_binary(pytester: pytest.Pytester, tmp_path: Path) -> None:
    lying = make_shipping_tree(tmp_path / "lie", "4.1.0", go=("qemu",), shim_says="3.30.0")
    result, verdict = run_suite(pytester, lying)
    assert {r["status"] for r in verdict["results"]} == {"error"} and verdict["verdict"] == "reject"
    result.stdout.fnmatch_lines(["*containerd-shim-kata-v2 --version (go) says 3.30.0 but VERSION says 4.1.0*"])
    honest = make_shipping_tree(tmp_path / "ok", "4.1.0", go=("qemu",), shim_says="4.1.0")
    _, verdict = run_suite(pytester, honest)
    assert verdict["verdict"] == "accept"
    build = verdict["results"][0]["evidence"]["build"]
    assert build["binaries"] == {"containerd-shim-kata-v2 --version (go)": "4.1.0"} and not build["mismatches"]
    _, verdict = run_suite(pytester, make_shipping_tree(tmp_path / "noshim", "4.1.0", go=("qemu",)))
    assert verdict["verdict"] == "accept"
    assert any("ships no runnable containerd-shim-kata-v2" in n
               for n in verdict["results"][0]["evidence"]["build"]["binary_notes"])


def test_vendor_build_is_judged_by_its_base_plus_the_backport_list(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    backports = tmp_path / "backports.toml"
    backports.write_text('[backports]\n"GHSA-wwj6-vghv-5p64" = "6a672503 cherry-picked as abc1234 in kata2"\n')
    feed = {a.id: a for a in load_feed()}
    kept = load_backports(backports)
    fixed = decide_build(feed["GHSA-wwj6-vghv-5p64"], "3.19.1.kata2", backports=kept,
                         backports_file=str(backports))
    assert not fixed.affected and fixed.backported and "abc1234" in fixed.evidence
    assert fixed.evidence.startswith("vendor build 3.19.1.kata2 judged by its upstream base 3.19.1")
    still = decide_build(feed["GHSA-rr59-xxvx-96qr"], "3.19.1.kata2", backports=kept)
    assert still.affected and still.backported is None
    rc, out, _ = run_cli(capsys, "advisories", "--version", "3.19.1.kata2", "--backports", str(backports), "--all")
    assert rc == 1 and "[not affected] Kata Container to Guest micro VM" in out and "backported" in out
    backports.write_text("backports = 3\n")
    rc, _, err = run_cli(capsys, "advisories", "--version", "3.19.1.kata2", "--backports", str(backports))
    assert rc == 2 and str(backports) in err and "[backports] table" in err


def test_refresh_merges_and_keeps_explicit_version_lists(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """An upstream GHSA record (pseudo-version range only, newer) merges into the feed: the feed keeps its
    other records and this record's explicit versions enumeration and scope."""
    target = tmp_path / "feed.json"
    target.write_text(DEFAULT_FEED.read_text())
    shipped = {a.id: a for a in load_feed()}
    upstream = copy.deepcopy(shipped["GHSA-wwj6-vghv-5p64"].raw)
    upstream["affected"] = upstream["affected"][:1]  # what GitHub publishes: the Go pseudo-version range
    upstream["database_specific"] = {"severity": "MODERATE"}
    upstream["modified"] = "2027-01-01T00:00:00Z"
    new = record(id="GHSA-3456-789c-fghj", affected=[{"versions": ["4.1.0"]}])
    source = tmp_path / "upstream.json"
    source.write_text(json.dumps([upstream, new]))
    rc, out, _ = run_cli(capsys, "advisories", "refresh", "--from", str(source), "--to", str(target))
    assert rc == 0 and "1 added, 0 removed, 1 changed, 15 kept" in out
    merged = {a.id: a for a in load_feed([target])}
    assert set(merged) == set(shipped) | {"GHSA-3456-789c-fghj"}
    wwj6 = merged["GHSA-wwj6-vghv-5p64"]
    assert wwj6.modified == "2027-01-01T00:00:00Z" and scope_of(wwj6).hypervisors == ("clh",)
    assert decide(wwj6, "3.26.0").evidence == "3.26.0 listed in affected[1].versions (GIT entry)"
    rc, out, _ = run_cli(capsys, "advisories", "refresh", "--from", str(source), "--to", str(target),
                         "--replace", "--dry-run")
    assert rc == 0 and "would write 2" in out and "15 removed" in out


def test_version_is_checked_against_the_agent_in_the_guest_image(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """A real ext4 guest image whose osbuilder record names another agent version than the bundle's VERSION."""
    from pytest_kata.images.common import make_ext4_disk

    rootfs = tmp_path / "rootfs"
    (rootfs / "var/lib/osbuilder").mkdir(parents=True)
    (rootfs / "var/lib/osbuilder/osbuilder.yaml").write_text("agent:\n  version: 3.30.0\n  url: x\n")
    tree = make_shipping_tree(tmp_path / "t", "4.1.0", go=("qemu",))
    (tree / "share/kata-containers").mkdir(parents=True)
    make_ext4_disk(rootfs, tree / "share/kata-containers/kata-containers.img")
    result, verdict = run_suite(pytester, tree)
    assert verdict["verdict"] == "reject" and {r["status"] for r in verdict["results"]} == {"error"}
    result.stdout.fnmatch_lines(["*agent.version in share/kata-containers/kata-containers.img:"
                                 "/var/lib/osbuilder/osbuilder.yaml says 3.30.0 but VERSION says 4.1.0*"])
