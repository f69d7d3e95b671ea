"""Guest images from the TOML recipes in ``vm-images/guest/``: a raw partitioned ext4 disk and an initrd.

The output mirrors Kata's osbuilder: ``kata-debian-12-<name>.image`` (msdos label, ext4 in partition 1),
``kata-debian-12-<name>.initrd`` (cpio newc), and ``/var/lib/osbuilder/osbuilder.yaml`` inside the rootfs
(and beside the outputs) recording what went in. Builds are cached by the content hash of the recipe, the
guest files, the kernel whose modules are copied in and the *resolved versions* of the packages
(``apt-cache``), so a new Debian point release or security update rebuilds the image while an unchanged
input reuses it instantly. Given the same package versions, the output is byte-for-byte the same.

Every image carries ``/usr/bin/kata-agent``: by default a clearly named placeholder, and the initrd's
``/init`` doubles as a loader that mounts a guest image read-only (see ``files/init``). A recipe with
``agent = "real"`` takes a real agent binary (:class:`RealAgent`, built by :mod:`pytest_kata.kata_build`)
and osbuilder's ``AGENT_INIT=yes`` layout instead: ``/sbin/init`` is the agent (or, when the kernel has
the agent's transports as modules, ``files/kata-preinit``, which loads them and execs the agent as PID 1)
and the initrd's ``/init`` links to ``/sbin/init``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import tomli
import yaml

from pytest_kata import __version__
from pytest_kata.errors import ConfigError, KataError
from pytest_kata.hashing import sha256_file as _sha256
from pytest_kata.images.common import (
    SOURCE_DATE_EPOCH,
    HostKernel,
    cached,
    content_hash,
    host_kernel,
    make_ext4_disk,
    make_initrd,
    mmdebstrap,
    run_tool,
    safe_rmtree,
    tree_manifest,
)
from pytest_kata.progress import step, timed
from pytest_kata.resources import cache_dir, vm_images_dir

AREA = "image"
CACHE_KIND = "guest"
# Part of every cache key, with the source of this module and of common.py: any builder change rebuilds.
BUILDER_VERSION = "1"
AGENT_PATH = "usr/bin/kata-agent"
MINBASE_VARIANTS = {"minbase", "essential", "apt", "required", "important", "standard", "buildd",
                    "debootstrap"}
_KEYS: dict[str, tuple[type, Any]] = {
    # key: (type, default; ... = required)
    "description": (str, ""),
    "os": (str, "debian"),
    "os_version": (str, "12"),
    "suite": (str, "bookworm"),
    "variant": (str, ...),
    "packages": (list, ...),
    "busybox_links": (bool, False),
    "purge": (list, []),
    "remove": (list, []),
    "strip_setuid": (bool, False),
    "init": (str, "agent"),
    "formats": (list, ["image", "initrd"]),
    "initrd_compression": (str, "gzip"),
    "partition_table": (str, "msdos"),
    "kernel_modules": (list, []),
    "read_only_root": (bool, False),
    "lock_modules": (bool, False),
    "sysctl": (dict, {}),
    "agent": (str, "placeholder"),
}
_CHOICES = {
    "init": {"agent", "systemd"},
    "initrd_compression": {"gzip", "zstd"},
    "partition_table": {"msdos", "gpt"},
    "variant": {"custom", "extract", *MINBASE_VARIANTS},
    "agent": {"placeholder", "real"},
}


# ---------------------------------------------------------------------------------------------- recipes
def recipes_dir() -> Path:
    return vm_images_dir() / "guest"


def guest_files_dir() -> Path:
    return recipes_dir() / "files"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.toml"))


def normalize_name(name: str) -> str:
    """``guest-minimal`` and ``minimal`` name the same recipe (the CLI uses the prefixed form)."""
    return name.removeprefix("guest-")


@dataclass(frozen=True)
class Recipe:
    """A guest image recipe, validated. ``settings`` holds every key with defaults filled in."""

    name: str
    path: Path
    settings: dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.settings[key]
        except KeyError:
            raise AttributeError(key)

    @property
    def artifact_stem(self) -> str:
        return f"kata-{self.settings['os']}-{self.settings['os_version']}-{self.name}"


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and validate a recipe by name (``vm-images/guest/<name>.toml``) or path; one-line errors."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" and candidate.exists():
        path = candidate
    else:
        path = recipes_dir() / f"{normalize_name(str(name_or_path))}.toml"
        if not path.exists():
            known = ", ".join(f"guest-{n}" for n in list_recipes()) or "none"
            raise KataError(f"no guest image recipe {name_or_path!r}; known: {known}", path=recipes_dir())
    try:
        raw = tomli.loads(path.read_text())
    except tomli.TOMLDecodeError as exc:
        raise ConfigError(f"malformed TOML: {exc}", path=path)
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(f"unknown recipe key(s) {', '.join(unknown)}; known: {', '.join(sorted(_KEYS))}",
                          path=path)
    settings: dict[str, Any] = {}
    for key, (kind, default) in _KEYS.items():
        if key not in raw:
            if default is ...:
                raise ConfigError(f"recipe key {key!r} is required", path=path)
            settings[key] = default
            continue
        value = raw[key]
        if not isinstance(value, kind):
            raise ConfigError(f"recipe key {key!r} must be a {kind.__name__}, not {type(value).__name__}",
                              path=path)
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ConfigError(f"recipe key {key!r} must be a list of strings", path=path)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ConfigError(f"recipe key {key!r} = {value!r}; expected one of {sorted(_CHOICES[key])}",
                              path=path)
        settings[key] = value
    for fmt in settings["formats"]:
        if fmt not in ("image", "initrd"):
            raise ConfigError(f"unknown format {fmt!r} (image, initrd)", path=path)
    for pkg in settings["packages"]:
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", pkg):
            raise ConfigError(f"invalid Debian package name {pkg!r}", path=path)
    if settings["variant"] == "custom" and "dpkg" not in settings["packages"]:
        raise ConfigError("variant 'custom' needs 'dpkg' in packages (mmdebstrap installs with it)",
                          path=path)
    if settings["agent"] == "real" and settings["init"] != "agent":
        raise ConfigError("agent = 'real' is osbuilder's AGENT_INIT=yes layout: set init = 'agent'", path=path)
    if settings["init"] == "agent" and not settings["busybox_links"]:
        raise ConfigError("init = 'agent' runs a shell script: set busybox_links = true", path=path)
    return Recipe(path.stem, path, settings)


# ---------------------------------------------------------------------------------------------- versions
APT_LISTS = Path("/var/lib/apt/lists")


def _apt_lists_stamp() -> str:
    """Changes whenever ``apt-get update`` brings new package lists (names, sizes, mtimes of the lists)."""
    stamp = []
    if APT_LISTS.is_dir():
        for p in sorted(APT_LISTS.iterdir()):
            if p.is_file():
                st = p.stat()
                stamp.append((p.name, st.st_size, st.st_mtime_ns))
    dpkg_status = Path("/var/lib/dpkg/status")
    if dpkg_status.exists():
        stamp.append(("dpkg-status", dpkg_status.stat().st_size, dpkg_status.stat().st_mtime_ns))
    return content_hash(stamp)


def resolve_versions(recipe: Recipe) -> dict[str, str]:
    """Candidate versions (from the host's apt lists) of the recipe's packages and their dependencies.

    ``apt-cache depends --recurse`` + ``apt-cache policy`` (~2 s) over-approximate the installed set (both
    sides of an alternative), which is what a cache key wants. An unknown package fails here, before
    mmdebstrap. The answer is memoised until the apt lists change, so a cache hit costs milliseconds.
    """
    memo = cache_dir() / CACHE_KIND / f".versions-{recipe.name}.json"
    stamp = content_hash(_apt_lists_stamp(), recipe.settings)
    try:
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return dict(saved["versions"])
    except (OSError, ValueError, KeyError):
        pass
    versions = _resolve_versions(recipe)
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f"{memo.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"stamp": stamp, "versions": versions}, sort_keys=True))
        os.replace(tmp, memo)
    except OSError:
        pass
    return versions


def _resolve_versions(recipe: Recipe) -> dict[str, str]:
    names = set(recipe.packages)
    policy = _apt_policy(sorted(names))
    missing = sorted(n for n in names if not policy.get(n))
    if missing:
        raise KataError(f"unknown package(s) {', '.join(missing)} (no apt candidate)", path=recipe.path,
                        hint="check the name, or run apt-get update")
    if recipe.variant in MINBASE_VARIANTS:
        names |= _host_required_packages()
    proc = subprocess.run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                           "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances", *sorted(names)],
                          capture_output=True, text=True)
    deps = {ln.strip() for ln in proc.stdout.splitlines() if ln and not ln.startswith((" ", "<"))}
    policy.update(_apt_policy(sorted(deps - set(policy))))
    return {name: version for name, version in sorted(policy.items()) if version}


def _apt_policy(names: list[str]) -> dict[str, str | None]:
    if not names:
        return {}
    out = run_tool(["apt-cache", "policy", *names], what="apt-cache policy").stdout.decode()
    result: dict[str, str | None] = {}
    current = None
    for line in out.splitlines():
        m = re.match(r"^(\S+):$", line)
        if m:
            current = m.group(1).split(":")[0]
            result[current] = None
        elif current and line.strip().startswith("Candidate:"):
            value = line.split(":", 1)[1].strip()
            result[current] = None if value == "(none)" else value
    return result


def _host_required_packages() -> set[str]:
    """Priority: required packages (what minbase adds) as this Debian host knows them."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Priority}\n"], capture_output=True,
                          text=True)
    return {ln.split("\t")[0] for ln in proc.stdout.splitlines() if ln.endswith("\trequired")}


def _kernel_identity(kernel: HostKernel) -> dict[str, str]:
    """What identifies the modules copied in: the release and the installed kernel package's version."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", f"linux-image-{kernel.release}"],
                          capture_output=True, text=True)
    ident = proc.stdout.strip() or content_hash(kernel.vmlinuz)
    return {"release": kernel.release, "package_version": ident}


class RealAgent(NamedTuple):
    """A real ``kata-agent`` binary for a recipe with ``agent = "real"``, and the version it reports."""

    binary: Path
    version: str


def guest_key(recipe: Recipe, versions: dict[str, str], kernel: HostKernel,
              agent: RealAgent | None = None) -> str:
    """The cache key: recipe settings, guest files, the builder's code, kernel, resolved package versions,
    and the real agent's bytes when there is one."""
    builder = [Path(__file__), Path(__file__).with_name("common.py")]
    agent_part = [agent.binary, agent.version] if agent else []
    return content_hash(BUILDER_VERSION, recipe.name, recipe.settings, guest_files_dir(), *builder, versions,
                        _kernel_identity(kernel), *agent_part)[:20]


# ---------------------------------------------------------------------------------------------- results
@dataclass
class GuestImage:
    """A built guest image: paths of the outputs and the record of what went in."""

    name: str
    key: str
    dir: Path
    image: Path | None
    initrd: Path | None
    recipe: Recipe
    rootfs_manifest: Path  # JSON list: path, type, mode, uid, gid, size, sha256 / target
    osbuilder: Path  # the osbuilder.yaml-like record beside the outputs
    partition_offset: int = 0
    packages: dict[str, str] = field(default_factory=dict)  # installed: name -> version (dpkg status)
    built: bool = False  # True when this call built it, False on a cache hit

    @classmethod
    def from_dir(cls, recipe: Recipe, directory: Path, *, built: bool = False) -> GuestImage:
        info = json.loads((directory / "guest.json").read_text())
        return cls(name=recipe.name, key=info["key"], dir=directory,
                   image=directory / info["image"] if info.get("image") else None,
                   initrd=directory / info["initrd"] if info.get("initrd") else None,
                   recipe=recipe, rootfs_manifest=directory / "rootfs-manifest.json",
                   osbuilder=directory / "osbuilder.yaml", partition_offset=info.get("partition_offset", 0),
                   packages=info.get("packages", {}), built=built)


def build_guest(recipe_name: str | Path, *, force: bool = False, kernel: HostKernel | None = None,
                agent: RealAgent | None = None) -> GuestImage:
    """Build (or reuse from the cache) the guest image of a recipe.

    ``kernel`` (default: the host's newest Debian kernel) is the guest kernel whose modules go in;
    ``agent`` is required by, and only accepted for, a recipe with ``agent = "real"``.
    """
    recipe = load_recipe(recipe_name)
    if (recipe.agent == "real") != (agent is not None):
        need = "needs a real kata-agent binary (agent=)" if agent is None else "takes no agent binary"
        raise KataError(f"guest-{recipe.name} {need}", path=recipe.path,
                        hint="pytest-kata build --from-source builds the agent" if agent is None else None)
    kernel = kernel or host_kernel()
    with timed(AREA, f"guest-{recipe.name}: resolving package versions"):
        versions = resolve_versions(recipe)
    key = guest_key(recipe, versions, kernel, agent)
    entry = f"{recipe.name}-{key}"
    final = cache_dir() / CACHE_KIND / entry
    if final.is_dir() and not force:
        step(AREA, f"guest-{recipe.name}: cached ({final})")
        return GuestImage.from_dir(recipe, final)
    if os.geteuid() != 0:
        raise KataError(f"building guest-{recipe.name} needs root (mmdebstrap in root mode, chroot, dpkg --root)",
                        path=recipe.path, hint="run as root, or use an image built on another machine")
    built = False

    def build(out: Path) -> None:
        nonlocal built
        with timed(AREA, f"guest-{recipe.name}: building {len(versions)} resolved packages into {entry}"):
            _build_into(recipe, key, versions, kernel, out, agent)
        built = True

    directory = cached(CACHE_KIND, entry, build, force=force)
    return GuestImage.from_dir(recipe, directory, built=built)


def find_cached(recipe_name: str) -> list[Path]:
    """Cache entries of a recipe, newest first (no build, no apt query)."""
    name = normalize_name(recipe_name)
    base = cache_dir() / CACHE_KIND
    entries = [p for p in base.glob(f"{name}-*") if (p / "guest.json").exists()] if base.exists() else []
    return sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)


def prune_cache(*, dry_run: bool = False) -> list[Path]:
    """Remove guest builds that are no longer current and all but the newest reference bundle of each kind.

    A guest entry is current when its key is what the recipe resolves to today; reference bundles
    (``fixtures/reference.py``) are keyed by a script outside the package, so the newest one per
    ``<which>-<variant>`` is kept. Returns what was (or, with ``dry_run``, would be) removed.
    """
    removed: list[Path] = []
    kernel = host_kernel()
    for name in list_recipes():
        recipe = load_recipe(name)
        if recipe.agent == "real":
            continue  # keyed by the agent built from source: the kata-build cache owns these entries
        current = guest_key(recipe, resolve_versions(recipe), kernel)
        removed += [p for p in find_cached(name) if not p.name.endswith(f"-{current}")]
    reference = cache_dir() / "reference"
    if reference.is_dir():
        newest: dict[str, list[Path]] = {}
        for entry in reference.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                newest.setdefault(entry.name.rsplit("-", 1)[0], []).append(entry)
        for entries in newest.values():
            entries.sort(key=lambda p: p.stat().st_mtime, reverse=True)
            removed += entries[1:]
    if not dry_run:
        for path in removed:
            safe_rmtree(path)
    return removed


# ---------------------------------------------------------------------------------------------- the build
def _build_into(recipe: Recipe, key: str, versions: dict[str, str], kernel: HostKernel, out: Path,
                agent: RealAgent | None = None) -> None:
    rootfs = out / "rootfs"
    total = 6
    n = iter(range(1, total + 1))
    say = lambda msg: step(AREA, f"guest-{recipe.name} [{next(n)}/{total}] {msg}")  # noqa: E731
    try:
        say(f"mmdebstrap --variant={recipe.variant} ({len(recipe.packages)} packages)")
        hook = guest_files_dir() / "busybox-extract-hook"
        # run through sh: an installed wheel may not keep the file's executable bit
        hooks = [f'--extract-hook=sh {shlex.quote(str(hook))} "$1"'] if recipe.busybox_links else []
        mmdebstrap(rootfs, suite=recipe.suite, variant=recipe.variant, include=recipe.packages,
                   extra_args=hooks, label=f"guest-{recipe.name}")
        say(f"purging {len(recipe.purge)} packages, adding {len(recipe.kernel_modules)} kernel modules")
        _purge(rootfs, recipe)
        modules = _install_modules(rootfs, kernel, recipe.kernel_modules)
        say(f"installing init={recipe.init}, agent {agent.version if agent else 'placeholder'}, sysctl and "
            "hardening")
        _install_guest_files(rootfs, recipe, modules, agent)
        _apply_removals(rootfs, recipe)
        _make_deterministic(rootfs)
        installed = _installed_packages(rootfs)
        record = _osbuilder_record(recipe, key, installed, kernel, modules, agent)
        record["pytest-kata"]["rootfs-hash"] = content_hash(rootfs)
        (rootfs / "var/lib/osbuilder").mkdir(parents=True, exist_ok=True)
        (rootfs / "var/lib/osbuilder/osbuilder.yaml").write_text(_yaml(record))
        say("writing rootfs manifest")
        manifest = tree_manifest(rootfs)
        (out / "rootfs-manifest.json").write_text(json.dumps(manifest, indent=0, sort_keys=True) + "\n")
        info: dict[str, Any] = {"name": recipe.name, "key": key, "packages": installed,
                                "recipe": recipe.settings, "files": len(manifest)}
        say("raw disk image (ext4 in partition 1)" if "image" in recipe.formats else "no disk image")
        if "image" in recipe.formats:
            image = out / f"{recipe.artifact_stem}.image"
            disk = make_ext4_disk(rootfs, image, table=recipe.partition_table, label="rootfs")
            info.update(image=image.name, partition_offset=disk.partition_offset,
                        partition_table=disk.table)
            record["pytest-kata"]["image"] = {"file": image.name, "sha256": _sha256(image),
                                              "partition-offset": disk.partition_offset}
        say(f"initrd ({recipe.initrd_compression})" if "initrd" in recipe.formats else "no initrd (formats)")
        if "initrd" in recipe.formats:
            initrd = out / f"{recipe.artifact_stem}.initrd"
            make_initrd(rootfs, initrd, compress=recipe.initrd_compression)
            info["initrd"] = initrd.name
            record["pytest-kata"]["initrd"] = {"file": initrd.name, "sha256": _sha256(initrd)}
        (out / "osbuilder.yaml").write_text(_yaml(record))
        (out / "recipe.toml").write_bytes(recipe.path.read_bytes())
        (out / "guest.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    finally:
        safe_rmtree(rootfs)


def _purge(rootfs: Path, recipe: Recipe) -> None:
    """Remove packages with dpkg itself, so the status file stays the truth about what is installed.

    The commands they took with them (tar, awk, dpkg...) are not replaced by busybox applets on purpose:
    the guest's init needs only sh, mount, insmod, sysctl and setsid.
    """
    if not recipe.purge:
        return
    present = set(_installed_packages(rootfs))
    for package in (p for p in recipe.purge if p in present):  # in recipe order: maintainer scripts care
        run_tool(["dpkg", f"--root={rootfs}", "--purge", "--force-remove-essential", "--force-depends",
                  "--force-remove-protected", package], what=f"dpkg --purge {package} in guest-{recipe.name}",
                 path=recipe.path, env={"DEBIAN_FRONTEND": "noninteractive"})


def module_load_order(kernel: HostKernel, names: list[str]) -> list[str]:
    """Module paths (relative to /lib/modules/<release>) in load order, dependencies first (modules.dep)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    dep_file = kernel.modules_dir / "modules.dep"
    if not dep_file.exists():
        return _require_built_in(kernel, names, dep_file)
    for line in dep_file.read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for dep in reversed(deps.get(mod, [])):  # modules.dep lists the deepest dependency last
            visit(dep)
        order.append(mod)

    builtin = _builtin_modules(kernel)
    for name in names:
        key = name.replace("-", "_")
        if key in builtin:
            continue
        if key not in by_name:
            raise KataError(f"kernel module {name!r} is neither a module nor built in for {kernel.release}",
                            path=dep_file)
        visit(by_name[key])
    return order


# Kconfig symbols of the modules the recipes name: a kernel without a module tree (one built the way Kata
# builds its guest kernel) must have them built in, and only its config can say so.
MODULE_KCONFIG = {
    "virtio_pci": "VIRTIO_PCI", "virtio_blk": "VIRTIO_BLK", "virtio_console": "VIRTIO_CONSOLE",
    "virtio_net": "VIRTIO_NET", "virtio_scsi": "SCSI_VIRTIO", "vsock": "VSOCKETS",
    "vmw_vsock_virtio_transport": "VIRTIO_VSOCKETS", "9p": "9P_FS", "9pnet_virtio": "NET_9P_VIRTIO",
    "nfit": "ACPI_NFIT", "nd_pmem": "BLK_DEV_PMEM", "ext4": "EXT4_FS", "crc32c_generic": "CRYPTO_CRC32C",
}


def _require_built_in(kernel: HostKernel, names: list[str], dep_file: Path) -> list[str]:
    """No module tree: every module must be built in according to the kernel's config (nothing to load)."""
    try:
        config = kernel.config.read_text(errors="replace")
    except OSError:
        raise KataError("no modules.dep and no readable config for the kernel", path=dep_file,
                        hint="give the kernel's config, or install its modules") from None
    built_in = set(re.findall(r"^CONFIG_(\w+)=y$", config, re.M))
    for name in names:
        symbol = MODULE_KCONFIG.get(name.replace("-", "_"))
        if symbol not in built_in:
            what = f"CONFIG_{symbol} is not =y" if symbol else "its Kconfig symbol is unknown"
            raise KataError(f"kernel module {name!r} is needed but {kernel.release} has no module tree and "
                            f"{what} in its config", path=kernel.config)
    return []


def _builtin_modules(kernel: HostKernel) -> set[str]:
    path = kernel.modules_dir / "modules.builtin"
    if not path.exists():
        return set()
    return {Path(line).name.split(".ko")[0].replace("-", "_") for line in path.read_text().split()}


def _install_modules(rootfs: Path, kernel: HostKernel, names: list[str]) -> list[str]:
    if not names:
        return []
    order = module_load_order(kernel, names)
    if not order:
        return []  # all built in (a kernel built like Kata's): nothing to copy or to load
    dest = rootfs / "lib/modules" / kernel.release
    for rel in order:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kernel.modules_dir / rel, target)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modules_dir / meta).exists():
            shutil.copy2(kernel.modules_dir / meta, dest / meta)
    run_tool(["depmod", "-b", rootfs, kernel.release], what="depmod", path=dest)
    (rootfs / "etc/kata-guest").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc/kata-guest/modules").write_text("".join(f"{rel}\n" for rel in order))
    return order


def _install_guest_files(rootfs: Path, recipe: Recipe, modules: list[str], real: RealAgent | None = None) -> None:
    files = guest_files_dir()
    agent = rootfs / AGENT_PATH
    agent.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(real.binary if real else files / "kata-agent", agent)
    agent.chmod(0o755)
    conf = rootfs / "etc/kata-guest"
    conf.mkdir(parents=True, exist_ok=True)
    for d in ("proc", "sys", "dev", "run", "tmp", "root", "var/lib/osbuilder"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "etc/hostname").write_text(f"kata-guest-{recipe.name}\n")
    root_opts = "ro" if recipe.read_only_root else "rw,errors=remount-ro"
    fsck_pass = 0 if recipe.read_only_root else 1
    (rootfs / "etc/fstab").write_text(f"# <fs> <mount point> <type> <options> <dump> <pass>\n"
                                      f"LABEL=rootfs / ext4 {root_opts} 0 {fsck_pass}\n")
    if recipe.read_only_root:
        (conf / "read-only-root").write_text("the agent remounts / read-only at boot\n")
    if recipe.lock_modules:
        (conf / "lock-modules").write_text("the agent sets kernel.modules_disabled=1 after loading modules\n")
    if recipe.sysctl:
        sysctl_dir = rootfs / "etc/sysctl.d"
        sysctl_dir.mkdir(parents=True, exist_ok=True)
        lines = ["# Hardening sysctls of the pytest-kata guest image (KSPP/CIS), applied at boot.",
                 *(f"{k} = {v}" for k, v in sorted(recipe.sysctl.items()))]
        (sysctl_dir / "90-kata-hardening.conf").write_text("\n".join(lines) + "\n")
    if real is not None:
        _install_agent_init(rootfs, modules)
        return
    (conf / "init").write_text("/usr/bin/kata-agent\n" if recipe.init == "agent" else "/lib/systemd/systemd\n")
    if recipe.init == "agent":
        init_link = rootfs / "sbin/init"
        if init_link.is_symlink() or init_link.exists():
            init_link.unlink()
        init_link.parent.mkdir(parents=True, exist_ok=True)
        init_link.symlink_to("/usr/bin/kata-agent")
        loader = rootfs / "init"
        shutil.copyfile(files / "init", loader)
        loader.chmod(0o755)
    else:
        _install_systemd_units(rootfs)


def _install_agent_init(rootfs: Path, modules: list[str]) -> None:
    """osbuilder's AGENT_INIT=yes: the agent is ``/sbin/init`` and the initrd's ``/init`` links to it.

    A kernel with the agent's transports built in (Kata's own) boots the agent directly; one that has them as
    modules (Debian's) boots ``files/kata-preinit``, which only loads them and execs the agent as PID 1.
    """
    init = rootfs / "sbin/init"
    init.parent.mkdir(parents=True, exist_ok=True)
    if init.is_symlink() or init.exists():
        init.unlink()
    if modules:
        shutil.copyfile(guest_files_dir() / "kata-preinit", init)
        init.chmod(0o755)
    else:
        init.symlink_to("/" + AGENT_PATH)
    loader = rootfs / "init"
    if loader.is_symlink() or loader.exists():
        loader.unlink()
    loader.symlink_to("/sbin/init")
    (rootfs / "etc/kata-guest/init").write_text("/sbin/init\n")


def _install_systemd_units(rootfs: Path) -> None:
    """osbuilder AGENT_INIT=no: systemd starts the agent; a serial autologin gives the harness its shell."""
    unit_dir = rootfs / "etc/systemd/system"
    (unit_dir / "multi-user.target.wants").mkdir(parents=True, exist_ok=True)
    (unit_dir / "kata-agent.service").write_text(
        "[Unit]\nDescription=Kata agent (pytest-kata placeholder, not a real agent)\n\n"
        "[Service]\nExecStart=/usr/bin/kata-agent --service\nStandardOutput=journal+console\n\n"
        "[Install]\nWantedBy=multi-user.target\n")
    wants = unit_dir / "multi-user.target.wants/kata-agent.service"
    if not wants.is_symlink():
        wants.symlink_to("/etc/systemd/system/kata-agent.service")
    dropin = unit_dir / "serial-getty@ttyS0.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "autologin.conf").write_text(
        "[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin root --noclear --keep-baud "
        "115200,57600,38400,9600 %I $TERM\n")
    bashrc = rootfs / "root/.bashrc"
    bashrc.parent.mkdir(parents=True, exist_ok=True)
    with open(bashrc, "a") as f:
        f.write("PS1='kata-guest# '\n")


def _apply_removals(rootfs: Path, recipe: Recipe) -> None:
    for pattern in recipe.remove:
        if pattern.startswith("/") or ".." in Path(pattern).parts:
            raise ConfigError(f"remove pattern {pattern!r} must be relative and stay inside the rootfs",
                              path=recipe.path)
        for hit in sorted(rootfs.glob(pattern), reverse=True):
            if hit.is_dir() and not hit.is_symlink():
                shutil.rmtree(hit)
            else:
                hit.unlink()
    if recipe.strip_setuid:
        for dirpath, _dirs, files in os.walk(rootfs):
            for name in files:
                p = Path(dirpath, name)
                st = p.lstat()
                if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                    p.chmod(stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))


_VOLATILE = ["var/log/dpkg.log", "var/log/alternatives.log", "var/log/apt/*", "var/cache/ldconfig/aux-cache",
             "var/lib/dpkg/*-old", "var/cache/debconf/*-old", "var/lib/apt/lists/*", "var/cache/apt/*.bin",
             "var/log/bootstrap.log"]


def _make_deterministic(rootfs: Path) -> None:
    """Drop files whose content is a timestamp or a cache of one (logs, -old backups, apt binary caches)."""
    for pattern in _VOLATILE:
        for hit in rootfs.glob(pattern):
            if hit.is_file() or hit.is_symlink():
                hit.unlink()


def _installed_packages(rootfs: Path) -> dict[str, str]:
    """name -> version of the packages dpkg says are installed in the rootfs."""
    from debian import deb822

    status = rootfs / "var/lib/dpkg/status"
    if not status.exists():
        return {}
    result = {}
    with open(status) as f:
        for para in deb822.Deb822.iter_paragraphs(f):
            if "installed" in para.get("Status", "").split():
                result[para["Package"]] = para.get("Version", "")
    return dict(sorted(result.items()))


def _osbuilder_record(recipe: Recipe, key: str, installed: dict[str, str], kernel: HostKernel,
                      modules: list[str], agent: RealAgent | None = None) -> dict[str, Any]:
    """The fields of osbuilder's ``create_summary_file`` (format 0.0.2) plus what pytest-kata needs."""
    created = datetime.fromtimestamp(SOURCE_DATE_EPOCH, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000000+0000")
    return {
        "osbuilder": {"url": "https://github.com/kata-containers/kata-containers/tools/osbuilder",
                      "version": f"pytest-kata-{__version__}"},
        "rootfs-creation-time": created,
        "description": f"osbuilder rootfs ({recipe.settings['description']})",
        "file-format-version": "0.0.2",
        "architecture": "x86_64",
        "base-distro": {"name": recipe.settings["os"].capitalize(), "version": recipe.settings["os_version"],
                        "packages": {"default": sorted(recipe.packages), "extra": []}},
        "agent": {"url": "https://github.com/kata-containers/" + ("agent" if agent else "kata-containers"),
                  "name": "kata-agent",
                  "version": agent.version if agent else "placeholder (pytest-kata reference candidate, no real "
                                                          "agent)",
                  "agent-is-init-daemon": "yes" if recipe.init == "agent" else "no"},
        "pytest-kata": {
            "recipe": recipe.name, "key": key, "builder-version": BUILDER_VERSION,
            "recipe-hash": content_hash(recipe.path.read_bytes()),
            "suite": recipe.suite, "variant": recipe.variant,
            "kernel": {"release": kernel.release, "modules": modules},
            "hardening": {"read-only-root": recipe.read_only_root, "lock-modules": recipe.lock_modules,
                          "strip-setuid": recipe.strip_setuid, "purged": sorted(recipe.purge),
                          "sysctl": dict(sorted(recipe.sysctl.items()))},
            "packages": installed,
        },
    }


def _yaml(record: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(record, sort_keys=False, default_flow_style=False)


# ---------------------------------------------------------------------------------------------- booting
def qemu_boot_args(guest: GuestImage, *, mode: str = "initrd", loader: GuestImage | None = None,
                   kernel: HostKernel | None = None, accel: str = "tcg", memory_mib: int = 512,
                   console: str = "ttyS0") -> list[str]:
    """qemu-system-x86_64 arguments that boot a guest image directly (serial console on stdio).

    ``mode="initrd"``: the initrd is the guest (the agent placeholder is init). ``mode="image"``: the initrd
    of ``loader`` (default: the guest itself, else ``reference``) loads the virtio/ext4 modules and
    switch_roots into the image, attached read-only like Kata attaches its guest image.
    """
    kernel = kernel or host_kernel()
    args = ["-accel", accel, "-machine", "pc", "-m", str(memory_mib), "-nographic", "-no-reboot",
            "-nic", "none", "-kernel", str(kernel.vmlinuz)]
    if mode == "initrd":
        if guest.initrd is None:
            raise KataError(f"guest-{guest.name} has no initrd (formats)", path=guest.recipe.path)
        return [*args, "-initrd", str(guest.initrd), "-append", f"console={console} quiet panic=-1"]
    if mode != "image":
        raise KataError(f"unknown boot mode {mode!r} (initrd, image)")
    if guest.image is None:
        raise KataError(f"guest-{guest.name} has no disk image (formats)", path=guest.recipe.path)
    loader = loader or (guest if guest.initrd else build_guest("reference"))
    assert loader.initrd is not None
    return [*args, "-initrd", str(loader.initrd),
            "-drive", f"file={guest.image},format=raw,if=virtio,readonly=on",
            "-append", f"console={console} quiet panic=-1 root=/dev/vda1 rootfstype=ext4 ro"]
