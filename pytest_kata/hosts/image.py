"""Build the staging host image from ``vm-images/host/recipe.toml`` (cached by content hash).

The host boots the machine's own Debian kernel directly (``/boot/vmlinuz`` + its initrd, which carries
virtio_blk and ext4), so the image holds that kernel's modules copied from ``/lib/modules/<release>``
rather than a second kernel package: cheaper (no 391 MB package, no initramfs build) and always matching.

Files in and out: small files travel over the serial console as base64 (needs nothing in the image), large
ones on a transfer disk hot-plugged on the host's virtio-scsi bus (``mkfs.ext4 -d`` in, ``debugfs`` out);
see :mod:`pytest_kata.hosts.libvirt`. No SSH daemon, keys or network are needed, so a host works before and
without a test network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.images.common import cached, content_hash, host_kernel, make_ext4_fs, mmdebstrap
from pytest_kata.progress import step, timed
from pytest_kata.resources import vm_images_dir

AREA = "host-image"
IMAGE_NAME = "host.img"
MANIFEST_NAME = "host-image.json"


@dataclass(frozen=True)
class HostRecipe:
    path: Path
    data: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def packages(self) -> list[str]:
        return list(self.data.get("packages", []))

    @property
    def prompt(self) -> str:
        return str(self.data.get("console", {}).get("prompt", "kt-host# "))

    @property
    def cmdline(self) -> str:
        return str(self.data.get("kernel", {}).get("cmdline", "root=/dev/vda rw console=ttyS0"))


@dataclass(frozen=True)
class HostImage:
    """A built host image: the base disk every host overlays, and the kernel/initrd it boots with."""

    image: Path
    image_format: str
    kernel: Path
    initrd: Path | None
    cmdline: str
    prompt: str
    memory_mib: int = 1536
    vcpus: int = 1
    info: dict[str, Any] = field(default_factory=dict)


def load_recipe(path: Path | None = None) -> HostRecipe:
    path = path or vm_images_dir() / "host" / "recipe.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KataError("host image recipe not found", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise KataError(f"host image recipe is not valid TOML: {exc}", path=path) from None
    for key in ("packages", "kernel"):
        if key not in data:
            raise KataError(f"host image recipe has no [{key}]", path=path)
    return HostRecipe(path, data)


def package_versions(packages: list[str]) -> dict[str, str]:
    """Candidate versions of the recipe's packages in this machine's apt cache (part of the cache key)."""
    proc = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages], capture_output=True, text=True)
    versions: dict[str, str] = {}
    name = None
    for line in proc.stdout.splitlines():
        if line.startswith("Package: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            versions[name] = line.split(": ", 1)[1]
    return versions


def cache_key(recipe: HostRecipe, release: str) -> str:
    overlay = recipe.dir / "rootfs"
    return content_hash(recipe.path.read_bytes(), overlay if overlay.is_dir() else "no-overlay", release,
                        package_versions(recipe.packages), Path(__file__).read_bytes())[:16]


def build_host_image(recipe_path: Path | None = None, *, force: bool = False) -> HostImage:
    """The host image for ``recipe_path`` (default: ``vm-images/host/recipe.toml``), built once and cached."""
    recipe = load_recipe(recipe_path)
    kernel = host_kernel()
    key = cache_key(recipe, kernel.release)
    out = cached("host", key, lambda tmp: _build(recipe, kernel, tmp), force=force)
    info = json.loads((out / MANIFEST_NAME).read_text())
    step(AREA, f"host image {out / IMAGE_NAME} (key {key}, kernel {kernel.release})")
    return HostImage(out / IMAGE_NAME, "raw", out / "vmlinuz", (out / "initrd.img"), recipe.cmdline,
                     recipe.prompt, int(recipe.data.get("memory_mib", 1536)), int(recipe.data.get("vcpus", 1)),
                     info)


def prebuilt_host_image(path: Path, recipe_path: Path | None = None) -> HostImage:
    """A user-supplied image (``--kata-host-image``): booted with this machine's kernel and the recipe's cmdline."""
    if not path.is_file():
        raise KataError("host image not found", path=path, hint="build one with: pytest-kata images build host")
    recipe = load_recipe(recipe_path)
    kernel = host_kernel()
    fmt = "qcow2" if _is_qcow2(path) else "raw"
    return HostImage(path, fmt, kernel.vmlinuz, kernel.initrd, recipe.cmdline, recipe.prompt,
                     int(recipe.data.get("memory_mib", 1536)), int(recipe.data.get("vcpus", 1)), {"prebuilt": True})


def _is_qcow2(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"QFI\xfb"


def _build(recipe: HostRecipe, kernel: Any, out: Path) -> None:
    data = recipe.data
    rootfs = out / "rootfs"
    with timed(AREA, f"mmdebstrap of {len(recipe.packages)} packages"):
        mmdebstrap(rootfs, suite=data.get("suite", "bookworm"), variant=data.get("variant", "minbase"),
                   include=recipe.packages, label="host rootfs")
    with timed(AREA, f"copying kernel modules of {kernel.release}"):
        _copy_modules(kernel.modules_dir, rootfs, data["kernel"])
    _configure(recipe, rootfs)
    installed = subprocess.run(["chroot", str(rootfs), "dpkg-query", "-W", "-f", "${Package}\t${Version}\n"],
                               capture_output=True, text=True, check=True).stdout
    size = int(data.get("size_mib", 4096)) * 1024 * 1024
    with timed(AREA, f"mkfs.ext4 -d into {IMAGE_NAME} ({size >> 20} MiB sparse)"):
        make_ext4_fs(rootfs, out / IMAGE_NAME, size=size, label="kt-host")
    shutil.rmtree(rootfs)
    shutil.copyfile(kernel.vmlinuz, out / "vmlinuz")
    if kernel.initrd:
        shutil.copyfile(kernel.initrd, out / "initrd.img")
    manifest = {"recipe": str(recipe.path), "kernel_release": kernel.release,
                "packages": dict(line.split("\t", 1) for line in installed.splitlines() if "\t" in line)}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for entry in out.iterdir():  # libvirt's qemu user reads the base image and the kernel
        entry.chmod(0o644)
    out.chmod(0o755)


def _copy_modules(src: Path, rootfs: Path, spec: dict[str, Any]) -> None:
    if not src.is_dir():
        raise KataError("kernel modules not found", path=src, hint="apt-get install linux-image-amd64")
    dest = rootfs / "lib/modules" / src.name
    excludes = [src / e for e in spec.get("module_excludes", [])]

    def ignore(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if Path(directory, n) in excludes]

    for tree in spec.get("module_trees", []):
        source = src / tree
        if source.is_dir():
            shutil.copytree(source, dest / tree, ignore=ignore, dirs_exist_ok=True, symlinks=True)
        elif source.is_file():
            (dest / tree).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / tree)
        else:
            step(AREA, f"warning: {source} does not exist; skipped")
    for name in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
        if (src / name).exists():
            shutil.copy2(src / name, dest / name)
    subprocess.run(["chroot", str(rootfs), "depmod", "-a", src.name], check=True, capture_output=True)


def _configure(recipe: HostRecipe, rootfs: Path) -> None:
    data = recipe.data
    overlay = recipe.dir / "rootfs"
    if overlay.is_dir():
        shutil.copytree(overlay, rootfs, dirs_exist_ok=True, symlinks=True)
    hostname = str(data.get("hostname", "kt-host"))
    (rootfs / "etc/hostname").write_text(hostname + "\n")
    (rootfs / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {hostname}\n")
    units = rootfs / "etc/systemd/system"
    for unit in data.get("mask", []):
        link = units / unit
        link.unlink(missing_ok=True)
        os.symlink("/dev/null", link)
    for unit, target in data.get("enable", {}).items():
        wants = units / f"{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        (wants / unit).unlink(missing_ok=True)
        os.symlink(f"../{unit}", wants / unit)
    loads = data["kernel"].get("modules_load", [])
    if loads:
        (rootfs / "etc/modules-load.d").mkdir(parents=True, exist_ok=True)
        (rootfs / "etc/modules-load.d/pytest-kata.conf").write_text("\n".join(loads) + "\n")
    (rootfs / "etc/machine-id").write_text("")  # systemd makes a fresh one per boot
    for cache in ("var/cache/apt", "var/lib/apt/lists"):
        for child in (rootfs / cache).glob("*"):
            if child.is_file():
                child.unlink()
