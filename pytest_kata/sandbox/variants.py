"""Candidate variants for negative controls: the same bundle with one flaw, or a minimal stand-in tree.

A control is only convincing when the flawed candidate differs from the good one by exactly the flaw, so a
variant is a copy of a bundle tree (hard links for the big files, never written through) whose effective
configuration gets a few dotted-key changes (``{"hypervisor.qemu.kernel_params": "... rw"}``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from pytest_kata.images.common import make_ext4_disk
from pytest_kata.resources import KATA_PREFIX, cache_dir
from pytest_kata.sandbox.base import SandboxError
from pytest_kata.sandbox.direct import STAND_IN_IMAGE_INIT, busybox_initramfs, host_kernel
from pytest_kata.sandbox.probe import BUSYBOX

CONFIG_DIR = Path("share/defaults/kata-containers")


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        if part == "*":
            part = next(iter(node))
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def write_config(path: Path, source: Path, changes: dict[str, Any]) -> None:
    """``source`` TOML with ``changes`` applied, written to ``path`` (a fresh file: never through a hard link)."""
    data = tomllib.loads(source.read_text(encoding="utf-8"))
    for key, value in changes.items():
        _set(data, key, value)
    path.unlink(missing_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")


def variant_tree(root: Path, out: Path, changes: dict[str, Any]) -> Path:
    """Copy the /opt/kata tree ``root`` to ``out/opt/kata`` (hard links where possible) and apply ``changes`` to
    every configuration file it ships (Go and runtime-rs) that has the table a key names, so that the flaw is
    there whichever shim is the default."""
    root = Path(root)
    dest = Path(out) / "opt" / "kata"
    if dest.exists():
        raise SandboxError("variant destination exists", path=dest)
    for src_dir, dirs, files in os.walk(root):
        rel = Path(src_dir).relative_to(root)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for name in files + [d for d in dirs if (Path(src_dir) / d).is_symlink()]:
            src, dst = Path(src_dir) / name, dest / rel / name
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
    changed = 0
    for config in sorted((dest / CONFIG_DIR).rglob("configuration*.toml")):
        if config.is_symlink():
            continue
        data = tomllib.loads(config.read_text(encoding="utf-8"))
        applicable = {k: v for k, v in changes.items() if _has_table(data, k)}
        if applicable:
            write_config(config, config, applicable)
            changed += 1
    if changes and not changed:
        raise SandboxError(f"no configuration in the bundle has the tables of {sorted(changes)}", path=root)
    return dest


def _has_table(data: dict[str, Any], dotted: str) -> bool:
    parts = dotted.split(".")
    if parts[0] != "hypervisor" or len(parts) < 3:
        return True
    return parts[1] == "*" or parts[1] in data.get("hypervisor", {})


def stand_in_image(out: Path) -> Path:
    """A small partitioned ext4 guest image (busybox, ``/sbin/init`` printing KATA-GUEST-READY), cached."""
    key = hashlib.sha256(BUSYBOX.read_bytes() + STAND_IN_IMAGE_INIT.encode()).hexdigest()[:16]
    cached = cache_dir() / "probe" / f"stand-in-image-{key}.img"
    if not cached.is_file():
        applets = subprocess.run([str(BUSYBOX), "--list"], capture_output=True, text=True, check=True).stdout.split()
        with tempfile.TemporaryDirectory(prefix="kata-stand-in-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "usr/bin", "var"):
                (rootfs / d).mkdir(parents=True)
            shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
            for applet in applets:
                if applet not in ("busybox", "init"):
                    os.symlink("busybox", rootfs / "bin" / applet)
            (rootfs / "sbin" / "init").write_text(STAND_IN_IMAGE_INIT)
            (rootfs / "sbin" / "init").chmod(0o755)
            (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n"
                                                   "nobody:x:65534:65534:nobody:/:/bin/sh\n")
            (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_name(f".{cached.name}.{os.getpid()}")
            make_ext4_disk(rootfs, partial, label="kata-stand-in")
            partial.replace(cached)
    target = Path(out)
    shutil.copyfile(cached, target)
    target.chmod(0o644)
    return target


def stand_in_tree(out: Path, config_source: Path, changes: dict[str, Any] | None = None, *,
                  version: str = "3.31.0", image: bool = False) -> Path:
    """A minimal /opt/kata tree: the host's Debian kernel, a busybox initramfs, one qemu configuration.

    With ``image``, a small ext4 guest image too, which the initramfs loads (virtio_blk/ext4 modules) and
    switches into read-only, as the reference candidate does. No shim or agent; the hypervisor binary is
    absent, so the direct driver says it uses the host's. For the direct driver's own tests and controls.
    """
    root = Path(out) / "opt" / "kata"
    share = root / "share" / "kata-containers"
    share.mkdir(parents=True)
    shutil.copyfile(host_kernel(), share / "vmlinuz-stand-in")
    os.symlink("vmlinuz-stand-in", share / "vmlinuz.container")
    shutil.copyfile(busybox_initramfs(), share / "kata-busybox.initrd")
    os.symlink("kata-busybox.initrd", share / "kata-containers-initrd.img")
    (root / "VERSION").write_text(version + "\n")
    confdir = root / CONFIG_DIR
    confdir.mkdir(parents=True)
    settings = {"hypervisor.qemu.kernel": f"{KATA_PREFIX}/share/kata-containers/vmlinuz.container",
                "hypervisor.qemu.initrd": f"{KATA_PREFIX}/share/kata-containers/kata-containers-initrd.img",
                "hypervisor.qemu.image": "", "hypervisor.qemu.default_memory": 512}
    if image:
        stand_in_image(share / "kata-stand-in.image")
        os.symlink("kata-stand-in.image", share / "kata-containers.img")
        settings["hypervisor.qemu.image"] = f"{KATA_PREFIX}/share/kata-containers/kata-containers.img"
    settings.update(changes or {})
    write_config(confdir / "configuration-qemu.toml", config_source, settings)
    os.symlink("configuration-qemu.toml", confdir / "configuration.toml")
    return root
