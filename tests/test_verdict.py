"""The verdict: accept/reject by severity, totals, JSON shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pytest_kata.verdict import Result, Verdict


def _r(status: str, severity: str, rid: str = "R") -> Result:
    return Result(id=rid, suite="s", status=status, severity=severity, title="t")


def test_failure_below_threshold_is_accepted_at_threshold_rejected() -> None:
    assert Verdict({}, [_r("fail", "medium"), _r("pass", "high")], "high").verdict == "accept"
    assert Verdict({}, [_r("fail", "high"), _r("pass", "high")], "high").verdict == "reject"
    assert Verdict({}, [_r("fail", "medium")], "medium").verdict == "reject"


def test_error_counts_like_failure_and_waived_does_not() -> None:
    assert Verdict({}, [_r("error", "critical")], "high").verdict == "reject"
    assert Verdict({}, [_r("waived", "critical")], "high").verdict == "accept"


def test_empty_or_all_skipped_run_is_rejected() -> None:
    v = Verdict({}, [_r("notapplicable", "high"), _r("skipped", "high")], "high")
    assert v.verdict == "reject" and "no check ran" in v.reasons[0]


def test_json_has_the_documented_shape(tmp_path: Path) -> None:
    v = Verdict({"path": "c", "version": "4.1.0", "sha256": "ab"}, [_r("fail", "high", "KATA-CFG-001")], "high")
    out = tmp_path / "v.json"
    v.write(out)
    data = json.loads(out.read_text())
    assert set(data) >= {"candidate", "results", "totals", "verdict"}
    assert data["verdict"] == "reject" and data["totals"]["fail"] == 1
    assert set(data["results"][0]) >= {"id", "suite", "status", "severity", "title", "evidence"}
    assert "KATA-CFG-001" in v.table()


def test_side_by_side_names_each_blocking_advisory_with_its_effect(tmp_path):
    from pytest_kata.verdict import side_by_side

    def doc(status: str, effect: str) -> dict:
        return {"verdict": "reject" if status == "fail" else "accept", "totals": {status: 1},
                "results": [{"id": "KATA-ESC-005[dynamic-virtio_fs_daemon]", "status": status, "title": "t",
                             "evidence": {"advisory": "CVE-2020-27151", "mode": "dynamic", "effect": effect}}]}

    text = side_by_side([("1.11.5", doc("pass", "refused")), ("1.11.0", doc("fail", "marker appeared: uid=0"))])
    assert "KATA-ESC-005[dynamic-virtio_fs_daemon] pass      fail" in text
    assert "1.11.0: VERDICT REJECT" in text and "1.11.5: VERDICT ACCEPT" in text
    assert "[CVE-2020-27151, dynamic]: marker appeared: uid=0" in text and "refused" not in text
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "pytest_kata.cli", "compare", str(bad)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == f"pytest-kata: error: {bad}: not a verdict JSON (no " \
        "results list)"
