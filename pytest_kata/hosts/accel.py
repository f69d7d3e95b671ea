"""Decide whether host VMs get KVM or TCG.

A ``/dev/kvm`` is not proof that KVM works: on a PVM (software nested virtualisation) machine the device
exists, libvirt offers ``<domain type='kvm'>``, and a stock Debian guest then aborts with
``failed to set MSR 0x10a`` or hangs. So KVM is chosen only when the CPU advertises svm/vmx and the KVM
provider is not ``kvm_pvm``; otherwise TCG (``<domain type='qemu'>`` with ``<cpu mode='maximum'/>``, which
still lets ``kvm_amd`` load inside the host so that sandbox VMs get KVM there). For a remote libvirt URI
the local files say nothing, so the remote host's capabilities XML is read instead.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pytest_kata.resources import LOCAL_LIBVIRT_URI

ACCELS = ("kvm", "tcg")


def detect_local(root: Path = Path("/")) -> tuple[str, str]:
    """KVM or TCG for VMs started on this machine, with the reason (shown in the pytest header)."""
    dev = root / "dev/kvm"
    try:
        cpuinfo = (root / "proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return decide(dev.exists(), (root / "sys/module/kvm_pvm").exists(), cpuinfo,
                  root != Path("/") or os.access(dev, os.R_OK | os.W_OK))


def detect_on(host: Any, requested: str = "auto") -> tuple[str, str]:
    """KVM or TCG for VMs a :class:`~pytest_kata.hosts.base.Host` starts itself (e.g. Kata's sandboxes on a
    staging host), read there by the same rules as :func:`detect_local`; ``requested`` (``--kata-accel``) wins
    unless it is ``auto``."""
    if requested in ACCELS:
        return requested, "forced by --kata-accel"
    out = host.run("test -e /dev/kvm && echo dev; test -e /sys/module/kvm_pvm && echo pvm; "
                   "test -r /dev/kvm -a -w /dev/kvm && echo rw; grep -m1 '^flags' /proc/cpuinfo", timeout=60).stdout
    lines = out.splitlines()
    return decide("dev" in lines, "pvm" in lines, out, "rw" in lines)


def decide(dev: bool, pvm: bool, cpuinfo: str, accessible: bool) -> tuple[str, str]:
    """The rules: a /dev/kvm that is not PVM, a CPU with svm/vmx, and the device open to this user."""
    if not dev:
        return "tcg", "no /dev/kvm"
    if pvm:
        return "tcg", "/dev/kvm is PVM (kvm_pvm): stock guests cannot run on it"
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    if not flags & {"svm", "vmx"}:
        return "tcg", "/dev/kvm present but the CPU has no svm/vmx flag"
    if not accessible:
        return "tcg", "/dev/kvm is not accessible to this user"
    return "kvm", f"/dev/kvm with {'svm' if 'svm' in flags else 'vmx'}"


def detect_from_capabilities(caps_xml: str) -> tuple[str, str]:
    """KVM or TCG from a libvirt host's capabilities (used for remote URIs)."""
    root = ET.fromstring(caps_xml)
    domain_types = {d.get("type") for d in root.iterfind("./guest/arch[@name='x86_64']/domain")}
    features = {f.get("name") for f in root.iterfind("./host/cpu/feature")}
    if "kvm" not in domain_types:
        return "tcg", "libvirt offers no kvm domain type"
    if not features & {"svm", "vmx"}:
        return "tcg", "libvirt offers kvm but the host CPU has no svm/vmx"
    return "kvm", "libvirt offers kvm and the host CPU has svm/vmx"


def is_local_uri(uri: str) -> bool:
    return "://" not in uri or uri.split("://", 1)[1].startswith("/")


def detect_accel(requested: str = "auto", conn: Any = None, uri: str = LOCAL_LIBVIRT_URI) -> tuple[str, str]:
    """The accelerator to use, and why. ``requested`` (``--kata-accel``) wins unless it is ``auto``."""
    if requested in ACCELS:
        return requested, "forced by --kata-accel"
    if requested != "auto":
        raise ValueError(f"unknown accelerator {requested!r}")
    if is_local_uri(uri):
        return detect_local()
    if conn is None:
        return "tcg", "remote URI without a connection to ask"
    return detect_from_capabilities(conn.getCapabilities())


def detect_accel_description(requested: str, uri: str) -> str:
    """One line for the pytest header, without opening a libvirt connection (cheap)."""
    if requested in ACCELS or is_local_uri(uri):
        accel, why = detect_accel(requested, None, uri)
        return f"{accel.upper()} ({why})"
    return "decided from the remote host's libvirt capabilities at first boot"
