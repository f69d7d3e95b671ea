"""The Host Protocol (after testinfra's backends) and the ``local`` provider.

Every provider — a libvirt domain, this machine, an SSH staging host, or a fake in unit tests — offers the
same eight operations, so that installers, drivers and suites never care where a host lives.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pytest_kata.errors import KataError

TIMED_OUT = 124  # the exit status of a command a Host stopped at its timeout (as coreutils' timeout)

class HostError(KataError):
    """A host cannot be reached, booted or driven."""


@dataclass
class RunResult:
    command: str
    rc: int
    stdout: str
    stderr: str = ""
    duration: float = 0.0
    host: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0

    def check(self) -> RunResult:
        """Raise :class:`HostError` with the command, exit code and output tail unless it succeeded."""
        if not self.ok:
            tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise HostError(f"command failed with exit {self.rc}: {self.command!r}; last output: "
                            + " | ".join(tail), path=self.host or None)
        return self


def as_command(cmd: str | Sequence[str]) -> str:
    return cmd if isinstance(cmd, str) else shlex.join(cmd)


@runtime_checkable
class Host(Protocol):
    """What every host provider implements."""

    name: str

    def run(self, cmd: str | Sequence[str], *, timeout: float = 600.0, check: bool = False,
            stdin: bytes | None = None) -> RunResult:
        """Run a shell command as root on the host."""
        ...

    def put(self, local: str | Path, remote: str, *, mode: int | None = None) -> None:
        """Copy a local file to ``remote`` on the host."""
        ...

    def get(self, remote: str, local: str | Path) -> None:
        """Copy ``remote`` from the host to a local file."""
        ...

    def reboot(self, *, timeout: float | None = None) -> None:
        """Reboot and wait until the host answers again."""
        ...

    def snapshot(self, name: str) -> None:
        """Take a named snapshot of the running host (disk and memory where the provider can)."""
        ...

    def revert(self, name: str) -> None:
        """Return the running host to a snapshot."""
        ...

    def console_log(self) -> str:
        """Everything the host's console printed so far."""
        ...

    def close(self) -> None:
        """Release the host (destroy a VM, close a connection). Idempotent."""
        ...


class UnsupportedOperation(HostError):
    """The provider cannot do this (e.g. snapshots of the local machine)."""


class LocalHost:
    """This machine. For static suites and staging hosts that already exist; it has no snapshots."""

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self._log: list[str] = []

    def run(self, cmd: str | Sequence[str], *, timeout: float = 600.0, check: bool = False,
            stdin: bytes | None = None) -> RunResult:
        command = as_command(cmd)
        start = time.monotonic()
        try:
            proc = subprocess.run(["/bin/sh", "-c", command], input=stdin, capture_output=True, timeout=timeout)
            result = RunResult(command, proc.returncode, proc.stdout.decode(errors="replace"),
                               proc.stderr.decode(errors="replace"), time.monotonic() - start, self.name)
        except subprocess.TimeoutExpired:
            result = RunResult(command, TIMED_OUT, "", f"timed out after {timeout:g} s", time.monotonic() - start,
                               self.name)
        self._log.append(f"$ {command}\n{result.stdout}{result.stderr}")
        return result.check() if check else result

    def put(self, local: str | Path, remote: str, *, mode: int | None = None) -> None:
        Path(remote).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, remote)
        if mode is not None:
            Path(remote).chmod(mode)

    def get(self, remote: str, local: str | Path) -> None:
        shutil.copyfile(remote, local)

    def reboot(self, *, timeout: float | None = None) -> None:
        raise UnsupportedOperation("the local host is never rebooted by the harness", path=self.name)

    def snapshot(self, name: str) -> None:
        raise UnsupportedOperation("the local host has no snapshots; use a libvirt host", path=self.name)

    def revert(self, name: str) -> None:
        raise UnsupportedOperation("the local host has no snapshots; use a libvirt host", path=self.name)

    def console_log(self) -> str:
        return "\n".join(self._log)

    def close(self) -> None:
        pass
