"""Boot a built bundle's kernel and initrd with plain qemu and wait for the real agent's first log line.

The cheapest evidence that the guest is right before any shim is involved: the kernel finds the initrd,
``/init`` -> ``/sbin/init`` loads the transport modules and execs ``kata-agent`` as PID 1, and the agent
logs on the serial console (``agent.log=debug``). A virtio-serial port named ``agent.channel.0`` (what
Kata's qemu command line gives it, ``kata-proxy`` on the host side) is attached so the agent finds its
channel and starts its gRPC server, which it logs too.
"""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.progress import timed

AGENT_LOG = re.compile(rb"[^\r\n]*name=\"?kata-agent[^\r\n]*")
GRPC_UP = re.compile(rb"agent grpc server starts|Agent grpc server starts", re.I)
FATAL = re.compile(rb"Kernel panic|Attempted to kill init|not syncing")


@dataclass(frozen=True)
class AgentBoot:
    """What the console showed: the agent's first log line, whether its gRPC server came up, the timings."""

    first_line: str
    grpc_started: bool
    seconds_to_agent: float
    console: str


def boot_agent(root: Path, *, timeout: float = 240.0, accel: str = "tcg") -> AgentBoot:
    """Boot ``root`` (a bundle's ``/opt/kata``) kernel + initrd; return once the agent has logged.

    Raises a one-line :class:`KataError` with the console's last lines when the agent never logs.
    """
    qemu = root / "bin/qemu-system-x86_64"
    kernel = root / "share/kata-containers/vmlinuz.container"
    initrd = root / "share/kata-containers/kata-containers-initrd.img"
    for path in (qemu, kernel, initrd):
        if not path.exists():
            raise KataError("the bundle has no such file", path=path)
    name = f"{runid.current_run_id()}-agent-smoke-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="kt-agent-smoke-") as tmp:
        channel = Path(tmp) / "agent.sock"
        argv = [str(qemu), "-name", name, "-accel", accel, "-machine", "pc", "-cpu", "max", "-m", "512",
                "-smp", "1", "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio",
                "-kernel", str(kernel), "-initrd", str(initrd),
                "-append", "console=ttyS0 panic=-1 agent.log=debug",
                "-device", "virtio-serial-pci,id=serial0",
                "-chardev", f"socket,id=charch0,path={channel},server=on,wait=off",
                "-device", "virtserialport,bus=serial0.0,chardev=charch0,name=agent.channel.0"]
        with timed("kata-build", f"booting {kernel.name} + {initrd.name} ({accel}) until the agent logs"):
            return watch_console(argv, timeout, what=initrd)


def watch_console(argv: list[str], timeout: float, *, what: Path) -> AgentBoot:
    """Run qemu ``argv`` (serial console on stdout) until the agent has logged; ``what`` names the guest in
    the error when it never does. The qemu process is always killed before returning."""
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    console = b""
    first: bytes | None = None
    first_at = 0.0
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    try:
        while time.monotonic() - start < timeout:
            if not selector.select(timeout=1.0):
                if first is not None and time.monotonic() - first_at > 20:
                    break  # the agent logged and then went quiet: waiting longer shows nothing new
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            console += chunk
            if first is None and (match := AGENT_LOG.search(console)):
                first, first_at = match.group(0), time.monotonic()
            if first is not None and (GRPC_UP.search(console) or FATAL.search(console)):
                break
    finally:
        selector.close()
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    text = console.decode(errors="replace")
    if first is None:
        tail = " | ".join(ln.strip() for ln in text.splitlines()[-4:] if ln.strip())[-400:]
        raise KataError(f"the agent never logged within {timeout:.0f}s: {tail or 'no console output'}",
                        path=what)
    return AgentBoot(first.decode(errors="replace").strip(), bool(GRPC_UP.search(console)),
                     first_at - start, text)
