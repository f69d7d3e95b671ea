"""The vulnerability scanner on the real fixture (../shared/data/vuln-fixtures): it finds exactly what debsecan
finds (debsecan is run for real here), matches expected-findings.json, weights the real kernel CNA record by
real kernel configs; plus synthetic edge cases of each feed format (labelled synthetic)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from pytest_kata.errors import FeedError, KataError
from pytest_kata.images.common import host_kernel, make_ext4_disk
from pytest_kata.images.packages import InstalledPackage
from pytest_kata.vuln import debsecan, scan
from pytest_kata.vuln.feeds import FeedSet, Release, load_feed
from pytest_kata.vuln.kernel import evaluate_kernel, load_kbuild_map, read_kconfig
from pytest_kata.vuln.match import match_packages

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vuln-fixtures"
ROOTFS = FIXTURE / "debian12-rootfs"
STATUS = ROOTFS / "var/lib/dpkg/status"
TRACKER = FIXTURE / "feeds/debian-tracker-bookworm-subset.json"
DEBSECAN_FEED_DIR = FIXTURE / "feeds/debsecan"
KERNEL_RECORD = FIXTURE / "feeds/linux-cve/CVE-2024-26581.json"
KATA_FRAGMENTS = [FIXTURE / "kernel/kata-4.1.0-fragment-common-network.conf",
                  FIXTURE / "kernel/kata-4.1.0-fragment-common-namespaces.conf"]
try:
    HOST_CONFIG = host_kernel().config
except KataError:  # no Debian kernel installed: the test that needs one skips and says so
    HOST_CONFIG = Path("/boot/config-amd64")

needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="../shared/data/vuln-fixtures is absent")


def run_debsecan(status: Path = STATUS, feed_dir: Path = DEBSECAN_FEED_DIR) -> set[tuple[str, str]]:
    """(CVE, binary package) pairs reported by the real debsecan, offline."""
    if shutil.which("debsecan") is None:
        pytest.skip("debsecan is not installed (apt-get install debsecan)")
    return debsecan.run_debsecan(status, feed_dir)


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURE / "expected/expected-findings.json").read_text())


@needs_fixture
@pytest.mark.parametrize("feed", [TRACKER, DEBSECAN_FEED_DIR], ids=["tracker-json", "debsecan-feed"])
def test_scanner_agrees_with_debsecan(feed: Path, expected: dict) -> None:
    oracle = run_debsecan()
    assert oracle == {(e["id"], e["binary_package"]) for e in expected["debian"]}, "debsecan itself changed"
    result = scan(ROOTFS, [feed])
    ours = {(f.id, f.package) for f in result.findings}
    assert ours == oracle
    for f in result.findings:  # every expected field, not just the ids
        exp = next(e for e in expected["debian"] if (e["id"], e["binary_package"]) == (f.id, f.package))
        assert (f.installed, f.source, f.source_version, f.fixed_in) == \
            (exp["installed"], exp["source"], exp["source_version"], exp["fixed_in"])
        assert f.reasons and f.rank, "every finding carries a rank and the reasons for it"
    not_reported = {e["id"] for e in expected["debian_not_reported"]}
    assert not not_reported & {f.id for f in result.findings}


@needs_fixture
def test_agreement_holds_on_a_changed_status(tmp_path: Path) -> None:
    """Negative control: upgrade expat in the status file; both debsecan and the scanner drop its 3 CVEs and
    downgrade zlib below its fix: both add CVE-2022-37434."""
    text = STATUS.read_text()
    text = text.replace("Version: 2.5.0-1\n", "Version: 2.5.0-1+deb12u1\n")
    text = text.replace("Version: 1:1.2.13.dfsg-1\n", "Version: 1:1.2.11.dfsg-2\n")
    status = tmp_path / "status"
    status.write_text(text)
    oracle = run_debsecan(status)
    result = scan(status, [TRACKER], suite="bookworm")
    assert {(f.id, f.package) for f in result.findings} == oracle
    assert ("CVE-2022-37434", "zlib1g") in oracle and not any(c.startswith("CVE-2024-4549") for c, _ in oracle)


@needs_fixture
def test_scan_of_a_real_ext4_image(tmp_path: Path) -> None:
    """Scan the built artefact: the fixture rootfs in a partitioned ext4 disk, read back with debugfs."""
    img = tmp_path / "guest.img"
    make_ext4_disk(ROOTFS, img)
    result = scan(img, [TRACKER])
    assert {(f.id, f.package) for f in result.findings} == run_debsecan()
    assert result.release == Release("debian", "12", "bookworm")


@needs_fixture
@pytest.mark.parametrize(("kernel", "status"), [("6.18.35", "unaffected"), ("6.6.10", "affected"),
                                                ("6.6.17", "unaffected"), ("6.5.3", "affected"),
                                                ("6.7.5", "unaffected"), ("5.15.148", "unaffected")])
def test_kernel_record_versions(kernel: str, status: str, expected: dict) -> None:
    records = load_feed(KERNEL_RECORD).kernel_records
    kconfig = read_kconfig(KATA_FRAGMENTS)
    [finding] = evaluate_kernel(records, kernel, kconfig, load_kbuild_map(), include_unaffected=True)
    exp = next(e for e in expected["kernel"] if e["kernel"] == kernel and "note" not in e)
    assert (finding.version_status, finding.kconfig, finding.config_reachability) == \
        (exp["version_status"], exp["kconfig"], exp["config_reachability"]) == (status, ["CONFIG_NF_TABLES"], "built")


@needs_fixture
def test_kernel_weighting_on_real_configs(tmp_path: Path) -> None:
    """The real record against the Kata 4.1.0 fragments (NF_TABLES=y), this machine's Debian config (=m), and
    the same config with NF_TABLES off: built -> high, built as module -> high, not built -> info."""
    records = load_feed(KERNEL_RECORD).kernel_records
    [kata] = evaluate_kernel(records, "6.6.10", read_kconfig(KATA_FRAGMENTS))
    assert (kata.rank, kata.config_reachability) == ("high", "built")
    assert any("CONFIG_USER_NS" in r for r in kata.reasons)  # the namespaces fragment enables it
    if not HOST_CONFIG.is_file():
        pytest.skip(f"{HOST_CONFIG} absent")
    host = read_kconfig([HOST_CONFIG])
    assert host["CONFIG_NF_TABLES"] == "m"
    [debian] = evaluate_kernel(records, "6.6.10", host)
    assert (debian.rank, debian.config_reachability) == ("high", "built")
    assert evaluate_kernel(records, "6.1.192", host) == []  # the running Debian kernel has the fix (6.1.78+)
    off = tmp_path / "config-off"
    off.write_text(HOST_CONFIG.read_text().replace("CONFIG_NF_TABLES=m", "# CONFIG_NF_TABLES is not set"))
    [not_built] = evaluate_kernel(records, "6.6.10", read_kconfig([off]))
    assert (not_built.version_status, not_built.config_reachability, not_built.rank) == \
        ("affected", "not-built", "info")


@needs_fixture
def test_sbom_and_json(tmp_path: Path) -> None:
    from pytest_kata.vuln import cyclonedx

    result = scan(ROOTFS, [TRACKER, KERNEL_RECORD], kernel_version="6.6.10", kernel_config=KATA_FRAGMENTS)
    text = cyclonedx(result)
    bom = json.loads(text)
    assert bom["specVersion"] == "1.6"
    assert {c["name"] for c in bom["components"]} == {p.name for p in result.packages} | {"linux"}
    vulns = {(v["id"], v["affects"][0]["ref"].split("/")[2].split("@")[0]) for v in bom["vulnerabilities"]
             if v["affects"][0]["ref"].startswith("pkg:")}
    assert vulns == {(f.id, f.package) for f in result.findings}
    [kernel] = [v for v in bom["vulnerabilities"] if v["id"] == "CVE-2024-26581"]
    assert kernel["analysis"]["state"] == "exploitable" and kernel["affects"][0]["ref"] == "guest-kernel:6.6.10"
    from cyclonedx.exception import MissingOptionalDependencyException
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    try:  # against the official CycloneDX 1.6 schema (the json-validation extra is in .[dev])
        errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    except MissingOptionalDependencyException:
        errors = None
    assert errors is None, errors
    data = result.to_json()
    assert data["summary"]["kernel_affected"] == 1 and data["os"]["codename"] == "bookworm"
    json.dumps(data)


# -- synthetic edge cases (not real advisories) ------------------------------------------------------------
def _pkg(name: str, version: str, source: str | None = None, eco: str = "deb") -> InstalledPackage:
    return InstalledPackage(name, version, source or name, version, "amd64", 0, [], eco)


def test_synthetic_tracker_statuses(tmp_path: Path) -> None:
    feed = tmp_path / "tracker.json"
    feed.write_text(json.dumps({"foo": {
        "CVE-0000-0001": {"scope": "local", "releases": {"bookworm": {"status": "open", "urgency": "high"}}},
        "CVE-0000-0002": {"releases": {"bookworm": {"status": "undetermined"}}},
        "CVE-0000-0003": {"releases": {"bookworm": {"status": "resolved", "fixed_version": "0"}}},
        "CVE-0000-0004": {"releases": {"bookworm": {"status": "open", "nodsa": "yes", "nodsa_reason": "ignored",
                                                     "urgency": "unimportant"}}},
        "CVE-0000-0005": {"releases": {"bullseye": {"status": "open"}}},
    }}))
    found = match_packages([_pkg("foo", "1.0-1")], FeedSet.load([feed]), Release("debian", "12", "bookworm"))
    assert {f.id: (f.severity, f.fix_available) for f in found} == {
        "CVE-0000-0001": ("high", False), "CVE-0000-0002": ("unknown", False), "CVE-0000-0004": ("info", False)}


def test_synthetic_osv_ranges(tmp_path: Path) -> None:
    recs = [
        {"id": "DEBIAN-CVE-0000-1", "affected": [{"package": {"ecosystem": "Debian:12", "name": "bar"},
                                                   "ranges": [{"type": "ECOSYSTEM", "events": [
                                                       {"introduced": "0"}, {"last_affected": "2.0-1"}]}]}]},
        {"id": "DEBIAN-CVE-0000-2", "affected": [{"package": {"ecosystem": "Debian:12", "name": "bar"},
                                                   "ranges": [{"type": "ECOSYSTEM", "events": [
                                                       {"introduced": "1.5"}, {"fixed": "1.9-1"}]}]}]},
        {"id": "DEBIAN-CVE-0000-3", "withdrawn": "2024-01-01T00:00:00Z",
         "affected": [{"package": {"ecosystem": "Debian:12", "name": "bar"}, "ranges": [
             {"type": "ECOSYSTEM", "events": [{"introduced": "0"}]}]}]},
        {"id": "DEBIAN-CVE-0000-4", "affected": [{"package": {"ecosystem": "Debian:11", "name": "bar"},
                                                   "ranges": [{"type": "ECOSYSTEM", "events": [
                                                       {"introduced": "0"}]}]}]},
    ]
    osv_dir = tmp_path / "osv"
    osv_dir.mkdir()
    for r in recs:
        (osv_dir / f"{r['id']}.json").write_text(json.dumps(r))
    zipped = tmp_path / "all.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for r in recs:
            zf.writestr(f"{r['id']}.json", json.dumps(r))
    bookworm = Release("debian", "12", "bookworm")
    for feed in (osv_dir, zipped):
        fs = FeedSet.load([feed])
        assert {f.id for f in match_packages([_pkg("bar", "1.8-1")], fs, bookworm)} == \
            {"DEBIAN-CVE-0000-1", "DEBIAN-CVE-0000-2"}
        assert {f.id for f in match_packages([_pkg("bar", "2.0-1+deb12u1")], fs, bookworm)} == set()
        assert {f.id for f in match_packages([_pkg("bar", "1.2-1")], fs, bookworm)} == {"DEBIAN-CVE-0000-1"}


def test_synthetic_alpine_secdb(tmp_path: Path) -> None:
    feed = tmp_path / "main.json"
    feed.write_text(json.dumps({"distroversion": "v3.18", "reponame": "main", "packages": [
        {"pkg": {"name": "musl", "secfixes": {"1.2.4-r2": ["CVE-0000-0010"], "0": ["CVE-0000-0011"]}}},
        {"pkg": {"name": "busybox", "secfixes": {"1.36.1-r5": ["CVE-0000-0012"]}}}]}))
    alpine = Release("alpine", "3.18.4", "")
    fs = FeedSet.load([feed])
    found = match_packages([_pkg("musl", "1.2.4-r1", eco="apk"), _pkg("busybox-binsh", "1.36.1-r5", "busybox", "apk"),
                            _pkg("busybox", "1.36.1_git20230601-r0", eco="apk")], fs, alpine)
    by = {(f.id, f.package): f.status for f in found}
    assert by[("CVE-0000-0010", "musl")] == "affected"
    assert ("CVE-0000-0011", "musl") not in by  # "0": listed, not affected
    assert ("CVE-0000-0012", "busybox-binsh") not in by  # at the fixed version
    assert by[("CVE-0000-0012", "busybox")] == "undetermined"  # univers refuses _git: said, never guessed
    assert match_packages([_pkg("musl", "1.2.4-r1", eco="apk")], fs, Release("alpine", "3.19.0")) == []


def test_synthetic_debsecan_binary_entries(tmp_path: Path) -> None:
    """Binary (B) entries and the source-first lookup, checked against the real debsecan on the same files:
    a binary entry is only seen when the source has no entry at all (debsecan's lookup order)."""
    import zlib

    feed_dir = tmp_path / "feed"
    feed_dir.mkdir()
    (feed_dir / "bookworm").write_bytes(zlib.compress(
        b"VERSION 1\nCVE-0000-0020,,x\nCVE-0000-0021,,y\nCVE-0000-0022,,z\n\n"
        b"libfoo1,0,B ?F,1.1-1,\nfoo,1,S ?F,2.0-1,1.5-1+deb12u1\nlibbar1,2,B ?F,1.1-1,\n\nfoo,libfoo1\n"))
    status = tmp_path / "status"
    status.write_text("Package: libfoo1\nStatus: install ok installed\nVersion: 1.0-1\nSource: foo\n\n"
                      "Package: libbar1\nStatus: install ok installed\nVersion: 1.0-1\n\n"
                      "Package: libbaz1\nStatus: install ok installed\nVersion: 1.0-1\nSource: foo (1.5-1+deb12u1)\n")
    result = scan(status, [feed_dir / "bookworm"], suite="bookworm")
    ours = {(f.id, f.package) for f in result.findings}
    assert ours == {("CVE-0000-0021", "libfoo1"), ("CVE-0000-0022", "libbar1")}
    assert ours == run_debsecan(status, feed_dir)


# -- bad input: one line -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "invalid JSON"),
    (b'{"a": [1, 2]}', "not a recognised feed"),
    (b"\x78\x9c garbage", "corrupt debsecan feed"),
    (b"PK\x03\x04 broken zip", "corrupt OSV zip"),
    (b'{"dataType": "CVE_RECORD"}', "not a CVE JSON 5 record"),
    (b'[{"id": "X", "affected": [{"package": {"ecosystem": "Debian:12", "name": "a"}, "ranges": '
     b'[{"type": "ECOSYSTEM", "events": [{"fixed": "1"}]}]}]}]', "closes before it opens"),
])
def test_malformed_feeds(tmp_path: Path, content: bytes, message: str) -> None:
    feed = tmp_path / "feed.json"
    feed.write_bytes(content)
    with pytest.raises(FeedError, match=message) as info:
        load_feed(feed)
    assert "\n" not in str(info.value) and str(feed) in str(info.value)


def test_missing_feed(tmp_path: Path) -> None:
    with pytest.raises(FeedError, match="no such feed"):
        load_feed(tmp_path / "nope.json")


@needs_fixture
def test_every_expected_kernel_entry(expected: dict, tmp_path: Path) -> None:
    """All kernel rows of expected-findings.json, including 'same record with CONFIG_NF_TABLES=n'."""
    records = load_feed(KERNEL_RECORD).kernel_records
    off = tmp_path / "fragment-off.conf"
    off.write_text(KATA_FRAGMENTS[0].read_text().replace("CONFIG_NF_TABLES=y", "# CONFIG_NF_TABLES is not set"))
    for exp in expected["kernel"]:
        fragments = [off, KATA_FRAGMENTS[1]] if "NF_TABLES=n" in exp.get("note", "") else KATA_FRAGMENTS
        [got] = evaluate_kernel(records, exp["kernel"], read_kconfig(fragments), include_unaffected=True)
        assert (got.id, got.version_status, got.kconfig, got.config_reachability) == \
            (exp["id"], exp["version_status"], exp["kconfig"], exp["config_reachability"]), exp
