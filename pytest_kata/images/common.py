"""Image building blocks: rootfs (mmdebstrap), raw ext4 disks, initrds, a content-hash cache, the host kernel.

Why this shape:

* **No mounts, no loop devices.** ``mkfs.ext4 -d DIR -E offset=N`` writes the filesystem straight into
  partition 1 of a raw disk file and ``sfdisk`` writes the partition table around it, which is the layout
  Kata's osbuilder ``image_builder.sh`` produces (msdos label, one primary ext4 partition) without needing
  ``losetup``/``mount`` (unavailable in many CI containers, and a leak risk when a build dies).
* **Reproducible.** Timestamps are pinned to :data:`SOURCE_DATE_EPOCH`, the filesystem UUID and hash seed are
  derived from the content, the initrd is written by a small deterministic cpio writer (sorted names, fixed
  mtimes, owner 0, sequential inode numbers), and compressors get fixed headers. The same tree gives the same
  bytes.
* **Cached by content hash, safely under concurrency.** :func:`cached` builds into a temporary directory and
  renames it into place under a file lock, so parallel builders (xdist workers, two CLI runs) never see or
  produce a half-written image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pytest_kata.errors import KataError
from pytest_kata.hashing import sha256_file as _sha256_file
from pytest_kata.locking import exclusive
from pytest_kata.progress import step
from pytest_kata.resources import cache_dir

AREA = "image"
# A fixed, documented epoch (2023-11-14) for every timestamp written into an image; override with
# SOURCE_DATE_EPOCH like every reproducible-builds tool.
SOURCE_DATE_EPOCH = int(os.environ.get("SOURCE_DATE_EPOCH", "1700000000"))
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
MiB = 1024 * 1024
PARTITION_OFFSET = 1 * MiB  # partition 1 starts at sector 2048, as parted/sfdisk align it
LINUX_GPT_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"


# ---------------------------------------------------------------------------------------------- processes
def run_tool(cmd: Sequence[str | Path], *, what: str, path: str | Path | None = None,
             env: dict[str, str] | None = None, input: bytes | None = None) -> subprocess.CompletedProcess:
    """Run an external tool; a failure becomes one line naming the tool and its most telling error line."""
    argv = [str(c) for c in cmd]
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise KataError(f"{what}: {argv[0]} is not installed", path=path,
                        hint="install its Debian package; a checkout's scripts/setup installs them all")
    if proc.returncode != 0:
        why = _telling_line(proc.stderr or proc.stdout)
        raise KataError(f"{what} failed (exit {proc.returncode}): {why}", path=path)
    return proc


def _telling_line(output: bytes | str) -> str:
    """The line of a tool's output that says what went wrong (dpkg's and apt's own words first)."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "error processing package" in line:  # dpkg: the package, then the reason on the next line
            return f"{line} {lines[i + 1] if i + 1 < len(lines) else ''}".strip()[:300]
    generic = ("E: setup failed", "E: mmdebstrap failed", "E: run_install() failed")
    errors = [ln for ln in lines if ln.startswith(("E:", "error", "Error", "ERROR")) and not ln.startswith(generic)]
    return (errors[0] if errors else lines[-1] if lines else "no output")[:300]


# ---------------------------------------------------------------------------------------------- mmdebstrap
def mirror_spec(suite: str = "bookworm") -> list[str]:
    """The mirror argument for mmdebstrap: the machine's deb822 sources (so updates and security are in)."""
    if suite == "bookworm" and DEBIAN_SOURCES.exists():
        return [str(DEBIAN_SOURCES)]
    return []  # mmdebstrap's default: deb.debian.org for the suite


def mmdebstrap(target_dir: str | Path, *, suite: str = "bookworm", variant: str = "minbase",
               include: Iterable[str] = (), extra_args: Sequence[str] = (), label: str | None = None) -> None:
    """Build a Debian rootfs directory with mmdebstrap, streaming its progress lines.

    ``variant="custom"`` must include ``dpkg`` (mmdebstrap installs with it); use ``extract`` for an
    unpack-only tree. An unknown package or an unreachable mirror ends in one line with apt's own error.
    """
    target = Path(target_dir)
    if target.exists() and any(target.iterdir()):
        raise KataError("mmdebstrap target is not empty", path=target)
    packages = sorted(set(include))
    cmd = ["mmdebstrap", f"--variant={variant}", "--aptopt=Acquire::Retries \"3\"",
           "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
           "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/locale/*",
           "--dpkgopt=path-exclude=/usr/share/info/*"]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [*extra_args, suite, str(target), *mirror_spec(suite)]
    name = label or target.name
    step(AREA, f"mmdebstrap {variant} {suite} -> {name} ({len(packages)} packages requested)")
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH), "LC_ALL": "C.UTF-8"}
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    except FileNotFoundError:
        raise KataError("mmdebstrap is not installed", hint="apt-get install mmdebstrap")
    tail: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            continue
        tail = [*tail[-40:], line]
        if line.startswith("I: "):
            step(AREA, f"mmdebstrap {name}: {line[3:]}")
    if proc.wait() != 0:
        why = _telling_line("\n".join(tail))
        raise KataError(f"mmdebstrap {variant} {suite} failed: {why}", path=target,
                        hint="check the recipe's package names")


# ---------------------------------------------------------------------------------------------- trees
def normalize_tree(root: Path, epoch: int = SOURCE_DATE_EPOCH) -> None:
    """Pin every atime/mtime in ``root`` to ``epoch`` (symlinks included) so images built from it match."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(dirpath, name), (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))


def walk_sorted(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """``(relative posix path, lstat)`` of every entry under ``root``, parents before children, sorted."""
    def _walk(rel: str) -> Iterator[tuple[str, os.stat_result]]:
        base = root / rel if rel else root
        for name in sorted(os.listdir(base)):
            child = f"{rel}/{name}" if rel else name
            st = os.lstat(root / child)
            yield child, st
            if stat.S_ISDIR(st.st_mode):
                yield from _walk(child)
    yield from _walk("")


def tree_manifest(root: Path) -> list[dict]:
    """A sorted listing (path, type, mode, owner, size, sha256 or target): the image's content record."""
    entries = []
    for rel, st in walk_sorted(root):
        entry: dict = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid}
        if stat.S_ISLNK(st.st_mode):
            entry.update(type="symlink", target=os.readlink(root / rel))
        elif stat.S_ISDIR(st.st_mode):
            entry.update(type="dir")
        elif stat.S_ISREG(st.st_mode):
            entry.update(type="file", size=st.st_size, sha256=_sha256_file(root / rel))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry.update(type="chr" if stat.S_ISCHR(st.st_mode) else "blk",
                         rdev=[os.major(st.st_rdev), os.minor(st.st_rdev)])
        else:
            entry.update(type="other")
        entries.append(entry)
    return entries


def tree_size(root: Path) -> tuple[int, int]:
    """(bytes rounded to 4 KiB blocks, number of inodes) of a tree, to size a filesystem for it."""
    total, count = 0, 1
    for _rel, st in walk_sorted(root):
        count += 1
        total += 4096 if not stat.S_ISREG(st.st_mode) else -(-st.st_size // 4096) * 4096
    return total, count


# ---------------------------------------------------------------------------------------------- ext4
def _fs_size_for(root: Path, size: int | None) -> tuple[int, int]:
    data, inodes = tree_size(root)
    if size is None:
        # Slack for metadata (journal, inode tables, directories): 25 % + 24 MiB, rounded up to a MiB.
        size = data + data // 4 + 24 * MiB
        size = -(-size // MiB) * MiB
    if size % 4096:
        raise KataError(f"filesystem size {size} is not a multiple of 4096", path=root)
    return size, inodes + inodes // 2 + 1024


def _deterministic_uuid(root: Path, salt: str) -> str:
    seed = hashlib.sha256(f"{salt}\0{content_hash(root)}".encode()).digest()[:16]
    return str(uuid.UUID(bytes=seed, version=4))


def make_ext4_fs(rootdir: str | Path, out: str | Path, *, size: int | None = None, label: str = "rootfs",
                 offset: int = 0, fs_uuid: str | None = None) -> int:
    """Write an ext4 filesystem holding ``rootdir`` into ``out`` (at byte ``offset``); returns its size.

    Owners are kept from the tree (root-owned when built as root). Timestamps, the UUID and the directory hash
    seed are pinned so that the same tree gives the same bytes. ``out`` is created when missing, and only
    grown, never truncated, so a partition table written before is kept.
    """
    root, target = Path(rootdir), Path(out)
    if not root.is_dir():
        raise KataError("not a directory, cannot make an ext4 filesystem from it", path=root)
    fs_size, inodes = _fs_size_for(root, size)
    fs_uuid = fs_uuid or _deterministic_uuid(root, label)
    normalize_tree(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "ab") as f:
        if f.tell() < offset + fs_size:
            f.truncate(offset + fs_size)
    extended = [f"hash_seed={fs_uuid}", "lazy_itable_init=0", "nodiscard"]
    if offset:
        extended.append(f"offset={offset}")
    run_tool(["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", str(inodes), "-L", label[:16], "-U", fs_uuid,
              "-m", "0", "-E", ",".join(extended), "-d", root, target, f"{fs_size // 1024}k"],
             what="mkfs.ext4", path=target, env={"E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH)})
    _pin_ctimes(target, offset)
    return fs_size


def _pin_ctimes(image: Path, offset: int) -> None:
    """mkfs.ext4 -d copies each source inode's ctime (which no tool can set) and atime (which reading the tree
    moves under relatime); pin both with debugfs."""
    spec = f"{image}?offset={offset}" if offset else str(image)
    inodes = run_tool(["debugfs", "-R", "stats", spec], what="debugfs stats", path=image).stdout.decode()
    m = re.search(r"Inode count:\s+(\d+)", inodes)
    free = re.search(r"Free inodes:\s+(\d+)", inodes)
    if not m or not free:
        return
    used = int(m.group(1)) - int(free.group(1))
    # Inodes are allocated in order; 11 is the first non-reserved one. A little headroom covers gaps.
    last = 11 + used + 16
    script = "".join(f"sif <{ino}> {field} @{SOURCE_DATE_EPOCH}\n"
                     for ino in range(2, last) for field in ("ctime", "atime"))
    subprocess.run(["debugfs", "-w", "-f", "-", spec], input=script.encode(), capture_output=True,
                   env={**os.environ, "E2FSPROGS_FAKE_TIME": str(SOURCE_DATE_EPOCH)})


@dataclass(frozen=True)
class Ext4Disk:
    """Where the filesystem sits inside a raw disk (what ``debugfs img?offset=N`` and qemu need)."""

    path: Path
    size: int
    partitioned: bool
    table: str | None
    partition_offset: int
    partition_size: int


def make_ext4_disk(rootdir: str | Path, out_img: str | Path, *, size: int | None = None,
                   partitioned: bool = True, label: str = "rootfs", table: str = "msdos") -> Ext4Disk:
    """A raw disk image like osbuilder's: a partition table and ext4 in partition 1 (or a bare fs).

    ``size`` is the filesystem size (default: fitted to the tree). The partition starts at 1 MiB; with
    ``table="gpt"`` the disk has 1 MiB more at the end for the backup GPT.
    """
    root, target = Path(rootdir), Path(out_img)
    if not root.is_dir():
        raise KataError("not a directory, cannot make a disk image from it", path=root)
    if table not in ("msdos", "gpt"):
        raise KataError(f"unknown partition table {table!r} (use msdos or gpt)", path=target)
    target.unlink(missing_ok=True)
    if not partitioned:
        fs_size = make_ext4_fs(root, target, size=size, label=label)
        return Ext4Disk(target, fs_size, False, None, 0, fs_size)
    fs_size, _ = _fs_size_for(root, size)
    tail = MiB if table == "gpt" else 0
    disk_size = PARTITION_OFFSET + fs_size + tail
    with open(target, "wb") as f:
        f.truncate(disk_size)
    fs_uuid = _deterministic_uuid(root, label)
    make_ext4_fs(root, target, size=fs_size, label=label, offset=PARTITION_OFFSET, fs_uuid=fs_uuid)
    start, sectors = PARTITION_OFFSET // 512, fs_size // 512
    disk_id = hashlib.sha256(fs_uuid.encode()).hexdigest()
    if table == "msdos":
        script = (f"label: dos\nlabel-id: 0x{disk_id[:8]}\nunit: sectors\n\n"
                  f"start={start}, size={sectors}, type=83\n")
    else:
        part_uuid = str(uuid.UUID(disk_id[8:40]))
        script = (f"label: gpt\nlabel-id: {uuid.UUID(disk_id[:32])}\nunit: sectors\n\n"
                  f"start={start}, size={sectors}, type={LINUX_GPT_TYPE}, uuid={part_uuid}, "
                  f"name=\"{label}\"\n")
    run_tool(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never",
              "--wipe-partitions", "never", target], what="sfdisk", path=target, input=script.encode())
    return Ext4Disk(target, disk_size, True, table, PARTITION_OFFSET, fs_size)


# ---------------------------------------------------------------------------------------------- initrd
def _newc_header(ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, size: int,
                 rdev_major: int, rdev_minor: int, name: bytes) -> bytes:
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev_major, rdev_minor, len(name) + 1, 0)
    header = b"070701" + b"".join(b"%08X" % v for v in fields) + name + b"\0"
    return header + b"\0" * (-len(header) % 4)


def write_cpio_newc(root: Path, sink, *, epoch: int = SOURCE_DATE_EPOCH) -> int:
    """Write ``root`` as a cpio newc archive (sorted, owner 0, fixed mtime); returns the number of entries.

    A dedicated writer instead of ``find | cpio`` because it needs no pre-pass over the tree and gives
    sequential inode numbers and a stable order on every filesystem. Hard links are stored as copies.
    """
    count = 0
    for ino, (rel, st) in enumerate(walk_sorted(root), start=1):
        name, mode = rel.encode(), st.st_mode
        data = b""
        if stat.S_ISLNK(mode):
            data = os.readlink(root / rel).encode()
        elif stat.S_ISREG(mode):
            data = (root / rel).read_bytes()
        elif not (stat.S_ISDIR(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                  or stat.S_ISFIFO(mode)):
            continue  # sockets: meaningless in an archive
        is_dev = stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if is_dev else (0, 0)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        sink.write(_newc_header(ino, mode, 0, 0, nlink, epoch, len(data), *rdev, name))
        sink.write(data + b"\0" * (-len(data) % 4))
        count += 1
    sink.write(_newc_header(0, 0, 0, 0, 1, 0, 0, 0, 0, b"TRAILER!!!"))
    return count


def make_initrd(rootdir: str | Path, out: str | Path, compress: str = "gzip") -> int:
    """Pack ``rootdir`` into an initramfs (cpio newc, gzip or zstd; both built into Debian's kernel).

    Deterministic: sorted names, owner 0, mtimes at :data:`SOURCE_DATE_EPOCH`, no name or time in the gzip
    header. Returns the number of archive entries.
    """
    root, target = Path(rootdir), Path(out)
    if not root.is_dir():
        raise KataError("not a directory, cannot make an initrd from it", path=root)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as raw:
        if compress == "gzip":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as sink:
                count = write_cpio_newc(root, sink)
        elif compress == "zstd":
            import zstandard

            with zstandard.ZstdCompressor(level=12, write_checksum=True).stream_writer(raw) as sink:
                count = write_cpio_newc(root, sink)
        elif compress == "none":
            count = write_cpio_newc(root, raw)
        else:
            raise KataError(f"unknown initrd compression {compress!r} (use gzip, zstd or none)", path=target)
    os.replace(partial, target)
    return count


# ---------------------------------------------------------------------------------------------- tarball
def _tar_members(root: Path) -> Iterator[tuple[str, Path]]:
    yield ".", root
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            full = Path(dirpath, name)
            yield "./" + full.relative_to(root).as_posix(), full


def write_tarball(root: Path, out: Path) -> None:
    """A kata-static-style ``.tar.zst``: members ``./opt/kata/...``, owner 0, fixed mtime, sorted order."""
    import zstandard

    partial = out.with_name(out.name + ".partial")
    with open(partial, "wb") as raw, \
            zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw) as sink, \
            tarfile.open(fileobj=sink, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        entries = sorted(_tar_members(root), key=lambda m: m[0])
        for name, path in entries:
            info = tar.gettarinfo(str(path), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = SOURCE_DATE_EPOCH
            if info.islnk():  # a hard link inside the tree: store the content again, keep it simple
                info.type, info.linkname, info.size = tarfile.REGTYPE, "", path.stat().st_size
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    os.replace(partial, out)


# ---------------------------------------------------------------------------------------------- hashing
def content_hash(*parts: object) -> str:
    """sha256 over strings, bytes, JSON-able data, files and directory trees (names, modes, links, contents).

    Each part is tagged with its kind and length so that different splits never collide.
    """
    h = hashlib.sha256()

    def feed(tag: str, payload: bytes) -> None:
        h.update(f"{tag}:{len(payload)}:".encode())
        h.update(payload)

    for part in parts:
        if isinstance(part, Path):
            if part.is_dir():
                for rel, st in walk_sorted(part):
                    feed("entry", f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode):o}".encode())
                    if stat.S_ISLNK(st.st_mode):
                        feed("link", os.readlink(part / rel).encode())
                    elif stat.S_ISREG(st.st_mode):
                        feed("file", bytes.fromhex(_sha256_file(part / rel)))
            elif part.exists():
                feed("file", bytes.fromhex(_sha256_file(part)))
            else:
                feed("missing", str(part).encode())
        elif isinstance(part, bytes):
            feed("bytes", part)
        elif isinstance(part, str):
            feed("str", part.encode())
        else:
            feed("json", json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- cleanup
def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (mmdebstrap mounts proc/sys/dev inside a rootfs while it installs)."""
    prefix = os.path.realpath(path)
    found = []
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def safe_rmtree(path: Path) -> None:
    """Remove a build tree, first unmounting anything a killed mmdebstrap left mounted inside it.

    ``shutil.rmtree`` would otherwise walk into a leftover ``/proc`` or ``/dev`` bind mount; if a mount cannot
    be removed, the tree is left alone rather than risk deleting through it.
    """
    if not os.path.lexists(path):
        return
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    left = mounts_under(path)
    if left:
        step(AREA, f"not removing {path}: still mounted inside ({left[0]})")
        return
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- cache
def cached(kind: str, key: str, build_fn: Callable[[Path], object], *, force: bool = False) -> Path:
    """``cache_dir()/<kind>/<key>``, built by ``build_fn(tmpdir)`` once and reused by content hash.

    ``build_fn`` fills the empty directory it is given. The result is renamed into place only when the build
    succeeded (an exclusive lock serialises concurrent builders of the same key; the others wait and
    then reuse it), so a crash or Ctrl-C never leaves a half-built entry that a later run would trust.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", kind) or not re.fullmatch(r"[A-Za-z0-9._-]+", key):
        raise KataError(f"invalid cache kind/key {kind!r}/{key!r}")
    base = cache_dir() / kind
    base.mkdir(parents=True, exist_ok=True)
    final = base / key
    if final.is_dir() and not force:
        return final
    with exclusive(base / f".{key}.lock"):
        if final.is_dir() and not force:
            return final  # another builder finished while we waited
        _sweep_stale_temps(base)
        tmp = base / f".tmp-{key}-{os.getpid()}"
        safe_rmtree(tmp)
        tmp.mkdir()
        try:
            build_fn(tmp)
        except BaseException:
            safe_rmtree(tmp)
            raise
        if final.exists():
            trash = base / f".old-{key}-{os.getpid()}"
            os.rename(final, trash)
            safe_rmtree(trash)
        os.rename(tmp, final)
    return final


def _sweep_stale_temps(base: Path) -> None:
    """Remove temp dirs of builders that died (their pid is gone)."""
    for entry in base.glob(".tmp-*"):
        m = re.search(r"-(\d+)$", entry.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            safe_rmtree(entry)
        except PermissionError:
            pass


# ---------------------------------------------------------------------------------------------- kernel
class HostKernel(NamedTuple):
    """The Debian kernel in /boot: the reference guest kernel (virtio, ext4 and vsock are modules in it)."""

    vmlinuz: Path
    initrd: Path | None
    config: Path
    release: str

    @property
    def modules_dir(self) -> Path:
        return Path("/lib/modules") / self.release

    @property
    def upstream_version(self) -> str:
        """``6.1.192`` for release ``6.1.0-56-amd64`` (Debian's ABI name hides it; the package has it)."""
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", f"linux-image-{self.release}"],
                              capture_output=True, text=True)
        version = proc.stdout.strip().split("-")[0]
        return version or self.release.split("-")[0]


def host_kernel(boot: str | Path = "/boot") -> HostKernel:
    """The newest Debian kernel installed in ``boot`` (``vmlinuz-<release>`` with its config and modules)."""
    from debian.debian_support import Version

    boot = Path(boot)
    found = []
    for vmlinuz in boot.glob("vmlinuz-*"):
        release = vmlinuz.name.removeprefix("vmlinuz-")
        config = boot / f"config-{release}"
        if config.exists():
            found.append((Version(release.replace("-amd64", "")), release, vmlinuz, config))
    if not found:
        raise KataError("no Debian kernel (vmlinuz-* with config-*) found", path=boot,
                        hint="apt-get install linux-image-amd64")
    _, release, vmlinuz, config = max(found)
    initrd = boot / f"initrd.img-{release}"
    return HostKernel(vmlinuz, initrd if initrd.exists() else None, config, release)
