"""The ``direct`` driver: boot the candidate's guest kernel and image as its configuration would, probe it.

No shim or agent is needed, so this works with any bundle (including the reference candidate, which has
neither): it boots the candidate's kernel + image/initrd with the candidate's QEMU (the host's when the
bundle's cannot run here, said so in the evidence) and the kernel parameters, machine type, memory and
read-only flags its ``configuration.toml`` gives, then drives the serial console with pexpect. The probe
runs as guest root ("privileged": the Kata threat model's compromised guest) or as uid 65534.

What the driver models from the configuration, since there is no shim to ask:
- the root device: Kata attaches the image read-only (NVDIMM ``readonly`` or ``virtio-blk`` ``readonly=on``)
  and passes ``ro``; a configuration whose ``kernel_params`` carry ``rw`` asks for a writable root, which the
  driver honours by attaching a *private copy* of the image read-write (the candidate's file is never
  written), so that guest writes that reach the backing file show up as a changed sha256 on the host;
- the image goes in as ``virtio-blk`` (``root=/dev/vda1``) even when ``disable_image_nvdimm = false``: the
  Debian-kernel reference loads only virtio/ext4 modules; the evidence says which attach Kata would use;
- no NIC and no vsock device (the host has no vhost-vsock): networks are unreachable by construction and
  vsock probes report "no AF_VSOCK transport".
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.bundle import Bundle, bundle_relative
from pytest_kata.hosts.accel import detect_local
from pytest_kata.progress import step, timed
from pytest_kata.resources import cache_dir, sandbox_dir
from pytest_kata.sandbox.base import (
    HostProcess,
    HostView,
    ProbeFacts,
    SandboxDriver,
    SandboxError,
    Workload,
    sha256_file,
)
from pytest_kata.sandbox.probe import BUSYBOX, console_upload_commands, parse_output, script_text

READY_RE = rb"KATA-GUEST-READY|KT-INIT-READY"
PROMPT = "kp# "
HOST_QEMU = "/usr/bin/qemu-system-x86_64"
SCOPE = ("guest-boot smoke test of the candidate's kernel and image: booted by the harness as the configuration "
         "says, without the candidate's shim, agent or runtime")
# What Kata's QEMU code puts on the guest cmdline for the rootfs (qemu_arch_base.go / kernel_params)
ROOT_PARAMS = "root=/dev/vda1 rootflags=data=ordered,errors=remount-ro ro rootfstype=ext4"


def detect_accel(requested: str = "auto") -> tuple[str, str]:
    """KVM only where it really works (:func:`pytest_kata.hosts.accel.detect_local`), unless forced."""
    if requested in ("kvm", "tcg"):
        return requested, "forced by --kata-accel"
    return detect_local()


def kernel_version_of(vmlinuz: Path) -> str | None:
    """The version text in a bzImage's setup header ("6.1.0-57-amd64 (builder) #1 SMP ... Debian ..."): what
    the booted kernel's ``/proc/version`` repeats."""
    try:
        with open(vmlinuz, "rb") as f:
            head = f.read(0x10000)
    except OSError:
        return None
    if head[0x202:0x206] != b"HdrS":
        return None
    offset = struct.unpack_from("<H", head, 0x20E)[0] + 0x200
    return head[offset:offset + 256].split(b"\0", 1)[0].decode(errors="replace") or None


def kernel_release_of(vmlinuz: Path) -> str | None:
    """The release string embedded in a bzImage's setup header (what ``uname -r`` says when it boots)."""
    text = kernel_version_of(vmlinuz)
    return text.split()[0] if text else None


@dataclass
class GuestSpec:
    """Everything the direct driver boots, and where each value came from (evidence)."""

    qemu: Path
    kernel: Path
    initrd: Path | None = None
    image: Path | None = None
    kernel_params: str = ""
    machine_type: str = "q35"
    memory_mb: int = 2048
    vcpus: int = 1
    image_read_only: bool = True
    image_attach: str = "virtio-blk"  # what Kata would use: nvdimm or virtio-blk
    accel: str = "tcg"
    accel_reason: str = ""
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    qemu_data_dir: Path | None = None

    @property
    def kernel_release(self) -> str | None:
        return kernel_release_of(self.kernel)

    def cmdline(self) -> str:
        parts = ["console=ttyS0", "panic=1", "reboot=k"]
        if self.image is not None:
            parts.append(ROOT_PARAMS)
        parts.append(self.kernel_params)
        return " ".join(p for p in parts if p)

    def argv(self, name: str, image_path: Path | None = None) -> list[str]:
        """The QEMU command line Kata would use, reduced to what boots under this accelerator."""
        argv = [str(self.qemu), "-name", name, "-machine", self.machine_type, "-accel", self.accel,
                "-cpu", "host" if self.accel == "kvm" else "max", "-m", str(self.memory_mb),
                "-smp", str(self.vcpus), "-nodefaults", "-no-user-config", "-display", "none",
                "-serial", "stdio", "-monitor", "none", "-no-reboot", "-kernel", str(self.kernel),
                "-append", self.cmdline()]
        if self.qemu_data_dir:
            argv += ["-L", str(self.qemu_data_dir)]
        if self.initrd:
            argv += ["-initrd", str(self.initrd)]
        if self.image is not None:
            drive = f"file={image_path or self.image},if=none,id=image,format=raw,cache=none,aio=threads"
            if self.image_read_only:
                drive += ",readonly=on"
            argv += ["-drive", drive, "-device", "virtio-blk-pci,drive=image"]
        if Path("/dev/vhost-vsock").exists():
            argv += ["-device", "vhost-vsock-pci,guest-cid=3"]
        return argv

    def to_json(self) -> dict[str, Any]:
        return {"qemu": str(self.qemu), "kernel": str(self.kernel), "kernel_release": self.kernel_release,
                "initrd": str(self.initrd) if self.initrd else None,
                "image": str(self.image) if self.image else None, "kernel_params": self.kernel_params,
                "machine_type": self.machine_type, "memory_mb": self.memory_mb, "vcpus": self.vcpus,
                "image_read_only": self.image_read_only, "image_attach_kata": self.image_attach,
                "accel": self.accel, "accel_reason": self.accel_reason, "notes": self.notes,
                "source": self.source}

    # ---- construction ---------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, root: Path, config: Any, *, accel: str = "auto", source: dict[str, Any] | None = None
                    ) -> GuestSpec:
        """From an unpacked /opt/kata tree and its effective KataConfig (drop-ins merged)."""
        root = Path(root)

        def asset(key: str) -> Path | None:
            value = config.get(f"hypervisor.*.{key}", "")
            if not value:
                return None
            return map_path(root, str(value))

        kernel = asset("kernel")
        if kernel is None or not kernel.is_file():
            raise SandboxError(f"the configuration's hypervisor kernel {config.get('hypervisor.*.kernel', '')!r} "
                               "is not in the bundle", path=config.path)
        image, initrd = asset("image"), asset("initrd")
        for what, p in (("image", image), ("initrd", initrd)):
            if p is not None and not p.is_file():
                raise SandboxError(f"the configuration's {what} {p} is not in the bundle", path=config.path)
        if image is None and initrd is None:
            raise SandboxError("the configuration names neither an image nor an initrd", path=config.path)
        notes: list[str] = []
        if image is not None and initrd is None:
            loader = root / "share" / "kata-containers" / "kata-containers-initrd.img"
            if needs_loader(kernel) and loader.is_file():
                initrd = loader
                notes.append(f"the guest kernel has virtio_blk/ext4 as modules: booting the bundle's {loader.name} "
                             "as a loader for the image (the reference candidate's documented image mode)")
        qemu = asset("path")
        qemu_data: Path | None = root / "share" / "kata-qemu" / "qemu"
        accel_name, reason = detect_accel(accel)
        usable, why = qemu_runs(qemu, accel_name)
        if not usable:
            notes.append(f"the bundle's hypervisor {qemu} cannot run here ({why}); using the host's {HOST_QEMU}")
            qemu, qemu_data = Path(HOST_QEMU), None
        params = str(config.get("hypervisor.*.kernel_params", "") or "")
        if image is not None and initrd is not None and asset("initrd") is not None:
            notes.append("image and initrd both set: booting the initrd as a loader for the image")
        nvdimm = not bool(config.get("hypervisor.*.disable_image_nvdimm", False))
        attach = "nvdimm" if nvdimm and image is not None else "virtio-blk"
        if attach == "nvdimm":
            notes.append("Kata would attach the image as a read-only NVDIMM; the direct driver uses read-only "
                         "virtio-blk (the reference kernel loads virtio_blk/ext4 only)")
        writable = "rw" in params.split()
        if writable:
            notes.append("kernel_params carry 'rw': the guest root is asked to be writable; the image is attached "
                         "read-write as a private copy")
        memory = int(config.get("hypervisor.*.default_memory", 2048) or 2048)
        return cls(qemu=qemu or Path(HOST_QEMU), kernel=kernel, initrd=initrd, image=image, kernel_params=params,
                   machine_type=str(config.get("hypervisor.*.machine_type", "q35") or "q35"),
                   memory_mb=memory, vcpus=max(1, min(2, int(config.get("hypervisor.*.default_vcpus", 1) or 1))),
                   image_read_only=not writable, image_attach=attach, accel=accel_name, accel_reason=reason,
                   notes=notes, source={"config": str(config.path), **(source or {})},
                   qemu_data_dir=qemu_data if qemu_data and qemu_data.is_dir() else None)

    @classmethod
    def from_bundle(cls, bundle: Bundle, shim: str | None = None, *, accel: str = "auto") -> GuestSpec:
        """From an opened candidate and the configuration of ``shim`` (None: the bundle's default)."""
        info = bundle.shim(shim)
        return cls.from_config(Path(bundle.root), info.config, accel=accel,
                               source={"bundle": str(bundle.root), "shim": info.name, "version": bundle.version})

    @classmethod
    def stand_in(cls, *, accel: str = "auto", memory_mb: int = 512) -> GuestSpec:
        """The host's Debian kernel + a busybox initramfs: for developing and benchmarking without a bundle."""
        kernel = host_kernel()
        accel_name, reason = detect_accel(accel)
        return cls(qemu=Path(HOST_QEMU), kernel=kernel, initrd=busybox_initramfs(), memory_mb=memory_mb,
                   accel=accel_name, accel_reason=reason, source={"stand_in": "host kernel + busybox initramfs"})

    def with_changes(self, **changes: Any) -> GuestSpec:
        return replace(self, **changes)


def needs_loader(kernel: Path) -> bool:
    """Whether the kernel cannot mount a virtio-blk ext4 root by itself (drivers built as modules)."""
    release = kernel_release_of(kernel) or ""
    for config in (*sorted(kernel.resolve().parent.glob("config-*")), Path(f"/boot/config-{release}")):
        try:
            text = config.read_text(errors="replace")
        except OSError:
            continue
        return "CONFIG_VIRTIO_BLK=m" in text or "CONFIG_EXT4_FS=m" in text
    return False


def map_path(root: Path, value: str) -> Path:
    """A configuration path (``/opt/kata/...``) inside an unpacked bundle tree."""
    rel = bundle_relative(value)
    if rel is not None:
        return root / rel
    candidate = root / value.lstrip("/")
    return candidate if candidate.exists() else Path(value)


def qemu_runs(qemu: Path | None, accel: str = "tcg") -> tuple[bool, str]:
    """Whether this QEMU can start a machine with ``accel`` here (``--version`` is not enough: a copied
    binary may lack its accelerator modules)."""
    if qemu is None:
        return False, "no hypervisor path in the configuration"
    if not qemu.is_file():
        return False, "not in the bundle"
    argv = [str(qemu), "-accel", accel, "-machine", "none", "-nodefaults", "-display", "none", "-monitor",
            "stdio", "-S"]
    try:
        proc = subprocess.run(argv, input="quit\n", capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return False, str(exc)
    except subprocess.TimeoutExpired:
        return False, "a smoke start timed out"
    if proc.returncode != 0:
        return False, (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return True, "starts"


def host_kernel() -> Path:
    release = os.uname().release
    for candidate in (Path(f"/boot/vmlinuz-{release}"), *sorted(Path("/boot").glob("vmlinuz-*"), reverse=True)):
        if candidate.is_file():
            return candidate
    raise SandboxError("no kernel in /boot to boot a stand-in guest", path="/boot",
                       hint="apt-get install linux-image-amd64")


# ---- a busybox initramfs (stand-in guest, same console contract as the reference guest) -------------------

STAND_IN_INIT = """#!/bin/busybox sh
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
if grep -q 'root=/dev/vda1' /proc/cmdline; then
  for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko; done
  for i in $(seq 50); do [ -b /dev/vda1 ] && break; sleep 0.1; done
  mkdir -p /newroot
  if mount -t ext4 -o ro /dev/vda1 /newroot; then
    umount /proc /sys; mount --move /dev /newroot/dev
    exec switch_root /newroot /sbin/init
  fi
  echo "KATA-LOADER: cannot mount /dev/vda1"
fi
mkdir -p /run /tmp && mount -t tmpfs tmpfs /run
echo "KATA-GUEST-READY"
export PS1='kata-guest# '
exec setsid cttyhack sh
"""
# what the stand-in image runs after switch_root (read-only root, like a Kata guest image)
STAND_IN_IMAGE_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /run
echo "KATA-GUEST-READY"
export PS1='kata-guest# '
exec setsid cttyhack sh
"""
# virtio-blk + ext4 for the Debian kernel, in load order (they are modules there, as in the reference guest)
LOADER_MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_legacy_dev",
                  "drivers/virtio/virtio_pci_modern_dev", "drivers/virtio/virtio_pci", "drivers/block/virtio_blk",
                  "lib/crc16", "fs/mbcache", "fs/jbd2/jbd2", "crypto/crc32c_generic", "fs/ext4/ext4")


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    out = io.BytesIO()

    def header(ino: int, name: str, mode: int, size: int) -> None:
        fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
        out.write(b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0")
        out.write(b"\0" * (-out.tell() % 4))

    for ino, (name, mode, data) in enumerate(entries, start=1):
        header(ino, name, mode, len(data))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))
    header(0, "TRAILER!!!", 0, 0)
    return out.getvalue()


def busybox_initramfs() -> Path:
    """Build (cached) a gzip cpio: static busybox + an init printing KATA-GUEST-READY and a root shell."""
    if not BUSYBOX.is_file():
        raise SandboxError("static busybox not found", path=BUSYBOX, hint="apt-get install busybox-static")
    busybox = BUSYBOX.read_bytes()
    entries = [("bin", 0o40755, b""), ("bin/busybox", 0o100755, busybox), ("dev", 0o40755, b""),
               ("etc", 0o40755, b""), ("etc/passwd", 0o100644,
                                       b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"),
               ("etc/group", 0o100644, b"root:x:0:\nnogroup:x:65534:\n"), ("proc", 0o40755, b""),
               ("root", 0o40700, b""), ("sbin", 0o40755, b""), ("sys", 0o40755, b""), ("tmp", 0o41777, b""),
               ("usr", 0o40755, b""), ("usr/bin", 0o40755, b""), ("usr/sbin", 0o40755, b""),
               ("init", 0o100755, STAND_IN_INIT.encode()), ("lib", 0o40755, b""), ("lib/modules", 0o40755, b"")]
    release = kernel_release_of(host_kernel())
    moddir = Path(f"/lib/modules/{release}/kernel")
    names = []
    for module in LOADER_MODULES:
        path = moddir / f"{module}.ko"
        if path.is_file():
            names.append(Path(module).name)
            entries.append((f"lib/modules/{Path(module).name}.ko", 0o100644, path.read_bytes()))
    entries.append(("lib/modules/order", 0o100644, ("\n".join(names) + "\n").encode()))
    raw = _cpio_newc(entries)
    key = hashlib.sha256(raw).hexdigest()[:16]
    out = cache_dir() / "probe" / f"stand-in-initramfs-{key}.cpio.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
        tmp.replace(out)
    return out


# ---- the driver ---------------------------------------------------------------------------------------------


class DirectDriver(SandboxDriver):
    """Boot once, probe many times over the serial console."""

    name = "direct"
    is_vm = True
    _instances = 0

    def __init__(self, spec: GuestSpec, *, boot_timeout: float = 240.0, keep: bool = False) -> None:
        self.spec = spec
        self.boot_timeout = boot_timeout
        self.keep = keep
        self.run_id = runid.current_run_id()
        DirectDriver._instances += 1
        self.vm_name = f"{self.run_id}-direct-{os.getpid()}-{DirectDriver._instances}"
        self.workdir: Path | None = None
        self.image_path: Path | None = None
        self.child: Any = None
        self.console = io.BytesIO()
        self.probe_dir = ""
        self.boot_seconds: float | None = None
        self.image_sha_at_start: str | None = None
        self.notes: list[str] = []
        self._counter = 0

    def describe(self) -> dict[str, Any]:
        return {"driver": self.name, "is_vm": True, "scope": SCOPE, "vm": self.vm_name,
                "boot_seconds": self.boot_seconds, "driver_notes": self.notes,
                "qemu_argv": self.spec.argv(self.vm_name, self.image_path), **self.spec.to_json()}

    def guest_kernel_release(self) -> str | None:
        return self.spec.kernel_release

    # lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        import pexpect

        if self.child is not None:
            return
        base = Path(sandbox_dir())
        base.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.vm_name}-", dir=base))
        if self.spec.image is not None and not self.spec.image_read_only:
            self.image_path = self.workdir / self.spec.image.name
            shutil.copyfile(self.spec.image, self.image_path)
        else:
            self.image_path = self.spec.image
        self.image_sha_at_start = self.image_sha256()
        argv = self.spec.argv(self.vm_name, self.image_path)
        start = time.monotonic()
        with timed("sandbox", f"booting {self.vm_name} ({self.spec.accel.upper()}, kernel "
                              f"{self.spec.kernel_release}, {'image' if self.spec.image else 'initrd'})"):
            self.child = pexpect.spawn(argv[0], argv[1:], timeout=self.boot_timeout, logfile=self.console,
                                       echo=False, env={**os.environ, "TERM": "dumb"})
            try:
                self.child.expect(READY_RE, timeout=self.boot_timeout)
                # drive a child shell, never the console shell itself: in a minimal guest that one is PID 1,
                # and anything that kills it would panic the guest
                self.child.sendline(f"dmesg -n 1 2>/dev/null; PS1='{PROMPT}' sh")
                self.child.sendline(f"export PS1='{PROMPT}'; stty -echo 2>/dev/null; echo KP-BOOT-$((40+2))")
                self.child.expect(r"KP-BOOT-42", timeout=60)
                self.child.expect_exact(PROMPT, timeout=30)
            except Exception as exc:
                tail = self.console_log()[-600:].replace("\r", "").strip().replace("\n", " | ")
                self.stop()
                raise SandboxError(f"guest did not reach its console ({type(exc).__name__}); console tail: {tail}",
                                   path=str(self.spec.kernel)) from None
        self.boot_seconds = time.monotonic() - start
        self._upload_probe()

    def run(self, command: str, *, timeout: float = 120.0) -> tuple[int, str]:
        """Run a shell command on the guest console; returns (exit code, output)."""
        if self.child is None:
            raise SandboxError("the direct sandbox is not running", path=self.vm_name)
        self._counter += 1
        n = 1000 + self._counter
        self.child.sendline(f"{command}; echo KP-END-$(({n}+0))-rc=$?")
        try:
            self.child.expect(rf"KP-END-{n}-rc=(\d+)", timeout=timeout)
        except Exception as exc:
            tail = self.console_log()[-400:].replace("\r", "").strip().replace("\n", " | ")
            raise SandboxError(f"command timed out or the guest died ({type(exc).__name__}): {command[:80]!r}; "
                               f"console tail: {tail}", path=self.vm_name) from None
        output = self.child.before.decode(errors="replace")
        rc = int(self.child.match.group(1))
        self.child.expect_exact(PROMPT, timeout=30)
        return rc, output

    def _upload_probe(self) -> None:
        rc, out = self.run("for d in /run /tmp /dev/shm /dev; do mkdir -p $d/kata-probe 2>/dev/null && "
                           ": > $d/kata-probe/.w 2>/dev/null && echo DIR=$d/kata-probe && break; done")
        m = re.search(r"DIR=(\S+)", out)
        if not m:
            raise SandboxError(f"no writable directory in the guest for the probe: {out.strip()[-200:]}",
                               path=self.vm_name)
        self.probe_dir = m.group(1)
        dest = f"{self.probe_dir}/probe.sh"
        for command in console_upload_commands(script_text(), dest):
            rc, out = self.run(command)
            if rc != 0:
                raise SandboxError(f"uploading the probe failed: {out.strip()[-200:]}", path=self.vm_name)
        self.run(f"chmod 755 {self.probe_dir} {dest}")
        # the unprivileged workload runs as nobody; a minimal guest image may not have that user
        rc, _ = self.run("grep -q '^nobody:' /etc/passwd")
        if rc != 0:
            etc = f"{self.probe_dir}/etc"
            rc, out = self.run(f"mkdir -p {etc} && cp -a /etc/. {etc}/ 2>/dev/null; "
                               f"[ -f {etc}/passwd ] || echo 'root:x:0:0:root:/root:/bin/sh' > {etc}/passwd; "
                               f"echo 'nobody:x:65534:65534:nobody:/:/bin/sh' >> {etc}/passwd && "
                               f"mount --bind {etc} /etc")
            self.notes.append("the guest image has no 'nobody' user: a copy of /etc with one added is bind-mounted "
                              "over /etc inside the guest" + ("" if rc == 0 else f" (failed: {out.strip()[-120:]})"))

    def probe(self, workload: Workload | None = None) -> ProbeFacts:
        workload = workload or Workload()
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in workload.env().items())
        script = f"{self.probe_dir}/probe.sh"
        if workload.privileged:
            command = f"cd / && env {env} sh {script} 2>/dev/null"
        else:
            inner = shlex.quote(f"cd / && env {env} sh {script} 2>/dev/null")
            command = (f"if setpriv --help 2>&1 | grep -q reuid; then setpriv --reuid=65534 --regid=65534 "
                       f"--clear-groups --inh-caps=-all --bounding-set=-all sh -c {inner}; "
                       f"else su -s /bin/sh nobody -c {inner}; fi")
        _rc, out = self.run(command, timeout=180)
        facts = parse_output(out, source=f"{self.vm_name} console")
        facts.driver, facts.workload = self.name, workload
        if not workload.privileged and facts.get("uid") == 0:
            raise SandboxError("could not drop to uid 65534 in the guest (no setpriv/su with a nobody user)",
                               path=self.vm_name)
        return facts

    def host_view(self) -> HostView:
        if self.child is None or not self.child.isalive():
            return HostView(is_vm=True, note="the VM is not running")
        return HostView(is_vm=True, processes=[HostProcess.read(self.child.pid, "vmm")],
                        note="direct driver: the VMM only (no shim, no virtiofsd)")

    def image_sha256(self) -> str | None:
        """sha256 of the file the VMM has attached as the guest image (the candidate's, or a private copy)."""
        return sha256_file(self.image_path) if self.image_path else None

    def console_log(self) -> str:
        return self.console.getvalue().decode(errors="replace")

    def stop(self) -> None:
        child, self.child = self.child, None
        if child is not None:
            try:
                if child.isalive():
                    child.sendline("sync; poweroff -f")
                    child.expect(__import__("pexpect").EOF, timeout=10)
            except Exception:
                pass
            finally:
                child.close(force=True)
            step("sandbox", f"stopped {self.vm_name}")
            if os.environ.get("PYTEST_KATA_CONSOLE_DIR"):
                log = Path(os.environ["PYTEST_KATA_CONSOLE_DIR"]) / f"{self.vm_name}.console.log"
                log.write_text(self.console_log())
        if self.workdir and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None
