"""A private containerd (own root, state, socket and config under a work directory), so that tests never touch
a system containerd or its images; the one way the harness starts a containerd (:func:`launch_containerd`),
also for the installer's sysroot containerd."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from pytest_kata import runid
from pytest_kata.progress import timed
from pytest_kata.resources import cache_dir
from pytest_kata.services.cleanup import (
    kill_cgroup_processes,
    kill_processes_mentioning,
    mounts_under,
    prune_containerd_run_dirs,
    remove_cgroups,
    remove_runc_state,
    unmount_under,
)
from pytest_kata.services.records import (
    DaemonRecord,
    ServiceError,
    await_daemon,
    one_line,
    spawn_daemon,
    stop_process,
)

_DISABLED_PLUGINS = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs",
                     "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
                     "io.containerd.snapshotter.v1.zfs"]


@dataclass
class Containerd:
    """A private containerd: ``.ctr(...)`` drives it with its own socket and namespace."""

    workdir: Path
    socket: Path
    namespace: str
    run_id: str
    record: DaemonRecord
    log: Path
    owns_workdir: bool = False

    @property
    def pid(self) -> int:
        return self.record.pid

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a SOCKET -n NAMESPACE ARGS...``; a failure raises :class:`ServiceError` when ``check``."""
        argv = ["ctr", "-a", str(self.socket), "-n", self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise ServiceError(f"ctr {' '.join(args)} failed with exit {proc.returncode}: "
                               f"{one_line(proc.stderr or proc.stdout)}", path=str(self.socket))
        return proc

    def import_image(self, tar: str | Path, *, base_name: str | None = None) -> list[str]:
        """Import an OCI/docker archive; returns the image names containerd now knows."""
        args = ["images", "import"]
        if base_name:
            args += ["--base-name", base_name]
        before = set(self.images())
        self.ctr(*args, str(tar))
        return sorted(set(self.images()) - before) or self.images()

    def images(self) -> list[str]:
        return [line for line in self.ctr("images", "ls", "-q").stdout.split() if line]

    def stop(self, *, timeout: float = 15.0) -> None:
        """Stop containerd and its shims by pid, unmount what it left, and remove its work directory."""
        for task in self._tasks():
            self.ctr("tasks", "kill", "-s", "SIGKILL", task, check=False, timeout=30)
            self.ctr("tasks", "delete", task, check=False, timeout=30)
        stop_process(self.record, timeout=timeout)
        kill_processes_mentioning(str(self.socket))
        if runid.run_id_of(self.namespace):
            kill_cgroup_processes(self.namespace)
        unmount_under(self.workdir)
        remove_cgroups(self.namespace)
        remove_runc_state(self.namespace)
        prune_containerd_run_dirs()
        if self.owns_workdir and not mounts_under(self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _tasks(self) -> list[str]:
        if not self.record.matches():
            return []
        proc = self.ctr("tasks", "ls", "-q", check=False, timeout=30)
        return proc.stdout.split() if proc.returncode == 0 else []

    def __enter__(self) -> Containerd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def containerd_config(workdir: Path) -> dict:
    """``containerd config default`` with every path moved under ``workdir`` (nothing in /var, /run, /opt)."""
    proc = subprocess.run(["containerd", "config", "default"], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ServiceError(f"containerd config default failed: {one_line(proc.stderr)}", path="containerd")
    config = tomllib.loads(proc.stdout)
    config["root"] = str(workdir / "root")
    config["state"] = str(workdir / "state")
    config["grpc"]["address"] = str(workdir / "containerd.sock")
    config.setdefault("ttrpc", {})["address"] = ""
    config.setdefault("debug", {})["address"] = ""
    config.setdefault("metrics", {})["address"] = ""
    config["disabled_plugins"] = sorted(set(config.get("disabled_plugins", [])) | set(_DISABLED_PLUGINS))
    config["plugins"].pop("io.containerd.grpc.v1.cri", None)
    config["plugins"].setdefault("io.containerd.internal.v1.opt", {})["path"] = str(workdir / "opt")
    return config


# containerd in a mount namespace of its own whose mounts are shared among themselves (what Kata's shim needs
# of ``/``) and with the host's in neither direction: private first cuts the copies off the host's peer groups
PRIVATE_MOUNTS_ARGV = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount --make-rshared / && exec "$0" "$@"']


def ctr_answers(socket: str | Path, *, timeout: float = 10.0) -> bool:
    """Whether a containerd serves ``socket`` (``ctr version`` gets the server's version)."""
    if not Path(socket).exists():
        return False
    proc = subprocess.run(["ctr", "-a", str(socket), "version"], capture_output=True, timeout=timeout)
    return proc.returncode == 0


def launch_containerd(config: Path, socket: Path, *, run_id: str, log: Path, timeout: float,
                      on_timeout: Callable[[DaemonRecord], object], env: dict[str, str] | None = None,
                      private_mounts: bool = False) -> tuple[subprocess.Popen[bytes], DaemonRecord]:
    """Start ``containerd --config CONFIG``, record it for the run and wait until it answers on ``socket``;
    ``on_timeout(record)`` takes down one that never does. The one way the harness starts a containerd."""
    argv = [*(PRIVATE_MOUNTS_ARGV if private_mounts else []), "containerd", "--config", str(config)]
    proc, record = spawn_daemon("containerd", argv, run_id=run_id, log=log, env=env)
    await_daemon("containerd", proc, record, log=log, ready=lambda: ctr_answers(socket), timeout=timeout,
                 on_timeout=lambda: on_timeout(record))
    return proc, record


def start_containerd(workdir: str | Path | None = None, run_id: str | None = None, *,
                     namespace: str | None = None, timeout: float = 60.0, private_mounts: bool = False,
                     path: Sequence[str | Path] = (), env: dict[str, str] | None = None) -> Containerd:
    """Start a private containerd under ``workdir`` (default ``cache_dir()/runs/<run-id>/containerd-N``).

    The namespace defaults to the run id, so that the cgroups of its containers (``/<namespace>/<id>``)
    carry the run id too and a sweep can find them. ``path``: directories put before ``$PATH`` for it (where
    it finds a shim such as ``containerd-shim-kata-v2``); ``env``: variables for it and its shims (e.g. Kata's
    ``KATA_CONF_FILE``). ``private_mounts``: run it (and so its shims and
    their VMs) in its own mount namespace with ``/`` shared inside it, which Kata's shim needs to share the
    container rootfs; the host's propagation is never changed, and every mount made in there goes away with
    the last process of the namespace.
    """
    run_id = run_id or runid.current_run_id()
    for tool in ("containerd", "ctr"):
        if not shutil.which(tool):
            raise ServiceError(f"{tool} is not installed", path=tool, hint="apt-get install containerd runc")
    owns = workdir is None
    if workdir is None:
        base = cache_dir() / "runs" / run_id
        base.mkdir(parents=True, exist_ok=True)
        workdir = Path(unique_dir(base, "containerd"))
    workdir = Path(workdir).resolve()
    if not workdir.exists():
        owns = True
    workdir.mkdir(parents=True, exist_ok=True)
    socket = workdir / "containerd.sock"
    if len(str(socket)) > 100:
        raise ServiceError("work directory path too long for a unix socket (over 100 characters)", path=workdir,
                           hint="use a shorter work directory")
    config = containerd_config(workdir)
    (workdir / "config.toml").write_text(tomli_w.dumps(config))
    log = workdir / "containerd.log"
    environ = {**os.environ, **(env or {})}
    if path:
        environ["PATH"] = os.pathsep.join([*(str(p) for p in path), environ.get("PATH", os.defpath)])

    def manager(record: DaemonRecord) -> Containerd:
        return Containerd(workdir, socket, namespace or run_id, run_id, record, log, owns_workdir=owns)

    with timed("containerd", f"starting containerd on {socket}"):
        _proc, record = launch_containerd(workdir / "config.toml", socket, run_id=run_id, log=log, env=environ,
                                          timeout=timeout, private_mounts=private_mounts,
                                          on_timeout=lambda record: manager(record).stop())
    ctd = manager(record)
    return ctd



def unique_dir(base: Path, stem: str) -> Path:
    for n in range(1000):
        candidate = base / f"{stem}-{os.getpid()}-{n}"
        if not candidate.exists():
            return candidate
    raise ServiceError("no free work directory name", path=base)


def build_busybox_oci(out: str | Path, *, name: str = "docker.io/pytest-kata/busybox:1",
                      busybox: str | Path = "/bin/busybox") -> Path:
    """Write an OCI-layout tar with one layer: static busybox and its applet links (no registry needed)."""
    busybox = Path(busybox)
    if not busybox.is_file():
        raise ServiceError("static busybox not found", path=busybox, hint="apt-get install busybox-static")
    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer_tar:
        for d in ("bin", "proc", "sys", "dev", "etc", "tmp"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            layer_tar.addfile(info)
        layer_tar.add(str(busybox), arcname="bin/busybox")
        for applet in ("sh", "uname", "cat", "ls", "id", "hostname", "ps", "mount", "echo", "sleep", "ip",
                       "ping", "wget", "nc", "grep", "true", "false"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            layer_tar.addfile(info)
        for fname, data in (("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"), ("etc/group", b"root:x:0:\n")):
            info = tarfile.TarInfo(fname)
            info.size = len(data)
            layer_tar.addfile(info, io.BytesIO(data))
    layer = layer_buf.getvalue()
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return "sha256:" + digest, len(data)

    layer_digest, layer_size = blob(gzip.compress(layer, mtime=0))
    config = {"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
              "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    config_digest, config_size = blob(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                           "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                            "size": layer_size}]}
    manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
    ref = name.split("/", 1)[-1]
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": name}}]}
    out = Path(out)
    with tarfile.open(out, "w") as oci:
        def add(member: str, data: bytes) -> None:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            oci.addfile(info, io.BytesIO(data))

        add("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        add("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            add(f"blobs/sha256/{digest}", data)
    return out
