"""Rolling update across hosts: N at a time, a health gate after each batch, and a full stop-and-roll-back
when an install or a gate fails.

Why stop everything on one failure: a candidate that breaks one host of a fleet is a bad candidate, and
the hosts already updated run it too. They are rolled back newest first (the reverse of the update
order), so that the fleet returns to the baseline the way it left it. Every decision is in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_kata import progress
from pytest_kata.bundle import Bundle
from pytest_kata.install.workloads import WorkloadProbe


class Target(Protocol):
    """What the rollout drives on each host (an :class:`~pytest_kata.install.installer.Installer`)."""

    def install(self, bundle: Bundle) -> Any: ...

    def rollback(self) -> Any: ...


@dataclass
class GateResult:
    ok: bool
    detail: str = ""


Gate = Callable[[str, Any, Any], "GateResult | bool | tuple[bool, str]"]  # (host name, target, install report)


def target_name(target: Any) -> str:
    return str(getattr(target, "name", None) or getattr(getattr(target, "host", None), "name", None) or target)


def _as_gate_result(value: Any) -> GateResult:
    if isinstance(value, GateResult):
        return value
    if isinstance(value, tuple):
        return GateResult(bool(value[0]), str(value[1]) if len(value) > 1 else "")
    return GateResult(bool(value), "")


def handlers_gate(name: str, target: Any, report: Any) -> GateResult:
    """The default gate: containerd answers and reports every ``kata-*`` handler the install wrote."""
    containerd = getattr(target, "containerd", None)
    if containerd is None or containerd.unavailable():
        reason = containerd.unavailable() if containerd is not None else "no containerd service"
        return GateResult(True, f"handlers not checked: {reason}")
    if not containerd.answers():
        return GateResult(False, "containerd does not answer")
    reported = containerd.handlers()
    expected = getattr(report, "handlers", {}) or {}
    missing = sorted(h for h in expected if h.startswith("kata-") and h not in reported)
    if missing:
        return GateResult(False, f"containerd lacks handlers {', '.join(missing)}")
    return GateResult(True, f"{sum(1 for h in reported if h.startswith('kata-'))} kata handlers answer")


def smoke_gate(name: str, target: Any, report: Any) -> GateResult:
    """The handlers gate, then a smoke run: one workload through every handler whose shim is on the host
    (``kata-*``) and through ``runc`` as a control; any of them failing to run fails the gate. Handlers without
    a shim on the host are named in the detail, not counted as passing."""
    handlers = handlers_gate(name, target, report)
    containerd = getattr(target, "containerd", None)
    if not handlers.ok or containerd is None or containerd.unavailable():
        return handlers
    probe = WorkloadProbe(target, tag=f"smoke{int(time.time() * 1000) % 10**8:08d}")
    try:
        planted = probe.plant().planted
    except Exception as exc:
        return GateResult(False, f"{handlers.detail}; smoke could not start: {exc}")
    finally:
        probe.cleanup()
    broken = probe.report.broken_at_plant()
    if broken:
        return GateResult(False, f"{handlers.detail}; smoke failed: "
                          + "; ".join(f"{w.handler} does not run a workload: "
                                      f"{w.before.removeprefix('did not run before the upgrade: ')}" for w in broken))
    ran = [w.handler for w in planted if w.ran_before]
    absent = [w.handler for w in planted if not w.runnable]
    return GateResult(True, f"{handlers.detail}; smoke ran through {', '.join(ran) or 'no handler'}"
                      + (f"; no shim on the host for {', '.join(absent)}" if absent else ""))


def rolling_update(targets: Sequence[Any], bundle: Bundle, *, batch_size: int = 1,
                   gate: Gate | None = None, parallel: bool = False) -> dict[str, Any]:
    """Update ``targets`` in order, ``batch_size`` at a time, gating after each batch.

    Returns a report: ``order``, ``batches``, ``events`` (install/gate/rollback in the order they
    happened, with durations), ``gates``, ``failed`` (host, stage, detail), ``rolled_back`` (newest first)
    with each rollback's outcome, and ``result``: ``updated``, ``rolled-back`` or ``rollback-incomplete``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    gate = gate or smoke_gate
    names = [target_name(t) for t in targets]
    batches = [list(range(i, min(i + batch_size, len(targets)))) for i in range(0, len(targets), batch_size)]
    report: dict[str, Any] = {"bundle": getattr(bundle, "label", str(bundle)), "batch_size": batch_size,
                              "order": names, "batches": [[names[i] for i in b] for b in batches],
                              "events": [], "gates": {}, "installs": {}, "failed": None, "rolled_back": [],
                              "rollbacks": {}, "result": "updated"}
    updated: list[int] = []  # indexes whose install committed, in update order

    def install_one(i: int) -> tuple[int, Any, BaseException | None, float]:
        start = time.monotonic()
        try:
            return i, targets[i].install(bundle), None, time.monotonic() - start
        except Exception as exc:  # the installer rolled itself back already
            return i, None, exc, time.monotonic() - start

    for number, batch in enumerate(batches, 1):
        progress.step("rollout", f"batch {number}/{len(batches)}: {', '.join(names[i] for i in batch)}")
        if parallel and len(batch) > 1:
            with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                outcomes = list(pool.map(install_one, batch))
        else:
            outcomes = [install_one(i) for i in batch]
        results: dict[int, Any] = {}
        for i, result, error, seconds in outcomes:
            ok = error is None
            report["events"].append({"host": names[i], "action": "install", "ok": ok, "seconds": round(seconds, 3),
                                     "detail": str(error) if error else getattr(result, "release", "")})
            report["installs"][names[i]] = (result.to_json() if hasattr(result, "to_json") else result) if ok \
                else {"error": str(error)}
            if ok:
                updated.append(i)
                results[i] = result
            elif report["failed"] is None:
                report["failed"] = {"host": names[i], "stage": "install", "detail": str(error)}
        if report["failed"] is None:
            for i in batch:
                start = time.monotonic()
                try:
                    verdict = _as_gate_result(gate(names[i], targets[i], results[i]))
                except Exception as exc:
                    verdict = GateResult(False, f"gate raised {type(exc).__name__}: {exc}")
                report["gates"][names[i]] = {"ok": verdict.ok, "detail": verdict.detail}
                report["events"].append({"host": names[i], "action": "gate", "ok": verdict.ok,
                                         "seconds": round(time.monotonic() - start, 3), "detail": verdict.detail})
                if not verdict.ok:
                    report["failed"] = {"host": names[i], "stage": "gate", "detail": verdict.detail}
                    break
        if report["failed"] is not None:
            progress.step("rollout", f"stopping: {report['failed']['stage']} failed on {report['failed']['host']}; "
                                     f"rolling back {len(updated)} updated hosts")
            report["result"] = "rolled-back"
            for i in reversed(updated):
                start = time.monotonic()
                try:
                    outcome = targets[i].rollback()
                    restored = bool(getattr(outcome, "restored", True))
                    detail = getattr(outcome, "message", "rolled back")
                except Exception as exc:
                    restored, detail = False, f"rollback raised {type(exc).__name__}: {exc}"
                report["rolled_back"].append(names[i])
                report["rollbacks"][names[i]] = {"restored": restored, "detail": detail}
                report["events"].append({"host": names[i], "action": "rollback", "ok": restored,
                                         "seconds": round(time.monotonic() - start, 3), "detail": detail})
                if not restored:
                    report["result"] = "rollback-incomplete"
            report["not_updated"] = [names[i] for i in range(len(targets)) if i not in updated
                                     and names[i] != report["failed"]["host"]]
            return report
    return report
