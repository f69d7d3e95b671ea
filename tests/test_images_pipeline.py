"""``pytest-kata images rebuild-and-scan``: the scheduled rebuild + scan + compare job, on the real guest image.

The image is the cached ``reference`` guest (built once per machine); the feeds are the real fixture feeds
from ../shared plus one feed written here that plays "a new advisory was published for a package in the
image" (the new-feed trigger), which must turn the gate red exactly once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_kata.cli import main
from pytest_kata.errors import KataError

SHARED_FEEDS = Path(__file__).resolve().parents[1].parent / "shared/data/vuln-fixtures/feeds"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_guest():
    from pytest_kata.images.guest import build_guest

    return build_guest("reference")


def _new_advisory_feed(path: Path, installed: str) -> Path:
    """A Debian-tracker-shaped feed saying busybox (the guest's shell) is fixed only in a later version."""
    feed = {"busybox": {"CVE-2022-48174": {
        "description": "simulated publication for the pipeline test: stack overflow in ash",
        "scope": "local",
        "releases": {"bookworm": {"status": "open", "urgency": "high",
                                  "repositories": {"bookworm": installed.split(":", 1)[-1]}}}}}}
    path.write_text(json.dumps(feed))
    return path


def test_new_feed_makes_new_findings_fail_once(reference_guest, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    if not SHARED_FEEDS.is_dir():
        pytest.skip(f"shared vulnerability fixtures absent: {SHARED_FEEDS}")
    from pytest_kata.images.pipeline import rebuild_and_scan

    state = tmp_path / "state.json"
    base_feed = str(SHARED_FEEDS / "debian-tracker-bookworm-subset.json")
    first = rebuild_and_scan("guest-reference", [base_feed], fail_on="high", state=state)
    assert first.key == reference_guest.key and not first.rebuilt
    assert state.exists() and json.loads(state.read_text())["key"] == reference_guest.key

    new_feed = _new_advisory_feed(tmp_path / "new-feed.json", reference_guest.packages["busybox-static"])
    second = rebuild_and_scan("guest-reference", [base_feed, str(new_feed)], fail_on="low", state=state)
    assert [f["id"] for f in second.new] == ["CVE-2022-48174"]
    assert second.gate, "a new open advisory on busybox must fail the gate"
    assert second.previous_key == second.key  # the image did not change: the feed did

    # Same inputs again: the finding is known now, so the gate passes (through the CLI, exit 0).
    code = main(["images", "rebuild-and-scan", "guest-reference", "--feed", base_feed, "--feed", str(new_feed),
                 "--fail-on", "low", "--state", str(state)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 new" in out and "-> pass" in out


def test_bad_pipeline_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_kata.images.pipeline import rebuild_and_scan

    with pytest.raises(KataError, match="no such feed"):
        rebuild_and_scan("guest-reference", [str(tmp_path / "absent.json")])
    broken = tmp_path / "state.json"
    broken.write_text("{not json")
    feed = tmp_path / "empty.json"
    feed.write_text("{}")
    assert main(["images", "rebuild-and-scan", "guest-reference", "--feed", str(feed), "--state",
                 str(broken)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("[kata")]
    assert len(err) == 1 and "state file is not JSON" in err[0]
