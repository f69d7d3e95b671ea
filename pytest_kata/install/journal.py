"""The install journal: every step of every install and rollback, as JSON lines on the host itself.

The journal lives on the host (``/var/lib/pytest-kata/install/journal.jsonl`` below the sysroot), not in
the harness, so that whoever comes next — a resumed install, ``pytest-kata rollback`` from another machine,
an operator — can see what was done and undo it. A step is written as ``begin`` before it changes
anything and ``done`` (with the data its undo needs) after; a crash between the two leaves a ``begin``
whose undo must cope with a half-done step (every undo here is idempotent).
"""

from __future__ import annotations

import json
import secrets
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host

JOURNAL_DIR = "/var/lib/pytest-kata/install"
JOURNAL_FILE = "journal.jsonl"


class JournalError(KataError):
    """The journal on a host is unreadable or inconsistent."""


@dataclass
class Step:
    name: str
    status: str  # begin / done / failed / skipped / undone
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Transaction:
    """One install or rollback, rebuilt from the journal lines."""

    id: str
    kind: str  # install / rollback
    status: str  # running / committed / aborted / rolled-back / failed / done
    data: dict[str, Any] = field(default_factory=dict)
    steps: dict[str, Step] = field(default_factory=dict)  # in the order they began; data merged

    def step(self, name: str) -> Step | None:
        return self.steps.get(name)

    @property
    def done_steps(self) -> list[str]:
        return [s.name for s in self.steps.values() if s.status in ("done", "skipped")]


class Journal:
    """Append-only JSON lines on ``host`` below ``sysroot``."""

    def __init__(self, host: Host, sysroot: str = "/") -> None:
        self.host = host
        self.sysroot = sysroot.rstrip("/")
        self.dir = f"{self.sysroot}{JOURNAL_DIR}"
        self.path = f"{self.dir}/{JOURNAL_FILE}"

    def tx_dir(self, tx: str) -> str:
        return f"{self.dir}/{tx}"

    @staticmethod
    def new_tx_id(kind: str) -> str:
        return f"{kind}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"

    def write(self, tx: str, kind: str, step: str, status: str, **data: Any) -> None:
        line = json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tx": tx, "kind": kind,
                           "step": step, "status": status, "data": data}, sort_keys=True, default=str)
        result = self.host.run(f"mkdir -p {shlex.quote(self.dir)} && cat >> {shlex.quote(self.path)}",
                               stdin=(line + "\n").encode())
        if not result.ok:
            raise JournalError(f"cannot append to the install journal: {result.stderr.strip()[-200:]}",
                               path=f"{self.host.name}:{self.path}")

    def lines(self) -> list[dict[str, Any]]:
        result = self.host.run(f"cat {shlex.quote(self.path)} 2>/dev/null || true")
        out = []
        for n, text in enumerate(result.stdout.splitlines(), 1):
            if not text.strip():
                continue
            try:
                out.append(json.loads(text))
            except json.JSONDecodeError:
                if n == len(result.stdout.splitlines()):
                    continue  # a torn last line from a crash mid-write: ignore it
                raise JournalError(f"line {n} is not JSON", path=f"{self.host.name}:{self.path}") from None
        return out

    def transactions(self) -> list[Transaction]:
        txs: dict[str, Transaction] = {}
        for line in self.lines():
            tx = txs.get(line["tx"])
            if tx is None:
                tx = txs[line["tx"]] = Transaction(line["tx"], line.get("kind", "install"), "running")
            if line["step"] == "tx":
                tx.status = line["status"] if line["status"] != "begin" else "running"
                tx.data.update(line.get("data", {}))
            else:
                step = tx.steps.setdefault(line["step"], Step(line["step"], line["status"]))
                step.status = line["status"]
                step.data.update(line.get("data", {}))
        return list(txs.values())

    def last(self, kind: str = "install") -> Transaction | None:
        for tx in reversed(self.transactions()):
            if tx.kind == kind:
                return tx
        return None
