"""How the installer restarts containerd and asks it for its runtime handlers: the host's systemd service, a
private containerd for a local sysroot (started by :func:`pytest_kata.services.launch_containerd`, like every
containerd the harness starts), or none (the steps are skipped with the reason)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path
from typing import Protocol

import tomli_w

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host, LocalHost
from pytest_kata.install.errors import InstallError
from pytest_kata.install.state import CONTAINERD_CONFIG, runtimes_of
from pytest_kata.processes import READY, poll_until
from pytest_kata.services import (
    DaemonRecord,
    ServiceError,
    containerd_config,
    ctr_answers,
    launch_containerd,
    stop_process,
)


class ContainerdService(Protocol):
    """How the installer restarts containerd and asks it which runtime handlers it has."""

    description: str

    def unavailable(self) -> str | None:
        """None when usable, else why the restart/verify steps are skipped."""
        ...

    def restart(self) -> None: ...

    def answers(self) -> bool: ...

    def can_report(self) -> bool: ...

    def handlers(self) -> dict[str, dict[str, str]]: ...


def _dump_handlers(host: Host, config: str) -> dict[str, dict[str, str]]:
    result = host.run(["containerd", "--config", config, "config", "dump"], timeout=60)
    if not result.ok:
        raise InstallError(f"containerd rejects its configuration: {result.stderr.strip()[-300:]}",
                           path=f"{host.name}:{config}")
    try:
        return runtimes_of(tomllib.loads(result.stdout))
    except tomllib.TOMLDecodeError as exc:
        raise InstallError(f"unreadable `containerd config dump` output: {exc}", path=host.name) from None


class NoContainerd:
    """No containerd to drive: restart and handler verification are skipped, with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.description = f"none ({reason})"

    def unavailable(self) -> str | None:
        return self.reason

    def restart(self) -> None:
        pass

    def answers(self) -> bool:
        return False

    def can_report(self) -> bool:
        return False

    def handlers(self) -> dict[str, dict[str, str]]:
        return {}


class SystemdContainerd:
    """The host's own containerd under systemd (a libvirt or staging host)."""

    def __init__(self, host: Host, config: str = CONTAINERD_CONFIG) -> None:
        self.host = host
        self.config = config
        self.description = f"systemd containerd on {host.name}"

    def unavailable(self) -> str | None:
        probe = self.host.run("command -v containerd >/dev/null && command -v systemctl >/dev/null")
        return None if probe.ok else f"no containerd/systemctl on {self.host.name}"

    def restart(self) -> None:
        self.host.run("systemctl restart containerd", timeout=120, check=True)

    def answers(self) -> bool:
        return poll_until(lambda: self.host.run("ctr version >/dev/null 2>&1", timeout=15).ok, timeout=30,
                          interval=0.2) == READY

    def can_report(self) -> bool:
        return self.unavailable() is None

    def handlers(self) -> dict[str, dict[str, str]]:
        return _dump_handlers(self.host, self.config)

    def kill(self) -> None:
        """Fault injection: containerd dies and stays down (a crash loop systemd gave up on)."""
        self.host.run("systemctl kill -s SIGKILL containerd; systemctl stop containerd", timeout=60)


class SysrootContainerd:
    """A private containerd whose configuration is ``<sysroot>/etc/containerd/config.toml``.

    It lets a local sysroot install exercise the real thing — containerd parsing our drop-ins and
    imports, restarting, and reporting the handlers — without touching the machine's containerd. Started
    and stopped by pid, registered with the run id (``pytest_kata.services``) so that a sweep finds it.
    """

    def __init__(self, sysroot: str | Path, run_id: str | None = None, *, private_mounts: bool = False) -> None:
        self.sysroot = Path(sysroot)
        self.config = self.sysroot / CONTAINERD_CONFIG.lstrip("/")
        self.run_id = run_id
        # in a mount namespace of its own with / shared inside (what a Kata shim needs to share a rootfs)
        self.private_mounts = private_mounts
        self.record: DaemonRecord | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.description = f"private containerd for {self.sysroot}"
        self.host = LocalHost("sysroot")

    @classmethod
    def prepare(cls, sysroot: str | Path, *, version: int = 2, imports: list[str] | None = None,
                run_id: str | None = None, private_mounts: bool = False) -> SysrootContainerd:
        """Write a containerd config for the sysroot (all paths inside it; CRI on, so that the handlers can
        be reported). ``version=1`` writes a config without drop-in support; ``private_mounts`` runs it (and
        its shims) in a mount namespace of its own with ``/`` shared inside, as real Kata shims need."""
        sysroot = Path(sysroot)
        work = sysroot / "var/lib/containerd"
        config = containerd_config(work)
        config["disabled_plugins"] = [p for p in config.get("disabled_plugins", []) if "cri" not in p]
        if len(str(config["grpc"]["address"])) > 100:  # unix socket paths are short: use the run's directory
            tag = hashlib.sha256(str(sysroot.resolve()).encode()).hexdigest()[:10]
            config["grpc"]["address"] = str(runid.run_dir(run_id or runid.current_run_id()) / f"ctd-{tag}.sock")
        path = sysroot / CONTAINERD_CONFIG.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        if version == 1:  # containerd 1.x before drop-ins: short plugin ids, no imports
            path.write_text(
                f'version = 1\nroot = "{config["root"]}"\nstate = "{config["state"]}"\n'
                'disabled_plugins = ["aufs", "btrfs", "devmapper", "zfs"]\n'
                f'[grpc]\n  address = "{config["grpc"]["address"]}"\n[ttrpc]\n  address = ""\n'
                '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
                f'[plugins.opt]\n  path = "{work / "opt"}"\n')
            return cls(sysroot, run_id, private_mounts=private_mounts)
        if imports is not None:
            config["imports"] = imports
        path.write_text(tomli_w.dumps(config))
        return cls(sysroot, run_id, private_mounts=private_mounts)

    def socket(self) -> str:
        return str(tomllib.loads(self.config.read_text())["grpc"]["address"])

    def unavailable(self) -> str | None:
        if not shutil.which("containerd") or not shutil.which("ctr"):
            return "containerd/ctr not installed on this machine"
        return None

    def start(self, timeout: float = 30.0) -> None:
        (self.sysroot / "var/lib").mkdir(parents=True, exist_ok=True)
        try:
            socket = Path(self.socket())
        except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
            raise InstallError(f"no containerd socket in the configuration: {exc}", path=self.config) from None
        try:
            self.process, self.record = launch_containerd(
                self.config, socket, run_id=self.run_id or runid.current_run_id(),
                log=self.sysroot / "var/lib/containerd.log", timeout=timeout, on_timeout=stop_process,
                private_mounts=self.private_mounts)
        except ServiceError as exc:
            raise InstallError(str(exc)) from None

    def stop(self) -> None:
        if self.record is not None:
            stop_process(self.record)
            self.record = None
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.process = None

    def kill(self) -> None:
        """Fault injection: containerd dies (SIGKILL, as the OOM killer would)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=5)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self) -> None:
        self.stop()
        self.start()

    def answers(self) -> bool:
        if not self.running():
            return False
        try:
            socket = self.socket()
        except (OSError, tomllib.TOMLDecodeError, KeyError):
            return False
        return ctr_answers(socket, timeout=15)

    def can_report(self) -> bool:
        return self.unavailable() is None and self.config.is_file()

    def handlers(self) -> dict[str, dict[str, str]]:
        return _dump_handlers(self.host, str(self.config))

    def __enter__(self) -> SysrootContainerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()




def containerd_for(mode: str, sysroot: str | Path, host: Host) -> ContainerdService:
    """The containerd an install below ``sysroot`` drives: ``systemd`` (the host's service, or none with the
    reason when it has none), ``private`` (started now for ``<sysroot>/etc/containerd/config.toml``; the
    caller stops it), ``none``; ``auto`` is systemd for ``/`` and none for a sysroot."""
    chosen = mode
    if chosen == "auto":
        chosen = "systemd" if str(sysroot).rstrip("/") == "" else "none"
    if chosen == "systemd":
        systemd = SystemdContainerd(host)
        reason = systemd.unavailable()
        return systemd if reason is None else NoContainerd(reason)
    if chosen == "private":
        config = Path(sysroot) / CONTAINERD_CONFIG.lstrip("/")
        if not config.is_file():
            raise KataError("no containerd config to start a private containerd with", path=config)
        private = SysrootContainerd(sysroot)
        private.start()
        return private
    return NoContainerd("--containerd none" if mode == "none" else
                        "a sysroot has no containerd of its own (pass --containerd private to start one)")
