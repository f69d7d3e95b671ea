"""Hardening facts of a guest image, as a flat dotted-key mapping the rules engine checks (``image.toml``).

Facts describe what the guest will *do*, not just which files exist: sysctl files count only when something
in the guest applies them (systemd-sysctl under systemd, or an init script that runs ``sysctl``; the Kata
agent as init applies none), enabled units count only under systemd, and the root filesystem is read-only
when the kernel mounts it so (``ro``, the kernel's default) and nothing remounts it read-write.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pytest_kata.images.packages import parse_os_release
from pytest_kata.images.read import Entry, RootView

BIN_DIRS = ("/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin")
SHELLS = ("sh", "bash", "dash", "ash", "zsh", "ksh", "ksh93", "mksh", "csh", "tcsh", "fish", "busybox")
PACKAGE_MANAGERS = ("apt", "apt-get", "aptitude", "dpkg", "rpm", "dnf", "yum", "microdnf", "zypper", "apk",
                    "pip", "pip3", "snap", "flatpak")
NETWORK_DAEMONS = ("sshd", "dropbear", "telnetd", "in.telnetd", "inetd", "xinetd", "rpcbind", "avahi-daemon",
                   "nginx", "apache2", "httpd", "lighttpd", "smbd", "nmbd", "vsftpd", "proftpd", "named",
                   "dnsmasq", "snmpd", "cupsd", "exim4", "sendmail", "master", "rsyncd", "ntpd", "nfsd",
                   "rpc.mountd", "mosquitto", "redis-server", "mysqld", "postgres", "getty", "agetty")
DEBUG_TOOLS = ("gdb", "strace", "ltrace", "tcpdump", "debugfs", "curl", "wget", "gcc", "cc", "g++", "make",
               "nc", "ncat", "netcat", "socat", "perf", "bpftrace", "python3", "perl")
AGENT_PATHS = ("/usr/bin/kata-agent", "/usr/local/bin/kata-agent", "/bin/kata-agent", "/sbin/kata-agent")
SYSCTL_DIRS = ("/usr/lib/sysctl.d", "/lib/sysctl.d", "/run/sysctl.d", "/etc/sysctl.d")  # lowest precedence first
CMDLINE_WEAKENERS = ("nokaslr", "nosmep", "nosmap", "nopti", "pti=off", "nospectre_v1", "nospectre_v2",
                     "spectre_v2=off", "spec_store_bypass_disable=off", "mitigations=off", "no_hash_pointers",
                     "norandmaps", "kpti=0", "slub_debug=-", "init_on_free=0", "page_poison=0", "lockdown=none",
                     "module.sig_enforce=0", "selinux=0", "apparmor=0", "iommu=off", "debugfs=on")
CMDLINE_DEBUG = ("agent.debug_console", "agent.debug_console_vport", "agent.log=debug", "agent.devmode",
                 "agent.trace", "systemd.log_level=debug", "systemd.debug-shell", "init=/bin/sh",
                 "init=/bin/bash", "rd.break", "single", "emergency")
# Units Kata itself needs in a systemd guest (osbuilder: kata-agent.service, kata-containers.target; chrony
# for time; kata-opa for the agent policy).
SERVICE_ALLOWLIST = ("kata-agent.service", "kata-containers.target", "chrony.service", "chronyd.service",
                     "kata-opa.service")


# by the key a rule reads: the facts that say which files it is about
ABOUT = {
    "sysctl.": ("sysctl.applied_by", "sysctl.files"),
    "init.": ("init.path", "init.target"),
    "root.readonly": ("root.readonly_reason",),
    "agent.": ("agent.path", "agent.mode"),
    "root.dm_verity": ("cmdline.text",),
    "services.": ("services.units",),
}


@dataclass
class ImageFacts:
    """Flat ``{"dotted.key": value}`` with the ``.get(key, default)`` the rules engine reads."""

    values: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def to_dict(self) -> dict[str, Any]:
        return {**self.values, "notes": list(self.notes)}

    def about(self, keys: Iterable[str]) -> dict[str, Any]:
        """The facts that name the files a finding on ``keys`` is about (for findings whose own value is a
        yes/no, a kind or a number rather than a list of paths)."""
        out: dict[str, Any] = {}
        for key in keys:
            for prefix, related in ABOUT.items():
                if key.startswith(prefix):
                    out.update({k: self.values[k] for k in related if k in self.values})
        return out


@dataclass(frozen=True)
class RootAttachment:
    """How the runtime attaches the guest image (from the configuration) and the root parameters it puts on
    the guest kernel command line before ``kernel_params``."""

    device: str  # nvdimm / virtio-pmem / virtio-blk / initrd
    root_params: str
    writable: bool | None  # True: the guest can write the backing device whatever the mount says; None: unknown
    why: str

    def cmdline(self, config: Any) -> str:
        """The guest command line: root parameters, then ``kernel_params`` (a later ro/rw wins), then what the
        agent debug settings add."""
        parts = [self.root_params] if self.root_params else []
        params = config.get("hypervisor.*.kernel_params", "") if config is not None else ""
        if params:
            parts.append(str(params))
        if config is not None and config.get("agent.kata.debug_console_enabled", False):
            parts.append("agent.debug_console agent.debug_console_vport=1026")
        if config is not None and config.get("agent.kata.enable_debug", False):
            parts.append("agent.log=debug")
        return " ".join(parts)


def root_attachment(config: Any, *, is_image: bool = True) -> RootAttachment:
    """How the runtime of ``config`` (a KataConfig) attaches its image: ``disable_image_nvdimm`` (Go),
    ``vm_rootfs_driver`` (runtime-rs), the hypervisor and its machine type."""
    if not is_image:
        return RootAttachment("initrd", "", None, "an initrd: the root is a tmpfs/ramfs in guest memory")
    hv = getattr(config, "hypervisor", None) or ""
    table: dict[str, Any] = getattr(config, "hypervisor_table", dict)()
    fstype = str(table.get("rootfs_type") or "ext4")
    flags = "data=ordered,errors=remount-ro" if fstype == "ext4" else ""

    def params(device: str, dax: bool) -> str:
        rootflags = ",".join(f for f in ("dax" if dax and flags else "", flags) if f)
        return " ".join(p for p in (f"root={device}", f"rootflags={rootflags}" if rootflags else "", "ro",
                                    f"rootfstype={fstype}") if p)

    if getattr(config, "runtime_rs", False):
        driver = str(table.get("vm_rootfs_driver") or ("virtio-pmem" if hv == "qemu" else "virtio-blk-pci"))
        if "pmem" in driver:
            return RootAttachment("virtio-pmem", params("/dev/pmem0p1", True), None,
                                  f"runtime-rs attaches the image with vm_rootfs_driver {driver}; whether the "
                                  "device is read-only cannot be told from the configuration")
        return RootAttachment("virtio-blk", params("/dev/vda1", False), None,
                              f"runtime-rs attaches the image with vm_rootfs_driver {driver}")
    if hv == "qemu" and not table.get("disable_image_nvdimm", False):
        if str(table.get("machine_type", "")) == "virt":
            return RootAttachment("nvdimm", params("/dev/pmem0p1", True), True,
                                  "QEMU NVDIMM on arm64 (machine_type virt) cannot be read-only "
                                  "(GHSA-wwj6-vghv-5p64): the guest can write the image's DAX window")
        return RootAttachment("nvdimm", params("/dev/pmem0p1", True), False,
                              "the Go runtime attaches the image as a read-only QEMU nvdimm "
                              "(disable_image_nvdimm = false)")
    if hv == "clh" and not table.get("disable_image_nvdimm", True):
        return RootAttachment("virtio-pmem", params("/dev/pmem0p1", True), True,
                              "Cloud Hypervisor virtio-pmem (disable_image_nvdimm = false) has a writable DAX "
                              "window (GHSA-wwj6-vghv-5p64): a container with CAP_MKNOD rewrites guest binaries")
    if hv == "clh":
        return RootAttachment("virtio-blk", params("/dev/vda1", False), False,
                              "Cloud Hypervisor attaches the image as a read-only virtio-blk disk "
                              "(disable_image_nvdimm = true)")
    return RootAttachment("virtio-blk", params("/dev/vda1", False), None,
                          f"{hv or 'the hypervisor'} attaches the image as a virtio-blk disk")


def image_facts(root: RootView, *, cmdline: str | None = None, verity_params: str | None = None,
                attachment: RootAttachment | None = None) -> ImageFacts:
    """Collect the facts of one image. ``cmdline`` is the kernel command line Kata passes (config
    ``kernel_params`` plus the runtime's defaults) when known; ``verity_params`` Kata's ``kernel_verity_params``;
    ``attachment`` how the configuration attaches the image (a writable device makes the root writable)."""
    facts = ImageFacts()
    v = facts.values
    entries = root.entries()
    v["image.kind"] = root.kind
    v["image.source"] = str(root.source)
    v["image.file_count"] = sum(1 for e in entries.values() if e.kind == "file")
    facts.notes.extend(root.fidelity_notes)
    osr = parse_os_release(root.read_text("/etc/os-release") or root.read_text("/usr/lib/os-release"))
    v["os.id"], v["os.version_id"] = osr.get("ID", ""), osr.get("VERSION_ID", "")

    _list_fact(v, "image.setuid_files", sorted(e.path for e in entries.values()
                                               if e.kind == "file" and e.mode & 0o6000))
    _list_fact(v, "image.file_capabilities", sorted(f"{e.path} ({_caps_text(e.capability)})"
                                                    for e in entries.values() if e.capability))
    _list_fact(v, "image.world_writable", sorted(
        e.path for e in entries.values()
        if e.kind in ("file", "dir") and e.mode & 0o002 and not (e.kind == "dir" and e.mode & 0o1000)))
    _accounts(root, v)
    executables = _executables(root)
    _list_fact(v, "image.shells", sorted({executables[n] for n in SHELLS if n in executables}))
    # busybox applet links (busybox httpd, busybox wget) add nothing busybox itself cannot do: they are
    # reported apart, and busybox counts once, as a shell
    applets = {n: p for n, p in executables.items() if posixpath.basename(p) == "busybox" and n != "busybox"}
    tools = {n: p for n, p in executables.items() if n not in applets}
    v["image.busybox_applets"] = sorted(n for n in applets if n in PACKAGE_MANAGERS + NETWORK_DAEMONS + DEBUG_TOOLS)
    _list_fact(v, "image.package_managers", sorted({tools[n] for n in PACKAGE_MANAGERS if n in tools}))
    _list_fact(v, "image.network_daemons", sorted({tools[n] for n in NETWORK_DAEMONS if n in tools}))
    _list_fact(v, "image.debug_tools", sorted({tools[n] for n in DEBUG_TOOLS if n in tools}))
    _agent(root, v)
    _init(root, v)
    _services(root, v)
    _cmdline(v, cmdline, verity_params)
    _root_readonly(root, v, cmdline, attachment)
    _sysctls(root, v, cmdline, facts.notes)
    return facts


def _list_fact(v: dict[str, Any], key: str, items: list[str]) -> None:
    v[key] = items
    v[f"{key}.count"] = len(items)


def _caps_text(raw: bytes | None) -> str:
    """Permitted capability bits of a VFS_CAP (v2/v3) xattr as names, e.g. ``cap_net_raw``."""
    if not raw or len(raw) < 12:
        return "capabilities"
    names = ["chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid", "setuid",
             "setpcap", "linux_immutable", "net_bind_service", "net_broadcast", "net_admin", "net_raw",
             "ipc_lock", "ipc_owner", "sys_module", "sys_rawio", "sys_chroot", "sys_ptrace", "sys_pacct",
             "sys_admin", "sys_boot", "sys_nice", "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease",
             "audit_write", "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
             "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore"]
    low = int.from_bytes(raw[4:8], "little")
    high = int.from_bytes(raw[12:16], "little") if len(raw) >= 16 else 0
    bits = low | (high << 32)
    got = [f"cap_{n}" for i, n in enumerate(names) if bits >> i & 1]
    effective = "+ep" if int.from_bytes(raw[0:4], "little") & 1 else "+p"
    return ",".join(got) + effective if got else "empty"


def _executables(root: RootView) -> dict[str, str]:
    """basename -> the real guest path (symlinks resolved) of the first executable by that name in PATH order."""
    found: dict[str, str] = {}
    entries = root.entries()
    for d in BIN_DIRS:
        real_dir = root.resolve(d)
        if real_dir is None:
            continue
        for name in root.listdir(d):
            if name in found:
                continue
            real = root.resolve(posixpath.join(real_dir, name))
            entry = entries.get(real or "")
            if entry is not None and entry.executable:
                found[name] = real  # type: ignore[assignment]
    return found


def _accounts(root: RootView, v: dict[str, Any]) -> None:
    """Accounts a finding is about, each with the file and line that defines it (``toor (/etc/passwd:2)``)."""
    passwd = root.read_text("/etc/passwd") or ""
    uid0 = []
    for number, line in enumerate(passwd.splitlines(), 1):
        parts = line.split(":")
        if len(parts) >= 4 and parts[2] == "0" and parts[0] != "root":
            uid0.append(f"{parts[0]} (/etc/passwd:{number})")
    shadow = root.read_text("/etc/shadow") or ""
    empty = [f"{p[0]} (/etc/shadow:{number})" for number, p in
             enumerate((line.split(":") for line in shadow.splitlines()), 1) if len(p) >= 2 and p[1] == ""]
    v["accounts.present"] = bool(passwd)
    _list_fact(v, "accounts.uid0_nonroot", uid0)
    _list_fact(v, "accounts.empty_passwords", empty)


def _agent(root: RootView, v: dict[str, Any]) -> None:
    for path in AGENT_PATHS:
        real = root.resolve(path)
        entry = root.entries().get(real or "")
        if entry is not None and entry.kind == "file":
            v["agent.present"] = True
            v["agent.path"] = path
            v["agent.mode"] = f"{entry.mode:04o}"
            v["agent.root_owned_not_writable"] = entry.uid == 0 and not entry.mode & 0o022
            return
    v["agent.present"] = False


def _init(root: RootView, v: dict[str, Any]) -> None:
    """What runs as PID 1: the Kata agent (osbuilder AGENT_INIT=yes), systemd, or something else."""
    candidates = ("/init", "/sbin/init") if root.kind == "initrd" else ("/sbin/init", "/init")
    for path in candidates:
        real = root.resolve(path)
        entry = root.entries().get(real or "")
        if entry is None or entry.kind != "file":
            continue
        v["init.path"] = path
        v["init.target"] = real
        base = posixpath.basename(real or "")
        if base == "kata-agent":
            v["init.kind"] = "kata-agent"
        elif base == "systemd":
            v["init.kind"] = "systemd"
        elif base == "busybox":
            v["init.kind"] = "busybox"
        else:
            head = root.read(path)[:65536].decode("utf-8", "replace")
            execs = re.findall(r"^\s*exec\s+(?:\S*switch_root\s+\S+\s+)?(\S+)", head, re.M)
            if head.startswith("#!") and any(posixpath.basename(x) == "kata-agent" for x in execs):
                v["init.kind"] = "kata-agent"
                v["init.via_script"] = True
            elif head.startswith("#!") and any("systemd" in x or x.endswith("/sbin/init") for x in execs):
                v["init.kind"] = "systemd"
                v["init.via_script"] = True
            else:
                v["init.kind"] = "script" if head.startswith("#!") else "other"
        v["init.is_agent"] = v["init.kind"] == "kata-agent"
        return
    v["init.kind"] = "none"
    v["init.is_agent"] = False


def _services(root: RootView, v: dict[str, Any]) -> None:
    """Enabled units by name (what the rules compare), and by path: ``services.units`` gives each unit's
    file and the links that enable it, so that a finding on a name says where to remove it."""
    links: dict[str, list[str]] = {}
    for link in sorted(root.glob("/etc/systemd/system/*.wants/*") + root.glob("/etc/systemd/system/*.requires/*")):
        links.setdefault(posixpath.basename(link), []).append(link)
    masked = {posixpath.basename(p) for p in root.glob("/etc/systemd/system/*")
              if (root.entry(p) or Entry(p, "", 0, 0, 0, 0)).target == "/dev/null"}
    enabled = sorted(u for u in links if u not in masked)
    units = [f"{u}: {_unit_file(root, links[u][0])} (enabled by {', '.join(links[u])})" for u in enabled]
    if v.get("init.kind") != "systemd":
        v["services.unit_links_ignored"] = enabled  # nothing starts them without systemd
        enabled, units = [], []
    _list_fact(v, "services.enabled", enabled)
    v["services.units"] = units
    _list_fact(v, "services.unexpected", [u for u in enabled if u not in SERVICE_ALLOWLIST])


def _unit_file(root: RootView, link: str) -> str:
    """The unit file an enablement link points at (``getty@tty1.service`` -> ``.../getty@.service``), or the
    link's target as written when the image lacks the file."""
    entry = root.entry(link)
    target = entry.target if entry is not None and entry.target else link
    return root.resolve(link) or posixpath.normpath(posixpath.join(posixpath.dirname(link), target))


def _cmdline_tokens(cmdline: str | None) -> list[str]:
    try:
        return shlex.split(cmdline or "")
    except ValueError:
        return (cmdline or "").split()


def _cmdline(v: dict[str, Any], cmdline: str | None, verity_params: str | None) -> None:
    tokens = _cmdline_tokens(cmdline)
    v["cmdline.known"] = cmdline is not None
    v["cmdline.text"] = cmdline or ""
    _list_fact(v, "cmdline.weakeners", [t for t in tokens if t in CMDLINE_WEAKENERS or
                                        any(t.startswith(w + "=") for w in CMDLINE_WEAKENERS if "=" not in w)])
    _list_fact(v, "cmdline.debug", [t for t in tokens if t in CMDLINE_DEBUG or
                                    any(t.startswith(d + "=") for d in CMDLINE_DEBUG if "=" not in d)])
    verity = bool(verity_params and verity_params.strip()) or any(
        t.startswith("dm-mod.create=") and "verity" in t for t in tokens) or any(
        t.startswith(("verity.", "roothash=", "systemd.verity")) for t in tokens)
    v["root.dm_verity"] = verity


def _root_readonly(root: RootView, v: dict[str, Any], cmdline: str | None,
                   attachment: RootAttachment | None = None) -> None:
    """Kernel mounts root ro unless ``rw`` is given; systemd then applies fstab's options for ``/``; a device
    the guest can write (a DAX window without read-only) makes any mount option moot."""
    tokens = _cmdline_tokens(cmdline)
    kernel_ro = True
    for t in tokens:  # the last of ro/rw wins, as in the kernel
        if t in ("ro", "rw"):
            kernel_ro = t == "ro"
    reasons = [f"kernel mounts root {'ro' if kernel_ro else 'rw'} "
               f"({'command line' if any(t in ('ro', 'rw') for t in tokens) else 'kernel default'})"]
    readonly = kernel_ro
    if v.get("init.kind") == "systemd":
        for line in (root.read_text("/etc/fstab") or "").splitlines():
            fields = line.split()
            if len(fields) >= 4 and not fields[0].startswith("#") and fields[1] == "/":
                opts = fields[3].split(",")
                readonly = "ro" in opts
                reasons.append(f"systemd-remount-fs applies /etc/fstab options {fields[3]!r} for /")
                break
    if v.get("init.kind") in ("script", "kata-agent", "busybox") and root.kind != "initrd":
        for path in ("/sbin/init", "/init"):
            text = root.read_text(path) or ""
            if re.search(r"mount\s+.*remount,\s*rw|mount\s+-o\s+rw,remount|remount,rw", text):
                readonly = False
                reasons.append(f"{path} remounts / read-write")
    if attachment is not None and root.kind != "initrd":
        reasons.insert(0, f"image attached as {attachment.device}: {attachment.why}")
        if attachment.writable:
            readonly = False
    if root.kind == "initrd":
        readonly = False
        reasons = ["an initrd root is a writable tmpfs/ramfs"]
    v["root.readonly"] = readonly
    v["root.readonly_reason"] = "; ".join(reasons)


def _sysctls(root: RootView, v: dict[str, Any], cmdline: str | None, notes: list[str]) -> None:
    """``sysctl.*`` kernel parameters, then sysctl.d in systemd-sysctl order (by file name, later dirs
    override same names) as the init applies them after the kernel; keep only what something applies."""
    files: dict[str, str] = {}
    for d in SYSCTL_DIRS:
        real = root.resolve(d)
        if real is None:
            continue
        for name in root.listdir(d):
            if name.endswith(".conf"):
                files[name] = posixpath.join(d, name)
    ordered = [files[n] for n in sorted(files)]
    if root.exists("/etc/sysctl.conf"):
        ordered.append("/etc/sysctl.conf")
    contents = root.read_many(ordered)
    from_files: dict[str, str] = {}
    for path in ordered:
        for key, value in _parse_sysctl(contents.get(path, b"").decode("utf-8", "replace")):
            from_files[key] = value
    boot = _sysctl_applier(root, v)
    applier = boot.applier
    v["sysctl.applied_by"] = applier or (f"cannot tell: {boot.undecided}" if boot.undecided else "nothing")
    v["sysctl.decided"] = True if applier or not boot.undecided else f"cannot tell: {boot.undecided}"
    # the kernel applies sysctl.* parameters before it starts init; what the init applies then overrides them
    values: dict[str, str] = {}
    for t in _cmdline_tokens(cmdline):
        if t.startswith("sysctl.") and "=" in t:
            key, _, value = t[len("sysctl."):].partition("=")
            values[key.replace("/", ".")] = value
    if applier:
        for path in ordered if boot.files is None else [p for p in ordered if p in boot.files]:
            values.update(_parse_sysctl(contents.get(path, b"").decode("utf-8", "replace")))
    values.update(boot.direct)
    if from_files and not applier:
        v["sysctl.unapplied"] = sorted(from_files)
        what = f"cannot tell whether the guest applies them ({boot.undecided})" if boot.undecided else \
            f"nothing in the guest applies them (init is {v.get('init.kind')})"
        notes.append(f"{len(from_files)} sysctl(s) set in {', '.join(ordered)} but {what}")
    for key, value in values.items():
        v[f"sysctl.{key}"] = _number(value)
    v["sysctl.files"] = ordered


SYSCTL_META = frozenset({"sysctl.decided", "sysctl.applied_by", "sysctl.files", "sysctl.unapplied"})


def sysctl_values(facts: ImageFacts) -> dict[str, Any]:
    """The sysctl values the facts say the guest has at boot, by sysctl name (``kernel.sysrq``)."""
    return {k[len("sysctl."):]: v for k, v in facts.values.items() if k.startswith("sysctl.") and k not in SYSCTL_META}


def with_booted_sysctls(facts: ImageFacts, booted: dict[str, str | None], how: str) -> ImageFacts:
    """The facts with every sysctl replaced by what a booted guest read back (None: the guest has no such
    sysctl, so it is not set); decided, since the guest itself was asked."""
    values = {k: v for k, v in facts.values.items() if not k.startswith("sysctl.")}
    values.update({f"sysctl.{k}": _number(v) for k, v in booted.items() if v is not None})
    values.update({"sysctl.decided": True, "sysctl.applied_by": how, "sysctl.files": facts.get("sysctl.files", [])})
    return ImageFacts(values, list(facts.notes))


def _parse_sysctl(text: str) -> Iterable[tuple[str, str]]:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            yield key.strip().lstrip("-").replace("/", "."), value.strip()


@dataclass
class BootSysctl:
    """What the guest's init does about sysctls at boot."""

    applier: str | None = None  # what applies sysctl.d files, with the command that does it
    files: set[str] | None = None  # the files it applies (None: every sysctl.d/sysctl.conf file)
    direct: dict[str, str] = field(default_factory=dict)  # echo V > /proc/sys/a/b: a.b = V
    undecided: str | None = None  # why it cannot be told


# programs an init runs that are known not to apply sysctl files (the real Kata agent included)
NOT_SYSCTL_APPLIERS = frozenset({
    "kata-agent", "busybox", "sh", "dash", "bash", "ash", "mount", "umount", "mkdir", "insmod", "modprobe",
    "hostname", "setsid", "sleep", "cttyhack", "switch_root", "chroot", "echo", "cat", "ln", "cp", "rm", "tr",
    "basename", "uname", "udevadm", "true", "false", "chmod", "chown", "ip", "ifconfig", "mdev", "getty",
})
_SOURCE = re.compile(r"^\s*(?:\.|source)\s+[\"']?(/[^\s\"';]+)")
_RUN = re.compile(r"^\s*(?:exec\s+)?[\"']?(/[^\s\"';|&]+)")
_SYSCTL = re.compile(r"(?:^|[\s;&|(`])(?:\S*/)?sysctl((?:[ \t]+[^\s;&|`)]+)*)")
_PROC_ECHO = re.compile(r"\becho\s+[\"']?([0-9A-Za-z_./|-]+)[\"']?\s*>\s*/proc/sys/([\w./-]+)")
_PROC_WRITE = re.compile(r"(?:>|\btee\s+(?:-a\s+)?)\s*/proc/sys/")
_MAX_SCRIPTS = 16


_NO_BLOCK = object()
_FILE_TEST = re.compile(r"^\s*if\s+(!\s+)?\[\s+-[efsd]\s+[\"']?(/[^\s\"']+)[\"']?\s+\]")


def _block_open(root: RootView, line: str) -> object:
    """For a line opening an if/case block: True/False when it tests a file of the image, None otherwise;
    ``_NO_BLOCK`` for any other line."""
    if re.match(r"\s*case\b", line):
        return None
    if not re.match(r"\s*if\b", line) or re.search(r"\bfi\s*$", line):
        return _NO_BLOCK
    test = _FILE_TEST.match(line)
    if test is None:
        return None
    return root.exists(test.group(2)) != bool(test.group(1))


def _is_script(root: RootView, path: str) -> bool:
    return root.read(path)[:2] == b"#!" if root.exists(path) else False


def _sysctl_applier(root: RootView, v: dict[str, Any]) -> BootSysctl:
    """Follow what the init runs (scripts it sources or runs, busybox inittab) and find what applies sysctls:
    ``sysctl`` with -p/--load/--system in any flag order (also as a busybox applet), a loop writing
    /proc/sys from /etc/sysctl.d, or literal ``echo V > /proc/sys/...``."""
    kind = v.get("init.kind")
    if kind == "systemd":
        for p in ("/usr/lib/systemd/systemd-sysctl", "/lib/systemd/systemd-sysctl"):
            masked = root.entry("/etc/systemd/system/systemd-sysctl.service")
            if root.exists(p) and (masked is None or masked.target != "/dev/null"):
                return BootSysctl("systemd-sysctl")
        return BootSysctl()
    init = v.get("init.path")
    if not init:
        return BootSysctl()
    queue: list[tuple[str, bool]] = [(str(init), False)]  # (path, sourced: read whatever its first line)
    if kind == "busybox":  # busybox init runs the inittab's actions, or /etc/init.d/rcS without one
        queue = []
        for line in (root.read_text("/etc/inittab") or "").splitlines():
            parts = line.split(":", 3)
            if len(parts) == 4 and parts[3].strip().startswith("/") and not line.lstrip().startswith("#"):
                queue.append((parts[3].split()[0], False))
        queue = queue or [("/etc/init.d/rcS", False)]
    result = BootSysctl()
    every_file = False
    named: set[str] = set()
    unknown: list[str] = []
    seen: set[str] = set()
    while queue and len(seen) < _MAX_SCRIPTS:
        path, sourced = queue.pop(0)
        real = root.resolve(path)
        if real is None or real in seen or not root.exists(real):
            continue
        seen.add(real)
        if not sourced and not _is_script(root, real):
            if path == init and posixpath.basename(real) not in NOT_SYSCTL_APPLIERS:
                unknown.append(path)
            continue
        text = root.read_text(real) or ""
        mentions_sysctl_d = "/etc/sysctl.d" in text or "sysctl.d/" in text
        conditions: list[bool | None] = []  # enclosing if/case blocks: True/False for a file test, None unknown
        for raw in text.splitlines():
            line = raw.split("#", 1)[0] if not raw.lstrip().startswith("#!") else ""
            if not line.strip():
                continue
            opened = _block_open(root, line)
            if opened is not _NO_BLOCK:
                conditions.append(opened)  # type: ignore[arg-type]
            elif re.match(r"\s*(fi|esac)\b", line) and conditions:
                conditions.pop()
                continue
            elif re.match(r"\s*(elif|else)\b", line) and conditions:
                conditions[-1] = None
            for m in _SYSCTL.finditer(line):
                args = [a for a in m.group(1).split() if not re.match(r"\d*[<>]", a)]  # not redirections
                flags = [a for a in args if a.startswith("-")]
                files = [a.strip("\"'") for a in args if not a.startswith("-")]
                system = "--system" in flags
                load = any(f.startswith("--load") or (not f.startswith("--") and "p" in f[1:]) for f in flags)
                if not (system or load):
                    continue
                result.applier = result.applier or f"{path}: sysctl {' '.join(args)}"
                if system or any("$" in f or "*" in f for f in files):  # every file, or a loop over them
                    every_file = True
                else:  # named files; -p alone loads /etc/sysctl.conf
                    named.update(files or ["/etc/sysctl.conf"])
            for m in _PROC_ECHO.finditer(line):
                if "$" not in m.group(1) and all(c is True for c in conditions):
                    result.direct[m.group(2).replace("/", ".")] = m.group(1)
            if _PROC_WRITE.search(line) and "$" in line and mentions_sysctl_d:
                result.applier = result.applier or f"{path}: writes /proc/sys from /etc/sysctl.d"
                every_file = True
            source, run = _SOURCE.match(line), _RUN.match(line)
            if source:
                queue.append((source.group(1), True))
            elif run:
                target = run.group(1)
                real_target = root.resolve(target)
                if real_target is None:
                    continue
                if _is_script(root, real_target):
                    queue.append((target, False))
                elif posixpath.basename(real_target) == "systemd":
                    return _sysctl_applier(root, {**v, "init.kind": "systemd"})
                elif posixpath.basename(real_target) not in NOT_SYSCTL_APPLIERS:
                    unknown.append(target)
    result.files = None if every_file else named
    if not result.applier and unknown:
        result.undecided = f"the init runs {', '.join(sorted(set(unknown)))}, which is not a script that can be read"
    return result


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        return value
