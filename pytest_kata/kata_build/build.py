"""Build a kata-static bundle (``/opt/kata``) of a Kata 1.x release from its upstream sources.

The recipe is upstream's own, run offline with Debian's Go in GOPATH mode (``GO111MODULE=off``, vendored
dependencies): each repository is unpacked to ``$GOPATH/src/github.com/kata-containers/<repo>`` and built
with its own Makefile (``make SKIP_GO_VERSION_CHECK=1 PREFIX=/opt/kata``; the runtime also
``containerd-shim-v2`` and ``install``, which renders ``cli/config/configuration-*.toml`` with every path
under ``/opt/kata``). Those rendered files go into the bundle as upstream's release script
(``packaging/release/kata-deploy-binaries.sh``) leaves them in kata-static: its one edit deletes the
``initrd =`` line of ``configuration-qemu.toml`` and ``configuration-fc.toml`` (the render names both an image
and an initrd, which 1.x refuses), so the guest image, booted as an NVDIMM root, is the default guest and the
hardening rules judge upstream's real defaults. The real ``kata-agent`` goes into a guest built by the
project's guest-image builder (recipe ``vm-images/guest/kata.toml``), shipped as osbuilder's NVDIMM image and
as an initrd, with Kata's guest kernel (built from the release's packaging sources) and qemu beside it.

Why it is built this way:

* **Cached by content hash** of the input archives (or checkout trees), this builder's code, the guest
  recipe and its resolved packages, the kernel (image and config), the guest form, qemu and the Go
  toolchain: a second build of the same
  inputs costs a few hashes. Go's build cache (``cache_dir()/go/cache``) is kept, so a cold bundle build
  after a builder change recompiles little.
* **Archives are untrusted** and are unpacked by the bundle opener's checked extraction
  (:func:`pytest_kata.bundle.unpack_archive`).
* **Reproducible**: ``-trimpath`` keeps the GOPATH out of the binaries, so the same sources give the same
  bytes (and the guest holding the agent keeps its cache key).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pytest_kata.bundle import PREFIX, unpack_archive
from pytest_kata.errors import KataError
from pytest_kata.hashing import sha256_file
from pytest_kata.images.common import HostKernel, cached, content_hash, safe_rmtree, write_tarball
from pytest_kata.images.guest import (
    GuestImage,
    RealAgent,
    build_guest,
    guest_files_dir,
    load_recipe,
    resolve_versions,
)
from pytest_kata.kata_build.image_mode import nvdimm_image
from pytest_kata.kata_build.kernel_choice import bundle_kernel
from pytest_kata.kata_build.sources import REQUIRED, Source, SourceSet, first_line
from pytest_kata.progress import step, timed
from pytest_kata.resources import cache_dir

AREA = "kata-build"
CACHE_KIND = "kata-build"
BUILDER_VERSION = "2"
GUEST_RECIPE = "kata"
QEMU = Path("/usr/bin/qemu-system-x86_64")
# Debian's qemu is relocatable: run from /opt/kata/bin it loads its accelerator and device modules, its
# firmware (SeaBIOS, option ROMs, iPXE) and data from <bindir>/../<the configured path> only ("could not load
# module for type 'tcg-accel-ops'", "could not load PC BIOS 'bios-256k.bin'"), so they go in beside it.
QEMU_FILES = {Path("/usr/lib/x86_64-linux-gnu/qemu"): "lib/x86_64-linux-gnu/qemu",
              Path("/usr/share/qemu"): "share/qemu", Path("/usr/share/seabios"): "share/seabios",
              Path("/usr/lib/ipxe/qemu"): "lib/ipxe/qemu"}
SHARE = "share/kata-containers"
DEFAULTS = "share/defaults/kata-containers"
GO_PROJECT = "src/github.com/kata-containers"
MAKE_VARS = ("SKIP_GO_VERSION_CHECK=1", f"PREFIX=/{PREFIX}")
LOG_TAIL_LINES = 3
DEFAULT_GUEST = "image"  # kata-static's: kata-deploy-binaries.sh deletes the initrd line
# The configurations upstream's release script edits (the others name one guest form only).
GUEST_CHOICE_CONFIGS = ("configuration-qemu.toml", "configuration-fc.toml")
# What every bundle holds (relative to /opt/kata); the build fails loudly when one is missing.
EXPECTED = ("bin/containerd-shim-kata-v2", "bin/kata-runtime", "libexec/kata-containers/kata-proxy",
            "libexec/kata-containers/kata-netmon", f"{DEFAULTS}/configuration-qemu.toml")


@dataclass(frozen=True)
class BuildResult:
    """A finished bundle: the tarball and the unpacked tree in the cache, and whether this call built it."""

    version: str
    key: str
    entry: Path
    tarball: Path
    built: bool
    seconds: float
    guest: str = DEFAULT_GUEST

    @property
    def root(self) -> Path:
        """The directory that contains ``opt/kata``."""
        return self.entry / "root"

    @property
    def record(self) -> dict[str, Any]:
        return json.loads((self.root / PREFIX / "kata-build.json").read_text())


def tarball_name(version: str) -> str:
    return f"kata-static-{version}-amd64.tar.zst"


# ---------------------------------------------------------------------------------------------- toolchain
def go_toolchain() -> str:
    """``go version`` of Debian's Go; a one-line error when Go or make is missing."""
    for tool, package in (("go", "golang-go"), ("make", "make")):
        if shutil.which(tool) is None:
            raise KataError(f"{tool} is not installed: building Kata from source needs Debian's {package}",
                            hint=f"apt-get install {package}, or run scripts/setup")
    proc = subprocess.run(["go", "version"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise KataError(f"go version failed: {first_line(proc.stderr) or 'no output'}",
                        hint="reinstall golang-go")
    return proc.stdout.strip()


def go_env(gopath: Path) -> dict[str, str]:
    """GOPATH mode with a private GOPATH and a kept build cache; nothing from the user's Go setup leaks in.

    ``-trimpath`` keeps the (per-build) GOPATH out of the binaries and out of Go's cache keys: the same
    sources give the same bytes, and a rebuild in another GOPATH reuses the compiled packages.
    """
    gocache = cache_dir() / "go" / "cache"
    gocache.mkdir(parents=True, exist_ok=True)
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(gopath),
            "GOPATH": str(gopath), "GOCACHE": str(gocache), "GO111MODULE": "off", "GOFLAGS": "-trimpath",
            "GOPROXY": "off", "LC_ALL": "C", "TMPDIR": str(gopath)}


# ---------------------------------------------------------------------------------------------- cache key
def _source_hash(source: Source) -> str:
    if source.kind == "archive":
        return sha256_file(source.path)
    return content_hash(source.path)


def build_key(sources: SourceSet, kernel: HostKernel, guest_versions: dict[str, str], go: str,
              qemu: Path = QEMU, guest: str = DEFAULT_GUEST) -> str:
    """The content hash that names a build: every input, and the code and recipe that turn them into it."""
    package = Path(__file__).parent
    builder = [package / name for name in ("build.py", "sources.py", "kernel_choice.py", "image_mode.py")]
    guest_code = [Path(__file__).parents[1] / "images" / name for name in ("guest.py", "common.py")]
    recipe = load_recipe(GUEST_RECIPE)
    parts: list[object] = [BUILDER_VERSION, sources.version, go, {r: _source_hash(s) for r, s in
                                                               sorted(sources.sources.items())}]
    parts += [*builder, *guest_code, recipe.path, guest_files_dir(), guest_versions]
    parts += [kernel.release, kernel.vmlinuz, kernel.config, qemu, guest]
    return content_hash(*parts)[:20]


# ---------------------------------------------------------------------------------------------- steps
def _run_make(repo: str, tree: Path, args: Sequence[str], env: dict[str, str], log: Path) -> None:
    """``nice make ARGS`` in ``tree``; output to ``log``; a failure is one line with the log's tail."""
    cmd = ["nice", "-n", "10", "make", *args]
    with open(log, "ab") as out:
        out.write(f"\n$ cd {tree} && {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        tail = " | ".join(lines[-LOG_TAIL_LINES:])[-400:]
        raise KataError(f"building {repo} failed (make {' '.join(args)}, exit {proc.returncode}): {tail}",
                        path=log)


def _unpack(source: Source, dest: Path, scratch: Path) -> str | None:
    """Put a repository's sources at ``dest`` (the GOPATH import path); returns the git commit if known."""
    if source.kind == "archive":
        assert source.top is not None
        tmp = scratch / f"unpack-{source.repo}"
        unpack_archive(source.path, tmp, prefix=source.top)
        os.rename(tmp / source.top, dest)
        shutil.rmtree(tmp)
        return None
    shutil.copytree(source.path, dest, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    proc = subprocess.run(["git", "-C", str(source.path), "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def _build_go(sources: SourceSet, work: Path, stage: Path, logs: Path) -> tuple[Path, dict[str, str | None]]:
    """Build runtime (installed into ``stage``), proxy (installed) and agent; returns the agent binary."""
    gopath = work / "gopath"
    project = gopath / GO_PROJECT
    project.mkdir(parents=True)
    env = go_env(gopath)
    commits: dict[str, str | None] = {}
    for repo in REQUIRED:
        with timed(AREA, f"{sources.version}: unpacking {repo} ({sources[repo].path.name})"):
            commits[repo] = _unpack(sources[repo], project / repo, work)
    destdir = f"DESTDIR={stage}"
    steps = [("runtime", [[*MAKE_VARS], [*MAKE_VARS, "containerd-shim-v2"], [*MAKE_VARS, destdir, "install"]]),
             ("proxy", [[*MAKE_VARS], [*MAKE_VARS, destdir, "install"]]),
             ("agent", [[*MAKE_VARS]])]
    for repo, invocations in steps:
        with timed(AREA, f"{sources.version}: go build {repo} (log {logs / f'{repo}.log'})"):
            for args in invocations:
                _run_make(repo, project / repo, args, env, logs / f"{repo}.log")
    root = stage / PREFIX
    shim = root / "bin/containerd-shim-kata-v2"
    if not shim.exists() and (project / "runtime/containerd-shim-kata-v2").exists():
        shim.parent.mkdir(parents=True, exist_ok=True)  # a release whose install leaves the shim out
        shutil.copy2(project / "runtime/containerd-shim-kata-v2", shim)
    agent = project / "agent/kata-agent"
    if not agent.is_file():
        raise KataError("the agent's make finished without a kata-agent binary", path=logs / "agent.log")
    return agent, commits


def select_guest(defaults: Path, guest: str) -> dict[str, str]:
    """Leave one guest form in the configurations that name both, as upstream's release script does.

    ``image`` is ``kata-deploy-binaries.sh``'s own edit (``sed -i -e '/^initrd =/d'`` on
    :data:`GUEST_CHOICE_CONFIGS`); ``initrd`` deletes the ``image =`` line instead, only where an ``initrd =``
    line is there to take its place. Nothing else in the files changes. Returns what was deleted, by file.
    """
    lines = {form: re.compile(rf"^{form} =.*\n?", re.MULTILINE) for form in ("image", "initrd")}
    drop = "initrd" if guest == "image" else "image"
    deleted = {}
    for name in GUEST_CHOICE_CONFIGS:
        path = defaults / name
        if not path.is_file():
            continue
        text = path.read_text()
        found = lines[drop].search(text)
        if found and (guest == "image" or lines[guest].search(text)):
            path.write_text(lines[drop].sub("", text))
            deleted[name] = found.group(0).strip()
    return deleted


def _binary_version(binary: Path, *args: str) -> str:
    """First line of ``BINARY --version`` (these are the binaries just built, run with a timeout)."""
    try:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL, cwd=binary.parent)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KataError(f"{binary.name} {' '.join(args)} could not run: {exc}", path=binary) from None
    return first_line(proc.stdout + proc.stderr)


def _install_guest(root: Path, version: str, guest: GuestImage, kernel: HostKernel) -> dict[str, str]:
    """Kernel, image and initrd under share/kata-containers with the names the rendered configs use.

    The image is osbuilder's NVDIMM layout of the guest disk (DAX header in front), as every osbuilder image
    is: Kata boots it as a pmem root, and its first MBR still shows the ext4 partition to other readers.
    A kernel keeps its own ``vmlinuz-*`` name (Kata's ``vmlinuz-<kernel>-<config version>``, Debian's
    ``vmlinuz-<release>``).
    """
    share = root / SHARE
    share.mkdir(parents=True, exist_ok=True)
    kernel_name = kernel.vmlinuz.name if kernel.vmlinuz.name.startswith("vmlinuz-") else f"vmlinuz-{kernel.release}"
    names = {"kernel": kernel_name, "kernel-config": f"config-{kernel.release}",
             "image": f"kata-containers-image_debian-12_{version}_agent.img",
             "initrd": f"kata-containers-initrd_debian-12_{version}_agent.initrd"}
    shutil.copyfile(kernel.vmlinuz, share / names["kernel"])
    shutil.copyfile(kernel.config, share / names["kernel-config"])
    (share / "vmlinuz.container").symlink_to(names["kernel"])
    if guest.image is None or guest.initrd is None:
        raise KataError(f"guest recipe {GUEST_RECIPE!r} must produce an image and an initrd", path=guest.dir)
    shutil.copyfile(nvdimm_image(guest.image), share / names["image"])
    (share / "kata-containers.img").symlink_to(names["image"])
    shutil.copyfile(guest.initrd, share / names["initrd"])
    (share / "kata-containers-initrd.img").symlink_to(names["initrd"])
    shutil.copyfile(guest.osbuilder, share / f"kata-containers-image_debian-12_{version}_agent.osbuilder.yaml")
    return names


def _install_qemu(root: Path) -> str:
    """Debian's qemu binary, modules and firmware at the paths it looks for them; its --version line."""
    shutil.copyfile(QEMU, root / "bin/qemu-system-x86_64")
    (root / "bin/qemu-system-x86_64").chmod(0o755)
    for source, rel in QEMU_FILES.items():
        if source.is_dir():  # links resolved: a bundle's links must stay inside it
            shutil.copytree(source, root / rel, symlinks=False, ignore_dangling_symlinks=True)
    return _binary_version(root / "bin/qemu-system-x86_64", "--version")


def _versions_yaml(kernel: HostKernel, qemu_line: str, guest: GuestImage, kernel_origin: str) -> str:
    """Kata's ``versions.yaml`` structure with what is really in this bundle.

    Not the runtime repository's ``versions.yaml``: that pins the kernel and qemu upstream released with,
    which would mislead the scanners about the Debian kernel and qemu shipped here.
    """
    match = re.search(r"version (\d+\.\d+\.\d+)", qemu_line)
    doc = {"description": "components of this bundle built from source by pytest-kata build --from-source",
           "assets": {
               "hypervisor": {"qemu": {"description": "Debian's qemu-system-x86_64",
                                       "version": f"v{match.group(1)}" if match else "unknown",
                                       "version-output": qemu_line}},
               "kernel": {"description": f"guest kernel: {kernel_origin}", "version": f"v{kernel.upstream_version}",
                          "release": kernel.release},
               "image": {"description": f"guest image (vm-images/guest/{GUEST_RECIPE}.toml) with the real agent, "
                                        "osbuilder's NVDIMM layout",
                         "architecture": {"x86_64": {"name": "debian", "version": "12"}}, "build-key": guest.key},
               "initrd": {"description": f"guest initrd (vm-images/guest/{GUEST_RECIPE}.toml), agent as init",
                          "architecture": {"x86_64": {"name": "debian", "version": "12"}}, "build-key": guest.key},
           }}
    return "---\n" + yaml.safe_dump(doc, sort_keys=False)


def _normalize_modes(root: Path) -> None:
    """Directories 0755, executables 0755, everything else 0644 (the tarball is owned by root)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o755 if os.stat(path).st_mode & 0o111 else 0o644)


def _build_into(sources: SourceSet, key: str, kernel: HostKernel, kernel_origin: str, guest_form: str, go: str,
                out: Path) -> None:
    version = sources.version
    # Outside the build directory: a failed build's directory is removed, its logs must stay readable.
    logs = cache_dir() / CACHE_KIND / "logs" / f"{version}-{key}"
    safe_rmtree(logs)
    logs.mkdir(parents=True)
    work = cache_dir() / "go" / f"work-{key}"
    safe_rmtree(work)
    work.mkdir(parents=True)
    stage = out / "root"
    root = stage / PREFIX
    try:
        step(AREA, f"{version}: [1/6] Go binaries with {go}")
        agent, commits = _build_go(sources, work, stage, logs)
        missing = [rel for rel in EXPECTED if not (root / rel).exists()]
        if missing:
            raise KataError(f"the build installed no {', '.join(missing)}", path=logs / "runtime.log")
        agent_line = _binary_version(agent, "--version")  # "kata-agent version 1.11.5"
        found = re.search(r"version\s+v?(\S+)", agent_line)
        agent_version = found.group(1) if found else agent_line  # osbuilder.yaml records the bare version
        step(AREA, f"{version}: [2/6] guest-{GUEST_RECIPE} with the real agent ({agent_line}), "
                   f"kernel {kernel.release}, image (NVDIMM layout) and initrd")
        guest = build_guest(GUEST_RECIPE, kernel=kernel, agent=RealAgent(agent, agent_version))
        names = _install_guest(root, version, guest, kernel)
        deleted = select_guest(root / DEFAULTS, guest_form)
        step(AREA, f"{version}: [3/6] default guest: the {guest_form} (deleted from the rendered configurations: "
                   f"{'; '.join(f'{n}: {line}' for n, line in deleted.items()) or 'nothing'})")
        step(AREA, f"{version}: [4/6] qemu from {QEMU} with its modules")
        qemu_line = _install_qemu(root)
        step(AREA, f"{version}: [5/6] VERSION, versions.yaml, kata-build.json")
        (root / "VERSION").write_text(f"{version}\n")
        (root / "versions.yaml").write_text(_versions_yaml(kernel, qemu_line, guest, kernel_origin))
        edited = ", ".join(GUEST_CHOICE_CONFIGS)
        record = {
            "version": version, "key": key, "builder-version": BUILDER_VERSION, "go": go,
            "sources": {repo: {"kind": s.kind, "name": s.path.name, "sha256": _source_hash(s),
                               "commit": commits.get(repo)} for repo, s in sorted(sources.sources.items())},
            "binaries": {"containerd-shim-kata-v2": _binary_version(root / "bin/containerd-shim-kata-v2",
                                                                    "--version"),
                         "kata-runtime": _binary_version(root / "bin/kata-runtime", "--version"),
                         "kata-agent": agent_line},
            "kernel": {"release": kernel.release, "source": str(kernel.vmlinuz), "origin": kernel_origin,
                       "file": f"{SHARE}/{names['kernel']}", "sha256": sha256_file(kernel.vmlinuz),
                       "config-sha256": sha256_file(kernel.config), "modules-in-guest": guest.recipe.kernel_modules},
            "guest": {"recipe": GUEST_RECIPE, "key": guest.key, "default": guest_form,
                      "deleted-from-configs": deleted, "image-layout": "osbuilder NVDIMM (DAX header + disk)",
                      "image": f"{SHARE}/{names['image']}",
                      "initrd": f"{SHARE}/{names['initrd']}", "init": "/sbin/init (agent, or kata-preinit "
                      "loading the transport modules, then exec of the agent); initrd /init -> /sbin/init"},
            "qemu": qemu_line,
            "configs": sorted(p.name for p in (root / DEFAULTS).glob("configuration*.toml")),
            "not-built": {"kata-shim": "the legacy kata-shim repository is not among the sources; the "
                                       "configs' [shim.kata] path is unused with containerd-shim-kata-v2",
                          "virtiofsd": "not packaged in Debian bookworm", "firecracker": "not built",
                          "cloud-hypervisor": "not built", "acrn": "not built"},
            "notes": ["configuration-*.toml are the runtime Makefile's render with PREFIX=/opt/kata; the render "
                      "names both image and initrd, which 1.x refuses at run time, and the only edit is "
                      + (f"upstream's own: kata-deploy-binaries.sh deletes the initrd line of {edited}"
                         if guest_form == "image" else f"--guest initrd, not upstream's default: the image line "
                         f"deleted from {edited}")],
        }
        (root / "kata-build.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        step(AREA, f"{version}: [6/6] {tarball_name(version)}")
        _normalize_modes(stage)
        write_tarball(stage, out / tarball_name(version))
    finally:
        safe_rmtree(work)


# ---------------------------------------------------------------------------------------------- public
def build_bundle(sources: SourceSet, *, kernel: HostKernel | None = None, guest: str = DEFAULT_GUEST,
                 force: bool = False) -> BuildResult:
    """Build (or take from the cache) the kata-static bundle of ``sources``.

    ``kernel`` defaults to Kata's guest kernel built from the release's packaging sources (see
    :func:`~pytest_kata.kata_build.kernel_choice.bundle_kernel`); ``guest`` is the form the configurations boot
    (``image``, upstream's default, or ``initrd``). Both forms are shipped either way.
    """
    start = time.monotonic()
    go = go_toolchain()
    kernel, kernel_origin = bundle_kernel(sources, kernel, guest)
    step(AREA, f"{sources.version}: guest kernel {kernel.release}: {kernel_origin}; default guest: the {guest}")
    with timed(AREA, f"{sources.version}: hashing the sources and inputs"):
        guest_versions = resolve_versions(load_recipe(GUEST_RECIPE))
        key = build_key(sources, kernel, guest_versions, go, guest=guest)
    entry_name = f"{sources.version}-{key}"
    final = cache_dir() / CACHE_KIND / entry_name
    built = False
    if final.is_dir() and not force:
        step(AREA, f"{sources.version}: cached ({final})")
    else:
        def build(out: Path) -> None:
            nonlocal built
            with timed(AREA, f"{sources.version}: building {entry_name}"):
                _build_into(sources, key, kernel, kernel_origin, guest, go, out)
            built = True

        final = cached(CACHE_KIND, entry_name, build, force=force)
    return BuildResult(sources.version, key, final, final / tarball_name(sources.version), built,
                       time.monotonic() - start, guest)


def publish(result: BuildResult, output_dir: Path) -> Path:
    """Place the tarball in ``output_dir`` (a hard link to the cache when possible, else a copy)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / result.tarball.name
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(result.tarball, tmp)
    except OSError:
        shutil.copyfile(result.tarball, tmp)
    os.replace(tmp, target)
    return target
