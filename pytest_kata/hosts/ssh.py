"""``SshHost``: an existing staging host reached over SSH, through the system OpenSSH client.

Why the system client and not a Python SSH library: it already knows the user's keys, agent, ``~/.ssh/config``,
jump hosts and known_hosts, and its connection sharing (``ControlMaster``) makes each command a ~10 ms channel
on one authenticated connection. Every call is non-interactive (``BatchMode=yes``), so a missing key fails at
once with ssh's own one-line reason instead of waiting for a password prompt.

Host keys: ``StrictHostKeyChecking=accept-new`` — a known host whose key changed is refused, a new one is
accepted; new keys go to the user's ``~/.ssh/known_hosts`` if there is one, else to a file private to this
object, so a run never edits files it did not find. ``PYTEST_KATA_SSH_CONFIG`` names an ``ssh_config(5)`` file
used instead of ``~/.ssh/config`` (identity, known_hosts, proxies for the command line, which has no flags for
them).

Commands run as root: directly for ``root@``, else through ``sudo -n``. A staging host is a real machine, so
it has no snapshots (``snapshot``/``revert`` raise :class:`UnsupportedOperation`; libvirt hosts have them).
"""

from __future__ import annotations

import atexit
import getpass
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.hashing import sha256_file
from pytest_kata.hosts.base import TIMED_OUT, HostError, RunResult, UnsupportedOperation, as_command

CONFIG_ENV = "PYTEST_KATA_SSH_CONFIG"
KILL_GRACE = 5  # seconds between the remote timeout's TERM and KILL
CLIENT_SLACK = 20  # extra seconds the local client waits beyond the remote timeout before giving up
MASTER_IDLE = 300  # an orphaned master (close() never called) exits after this many idle seconds
_SSH_FAILURE = re.compile(r"^ssh: |Connection (closed|refused|reset|timed out)|Permission denied|"
                          r"Host key verification failed|kex_exchange_identification|Could not resolve")
_open: set[SshHost] = set()


def parse_ssh_target(spec: str) -> tuple[str | None, str, int]:
    """``ssh://[user@]host[:port]``, ``[user@]host[:port]`` or ``[user@][v6addr]:port`` → (user, host, port)."""
    text = spec.strip()
    if not text.startswith("ssh://"):
        if "://" in text:
            raise KataError(f"{spec!r} is not an ssh target: write ssh://[user@]host[:port] or user@host")
        text = "ssh://" + text
    try:
        parts = urlsplit(text)
        port = parts.port or 22
    except ValueError as exc:
        raise KataError(f"bad ssh target {spec!r}: {exc}") from None
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment or parts.password \
            or parts.hostname.startswith("-") or (parts.username or "").startswith("-"):
        raise KataError(f"bad ssh target {spec!r}: write ssh://[user@]host[:port] or user@host")
    return parts.username or None, parts.hostname, port


class SshHost:
    """A host reached over SSH. Connects lazily (first command); :meth:`close` ends the shared connection."""

    def __init__(self, target: str, *, port: int | None = None, identity: str | Path | None = None,
                 known_hosts: str | Path | None = None, connect_timeout: float = 10.0,
                 ssh_config: str | Path | None = None) -> None:
        user, self.hostname, parsed_port = parse_ssh_target(target)
        self.port = port or parsed_port
        self.user = user
        self.login = user or getpass.getuser()
        self.name = f"{self.login}@{self.hostname}" + (f":{self.port}" if self.port != 22 else "")
        self.identity = Path(identity) if identity else None
        self.connect_timeout = connect_timeout
        self.ssh_config = ssh_config or os.environ.get(CONFIG_ENV) or None
        self.reboot_command = "reboot"  # what reboot() runs (tests point it at something harmless)
        self._dir = Path(tempfile.mkdtemp(prefix=f"pytest-kata-ssh-{runid.current_run_id()}-"))
        self._dir.chmod(0o700)
        self.known_hosts = self._known_hosts(known_hosts)
        self._log: list[str] = []
        self._master = False
        self._closed = False
        _open.add(self)

    def __repr__(self) -> str:
        return f"SshHost({self.name!r})"

    def __enter__(self) -> SshHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _known_hosts(self, given: str | Path | None) -> Path | None:
        """The known_hosts file to pass, or None to leave it to the user's ssh configuration."""
        if given:
            return Path(given)
        if self.ssh_config or (Path.home() / ".ssh" / "known_hosts").exists():
            return None
        return self._dir / "known_hosts"

    # ------------------------------------------------------------------------------------------ ssh
    def options(self) -> list[str]:
        """The ssh options shared by every call (so that each call reuses the master connection)."""
        opts = ["-F", str(self.ssh_config)] if self.ssh_config else []
        opts += ["-p", str(self.port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(self.connect_timeout)}",
                 "-o", "StrictHostKeyChecking=accept-new", "-o", "LogLevel=ERROR",
                 "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
                 "-o", f"ControlPath={self._dir}/cm-%C"]
        if self.known_hosts is not None:
            opts += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        if self.identity is not None:
            opts += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        if self.user:
            opts += ["-l", self.user]
        return opts

    def _unreachable(self, stderr: str) -> HostError:
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "ssh gave no reason"
        return HostError(f"host {self.login}@{self.hostname}:{self.port} unreachable: {last}")

    def connect(self) -> None:
        """Start the shared master connection (``ssh -f -N``); a failure names the host and ssh's reason.

        The master's stderr goes to a file, not a pipe: a backgrounded master holding our pipe would make
        every later ``communicate()`` wait for it to exit.
        """
        if self._closed:
            raise HostError(f"{self.name} is closed")
        if self._master:
            return  # if it died since, ssh falls back to a direct connection: slower, still correct
        log = self._dir / "master.log"
        try:
            with open(log, "wb") as err:
                proc = subprocess.run(["ssh", *self.options(), "-o", "ControlMaster=yes",
                                       "-o", f"ControlPersist={MASTER_IDLE}", "-f", "-N", self.hostname],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                      timeout=self.connect_timeout + 30)
        except subprocess.TimeoutExpired:
            raise self._unreachable(f"no session within {self.connect_timeout + 30:g} s") from None
        if proc.returncode != 0:
            raise self._unreachable(log.read_text(errors="replace"))
        self._master = True

    def _control(self, command: str) -> int:
        return subprocess.run(["ssh", *self.options(), "-O", command, self.hostname], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30).returncode

    def _remote(self, command: str) -> str:
        """The remote command line: POSIX sh regardless of the login shell, as root."""
        line = "sh -c " + shlex.quote(command)
        return line if self.login == "root" else "sudo -n " + line

    def _ssh(self, remote: str, *, timeout: float, stdin: Any = None, stdout: Any = subprocess.PIPE
             ) -> subprocess.CompletedProcess[bytes]:
        self.connect()
        argv = ["ssh", *self.options(), "-o", "ControlMaster=no", self.hostname, remote]
        data = stdin if isinstance(stdin, bytes) else None
        proc = subprocess.run(argv, input=data, stdin=None if data is not None else (stdin or subprocess.DEVNULL),
                              stdout=stdout, stderr=subprocess.PIPE, timeout=timeout)
        if proc.returncode == 255 and _SSH_FAILURE.search(proc.stderr.decode(errors="replace")):
            raise self._unreachable(proc.stderr.decode(errors="replace"))
        return proc

    # ------------------------------------------------------------------------------------------ Host
    def run(self, cmd: str | Sequence[str], *, timeout: float = 600.0, check: bool = False,
            stdin: bytes | None = None) -> RunResult:
        """Run ``cmd`` under the remote ``timeout`` (exit 124, like coreutils), so nothing outlives it."""
        command = as_command(cmd)
        limited = f"timeout -k {KILL_GRACE} {timeout:g} sh -c {shlex.quote(command)}"
        start = time.monotonic()
        try:
            proc = self._ssh(self._remote(limited), timeout=timeout + KILL_GRACE + CLIENT_SLACK,
                             stdin=stdin if stdin is not None else subprocess.DEVNULL)
            result = RunResult(command, proc.returncode, proc.stdout.decode(errors="replace"),
                               proc.stderr.decode(errors="replace"), time.monotonic() - start, self.name)
        except subprocess.TimeoutExpired:
            result = RunResult(command, TIMED_OUT, "", f"timed out after {timeout:g} s (the ssh client gave up)",
                               time.monotonic() - start, self.name)
        self._log.append(f"$ {command}\n{result.stdout}{result.stderr}")
        return result.check() if check else result

    def put(self, local: str | Path, remote: str, *, mode: int | None = None) -> None:
        """Stream the file through ``cat`` into a temporary name, check its sha256, then rename it into place.

        ``cat`` over the shared connection needs no sftp subsystem and works through ``sudo``.
        """
        expected = sha256_file(local)
        tmp = f"{remote}.tmp-pytest-kata"
        q, qt = shlex.quote(remote), shlex.quote(tmp)
        chmod = f"chmod {mode:o} {qt} && " if mode is not None else ""
        script = (f"mkdir -p \"$(dirname {q})\" && cat > {qt} && {chmod}"
                  f"sum=$(sha256sum {qt} | cut -d' ' -f1) && mv -f {qt} {q} && echo \"$sum\"")
        with open(local, "rb") as src:
            proc = self._ssh(self._remote(script), timeout=3600, stdin=src)
        got = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0 or got != expected:
            self._ssh(self._remote(f"rm -f {qt}"), timeout=60)
            why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"sha256 {got[:16]}"]
            raise HostError(f"copy of {local} to {remote} failed (exit {proc.returncode}): {why[0]}"
                            f" (expected sha256 {expected[:16]})", path=self.name)

    def get(self, remote: str, local: str | Path) -> None:
        """Stream ``remote`` into ``local`` and compare the local sha256 with the host's ``sha256sum``."""
        q = shlex.quote(remote)
        with open(local, "wb") as dst:
            proc = self._ssh(self._remote(f"cat {q}"), timeout=3600, stdout=dst)
        if proc.returncode != 0:
            Path(local).unlink(missing_ok=True)
            why = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no reason"]
            raise HostError(f"cannot copy {remote} (exit {proc.returncode}): {why[0]}", path=self.name)
        theirs = self.run(f"sha256sum {q} | cut -d' ' -f1", timeout=600).stdout.strip()
        ours = sha256_file(local)
        if theirs != ours:
            raise HostError(f"copy of {remote} is corrupt: sha256 {ours[:16]} here, {theirs[:16]} on the host",
                            path=self.name)

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id", timeout=30, check=True).stdout.strip()

    def reboot(self, *, timeout: float | None = None) -> None:
        """Reboot and wait until ssh answers with a different boot id (the old connection dies with it)."""
        limit = 600.0 if timeout is None else timeout
        before = self.boot_id()
        self.run(f"nohup sh -c 'sleep 1; {self.reboot_command}' >/dev/null 2>&1 &", timeout=30, check=True)
        self._end_master()
        deadline = time.monotonic() + limit
        last = "no answer yet"
        while time.monotonic() < deadline:
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
            try:
                now = self.boot_id()
                if now != before:
                    return
                last = "same boot id (not rebooted yet)"
            except HostError as exc:
                last = str(exc)
            self._end_master()  # a master that outlived the reboot is stale
        raise HostError(f"did not come back with a new boot id within {limit:g} s; last: {last}", path=self.name)

    def snapshot(self, name: str) -> None:
        raise UnsupportedOperation("a staging host reached over SSH has no snapshots; use libvirt hosts "
                                   "(--kata-host-provider libvirt) for snapshot/revert", path=self.name)

    def revert(self, name: str) -> None:
        raise UnsupportedOperation("a staging host reached over SSH has no snapshots; use libvirt hosts "
                                   "(--kata-host-provider libvirt) for snapshot/revert", path=self.name)

    def console_log(self) -> str:
        """There is no console over SSH: the commands this object ran and what they printed."""
        return "\n".join(self._log)

    def _end_master(self) -> None:
        if self._master:
            try:
                self._control("exit")
            except subprocess.TimeoutExpired:
                pass
            self._master = False

    def close(self) -> None:
        """End the master connection and remove the private directory (known_hosts, control socket)."""
        if self._closed:
            return
        self._end_master()
        self._closed = True
        _open.discard(self)
        shutil.rmtree(self._dir, ignore_errors=True)


def next_ssh_host(option: str | None, *, taken: int) -> SshHost:
    """Host number ``taken`` of ``--kata-ssh-hosts`` for the pool; staging hosts are listed, never made."""
    targets = [t.strip() for t in (option or "").split(",") if t.strip()]
    if not targets:
        raise HostError("--kata-host-provider ssh needs --kata-ssh-hosts user@host[,user@host...]")
    if taken >= len(targets):
        raise HostError(f"--kata-ssh-hosts lists {len(targets)} host(s) and this run needs {taken + 1}: "
                        "list more, or use the libvirt provider, which boots fresh hosts")
    return SshHost(targets[taken])


def close_all_ssh_hosts() -> None:
    """Close every open SshHost (at exit, and for callers that stop the server side first)."""
    for host in list(_open):
        host.close()


atexit.register(close_all_ssh_hosts)
