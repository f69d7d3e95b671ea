"""Rolling updates: order, batches, health gates, stop-and-roll-back. Fake targets for the decision logic;
real installers on local sysroots for the 2-host "gate fails on host 2 rolls back 1 and 2" case."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pytest_kata.hosts.base import LocalHost
from pytest_kata.install import Installer
from pytest_kata.install.rollout import GateResult, rolling_update
from tests.test_install import make_bundle


class FakeTarget:
    """Records what the rollout asked it to do; can fail its install."""

    def __init__(self, name: str, log: list[str], *, install_fails: bool = False) -> None:
        self.name = name
        self.log = log
        self.install_fails = install_fails
        self.installed = False

    def install(self, bundle: Any) -> Any:
        self.log.append(f"install {self.name}")
        if self.install_fails:
            raise RuntimeError(f"{self.name}: unpack failed (rolled back by itself)")
        self.installed = True
        return {"release": bundle}

    def rollback(self) -> Any:
        self.log.append(f"rollback {self.name}")
        self.installed = False
        return type("R", (), {"restored": True, "message": f"{self.name} restored"})()


def fleet(n: int, **fail: bool) -> tuple[list[FakeTarget], list[str]]:
    log: list[str] = []
    return [FakeTarget(f"h{i}", log, install_fails=fail.get(f"h{i}", False)) for i in range(1, n + 1)], log


def gate_failing_on(*names: str) -> Any:
    def gate(name: str, target: Any, report: Any) -> GateResult:
        target.log.append(f"gate {name}")
        return GateResult(name not in names, "smoke failed" if name in names else "ok")
    return gate


def test_all_hosts_updated_one_at_a_time_with_a_gate_after_each() -> None:
    targets, log = fleet(3)
    report = rolling_update(targets, "4.1.0", gate=gate_failing_on())
    assert report["result"] == "updated" and report["failed"] is None and report["rolled_back"] == []
    assert log == ["install h1", "gate h1", "install h2", "gate h2", "install h3", "gate h3"]
    assert report["batches"] == [["h1"], ["h2"], ["h3"]] and all(g["ok"] for g in report["gates"].values())


def test_failing_gate_on_host_2_rolls_back_hosts_2_and_1_newest_first() -> None:
    targets, log = fleet(3)
    report = rolling_update(targets, "4.1.0", gate=gate_failing_on("h2"))
    assert log == ["install h1", "gate h1", "install h2", "gate h2", "rollback h2", "rollback h1"]
    assert report["result"] == "rolled-back"
    assert report["failed"] == {"host": "h2", "stage": "gate", "detail": "smoke failed"}
    assert report["rolled_back"] == ["h2", "h1"] and report["not_updated"] == ["h3"]
    assert [e["action"] for e in report["events"]] == ["install", "gate", "install", "gate", "rollback",
                                                       "rollback"]
    assert not any(t.installed for t in targets)


def test_batches_of_two_and_a_failed_install_stops_before_its_gate() -> None:
    targets, log = fleet(5, h3=True)
    report = rolling_update(targets, "4.1.0", batch_size=2, gate=gate_failing_on())
    assert report["batches"] == [["h1", "h2"], ["h3", "h4"], ["h5"]]
    assert log == ["install h1", "install h2", "gate h1", "gate h2", "install h3", "install h4",
                   "rollback h4", "rollback h2", "rollback h1"]
    assert report["failed"]["host"] == "h3" and report["failed"]["stage"] == "install"
    assert report["not_updated"] == ["h5"]


def test_parallel_batch_and_a_gate_that_raises() -> None:
    targets, log = fleet(2)

    def gate(name: str, target: Any, report: Any) -> bool:
        raise TimeoutError("handler did not answer")

    report = rolling_update(targets, "4.1.0", batch_size=2, gate=gate, parallel=True)
    assert sorted(log[:2]) == ["install h1", "install h2"]
    assert report["gates"]["h1"] == {"ok": False, "detail": "gate raised TimeoutError: handler did not answer"}
    assert report["rolled_back"] == ["h2", "h1"]
    with pytest.raises(ValueError):
        rolling_update(targets, "x", batch_size=0)


def test_real_two_host_rollout_gate_failure_restores_both(tmp_path: Path) -> None:
    baseline = make_bundle(tmp_path / "b", "3.30.0")
    candidate = make_bundle(tmp_path / "c", "3.31.0", shims=("qemu", "clh"),
                            extra={"share/kata-containers/new-kernel": "B"})
    installers = []
    for name in ("host-1", "host-2"):
        root = tmp_path / name
        root.mkdir()
        installer = Installer(LocalHost(name), str(root))
        installer.install(baseline)
        installers.append(installer)
    before = {i.host.name: i.capture().digest for i in installers}

    def smoke(name: str, installer: Any, report: Any) -> tuple[bool, str]:
        ok = name != "host-2" and (Path(installer.sysroot) / "opt/kata/share/kata-containers/new-kernel").exists()
        return ok, "candidate files present" if ok else "smoke suite failed on host-2"

    report = rolling_update(installers, candidate, gate=smoke)
    assert report["order"] == ["host-1", "host-2"] and report["rolled_back"] == ["host-2", "host-1"]
    assert report["gates"] == {"host-1": {"ok": True, "detail": "candidate files present"},
                               "host-2": {"ok": False, "detail": "smoke suite failed on host-2"}}
    assert all(r["restored"] for r in report["rollbacks"].values())
    assert {i.host.name: i.capture().digest for i in installers} == before
