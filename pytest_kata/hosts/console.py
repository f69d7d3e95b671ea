"""A host's serial console as a pexpect child: the libvirt console stream feeds a pipe that pexpect reads.

Why a stream and not the pty: a stream goes through the libvirt connection, so it works the same for
``qemu+ssh://`` URIs where the pty lives on another machine. A reader thread copies the stream into a pipe
(and into the per-host log file); :class:`pexpect.fdpexpect.fdspawn` reads the pipe, so ``expect`` with
timeouts and regexes comes from pexpect. After a snapshot revert the stream dies: :meth:`Console.reopen`
attaches a new stream to the same pipe, and the pexpect child never notices.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import pexpect
import pexpect.fdpexpect

KEEP_IN_MEMORY = 4 * 1024 * 1024  # the whole log is on disk; memory keeps the newest 4 MiB


class Console:
    """Read/write the serial console of one libvirt domain; everything read is also logged to ``log_path``."""

    def __init__(self, uri: str, dom: Any, log_path: Path) -> None:
        self._uri = uri
        self._dom_uuid = dom.UUIDString()
        self._dom_name = dom.name()
        self.log_path = log_path
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._recent = bytearray()
        self._lock = threading.Lock()
        self._read_fd, self._write_fd = os.pipe()
        self.child = pexpect.fdpexpect.fdspawn(self._read_fd, timeout=30, encoding=None)
        self._stream: Any = None
        self._closed = False
        self.reopen()

    def reopen(self) -> None:
        """Attach a fresh console stream (needed after a revert, which kills the old one).

        Each stream gets its own libvirt connection: a stream blocked in ``recv`` stalls ``openConsole`` of
        another domain on the same connection (seen with two hosts on one connection, libvirt 9.0).
        """
        import libvirt

        self._abort_stream()
        conn = libvirt.open(self._uri)
        try:
            stream = conn.newStream(0)
            conn.lookupByUUIDString(self._dom_uuid).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        except BaseException:
            conn.close()
            raise
        self._stream = stream
        threading.Thread(target=self._pump, args=(conn, stream), daemon=True,
                         name=f"console-{self._dom_name}").start()

    def _pump(self, conn: Any, stream: Any) -> None:
        import libvirt

        try:
            while not self._closed and stream is self._stream:
                try:
                    data = stream.recv(65536)
                except libvirt.libvirtError as exc:
                    self._record(f"\n[console stream closed: {exc.get_error_message()}]\n".encode())
                    return
                if data == -2:  # would block
                    time.sleep(0.02)
                    continue
                if not data:
                    return
                self._record(data)
                try:
                    os.write(self._write_fd, data)
                except OSError:
                    return
        finally:
            try:
                conn.close()
            except Exception:
                pass

    def _record(self, data: bytes) -> None:
        with self._lock:
            if self._log.closed:
                return
            self._log.write(data)
            self._log.flush()
            self._recent += data
            if len(self._recent) > KEEP_IN_MEMORY:
                del self._recent[: len(self._recent) - KEEP_IN_MEMORY]

    def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if self._stream is None:
            raise OSError("console is closed")
        view = memoryview(data)
        while view:
            sent = self._stream.send(bytes(view[:4096]))
            if sent == -2:
                time.sleep(0.01)
                continue
            view = view[sent:]

    def sendline(self, text: str = "") -> None:
        self.send(text + "\n")

    def expect(self, pattern: str | bytes | re.Pattern[bytes], timeout: float) -> re.Match[bytes]:
        """Wait for ``pattern``; returns the match. ``self.child.before`` holds what came before it."""
        if isinstance(pattern, str):
            pattern = pattern.encode()
        self.child.expect(pattern, timeout=timeout)
        match = self.child.match
        assert isinstance(match, re.Match)
        return match

    def text(self) -> str:
        """Everything this console printed (up to the newest 4 MiB; the full log is at ``log_path``)."""
        with self._lock:
            return self._recent.decode(errors="replace")

    def tail(self, lines: int = 15) -> str:
        cleaned = [ln.strip() for ln in strip_ansi(self.text()).splitlines() if ln.strip()]
        return " | ".join(cleaned[-lines:])

    def mark(self, note: str) -> None:
        """Write a harness note into the log (not sent to the guest): test boundaries, reverts."""
        self._record(f"\n[pytest-kata {time.strftime('%H:%M:%S')}] {note}\n".encode())

    def _abort_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.abort()
            except Exception:
                pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._abort_stream()
        try:
            os.close(self._write_fd)
        except OSError:
            pass
        try:
            self.child.close()  # closes the read end
        except OSError:
            pass
        with self._lock:
            self._log.close()


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, pexpect.TIMEOUT | pexpect.EOF)
