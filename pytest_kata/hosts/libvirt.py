"""``LibvirtHost``: a staging host as a libvirt domain, driven over its serial console.

Everything goes through the libvirt API (domain, console stream, snapshots, storage pool/volume for the
overlay), so a remote ``qemu+ssh://`` URI works like ``qemu:///system``. The one thing a remote hypervisor
must already have is the base image directory (image, kernel, initrd) at the same path; and large-file
transfer by hot-plugged disk is local-only (remote hosts fall back to the console).

Names: domain, pool and overlay are ``<run-id>-<worker>-h<N>`` (``kt-1a2b3c4d-gw0-h1``), and the domain's
``<metadata>`` records the run id, worker and owner pid, so that the sweep (pytest_kata.sweep) can remove
what a dead run left behind.

Commands: ``run()`` base64-copies the command into the guest and brackets its output with sentinels whose
digits only exist after shell arithmetic (``$((6*7))``), so an echoed command line can never match; stderr
is captured separately and the exit code is part of the end sentinel.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pexpect

from pytest_kata import runid
from pytest_kata.hashing import sha256_file as _sha256
from pytest_kata.hosts.accel import is_local_uri
from pytest_kata.hosts.base import TIMED_OUT, HostError, RunResult, as_command
from pytest_kata.hosts.console import Console, strip_ansi
from pytest_kata.images.common import make_ext4_fs
from pytest_kata.progress import step
from pytest_kata.resources import LOCAL_LIBVIRT_URI, cache_dir
from pytest_kata.runid import worker_id

AREA = "host"
METADATA_NS = "https://github.com/pytest-kata/pytest-kata/host"
CONSOLE_TRANSFER_LIMIT = 64 * 1024  # bigger files go on a hot-plugged transfer disk (local URIs)
B64_LINE = 1024  # base64 characters per console line; the tty's canonical line limit is 4095
LINES_PER_ACK = 24  # console lines sent before waiting for the shell to catch up
PANIC_PATTERNS = ("Kernel panic", "Oops", "Call Trace", "BUG:")
_counter = itertools.count(1)
_live: dict[str, LibvirtHost] = {}
_live_lock = threading.Lock()


def host_name(index: int | None = None, run_id: str | None = None) -> str:
    return f"{run_id or runid.current_run_id()}-{worker_id()}-h{index or next(_counter)}"


def connect(uri: str, uri_flag: str = "--kata-libvirt-uri") -> Any:
    """Open a libvirt connection, with libvirt's own stderr chatter silenced (errors come as exceptions);
    ``uri_flag`` is the option that chose the URI, named in the hint."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise HostError(f"cannot connect to libvirt: {exc.get_error_message()}", path=uri,
                        hint=f"start libvirtd (virtlogd -d; libvirtd -d) or pass {uri_flag}") from None


@dataclass
class HostSpec:
    """What to boot. ``image`` is the read-only base every host overlays (raw or qcow2)."""

    image: Path
    kernel: Path
    initrd: Path | None
    cmdline: str
    prompt: str = "kt-host# "
    image_format: str = "raw"
    memory_mib: int = 1536
    vcpus: int = 1
    accel: str = "tcg"
    boot_timeout: float = 240.0
    log_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "pytest-kata-hosts")
    extra_devices: str = ""  # domain XML fragments, e.g. <interface> elements of a test network

    def with_changes(self, **changes: Any) -> HostSpec:
        return replace(self, **changes)


def domain_xml(name: str, spec: HostSpec, overlay: Path, run_id: str, serial_log: Path | None = None) -> str:
    virt_type = "kvm" if spec.accel == "kvm" else "qemu"
    cpu = "<cpu mode='host-passthrough'/>" if spec.accel == "kvm" else "<cpu mode='maximum'/>"
    initrd = f"<initrd>{escape(str(spec.initrd))}</initrd>" if spec.initrd else ""
    # qemu's own copy of the serial output (via virtlogd), from power-on: complete even before the console
    # stream is attached and during reverts
    log = f"<log file='{escape(str(serial_log))}' append='on'/>" if serial_log else ""
    return f"""<domain type='{virt_type}'>
  <name>{name}</name>
  <description>pytest-kata host of run {run_id}; removed by the run, or swept when the run is dead</description>
  <metadata>
    <kt:host xmlns:kt='{METADATA_NS}'>
      <kt:run-id>{run_id}</kt:run-id><kt:worker>{worker_id()}</kt:worker><kt:pid>{os.getpid()}</kt:pid>
    </kt:host>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>{spec.vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(spec.kernel))}</kernel>{initrd}
    <cmdline>{escape(spec.cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  {cpu}
  <on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{escape(str(overlay))}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <serial type='pty'>{log}<target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <memballoon model='none'/>{spec.extra_devices}
  </devices>
</domain>"""


class LibvirtHost:
    """One host VM. Create with :meth:`boot`; every method is safe to call from one thread at a time."""

    def __init__(self, name: str, spec: HostSpec, uri: str, conn: Any | None = None,
                 run_id: str | None = None) -> None:
        self.name = name
        self.spec = spec
        self.uri = uri
        self.run_id = run_id or runid.current_run_id()
        self.conn = conn or connect(uri)
        self.dom: Any = None
        self.pool: Any = None
        self.volume: Any = None
        self.console: Console | None = None
        self.console_log_path = spec.log_dir / f"{name}.console.log"
        self.qemu_log_path = spec.log_dir / f"{name}.qemu.log"
        self.boot_seconds: float | None = None
        self.kept = False
        self._closed = False
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        # under the run's scratch dir (cache_dir()/runs/<run-id>), which the sweep removes for dead runs
        self.workdir = cache_dir() / "runs" / self.run_id / "hosts" / name

    # ------------------------------------------------------------------------------------------ lifecycle
    @classmethod
    def boot(cls, spec: HostSpec, uri: str = LOCAL_LIBVIRT_URI, *, name: str | None = None,
             conn: Any | None = None) -> LibvirtHost:
        """Create the overlay, define and start the domain, and wait for the shell prompt."""
        host = cls(name or host_name(), spec, uri, conn)
        with _live_lock:
            _live[host.name] = host
        try:
            host._create_overlay()
            serial_log = host.workdir / "serial.log" if _is_local(uri) else None
            host.dom = host.conn.defineXML(domain_xml(host.name, spec, host.overlay_path, host.run_id, serial_log))
            step(AREA, f"booting {host.name} ({spec.accel.upper()}, {spec.vcpus} vCPU, {spec.memory_mib} MiB)")
            start = time.monotonic()
            host.dom.create()
            host.console = Console(uri, host.dom, host.console_log_path)
            host._wait_ready(spec.boot_timeout, start)
            host.boot_seconds = time.monotonic() - start
            step(AREA, f"{host.name} ready in {host.boot_seconds:.1f}s")
        except BaseException:
            host.close()
            raise
        return host

    @property
    def overlay_path(self) -> Path:
        if self.volume is not None:
            return Path(self.volume.path())
        return self.workdir / f"{self.name}.qcow2"

    def _create_overlay(self) -> None:
        """A qcow2 overlay on the base image, made through a transient libvirt dir pool (works remotely too)."""
        import libvirt

        if _is_local(self.uri):
            for parent in reversed(self.workdir.parents[:3]):  # runs/<run-id>/hosts: traversable by qemu
                parent.mkdir(exist_ok=True)
                parent.chmod(0o755)
        pool_xml = (f"<pool type='dir'><name>{self.name}</name><target><path>{escape(str(self.workdir))}</path>"
                    "<permissions><mode>0755</mode></permissions></target></pool>")
        try:
            self.pool = self.conn.storagePoolCreateXML(pool_xml, libvirt.VIR_STORAGE_POOL_CREATE_WITH_BUILD)
            capacity = _image_virtual_size(self.spec.image, self.spec.image_format)
            vol_xml = (f"<volume><name>{self.name}.qcow2</name><capacity unit='bytes'>{capacity}</capacity>"
                       "<target><format type='qcow2'/><permissions><mode>0600</mode></permissions></target>"
                       f"<backingStore><path>{escape(str(self.spec.image))}</path>"
                       f"<format type='{self.spec.image_format}'/></backingStore></volume>")
            self.volume = self.pool.createXML(vol_xml, 0)
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot create the overlay of {self.spec.image}: {exc.get_error_message()}",
                            path=self.name) from None

    def _wait_ready(self, timeout: float, start: float) -> None:
        """Wait for the prompt; fail early on a panic or a dead domain, with the console's last lines."""
        assert self.console is not None
        patterns = [re.escape(self.spec.prompt.encode()), rb"Kernel panic - not syncing[^\n]*"]
        deadline = start + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unreachable(time.monotonic() - start)
            try:
                index = self.console.child.expect(patterns, timeout=min(left, 5.0))
            except pexpect.TIMEOUT:
                if not self.dom.isActive():
                    raise self._unreachable(time.monotonic() - start, "the domain stopped") from None
                continue
            except pexpect.EOF:
                raise self._unreachable(time.monotonic() - start, "the console closed") from None
            if index == 1:
                time.sleep(1.0)  # let the panic's trace reach the log
                raise self._unreachable(time.monotonic() - start, "kernel panic")
            self._sync(timeout=30)
            return

    def _unreachable(self, seconds: float, why: str = "") -> HostError:
        tail = self.console.tail(12) if self.console else ""
        if not tail:  # the stream saw nothing: qemu's serial log has everything since power-on
            self._collect_serial_log()
            lines = [ln.strip() for ln in strip_ansi(self._read(self.serial_log_path)).splitlines() if ln.strip()]
            tail = " | ".join(lines[-12:])
        reason = f" ({why})" if why else ""
        error = HostError(f"host {self.name} unreachable after {seconds:.0f} s{reason}, last console lines: "
                          f"{tail or '(nothing printed)'}", hint=f"full console log: {self.console_log_path}")
        error.console_log_path = self.console_log_path  # type: ignore[attr-defined]  # attached to the test
        error.serial_log_path = self.serial_log_path  # type: ignore[attr-defined]
        return error

    def close(self) -> None:
        """Destroy the domain, its snapshots, overlay and pool (unless kept for inspection). Idempotent."""
        import libvirt

        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.console is not None:
                self.console.close()
            if self.kept:
                step(AREA, f"kept {self.name} for inspection: virsh -c {self.uri} console {self.name}")
            else:
                if self.dom is not None:
                    for action in (self.dom.destroy, self._undefine):
                        try:
                            action()
                        except libvirt.libvirtError:
                            pass
                for action in (lambda: self.volume and self.volume.delete(0),
                               lambda: self.pool and self.pool.destroy()):
                    try:
                        action()
                    except libvirt.libvirtError:
                        pass
                if _is_local(self.uri):
                    self._collect_serial_log()
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    self._collect_qemu_log(remove=True)
            with _live_lock:
                _live.pop(self.name, None)

    def _undefine(self) -> None:
        import libvirt

        self.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)

    def keep(self) -> str:
        """Leave the host running after close (``--kata-keep-on-failure``); returns how to reach it."""
        self.kept = True
        return f"virsh -c {self.uri} console {self.name}"

    def __enter__(self) -> LibvirtHost:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ commands
    def run(self, cmd: str | Sequence[str], *, timeout: float = 600.0, check: bool = False,
            stdin: bytes | None = None) -> RunResult:
        """Run ``cmd`` with ``bash`` as root; stdout and stderr apart, the exit code exact."""
        command = as_command(cmd)
        with self._lock:
            con = self._console()
            n = next(self._seq)
            start = time.monotonic()
            tmp = f"/tmp/.kt/{n}"
            if _fits_on_one_line(command):
                script = f"bash -c {shlex.quote(command)}"
            else:
                self._upload_text(f"{tmp}.sh", command.encode())
                script = f"bash {tmp}.sh"
            redirect = "/dev/null"
            if stdin is not None:
                self._upload_text(f"{tmp}.in", stdin)
                redirect = f"{tmp}.in"
            con.sendline(f"printf '\\n__KT_B{n}_%d__\\n' $((6*7)); {script} <{redirect} 2>{tmp}.err; "
                         f"kt_rc=$?; printf '\\n__KT_E{n}_%d_%d__\\n' $((6*7)) $kt_rc; base64 -w0 {tmp}.err; "
                         f"printf '\\n__KT_F{n}_%d__\\n' $((6*7)); rm -f {tmp}.*")
            regex = re.compile(rb"\n__KT_B%d_42__\n(.*?)\n__KT_E%d_42_(\d+)__\n(.*?)\n__KT_F%d_42__\n"
                               % (n, n, n), re.S)
            try:
                match = con.expect(regex, timeout=timeout)
            except pexpect.TIMEOUT:
                partial = con.child.before.split(b"__KT_B%d_42__\n" % n, 1)[-1]
                result = RunResult(command, TIMED_OUT, strip_ansi(partial.decode(errors="replace")),
                                   f"timed out after {timeout:g} s", time.monotonic() - start, self.name)
                self._interrupt(n)
                return result.check() if check else result
            except pexpect.EOF:
                raise HostError(f"console closed while running {command!r}", path=self.name) from None
            stdout = match.group(1).decode(errors="replace")
            stderr = base64.b64decode(match.group(3).strip() or b"").decode(errors="replace")
            result = RunResult(command, int(match.group(2)), stdout, stderr, time.monotonic() - start, self.name)
        return result.check() if check else result

    def _console(self) -> Console:
        if self._closed or self.console is None:
            raise HostError("host is closed", path=self.name)
        return self.console

    def _interrupt(self, n: int) -> None:
        """After a timeout: Ctrl-C the command and resynchronise, or declare the console lost."""
        con = self._console()
        con.send(b"\x03")  # interactive bash drops the rest of the line when its job dies of SIGINT
        try:
            self._sync(timeout=15)
        except pexpect.TIMEOUT:
            raise HostError("console does not answer after interrupting a timed-out command", path=self.name,
                            hint=f"console log: {self.console_log_path}") from None

    def _sync(self, timeout: float = 30) -> None:
        """Flush whatever is pending on the console and prove the shell answers."""
        con = self._console()
        token = next(self._seq)
        con.sendline(f"mkdir -p /tmp/.kt; printf '__KT_S{token}_%d__\\n' $((6*7))")
        con.expect(rb"__KT_S%d_42__\n" % token, timeout=timeout)

    def _upload_text(self, remote: str, data: bytes) -> None:
        """Write ``data`` to ``remote`` through the console as base64 lines, pacing with acknowledgements."""
        con = self._console()
        encoded = base64.b64encode(data).decode()
        lines = [encoded[i:i + B64_LINE] for i in range(0, len(encoded), B64_LINE)] or [""]
        con.sendline(f": > {remote}.b64")
        for batch_start in range(0, len(lines), LINES_PER_ACK):
            batch = lines[batch_start:batch_start + LINES_PER_ACK]
            con.send("".join(f"echo {line} >> {remote}.b64\n" for line in batch))
            if batch_start + LINES_PER_ACK < len(lines):
                self._sync(timeout=60)
        token = next(self._seq)
        con.sendline(f"base64 -d {remote}.b64 > {remote}; printf '__KT_U{token}_%d_%d__\\n' $((6*7)) $?; "
                     f"rm -f {remote}.b64")
        match = con.expect(rb"__KT_U%d_42_(\d+)__\n" % token, timeout=120)
        if match.group(1) != b"0":
            raise HostError(f"cannot write {remote} through the console", path=self.name)

    # ------------------------------------------------------------------------------------------ files
    def put(self, local: str | Path, remote: str, *, mode: int | None = None) -> None:
        """Copy a local file to the host: console for small files, a transfer disk for large ones."""
        local = Path(local)
        if not local.is_file():
            raise HostError("no such local file to copy", path=local)
        size = local.stat().st_size
        with self._lock:
            partial = f"/tmp/.kt/put-{next(self._seq)}"  # moved into place only once its checksum matches
            self.run(f"mkdir -p \"$(dirname {shlex.quote(remote)})\"", check=True)
            if size <= CONSOLE_TRANSFER_LIMIT or not _is_local(self.uri):
                self._upload_text(partial, local.read_bytes())
            else:
                self._put_by_disk(local, partial)
            digest = _sha256(local)
            chmod = f" && chmod {mode:o} {partial}" if mode is not None else ""
            result = self.run(f"echo '{digest}  {partial}' | sha256sum -c --status{chmod} && mv -f {partial} "
                              f"{shlex.quote(remote)}")
            if not result.ok:
                self.run(f"rm -f {partial}")
                raise HostError(f"copy of {local} to {remote} arrived corrupted", path=self.name)

    def get(self, remote: str, local: str | Path) -> None:
        """Copy a file from the host (checksummed)."""
        local = Path(local)
        with self._lock:
            quoted = shlex.quote(remote)
            info = self.run(f"stat -c %s {quoted} && sha256sum < {quoted}")
            if not info.ok:
                raise HostError(f"cannot read {remote}: {info.stderr.strip()}", path=self.name)
            size_line, sum_line = info.stdout.strip().splitlines()[:2]
            size, digest = int(size_line), sum_line.split()[0]
            local.parent.mkdir(parents=True, exist_ok=True)
            if size <= CONSOLE_TRANSFER_LIMIT or not _is_local(self.uri):
                result = self.run(f"base64 -w {B64_LINE} {quoted}", check=True)
                local.write_bytes(base64.b64decode("".join(result.stdout.split())))
            else:
                self._get_by_disk(remote, local, size)
            if _sha256(local) != digest:
                raise HostError(f"copy of {remote} to {local} arrived corrupted", path=self.name)

    def _transfer_disk(self, image: Path, tag: str) -> tuple[str, str]:
        """Hot-plug ``image`` on the virtio-scsi bus; returns (device xml, guest device path)."""
        import libvirt

        image.chmod(0o666)
        xml = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{image}'/>"
               f"<target dev='sd{chr(ord('a') + int(tag[3:]) % 26)}' bus='scsi'/><serial>{tag}</serial></disk>")
        try:
            self.dom.attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as exc:
            raise HostError(f"cannot attach the transfer disk: {exc.get_error_message()}", path=self.name) from None
        found = self.run(f"for i in $(seq 150); do d=$(lsblk -dnpo NAME,SERIAL | awk '$2==\"{tag}\"{{print $1}}'); "
                         "[ -n \"$d\" ] && [ -b \"$d\" ] && echo $d && exit 0; sleep 0.2; done; exit 1", timeout=60)
        if not found.ok:
            self._detach(xml, None)
            raise HostError("transfer disk did not appear in the guest", path=self.name)
        return xml, found.stdout.strip()

    def _detach(self, xml: str, device: str | None) -> None:
        import libvirt

        if device:
            self.run(f"echo 1 > /sys/block/{Path(device).name}/device/delete", timeout=60)
        try:
            self.dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError:
            pass
        for _ in range(50):  # snapshots refuse while a raw disk is attached
            if "<serial>kt" not in self.dom.XMLDesc(0):
                return
            time.sleep(0.1)

    def _put_by_disk(self, local: Path, remote: str) -> None:
        tag = f"ktx{next(self._seq)}"
        with tempfile.TemporaryDirectory(dir=self._scratch()) as tmp:
            Path(tmp).chmod(0o755)  # libvirt's qemu user opens the image in it
            tree = Path(tmp, "tree")
            tree.mkdir()
            # a copy, never a hard link: the image builder normalises the tree's mtimes, and a link would
            # change the caller's file (and a symlinked path would arrive as the link itself)
            shutil.copyfile(local.resolve(), tree / "payload")
            image = Path(tmp, f"{tag}.img")
            make_ext4_fs(tree, image, label=tag)
            xml, device = self._transfer_disk(image, tag)
            try:
                self.run(f"mkdir -p /mnt/{tag} && mount -o ro {device} /mnt/{tag} && cp /mnt/{tag}/payload "
                         f"{shlex.quote(remote)}; rc=$?; umount /mnt/{tag}; rmdir /mnt/{tag}; exit $rc", check=True,
                         timeout=600)
            finally:
                self._detach(xml, device)

    def _get_by_disk(self, remote: str, local: Path, size: int) -> None:
        tag = f"ktx{next(self._seq)}"
        with tempfile.TemporaryDirectory(dir=self._scratch()) as tmp:
            Path(tmp).chmod(0o755)
            image = Path(tmp, f"{tag}.img")
            with open(image, "wb") as f:
                f.truncate(size + size // 8 + 64 * 1024 * 1024)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", tag, str(image)], check=True, capture_output=True)
            xml, device = self._transfer_disk(image, tag)
            try:
                self.run(f"mkdir -p /mnt/{tag} && mount {device} /mnt/{tag} && "
                         f"cp {shlex.quote(remote)} /mnt/{tag}/payload; "
                         f"rc=$?; umount /mnt/{tag}; rmdir /mnt/{tag}; exit $rc", check=True, timeout=600)
            finally:
                self._detach(xml, device)
            subprocess.run(["debugfs", "-R", f"dump /payload {local}", str(image)], check=True,
                           capture_output=True)

    def _scratch(self) -> Path:
        path = self.workdir / "xfer"
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o755)
        return path

    # ------------------------------------------------------------------------------------------ networks
    def attach_network(self, network: Any, *, timeout: float = 90.0) -> str:
        """Hot-plug a NIC on ``network`` (a :class:`pytest_kata.network.TestNetwork`), give it the network's
        address for this host and return that address. A revert to ``clean`` removes the NIC again."""
        import libvirt

        digest = hashlib.sha256(f"{self.name}/{network.label}".encode()).digest()
        mac = "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])
        ip = network.allocate_ip(self.name)
        with self._lock:
            try:
                self.dom.attachDeviceFlags(network.interface_xml(mac=mac), libvirt.VIR_DOMAIN_AFFECT_LIVE)
            except libvirt.libvirtError as exc:
                raise HostError(f"cannot attach a NIC on {network.label}: {exc.get_error_message()}",
                                path=self.name) from None
            # find the NIC by its MAC, let udev finish renaming it (eth0 -> ens4), then look again
            by_mac = f"ip -o link | awk -F': ' '/{mac}/ {{print $2}}'"
            found = self.run(f"for i in $(seq {int(timeout * 5)}); do d=$({by_mac}); [ -n \"$d\" ] && break; "
                             f"sleep 0.2; done; udevadm settle -t 30; d=$({by_mac}); [ -n \"$d\" ] && "
                             f"ip addr add {ip}/{network.prefixlen} dev $d && ip link set $d up && echo $d",
                             timeout=timeout + 60)
            if not found.ok:
                raise HostError(f"the NIC on {network.label} did not come up: {found.stderr.strip()}",
                                path=self.name)
        return ip

    # ------------------------------------------------------------------------------------------ snapshots
    def snapshot(self, name: str) -> None:
        """An internal snapshot of the running host (RAM + disk, ~1 s under TCG)."""
        import libvirt

        with self._lock:
            self._sync()
            try:
                self.dom.snapshotCreateXML(f"<domainsnapshot><name>{escape(name)}</name>"
                                           f"<description>pytest-kata run {self.run_id}</description>"
                                           "</domainsnapshot>", 0)
            except libvirt.libvirtError as exc:
                raise HostError(f"cannot snapshot: {exc.get_error_message()}", path=self.name) from None

    def revert(self, name: str) -> None:
        """Back to a snapshot (~3.5 s under TCG): files, processes, loaded modules; the clock is reset to now."""
        import libvirt

        with self._lock:
            con = self._console()
            try:
                snap = self.dom.snapshotLookupByName(name, 0)
                self.dom.revertToSnapshot(snap, 0)
            except libvirt.libvirtError as exc:
                raise HostError(f"cannot revert to snapshot {name!r}: {exc.get_error_message()}",
                                path=self.name) from None
            con.mark(f"reverted to snapshot {name}")
            con.reopen()
            try:
                con.child.read_nonblocking(1 << 20, timeout=0.2)  # drop output from before the revert
            except (pexpect.TIMEOUT, pexpect.EOF):
                pass
            self._sync(timeout=60)
            self.run(f"date -u -s @{int(time.time())} >/dev/null")  # the guest clock went back in time

    def snapshots(self) -> list[str]:
        return [s.getName() for s in self.dom.listAllSnapshots(0)] if self.dom is not None else []

    def reboot(self, *, timeout: float | None = None) -> None:
        with self._lock:
            con = self._console()
            con.mark("reboot")
            start = time.monotonic()
            con.sendline("systemctl reboot")
            budget = timeout or self.spec.boot_timeout
            try:  # the shell prints a prompt before going down: wait for the new kernel first
                con.expect(rb"Linux version", timeout=budget)
            except pexpect.TIMEOUT:
                raise self._unreachable(time.monotonic() - start, "no reboot seen") from None
            self._wait_ready(budget, start)

    # ------------------------------------------------------------------------------------------ logs
    def console_log(self) -> str:
        if self.console is not None:
            return self.console.text()
        try:
            return self.console_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def note(self, text: str) -> None:
        """A marker line in the console log (test boundaries)."""
        if self.console is not None:
            self.console.mark(text)

    def qemu_log(self) -> str:
        """libvirt's log of this domain's qemu process (local URIs)."""
        path = Path("/var/log/libvirt/qemu") / f"{self.name}.log"
        for candidate in (path, self.qemu_log_path):
            try:
                return candidate.read_text(errors="replace")
            except OSError:
                continue
        return ""

    @property
    def serial_log_path(self) -> Path:
        """qemu's log of the serial console (local URIs), copied next to the console log."""
        return self.spec.log_dir / f"{self.name}.serial.log"

    def _collect_serial_log(self) -> None:
        source = self.workdir / "serial.log"
        if source.exists():
            self.serial_log_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.serial_log_path)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    def _collect_qemu_log(self, remove: bool) -> None:
        source = Path("/var/log/libvirt/qemu") / f"{self.name}.log"
        if source.exists():
            self.qemu_log_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, self.qemu_log_path)
            if remove:
                source.unlink(missing_ok=True)


_PRINTK_LINE = re.compile(r"\[\s*\d+\.\d+\]")  # "[   12.345678] ..." (console) or journalctl -o short-monotonic


def scan_for_panics(text: str, *, kernel_lines_only: bool = True) -> list[str]:
    """Lines that show a kernel in trouble (panic, oops, BUG, call trace).

    Only kernel lines count by default: the console also carries what test commands print, and a test
    that greps for "BUG:" must not fail itself.
    """
    return [line.strip() for line in strip_ansi(text).splitlines()
            if any(p in line for p in PANIC_PATTERNS) and (not kernel_lines_only or _PRINTK_LINE.search(line))]


def domain_run_id(dom: Any) -> str | None:
    """The run id recorded in a domain's metadata (or its name)."""
    import libvirt

    try:
        meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, 0)
        node = ET.fromstring(meta).find(f"{{{METADATA_NS}}}run-id")
        if node is not None and node.text:
            return node.text
    except (libvirt.libvirtError, ET.ParseError):
        pass
    return runid.run_id_of(dom.name())


def close_all() -> None:
    """Close every host this process still has (atexit, Ctrl-C): nothing outlives the run."""
    with _live_lock:
        hosts = list(_live.values())
    for host in hosts:
        try:
            host.close()
        except Exception:
            pass


atexit.register(close_all)


def _fits_on_one_line(command: str) -> bool:
    """Short printable one-liners go straight onto the console line (one round trip instead of three)."""
    return len(command) < 2000 and all(32 <= ord(c) < 127 or c == "\t" for c in command)


def _is_local(uri: str) -> bool:
    return is_local_uri(uri)





def _image_virtual_size(image: Path, fmt: str) -> int:
    if fmt == "raw":
        return image.stat().st_size
    proc = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)], capture_output=True, text=True)

    try:
        return int(json.loads(proc.stdout)["virtual-size"])
    except (ValueError, KeyError):
        raise HostError(f"cannot read the size of the host image: {proc.stderr.strip()}", path=image) from None
