"""The Kata guest kernel, built the way Kata's packaging builds it (``kernel/build-kernel.sh``).

Why build one: Kata 1.x boots its guest *image* as an NVDIMM root device with no initrd
(``root=/dev/pmem0p1 rootflags=dax,... rootfstype=ext4``; the 1.11 runtime refuses an image and an initrd
together), so the NVDIMM/pmem, ext4, virtio and vsock drivers must be built into the kernel. Debian's kernel
has them as modules and cannot mount that root without an initrd.

How: Debian's kernel source (``linux-source-6.1``) and Kata's config fragments from the packaging tree
(``kernel/configs/fragments/{common,x86_64}/*.conf``, ``kernel/kata_config_version``), merged by the kernel's
own ``scripts/kconfig/merge_config.sh -r -n`` (allnoconfig base) exactly as ``build-kernel.sh`` does, plus one
extra fragment from ``kernel_adaptations.toml`` for what 6.1 renamed or moved. The merged ``.config`` is then
checked: every option a fragment asks for is there with its value, or is explained (removed/renamed in 6.1,
checked against the source's Kconfig, or tolerated by Kata's ``whitelist.conf``). Installed like
``install_kata``: ``vmlinuz-<kernel>-<kata_config_version>`` (the bzImage qemu ``-kernel`` takes),
``vmlinux-...``, ``config-<kernel>`` and the ``vmlinuz.container``/``vmlinux.container`` links.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli

from pytest_kata.errors import ConfigError, KataError
from pytest_kata.hashing import sha256_file
from pytest_kata.images.common import SOURCE_DATE_EPOCH, cached, content_hash, safe_rmtree
from pytest_kata.progress import step
from pytest_kata.resources import cache_dir

AREA = "kernel"
CACHE_KIND = "kata-kernel"
# Part of every cache key, with the build functions' source and the adaptations file (see kernel_key).
BUILDER_VERSION = "1"
DEFAULT_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
ADAPTATIONS = Path(__file__).with_name("kernel_adaptations.toml")
ARCH = "x86_64"
# build-kernel.sh merges common/*.conf then <arch>/*.conf; experimental/ and gpu/ only on request.
FRAGMENT_DIRS = ("common", ARCH)
ACTIONS = ("needs", "renamed", "removed")
JOBS = 2
# Compile steps ("CC"/"AS" lines) of this fragment set on 6.1 x86_64, for a rough percentage only.
COMPILE_STEPS_ESTIMATE = 1900
LOG_TAIL_LINES = 6

Progress = Callable[[str, str], None]
_OPTION = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")
_KCONFIG_SYMBOL = re.compile(r"^\s*(?:menu)?config\s+([A-Za-z0-9_]+)\s*$", re.MULTILINE)
_COMPILE_STEP = re.compile(r"^\s+(CC|AS)\s")


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Fragment:
    """One Kata config fragment: the options it sets and the lines merge_config.sh would not take."""

    name: str  # relative to fragments/, e.g. "common/dax.conf"
    text: str
    options: dict[str, str]
    ignored: tuple[str, ...] = ()


@dataclass(frozen=True)
class KataKernelConfig:
    """What Kata's packaging says about its guest kernel: fragments, whitelist and config version."""

    source: Path  # the packaging archive or directory it was read from
    fragments: tuple[Fragment, ...]
    whitelist: tuple[str, ...]  # grep patterns of options allowed to be missing (whitelist.conf)
    config_version: str


@dataclass(frozen=True)
class Adaptation:
    """How 6.1 treats one fragment option (see kernel_adaptations.toml)."""

    name: str
    action: str
    add: tuple[str, ...]
    reason: str


def parse_config_lines(text: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """Options of a fragment or ``.config`` (``# CONFIG_X is not set`` is ``n``) and the malformed lines.

    A line such as ``CONFIG_STACKPROTECTOR_STRONG`` (no value) is not an option for merge_config.sh either;
    it is returned among the ignored lines so that the report can say so.
    """
    options: dict[str, str] = {}
    ignored: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if m := _OPTION.match(line):
            options[m.group(1)] = m.group(2)
        elif m := _NOT_SET.match(line):
            options[m.group(1)] = "n"
        elif line.startswith("CONFIG_"):
            ignored.append(line)
    return options, tuple(ignored)


def parse_fragment(name: str, text: str) -> Fragment:
    options, ignored = parse_config_lines(text)
    return Fragment(name=name, text=text, options=options, ignored=ignored)


def _packaging_members(packaging: Path) -> dict[str, str]:
    """``kernel/...`` files of a packaging archive or directory, by path relative to ``kernel/``."""
    wanted = re.compile(r"(?:^|/)kernel/((?:configs/fragments/.+\.conf)|kata_config_version)$")
    found: dict[str, str] = {}
    if packaging.is_dir():
        base = packaging / "kernel" if (packaging / "kernel").is_dir() else packaging
        for path in sorted(base.rglob("*")):
            m = wanted.search("kernel/" + path.relative_to(base).as_posix())
            if m and path.is_file():
                found[m.group(1)] = path.read_text(errors="replace")
        return found
    try:
        with tarfile.open(packaging) as tar:
            for member in tar:
                m = wanted.search(member.name)
                if m and member.isfile() and member.name.count("/") <= 6:
                    handle = tar.extractfile(member)
                    if handle is not None:
                        found[m.group(1)] = handle.read().decode(errors="replace")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise KataError(f"cannot read the packaging archive: {exc}", path=packaging)
    return found


def load_packaging(packaging: str | Path) -> KataKernelConfig:
    """Kata's kernel config inputs from a packaging archive (``kata-packaging-V.tar.xz``) or checkout."""
    packaging = Path(packaging)
    if not packaging.exists():
        raise KataError("no such Kata packaging archive or directory", path=packaging)
    members = _packaging_members(packaging)
    fragments = []
    for directory in FRAGMENT_DIRS:
        prefix = f"configs/fragments/{directory}/"
        names = sorted(n for n in members if n.startswith(prefix) and "/" not in n[len(prefix):])
        if not names:
            raise KataError(f"not a Kata packaging tree: no kernel/{prefix}*.conf", path=packaging)
        fragments += [parse_fragment(n.removeprefix("configs/fragments/"), members[n]) for n in names]
    version = members.get("kata_config_version", "").strip()
    if not re.fullmatch(r"[0-9A-Za-z._-]+", version):
        raise KataError("not a Kata packaging tree: kernel/kata_config_version missing or malformed",
                        path=packaging)
    whitelist = tuple(ln.strip() for ln in members.get("configs/fragments/whitelist.conf", "").splitlines()
                      if ln.strip() and not ln.lstrip().startswith("#"))
    return KataKernelConfig(source=packaging, fragments=tuple(fragments), whitelist=whitelist,
                            config_version=version)


def load_adaptations(path: Path = ADAPTATIONS) -> tuple[Adaptation, ...]:
    """The 6.1 adaptations, validated (one-line errors naming the file and the entry)."""
    try:
        data = tomli.loads(path.read_text())
    except (OSError, tomli.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read kernel adaptations: {exc}", path=path)
    result = []
    for i, entry in enumerate(data.get("option", []), start=1):
        where = f"[[option]] #{i} ({entry.get('name', '?')})"
        unknown = set(entry) - {"name", "action", "add", "reason"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}", path=path)
        name, action, add = entry.get("name", ""), entry.get("action"), entry.get("add", [])
        if not re.fullmatch(r"CONFIG_[A-Za-z0-9_]+", str(name)):
            raise ConfigError(f"{where}: name must be CONFIG_<SYMBOL>", path=path)
        if action not in ACTIONS:
            raise ConfigError(f"{where}: action must be one of {', '.join(ACTIONS)}", path=path)
        if not isinstance(add, list) or any(not _OPTION.match(str(a)) for a in add):
            raise ConfigError(f"{where}: add must be a list of CONFIG_X=value lines", path=path)
        if action in ("needs", "renamed") and not add:
            raise ConfigError(f"{where}: action {action} needs an add list", path=path)
        if not str(entry.get("reason", "")).strip():
            raise ConfigError(f"{where}: every adaptation needs a reason", path=path)
        result.append(Adaptation(name=name, action=action, add=tuple(add), reason=" ".join(entry["reason"].split())))
    return tuple(result)


def adaptation_fragment(adaptations: Iterable[Adaptation]) -> str:
    """The extra fragment merged after Kata's: the ``add`` lines, each once."""
    lines = ["# pytest-kata: adaptations of Kata's fragments to this kernel (kernel_adaptations.toml)"]
    for adaptation in adaptations:
        lines += [line for line in adaptation.add if line not in lines]
    return "\n".join(lines) + "\n"


def requested_options(config: KataKernelConfig, adaptations: Iterable[Adaptation]) -> dict[str, tuple[str, str]]:
    """Every option asked for, ``name -> (value, where)``; a later fragment wins, as in merge_config.sh."""
    requested: dict[str, tuple[str, str]] = {}
    for fragment in config.fragments:
        for name, value in fragment.options.items():
            requested[name] = (value, fragment.name)
    for adaptation in adaptations:
        for name, value in parse_config_lines("\n".join(adaptation.add))[0].items():
            requested[name] = (value, ADAPTATIONS.name)
    return requested


def kconfig_symbols(tree: Path) -> set[str]:
    """Every symbol a ``Kconfig*`` file of the source tree declares (``CONFIG_`` prefix added)."""
    symbols: set[str] = set()
    for path in tree.rglob("Kconfig*"):
        if path.is_file():
            symbols.update("CONFIG_" + s for s in _KCONFIG_SYMBOL.findall(path.read_text(errors="replace")))
    return symbols


# ---------------------------------------------------------------------------------------------- the check
@dataclass
class ConfigReport:
    """What became of the fragments' options in the merged ``.config``."""

    kernel_version: str
    requested: int
    present: int
    adaptations: list[dict] = field(default_factory=list)  # applied: name, action, add, reason
    dropped: list[dict] = field(default_factory=list)  # option, value, fragment, why
    ignored_lines: list[dict] = field(default_factory=list)  # fragment, line
    problems: list[str] = field(default_factory=list)


def _whitelisted(name: str, whitelist: Iterable[str]) -> bool:
    return any(re.search(pattern, name) for pattern in whitelist)


def check_config(config: KataKernelConfig, adaptations: tuple[Adaptation, ...], final: dict[str, str],
                 symbols: set[str], kernel_version: str) -> ConfigReport:
    """Compare what the fragments asked for with the merged ``.config``; ``problems`` lists the unexplained.

    An adaptation must also still be true of this kernel: ``removed``/``renamed`` options must be absent from
    its Kconfig and ``needs`` options present, so a stale entry is a problem rather than a silent drop.
    """
    by_name = {a.name: a for a in adaptations}
    requested = requested_options(config, adaptations)
    report = ConfigReport(kernel_version=kernel_version, requested=len(requested), present=0,
                          adaptations=[asdict(a) for a in adaptations])
    for adaptation in adaptations:
        exists = adaptation.name in symbols
        if adaptation.action in ("removed", "renamed") and exists:
            report.problems.append(f"{adaptation.name} is {adaptation.action} in {ADAPTATIONS.name} but exists "
                                   f"in linux {kernel_version}")
        elif adaptation.action == "needs" and not exists:
            report.problems.append(f"{adaptation.name} (action needs in {ADAPTATIONS.name}) does not exist "
                                   f"in linux {kernel_version}")
    for name, (value, origin) in requested.items():
        got = final.get(name, "n")
        if got == value:
            report.present += 1
            continue
        explained = by_name.get(name)
        drop = {"option": name, "value": value, "fragment": origin}
        if explained and explained.action in ("removed", "renamed") and name not in symbols:
            replaced = f" (replaced by {', '.join(explained.add)})" if explained.add else ""
            report.dropped.append({**drop, "why": f"{explained.action}{replaced}: {explained.reason}"})
        elif _whitelisted(name, config.whitelist):
            report.dropped.append({**drop, "why": "tolerated by Kata's whitelist.conf (dropped in newer kernels)"})
        elif name not in symbols:
            report.problems.append(f"{name}={value} ({origin}) does not exist in linux {kernel_version}")
        else:
            report.problems.append(f"{name}={value} ({origin}) is {got} in the merged .config "
                                   f"(dependencies not met)")
    for fragment in config.fragments:
        report.ignored_lines += [{"fragment": fragment.name, "line": line,
                                  "why": "no value: merge_config.sh ignores it"} for line in fragment.ignored]
    return report


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class KernelArtifacts:
    """A built Kata guest kernel, installed as Kata's ``install_kata`` lays it out."""

    dir: Path
    vmlinuz: Path  # bzImage, what qemu -kernel takes: vmlinuz-<kernel>-<kata_config_version>
    vmlinux: Path  # the uncompressed ELF
    config: Path  # config-<kernel>, the merged .config
    report: Path  # config-report.json: adaptations, dropped options, ignored lines
    kernel_version: str  # e.g. 6.1.192 (the guest's uname -r)
    config_version: str  # kata_config_version, e.g. 76
    built: bool = False  # True when this call built it, False on a cache hit

    @property
    def version(self) -> str:
        return f"{self.kernel_version}-{self.config_version}"

    @property
    def container(self) -> Path:
        """``vmlinuz.container``: the name Kata's configuration points at."""
        return self.dir / "vmlinuz.container"

    @classmethod
    def from_dir(cls, directory: Path, *, built: bool = False) -> KernelArtifacts:
        info = json.loads((directory / "kernel.json").read_text())
        return cls(dir=directory, vmlinuz=directory / info["vmlinuz"], vmlinux=directory / info["vmlinux"],
                   config=directory / info["config"], report=directory / "config-report.json",
                   kernel_version=info["kernel_version"], config_version=info["config_version"], built=built)


# ---------------------------------------------------------------------------------------------- source
def source_identity(source: Path) -> dict[str, str]:
    """sha256 and kernel version of a linux source tarball, memoised by path, size and mtime."""
    st = source.stat()
    memo = cache_dir() / CACHE_KIND / ".sources.json"
    stamp = f"{source.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp in known:
        return known[stamp]
    identity = {"sha256": sha256_file(source), "version": _tarball_kernel_version(source)}
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}")
    tmp.write_text(json.dumps({**known, stamp: identity}, indent=1))
    os.replace(tmp, memo)
    return identity


def makefile_version(text: str) -> str:
    """``VERSION.PATCHLEVEL.SUBLEVEL[EXTRAVERSION]`` of a kernel's top Makefile."""
    fields = dict(re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)\s*=[ \t]*(\S*)", text, re.MULTILINE))
    if not all(fields.get(k) for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL")):
        raise KataError("not a kernel Makefile: no VERSION/PATCHLEVEL/SUBLEVEL")
    return f"{fields['VERSION']}.{fields['PATCHLEVEL']}.{fields['SUBLEVEL']}{fields.get('EXTRAVERSION', '')}"


def _tarball_kernel_version(source: Path) -> str:
    try:
        with tarfile.open(source, mode="r|*") as tar:  # streamed: the top Makefile comes early
            for member in tar:
                if re.fullmatch(r"[^/]+/Makefile", member.name) and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return makefile_version(handle.read().decode(errors="replace"))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise KataError(f"cannot read the linux source tarball: {exc}", path=source)
    except KataError as exc:
        raise KataError(str(exc), path=source)
    raise KataError("not a linux source tarball: no top-level Makefile", path=source)


def _toolchain() -> str:
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        raise KataError("building the guest kernel needs gcc", hint="run scripts/setup")


def kernel_key(config: KataKernelConfig, adaptations_path: Path, source: dict[str, str], toolchain: str) -> str:
    """Content hash of everything that decides the kernel's bytes.

    The builder enters as the source of the functions that unpack, configure, compile and install (not the
    whole module), so a change to the checks or the messages does not cost a kernel build.
    """
    recipe = [inspect.getsource(fn) for fn in (_build_into, _build_env, _unpack, _make, _install)]
    return content_hash(BUILDER_VERSION, source, [(f.name, f.text) for f in config.fragments],
                        list(config.whitelist), config.config_version, adaptations_path, recipe,
                        toolchain, ARCH)[:20]


# ---------------------------------------------------------------------------------------------- building
def build_guest_kernel(packaging: str | Path, *, source: str | Path = DEFAULT_SOURCE,
                       adaptations_file: Path = ADAPTATIONS, progress: Progress = step,
                       force: bool = False) -> KernelArtifacts:
    """Build (or reuse from the cache) Kata's guest kernel from a packaging archive or directory.

    ``source`` is a linux source tarball (Debian's ``linux-source-6.1`` by default); ``adaptations_file`` says
    how that kernel differs from what Kata's fragments were written for.
    """
    config = load_packaging(packaging)
    adaptations = load_adaptations(adaptations_file)
    source = Path(source)
    if not source.is_file():
        raise KataError("no linux source tarball", path=source, hint="apt-get install linux-source-6.1 "
                        "(scripts/setup)")
    identity = source_identity(source)
    key = kernel_key(config, adaptations_file, identity, _toolchain())
    entry = f"{identity['version']}-{config.config_version}-{key}"
    final = cache_dir() / CACHE_KIND / entry
    if final.is_dir() and not force:
        progress(AREA, f"guest kernel {identity['version']}-{config.config_version}: cached ({final})")
        return KernelArtifacts.from_dir(final)
    log = cache_dir() / CACHE_KIND / f"{entry}.log"  # outside the build dir: kept when the build fails
    built = False

    def build(out: Path) -> None:
        nonlocal built
        work = out.parent / f".tmp-work-{entry}-{os.getpid()}"  # swept by cached() if this process dies
        safe_rmtree(work)
        work.mkdir()
        try:
            _build_into(config, adaptations, source, identity["version"], work, out, log, progress)
        finally:
            safe_rmtree(work)
        built = True

    start = time.monotonic()
    directory = cached(CACHE_KIND, entry, build, force=force)
    if built:
        progress(AREA, f"guest kernel {identity['version']}-{config.config_version} built in "
                       f"{time.monotonic() - start:.0f}s ({directory})")
    return KernelArtifacts.from_dir(directory, built=built)


def _build_into(config: KataKernelConfig, adaptations: tuple[Adaptation, ...], source: Path, version: str,
                work: Path, out: Path, log: Path, progress: Progress) -> None:
    tree = _unpack(source, work, progress)
    fragments = work / "fragments"
    paths = []
    for fragment in config.fragments:
        path = fragments / fragment.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(fragment.text)
        paths.append(path)
    extra = fragments / "pytest-kata-adaptations.conf"
    extra.write_text(adaptation_fragment(adaptations))
    paths.append(extra)
    env = _build_env(tree)
    with open(log, "w") as sink:
        progress(AREA, f"config: merging {len(config.fragments)} Kata fragments + {len(adaptations)} adaptations "
                       f"(merge_config.sh -r -n, allnoconfig base)")
        _run_logged(["nice", "-n", "10", str(tree / "scripts/kconfig/merge_config.sh"), "-r", "-n", *map(str, paths)],
                    tree, env, sink, log, "merge_config.sh")
        final, _ = parse_config_lines((tree / ".config").read_text())
        report = check_config(config, adaptations, final, kconfig_symbols(tree), version)
        (out / "config-report.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
        if report.problems:
            shutil.copy(tree / ".config", log.with_suffix(".config"))
            raise KataError(f"{len(report.problems)} Kata fragment option(s) not in the merged .config: "
                            f"{'; '.join(report.problems[:3])}", path=log.with_suffix(".config"),
                            hint=f"explain each in {ADAPTATIONS}")
        dropped = ", ".join(d["option"] for d in report.dropped)
        progress(AREA, f"config: {report.present}/{report.requested} requested options set, "
                       f"{len(report.dropped)} dropped as gone in {version} ({dropped})")
        progress(AREA, f"compile: nice -n 10 make -j{JOBS} ARCH={ARCH} bzImage (log: {log})")
        _make(tree, env, sink, log, progress)
    _install(tree, out, version, config.config_version)
    shutil.copy(log, out / "build.log")


def _build_env(tree: Path) -> dict[str, str]:
    """Reproducible-build settings (kbuild's own variables) and Kata's ARCH."""
    return {**os.environ, "ARCH": ARCH, "KCONFIG_CONFIG": ".config", "LC_ALL": "C",
            "KBUILD_BUILD_TIMESTAMP": time.strftime("%Y-%m-%d", time.gmtime(SOURCE_DATE_EPOCH)),
            "KBUILD_BUILD_USER": "pytest-kata", "KBUILD_BUILD_HOST": "pytest-kata", "KBUILD_BUILD_VERSION": "1"}


def _unpack(source: Path, work: Path, progress: Progress) -> Path:
    """Stream the tarball into ``tar -xJ`` with a percentage of the compressed bytes read."""
    size = source.stat().st_size
    progress(AREA, f"unpack: {source} ({size / 1e6:.0f} MB)")
    try:
        proc = subprocess.Popen(["nice", "-n", "10", "tar", "-xJf", "-", "-C", str(work)],
                                stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise KataError("tar is not installed", hint="run scripts/setup")
    assert proc.stdin is not None and proc.stderr is not None
    done, shown = 0, 0
    try:
        with open(source, "rb") as fh:
            while block := fh.read(1 << 20):
                proc.stdin.write(block)
                done += len(block)
                if done * 10 // size > shown:
                    shown = done * 10 // size
                    progress(AREA, f"unpack: {shown * 10}%")
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0:
        raise KataError(f"unpacking failed: {err.strip().splitlines()[-1] if err.strip() else 'tar failed'}",
                        path=source)
    tops = [p for p in work.iterdir() if p.is_dir() and (p / "Makefile").is_file()]
    if len(tops) != 1:
        raise KataError("not a linux source tarball: no single top directory with a Makefile", path=source)
    return tops[0]


def log_tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    """The telling end of a build log: the first compiler error if any, else the last lines."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in kept if re.search(r"\berror\b|\*\*\*", ln, re.IGNORECASE)]
    chosen = errors[:lines] if errors else kept[-lines:]
    return " | ".join(chosen)[:600] or "no output"


def _run_logged(argv: list[str], tree: Path, env: dict[str, str], sink, log: Path, what: str) -> None:
    sink.write(f"$ {' '.join(argv)}\n")
    sink.flush()
    proc = subprocess.run(argv, cwd=tree, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sink.flush()
        raise KataError(f"{what} failed (exit {proc.returncode}): {log_tail(log.read_text(errors='replace'))}",
                        path=log)


def _make(tree: Path, env: dict[str, str], sink, log: Path, progress: Progress) -> None:
    argv = ["nice", "-n", "10", "make", f"-j{JOBS}", f"ARCH={ARCH}", "bzImage"]
    sink.write(f"$ {' '.join(argv)}\n")
    sink.flush()
    try:
        proc = subprocess.Popen(argv, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
    except FileNotFoundError:
        raise KataError("building the guest kernel needs make", hint="run scripts/setup")
    assert proc.stdout is not None
    steps, shown, last = 0, -1, time.monotonic()
    try:
        for line in proc.stdout:
            sink.write(line)
            if _COMPILE_STEP.match(line):
                steps += 1
            percent = min(99, steps * 100 // COMPILE_STEPS_ESTIMATE)
            if percent >= shown + 10 or (time.monotonic() - last > 60 and percent != shown):
                shown, last = percent, time.monotonic()
                progress(AREA, f"compile: ~{percent}% ({steps} files)")
    except BaseException:  # Ctrl-C or a progress callback failing: stop make and its compilers
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    sink.flush()
    if proc.wait() != 0:
        raise KataError(f"kernel build failed (exit {proc.returncode}): {log_tail(log.read_text(errors='replace'))}",
                        path=log)
    progress(AREA, f"compile: done ({steps} files)")


def _install(tree: Path, out: Path, version: str, config_version: str) -> None:
    """Lay the kernel out as Kata's install_kata does."""
    vmlinuz, vmlinux, config = f"vmlinuz-{version}-{config_version}", f"vmlinux-{version}-{config_version}", \
        f"config-{version}"
    bzimage = tree / "arch" / ARCH / "boot" / "bzImage"
    if not bzimage.is_file():
        bzimage = tree / "arch/x86/boot/bzImage"
    shutil.copy(bzimage, out / vmlinuz)
    shutil.copy(tree / "vmlinux", out / vmlinux)
    shutil.copy(tree / ".config", out / config)
    for name in (vmlinuz, vmlinux, config):
        os.chmod(out / name, 0o644)
    (out / "vmlinuz.container").symlink_to(vmlinuz)
    (out / "vmlinux.container").symlink_to(vmlinux)
    (out / "kernel.json").write_text(json.dumps({
        "kernel_version": version, "config_version": config_version, "vmlinuz": vmlinuz, "vmlinux": vmlinux,
        "config": config, "arch": ARCH, "builder_version": BUILDER_VERSION}, indent=1) + "\n")
