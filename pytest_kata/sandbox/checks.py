"""Isolation and escape checks as pure functions: probe facts + host facts (+ configuration) → an outcome.

Kept free of pytest so that the suites stay one-liners per check and the logic is unit-tested with plain
dicts. Every outcome carries the evidence it was decided on; a message says *why* in the user's words
(e.g. "runc is no VM: the workload runs on the host kernel").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STANDARD_MOUNTS = {"/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/run", "/tmp",
                   "/sys/fs/cgroup", "/proc/sys", "/sys/kernel/security", "/sys/kernel/debug", "/dev/hugepages",
                   "/sys/fs/bpf", "/sys/kernel/tracing", "/sys/fs/pstore", "/sys/firmware", "/etc/hosts",
                   "/etc/hostname", "/etc/resolv.conf", "/run/lock", "/sys/fs/fuse/connections",
                   "/proc/sys/fs/binfmt_misc", "/sys/kernel/config"}
# device nodes only a host has (block devices are compared by identity: name, numbers and size)
HOST_DEVICE_NODES = ("kvm", "vhost-vsock", "vhost-net")
AGENT_PORT, DEBUG_CONSOLE_PORT = 1024, 1026


@dataclass
class Outcome:
    status: str  # pass | fail | error | skipped (the effect could not be observed) | notapplicable
    message: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def apply(self, recorder: Any) -> None:
        """Record the evidence on a ``kata_result`` recorder and end the test with this status."""
        recorder.record(**self.evidence)
        recorder.conclude(self.status, self.message)


def no_vm(handler: str, facts: Mapping[str, Any], host: Mapping[str, Any]) -> str:
    return f"{handler} is no VM: the workload runs on the host kernel ({host.get('kernel_release')})"


# ---- isolation (dynamic: facts from inside vs the host) ------------------------------------------------


def kernel_identity(facts: Mapping[str, Any], host: Mapping[str, Any], *, expected: str | None, is_vm: bool,
                    handler: str) -> Outcome:
    """The workload's kernel must be the candidate's guest kernel and a different boot than the host."""
    seen = facts.get("kernel_release")
    ev = {"workload_kernel": seen, "host_kernel": host.get("kernel_release"), "candidate_kernel": expected,
          "workload_boot_id": facts.get("boot_id"), "host_boot_id": host.get("boot_id"), "is_vm": is_vm}
    same_boot = bool(facts.get("boot_id")) and facts.get("boot_id") == host.get("boot_id")
    if same_boot or not is_vm:
        why = no_vm(handler, facts, host) if not is_vm else "the workload shares the host's boot"
        return Outcome("fail", f"{why}; workload boot id {'equals' if same_boot else 'differs from'} the host's", ev)
    if expected and seen != expected:
        return Outcome("fail", f"the workload runs kernel {seen}, not the candidate's guest kernel {expected}", ev)
    if not expected:
        return Outcome("pass", f"own boot ({seen}); the candidate's kernel release is unknown, boot id checked", ev)
    return Outcome("pass", f"the workload runs the candidate's guest kernel {seen} in its own boot", ev)


def host_processes(facts: Mapping[str, Any], host_comms: Iterable[str]) -> Outcome:
    """No host process (by name) is visible in the workload's /proc."""
    seen = {p.split(" ", 1)[1] for p in facts.get("processes", []) if " " in p}
    leaked = sorted(set(host_comms) & seen)
    ev = {"host_processes_visible": leaked, "workload_process_count": len(facts.get("processes", []))}
    if leaked:
        return Outcome("fail", f"host processes visible from the workload: {', '.join(leaked[:8])}", ev)
    return Outcome("pass", f"none of {len(set(host_comms))} host process names visible", ev)


def host_mounts(facts: Mapping[str, Any], host_mountpoints: Iterable[str], host_paths: Iterable[str] = ()
                ) -> Outcome:
    """No host-specific mount point, or host path in a mount source/option, shows up inside."""
    distinctive = {m for m in host_mountpoints if m not in STANDARD_MOUNTS and len(m) > 4}
    needles = sorted(distinctive | {p for p in host_paths if p})
    leaked = sorted({line for line in facts.get("mounts", []) for n in needles if n in line})
    ev = {"leaked_mount_lines": leaked[:20], "host_needles": len(needles)}
    if leaked:
        return Outcome("fail", f"{len(leaked)} mount line(s) inside name host paths, e.g. {leaked[0][:160]}", ev)
    return Outcome("pass", f"no host mount point or host path among {len(facts.get('mounts', []))} mounts", ev)


def hostname(facts: Mapping[str, Any], host: Mapping[str, Any], *, is_vm: bool, handler: str) -> Outcome:
    seen, real = facts.get("hostname"), host.get("hostname")
    ev = {"workload_hostname": seen, "host_hostname": real}
    if seen == real:
        return Outcome("fail", f"the workload sees the host's hostname {real!r}"
                       + ("" if is_vm else f" ({handler} is no VM)"), ev)
    return Outcome("pass", f"hostname {seen!r} differs from the host's", ev)


def host_markers(facts: Mapping[str, Any]) -> Outcome:
    visible = sorted(p for p, seen in facts.get("host_paths", {}).items() if seen)
    ev = {"host_markers": facts.get("host_paths", {})}
    if not facts.get("host_paths"):
        return Outcome("notapplicable", "no host marker was given to the probe", ev)
    if visible:
        return Outcome("fail", f"host marker file(s) visible inside: {', '.join(visible)}", ev)
    return Outcome("pass", "host marker files are invisible inside", ev)


def host_devices(facts: Mapping[str, Any], host_blocks: Sequence[Mapping[str, Any]], host_dev: Iterable[str]
                 ) -> Outcome:
    """No host block device (same name, numbers and size) and no host-only device node inside."""
    key = lambda b: (b.get("name"), b.get("dev"), b.get("size"))  # noqa: E731
    host_keys = {key(b) for b in host_blocks if b.get("size")}
    leaked_blocks = sorted(str(b.get("name")) for b in facts.get("block_devices", []) if key(b) in host_keys)
    nodes = set(facts.get("devices", []))
    leaked_nodes = sorted(n for n in HOST_DEVICE_NODES if n in nodes and n in set(host_dev))
    ev = {"leaked_block_devices": leaked_blocks, "leaked_device_nodes": leaked_nodes,
          "workload_block_devices": [b.get("name") for b in facts.get("block_devices", [])]}
    if leaked_blocks or leaked_nodes:
        return Outcome("fail", f"host devices visible inside: {', '.join(leaked_blocks + leaked_nodes)}", ev)
    return Outcome("pass", "no host block device or host-only device node is visible", ev)


def network(facts: Mapping[str, Any], targets: Sequence[str], host_addresses: Iterable[str]) -> Outcome:
    """The run's test networks are unreachable and no host address is configured inside."""
    reach = facts.get("reach", {})
    reachable = sorted(t for t in targets if reach.get(t) == "reachable")
    untestable = sorted(t for t in targets if str(reach.get(t, "")).startswith("untestable"))
    inside = {a.split()[1].split("/")[0] for a in facts.get("addresses", []) if len(a.split()) > 1}
    shared = sorted(inside & {a for a in host_addresses if not a.startswith(("127.", "::1"))})
    ev = {"reach": reach, "workload_addresses": facts.get("addresses", []), "host_addresses_inside": shared}
    if reachable or shared:
        return Outcome("fail", f"reachable from the workload: {', '.join(reachable) or '-'}; host addresses "
                       f"inside: {', '.join(shared) or '-'}", ev)
    if untestable and len(untestable) == len(targets):
        return Outcome("notapplicable", f"reachability untestable in this workload: {reach.get(untestable[0])}", ev)
    return Outcome("pass", f"{len(targets)} run-owned target(s) unreachable; no host address inside", ev)


def vsock_ports(facts: Mapping[str, Any]) -> Outcome:
    """Neither the agent (1024) nor the debug console (1026) answers the workload over vsock, and no
    virtio-serial port of the guest (the agent's channel when Kata runs without vsock) opens for it."""
    vsock = facts.get("vsock", {})
    serial = facts.get("agent_serial", {})
    ev = {"vsock": vsock, "vsock_device": facts.get("vsock_device"), "agent_serial": serial}
    open_serial = sorted(k for k, v in serial.items() if v == "reachable")
    if open_serial:
        return Outcome("fail", f"the guest's virtio-serial port(s) {', '.join(open_serial)} (the agent's channel "
                       "without vsock) open for the workload", ev)
    open_ports = sorted(k for k, v in vsock.items() if v == "reachable" and k.endswith((":1024", ":1026")))
    if open_ports:
        return Outcome("fail", f"agent/debug-console vsock ports reachable from the workload: {', '.join(open_ports)}",
                       ev)
    untestable = [v for v in vsock.values() if str(v).startswith("untestable")]
    if vsock and len(untestable) == len(vsock):
        return Outcome("notapplicable", f"vsock untestable: {untestable[0].removeprefix('untestable: ')}", ev)
    unobserved = [v for v in vsock.values() if "no virtio-vsock device" in str(v) or "no AF_VSOCK" in str(v)]
    if (not vsock or len(unobserved) == len(vsock)) and not serial:
        why = unobserved[0].removeprefix("unreachable: ") if unobserved else "the probe tried no vsock port"
        return Outcome("skipped", f"cannot observe: {why} and no virtio-serial port was tried, so closed ports "
                       "prove nothing about the agent's channel", ev)
    ports = f"; virtio-serial ports {', '.join(sorted(serial))} do not open" if serial else ""
    return Outcome("pass", f"agent (1024) and debug console (1026) vsock ports are not reachable{ports}", ev)


def memory_bounded(facts: Mapping[str, Any], host: Mapping[str, Any], *, limit_mb: int | None, is_vm: bool,
                   handler: str) -> Outcome:
    """The memory the workload sees is the sandbox's, not the host's."""
    seen = facts.get("mem_total_kb") or 0
    host_kb = host.get("mem_total_kb") or 0
    ev = {"workload_mem_total_kb": seen, "host_mem_total_kb": host_kb, "configured_mb": limit_mb,
          "cgroup_memory_limit": facts.get("memory_limit")}
    if not is_vm or (host_kb and seen >= host_kb):
        return Outcome("fail", (no_vm(handler, facts, host) + ": " if not is_vm else "")
                       + f"the workload sees the host's memory ({seen} kB)", ev)
    if limit_mb and seen > (limit_mb + 64) * 1024:
        return Outcome("fail", f"the workload sees {seen // 1024} MiB, more than the configured {limit_mb} MiB", ev)
    return Outcome("pass", f"the workload sees {seen // 1024} MiB (configured {limit_mb} MiB, host {host_kb // 1024} "
                   "MiB)", ev)


CAP_MKNOD = 27
EPERM_TEXT = "Operation not permitted"


def device_cgroup_root(facts: Mapping[str, Any], host_blocks: Sequence[Mapping[str, Any]], *, is_vm: bool,
                       handler: str) -> Outcome:
    """A workload holding CAP_MKNOD makes a node for the guest's root block device and opens it: the device
    cgroup must refuse (EPERM at mknod or open). Where the guest has no root block device (an initrd boot)
    there is nothing to deny, so the check cannot be shown to hold: skipped with that reason, never pass."""
    m = facts.get("mknod_root") or {}
    device, source = m.get("device") or "", m.get("source", "")
    ev = {"mknod_root": m, "root_param": facts.get("root_param"), "capeff": facts.get("status", {}).get("CapEff"),
          "is_vm": is_vm}
    host_keys = {(b.get("name"), b.get("dev"), b.get("size")) for b in host_blocks if b.get("size")}
    opened = m.get("open_read") == "ok"
    no_vm_prefix = "" if is_vm else f"{handler} is no VM: "
    if device and (device, m.get("dev"), m.get("size")) in host_keys:
        how = "and opened it" if opened else f"(the open: {m.get('open_read') or m.get('mknod') or '-'})"
        return Outcome("fail", f"{no_vm_prefix}the block device the workload can name, {device} ({m.get('dev')}), "
                       f"is the host's own disk, {how}", ev)
    if not is_vm:
        return Outcome("fail", f"{no_vm_prefix}the workload runs on the host kernel; its device cgroup is all that "
                       "stands between it and the host's devices", ev)
    if not device or (is_vm and source != "root="):
        why = (f"the guest has no root block device: its kernel command line has no root= (it booted from an "
               f"initrd){f'; the disk {device} is not its root' if device else ''}")
        return Outcome("skipped", f"cannot observe: {why}, so there is no root device for the device cgroup to "
                       "deny", ev)
    capeff = int(str(facts.get("status", {}).get("CapEff") or "0"), 16)
    if not capeff & (1 << CAP_MKNOD):
        return Outcome("skipped", "cannot observe: the workload lacks CAP_MKNOD, so a refused mknod proves nothing "
                       "about the device cgroup", ev)
    if opened:
        return Outcome("fail", f"a CAP_MKNOD workload opened the guest's root device {device} ({m.get('dev')}): "
                       "the device cgroup does not deny it", ev)
    refused = [k for k in ("mknod", "open_read") if EPERM_TEXT in str(m.get(k, ""))]
    if not refused:
        return Outcome("skipped", f"cannot tell: the root device {device} was neither opened nor refused by the "
                       f"device cgroup (mknod: {m.get('mknod')}; open: {m.get('open_read')})", ev)
    step = "mknod" if refused[0] == "mknod" else "open"
    return Outcome("pass", f"the device cgroup refuses a CAP_MKNOD workload the guest's root device {device} "
                   f"({m.get('dev')}) at {step}: {m.get(refused[0])}", ev)


CPU_TOLERANCE = 1.25  # CFS throttles per period: a short burn may overrun a little
CPU_SLACK = 0.05


def cpu_limited(facts: Mapping[str, Any], *, quota_cpus: float, handler: str) -> Outcome:
    """Busy loops in a workload with a CPU quota of ``quota_cpus`` must not use more CPU time than it, measured
    from inside (their utime+stime over the wall time of the burn)."""
    burn = facts.get("cpu_burn") or {}
    ev = {"cpu_burn": burn, "quota_cpus": quota_cpus, "handler": handler}
    if not quota_cpus:
        return Outcome("notapplicable", "no CPU quota was given to the workload", ev)
    try:
        wall = float(burn["uptime_after"]) - float(burn["uptime_before"])
        used = int(burn["ticks"]) / int(burn.get("hz") or 100) / wall
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return Outcome("error", "the probe ran no measurable CPU load (cpu_burn missing or malformed)", ev)
    ev["used_cpus"] = round(used, 3)
    ev["wall_seconds"] = round(wall, 2)
    allowed = quota_cpus * CPU_TOLERANCE + CPU_SLACK
    if used > allowed:
        return Outcome("fail", f"{burn.get('workers')} busy loops used {used:.2f} CPUs with a quota of "
                       f"{quota_cpus:g} (at most {allowed:.2f} allowed): the CPU limit does not hold", ev)
    if used < quota_cpus / 4:
        return Outcome("skipped", f"cannot observe: the load got only {used:.2f} CPUs, too little to show whether a "
                       f"quota of {quota_cpus:g} binds", ev)
    return Outcome("pass", f"{burn.get('workers')} busy loops used {used:.2f} CPUs over {wall:.1f} s with a quota of "
                   f"{quota_cpus:g} (cgroup cpu.max {burn.get('cpu_max')!r}, {burn.get('cpus')} CPUs seen)", ev)


def memory_limited(facts: Mapping[str, Any], *, limit_mb: int, handler: str) -> Outcome:
    """A process that tries to hold more than the container's memory limit must be stopped (OOM-killed) before
    it holds more than the limit; one that holds it all shows that the limit does not hold."""
    fill = facts.get("mem_fill") or {}
    ev = {"mem_fill": fill, "limit_mb": limit_mb, "handler": handler}
    if not limit_mb:
        return Outcome("notapplicable", "no memory limit was given to the workload", ev)
    if not fill or fill.get("reached_bytes") is None:
        return Outcome("error", "the probe made no measurable allocation (mem_fill missing)", ev)
    reached = int(fill["reached_bytes"]) / (1 << 20)
    ev["reached_mb"] = round(reached, 1)
    asked = int(fill.get("asked_mb") or 0)
    if fill.get("held") and asked > limit_mb:
        return Outcome("fail", f"a process held {reached:.0f} MiB in a container limited to {limit_mb} MiB: the "
                       "memory limit does not hold", ev)
    if fill.get("rc") in (137, 9) and reached <= limit_mb:
        return Outcome("pass", f"a process asking for {asked} MiB was killed at {reached:.0f} MiB (its "
                       f"allocations need up to 3x that) under a {limit_mb} MiB limit (cgroup: "
                       f"{fill.get('limit')!r})", ev)
    return Outcome("skipped", f"cannot tell: the allocation stopped at {reached:.0f} MiB with exit status "
                   f"{fill.get('rc')} (not the OOM killer's SIGKILL)", ev)


def container_boundary(facts: Mapping[str, Any], *, has_container: bool) -> Outcome:
    """Unprivileged workload: capabilities dropped, kernel knobs read-only, OCI masked paths masked."""
    ev = {"status": facts.get("status"), "masked": facts.get("masked"), "writable": facts.get("writable_paths"),
          "uid": facts.get("uid")}
    capeff = int(str(facts.get("status", {}).get("CapEff") or "0"), 16)
    problems = []
    if capeff & (1 << 21):
        problems.append("CAP_SYS_ADMIN in the effective set")
    writable = facts.get("writable_paths", {})
    for knob in ("/proc/sys/kernel/core_pattern", "/proc/sysrq-trigger", "/sys/kernel/uevent_helper"):
        if writable.get(knob):
            problems.append(f"{knob} writable")
    if has_container:
        for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"):
            if facts.get("masked", {}).get(path) == "visible":
                problems.append(f"{path} not masked")
    if problems:
        return Outcome("fail", "unprivileged workload boundary: " + "; ".join(problems), ev)
    scope = "" if has_container else " (uid 65534 in the guest: the direct driver has no container layer)"
    return Outcome("pass", f"no CAP_SYS_ADMIN, kernel knobs read-only{scope}", ev)


def host_unchanged(diff: Mapping[str, Any], *, what: str) -> Outcome:
    if diff:
        return Outcome("fail", f"host state changed after {what}: {', '.join(sorted(diff))}", {"host_diff": diff})
    return Outcome("pass", f"host image hashes, mount table and kernel knobs unchanged after {what}",
                   {"host_diff": {}})


# ---- static checks (configuration / version) ------------------------------------------------------------


def annotation_enabled(config: Any, name: str) -> list[str]:
    """The ``enable_annotations`` entries (regexes, as Kata matches them) that let ``name`` through."""
    patterns = config.get("hypervisor.*.enable_annotations", []) or []
    hits = []
    for pattern in patterns:
        try:
            if re.search(str(pattern), name):
                hits.append(str(pattern))
        except re.error:
            if str(pattern) in name:
                hits.append(str(pattern))
    return hits


def combine(*outcomes: Outcome) -> Outcome:
    """The worst of several outcomes, with all evidence kept. A part that could not be judged (skipped)
    outranks a pass: the whole claims no more than its weakest observed part."""
    order = {"error": 0, "fail": 1, "skipped": 2, "pass": 3, "notapplicable": 4}
    worst = sorted(outcomes, key=lambda o: order.get(o.status, 0))[0]
    evidence: dict[str, Any] = {}
    for o in outcomes:
        evidence.update(o.evidence)
    evidence["checks"] = [f"{o.status}: {o.message}" for o in outcomes]
    relevant = [o.message for o in outcomes if o.status == worst.status]
    return Outcome(worst.status, "; ".join(relevant), evidence)
