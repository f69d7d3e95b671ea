"""Command-line pieces shared by the commands that act on a host (``install``, ``rollback``, ``state``); not a
command itself (the CLI skips modules whose name starts with ``_``)."""

from __future__ import annotations

import argparse
from typing import Any


def add_host_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="local", metavar="HOST",
                   help="where to act: 'local' (this machine; default), a staging host over SSH: "
                        "ssh://[user@]host[:port] or user@host (system ssh, BatchMode; $PYTEST_KATA_SSH_CONFIG "
                        "names an ssh_config for keys/known_hosts), or a KVM host by its libvirt URI: "
                        "qemu+ssh://[user@]host[:port]/system[?keyfile=K] (reached over SSH like libvirt does; "
                        "libvirt there is checked to be the same machine) or qemu:///system (this machine)")
    p.add_argument("--sysroot", default="/", metavar="DIR",
                   help="act below DIR instead of / (a scratch root: nothing outside it is touched)")
    p.add_argument("--containerd", choices=("auto", "systemd", "private", "none"), default="auto",
                   help="how to restart containerd and verify the handlers: systemd (the host's service), "
                        "private (a containerd started for DIR/etc/containerd/config.toml and stopped after), "
                        "none (skip, with the reason in the journal); auto: systemd for /, none for a sysroot")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def print_workloads(report: Any, *, indent: str = "  ") -> None:
    for result in report.results:
        print(f"{indent}workload {result.handler}: {result.status.upper()} {result.detail}")
