"""The isolation probe: where the script lives, how its output is parsed, and how it is packaged.

The probe is one POSIX-sh script (``pytest_kata/data/probe/probe.sh``) so that the same facts come out of a
runc container, a Kata container and a bare guest booted by the direct driver. For ``ctr`` it is packaged as
an OCI-layout tar (static busybox + the script), built deterministically so that its digest is a cache key.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from pathlib import Path
from typing import Any

from pytest_kata.hosts.base import LocalHost
from pytest_kata.resources import cache_dir, data_path
from pytest_kata.sandbox.base import ProbeFacts, SandboxError

BEGIN = "=== KATA-PROBE-BEGIN ==="
END = "=== KATA-PROBE-END ==="
BUSYBOX = Path("/bin/busybox")
IMAGE_REPO = "docker.io/pytest-kata/probe"
# applets linked in the image: what the probe and a human debugging it need
APPLETS = ("sh", "ash", "cat", "ls", "id", "awk", "sed", "tr", "dd", "wc", "head", "tail", "grep", "readlink",
           "uname", "hostname", "mount", "umount", "mknod", "ip", "ping", "nc", "timeout", "sleep", "echo",
           "printf", "test", "[", "rm", "mkdir", "touch", "basename", "dirname", "sync", "stat", "env", "ps")


def script_path() -> Path:
    return data_path("probe", "probe.sh")


def script_text() -> str:
    return script_path().read_text(encoding="utf-8")


def parse_output(text: str, *, source: str = "probe") -> ProbeFacts:
    """The JSON object between the last BEGIN/END marker pair; a clear error when the probe did not finish."""
    text = text.replace("\r", "")
    end = text.rfind(END)
    begin = text.rfind(BEGIN, 0, end if end >= 0 else None)
    if begin < 0 or end < 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise SandboxError(f"the probe printed no result (markers missing); last output: {tail[-300:]}", path=source)
    body = text[begin + len(BEGIN):end]
    # a console may interleave kernel messages: keep the line that holds the object
    candidates = [line for line in body.splitlines() if line.startswith("{")]
    if not candidates:
        raise SandboxError("the probe printed no JSON object between its markers", path=source)
    try:
        data = json.loads(candidates[-1], strict=False)
    except json.JSONDecodeError as exc:
        raise SandboxError(f"the probe's JSON is malformed: {exc}", path=source) from None
    facts = ProbeFacts(data)
    facts.raw = body.strip()
    return facts


def _add(tar: tarfile.TarFile, name: str, *, data: bytes | None = None, kind: bytes = tarfile.REGTYPE,
         mode: int = 0o644, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = kind, mode, 0, 0, 0, "", ""
    if kind == tarfile.SYMTYPE:
        info.linkname = link
    if data is not None:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


def _layer(busybox: bytes, script: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "run", "root"):
            _add(tar, d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        _add(tar, "bin/busybox", data=busybox, mode=0o755)
        for applet in sorted(APPLETS):
            _add(tar, f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
        _add(tar, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        _add(tar, "etc/group", data=b"root:x:0:\nnogroup:x:65534:\n")
        _add(tar, "probe.sh", data=script, mode=0o755)
    return buf.getvalue()


def build_oci_image(out: Path | None = None, *, busybox: Path = BUSYBOX) -> tuple[Path, str]:
    """Build (cached by content) the probe image as an OCI-layout tar; returns (path, image name).

    Deterministic: fixed mtimes/owners, gzip without timestamp, so the same busybox and script give the
    same digest everywhere (and ``ctr image import`` is a no-op the second time).
    """
    if not busybox.is_file():
        raise SandboxError("static busybox not found: install busybox-static", path=busybox)
    layer = _layer(busybox.read_bytes(), script_path().read_bytes())
    key = hashlib.sha256(layer).hexdigest()[:16]
    name = f"{IMAGE_REPO}:{key}"
    out = out or cache_dir() / "probe" / f"probe-oci-{key}.tar"
    if out.is_file():
        return out, name
    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return f"sha256:{digest}", len(data)

    layer_gz = gzip.compress(layer, mtime=0)
    layer_digest, layer_size = blob(layer_gz)
    config = {"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
              "config": {"Cmd": ["/bin/sh", "/probe.sh"], "Env": ["PATH=/bin"], "WorkingDir": "/"},
              "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]}}
    cfg_digest, cfg_size = blob(json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg_digest,
                           "size": cfg_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                            "size": layer_size}]}
    man_digest, man_size = blob(json.dumps(manifest, sort_keys=True).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": man_digest, "size": man_size,
        "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": key}}]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        _add(tar, "oci-layout", data=b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", data=json.dumps(index, sort_keys=True).encode())
        _add(tar, "blobs", kind=tarfile.DIRTYPE, mode=0o755)
        _add(tar, "blobs/sha256", kind=tarfile.DIRTYPE, mode=0o755)
        for digest in sorted(blobs):
            _add(tar, f"blobs/sha256/{digest}", data=blobs[digest])
    tmp.replace(out)
    return out, name


def console_upload_commands(script: str, dest: str, *, chunk: int = 700) -> list[str]:
    """Shell commands that recreate ``script`` at ``dest`` when typed into a console.

    ``printf '%s\\n' 'line' ...`` passes lines verbatim (no escapes interpreted); each command stays under
    busybox ash's 1024-byte line-editing limit.
    """
    if "\t" in script:
        raise SandboxError("the probe script contains a tab, which a console shell would expand", path=dest)
    commands = [f": > {dest}"]
    batch: list[str] = []
    size = 0
    for line in script.splitlines():
        quoted = "'" + line.replace("'", "'\\''") + "'"
        if len(quoted) > chunk:
            raise SandboxError(f"probe line too long for a console ({len(quoted)} bytes)", path=dest)
        if batch and size + len(quoted) > chunk:
            commands.append(f"printf '%s\\n' {' '.join(batch)} >> {dest}")
            batch, size = [], 0
        batch.append(quoted)
        size += len(quoted) + 1
    if batch:
        commands.append(f"printf '%s\\n' {' '.join(batch)} >> {dest}")
    return commands


def has_marker(text: str) -> bool:
    return bool(re.search(re.escape(END), text))


def which(name: str) -> str | None:
    return shutil.which(name)


def host_facts(host: Any = None) -> dict[str, Any]:
    """The host's own identity, processes, devices and addresses, read by running the probe *on the host*
    (this machine, or a staging host through the Host protocol): what no workload may see."""
    target = host if host is not None else LocalHost()
    result = target.run("cd / && KATA_PROBE_VSOCK_TIMEOUT=1 sh -s", stdin=script_text().encode(), timeout=180)
    facts = parse_output(result.stdout, source=f"{getattr(target, 'name', 'host')}: host probe")
    mounts = [line.split()[1] for line in facts.get("mounts", []) if len(line.split()) > 1]
    addresses = sorted({a.split()[1].split("/")[0] for a in facts.get("addresses", []) if len(a.split()) > 1})
    return {"kernel_release": facts.get("kernel_release"), "boot_id": facts.get("boot_id"),
            "hostname": facts.get("hostname"), "machine_id": facts.get("machine_id"), "mounts": mounts,
            "user_processes": facts.get("user_processes", []), "block_devices": facts.get("block_devices", []),
            "dev_nodes": facts.get("devices", []), "addresses": addresses, "mem_total_kb": facts.get("mem_total_kb"),
            "host": getattr(target, "name", "local")}
