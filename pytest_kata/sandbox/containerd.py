"""The ``containerd`` driver: run the probe with ``ctr`` through a runtime handler on a host.

``kata-<shim>`` runs the candidate (it needs the bundle's ``containerd-shim-kata-v2``: a bundle without one,
like the reference candidate, makes this driver unavailable with the bundle's own reason); ``runc`` and
``runsc`` are controls: the suites must fail on them, because a runc workload runs on the host kernel. The
containerd is private to the run (own root/state/socket, :func:`pytest_kata.services.start_containerd`),
so no system containerd or image store is touched. Annotations, privileged mode, mounts and devices are
workload parameters because most escape regressions need one of them.

For ``kata``/``kata-*`` on this machine the shim runs as the candidate ships it, handed a configuration copy
(:mod:`pytest_kata.sandbox.shimconfig`: bundle paths, what the host lacks, the TCG wrapper where KVM is
unusable) through ``KATA_CONF_FILE``; containerd runs in a mount namespace of its own with ``/`` shared inside,
and a ``/dev/log`` is lent for the run (:func:`pytest_kata.services.lend_syslog`). Escape tests drive pods with
:meth:`ContainerdDriver.run`, :meth:`~ContainerdDriver.start_pod`, :meth:`~ContainerdDriver.exec`,
:meth:`~ContainerdDriver.remove_pod` and read the host side with :meth:`~ContainerdDriver.pod_processes` and
:meth:`~ContainerdDriver.hypervisor_argv`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.bundle import Bundle, ShimInfo
from pytest_kata.hosts.accel import detect_on
from pytest_kata.hosts.base import TIMED_OUT, LocalHost
from pytest_kata.progress import step, timed
from pytest_kata.resources import KATA_PREFIX, cache_dir, sandbox_dir
from pytest_kata.sandbox.base import (
    HostProcess,
    HostView,
    ProbeFacts,
    SandboxDriver,
    SandboxError,
    SandboxUnavailable,
    Workload,
)
from pytest_kata.sandbox.direct import detect_accel, kernel_release_of, map_path
from pytest_kata.sandbox.probe import build_oci_image, parse_output
from pytest_kata.sandbox.shimconfig import SHORT_BOOLEAN_PROBE, ShimConfig, config_args, write_shim_config
from pytest_kata.services import lend_syslog, return_syslog, start_containerd, unique_dir

CONTROL_HANDLERS = {"runc": "io.containerd.runc.v2", "runsc": "io.containerd.runsc.v1"}
CONTROL_SHIMS = {"runc": ("containerd-shim-runc-v2", "runc"), "runsc": ("containerd-shim-runsc-v1", "runsc")}
KATA_NAMESPACE = "pytest-kata"
AGENT_TIMEOUT = "Failed to check if grpc server is working"
POD_RETRIES = 2  # a pod is tried at most this many times more (agent deadline under TCG, stalled nested pod)
NESTED_POD_DEADLINE = 150.0  # seconds a pod attempt may take on a staging host before it is retried
CAPS_NEWER_THAN_KATA1 = ("perfmon", "bpf", "checkpoint_restore")  # Linux 5.8/5.9: unknown to Kata 1.x agents
VMM_NAMES = ("qemu", "cloud-hypervisor", "firecracker", "dragonball", "stratovirt")


LEGACY_CGROUPS = "systemd.unified_cgroup_hierarchy=0"


def staging_host_changes(spec: Any, version: str | None, config: Any) -> dict[str, Any]:
    """What a staging host (booted from ``spec``, a HostSpec) needs beyond the pool's default to run the pods
    of a release (``version``, its shim's ``config``): room for two sandbox VMs at once (the driver's holder pod
    and a probe) besides its own memory, and, for Kata 1.x, which knows only cgroup v1 ("cgroups: cgroup
    mountpoint does not exist" on a unified host), systemd's hybrid hierarchy on the kernel command line."""
    sandbox_mib = int(config.get("hypervisor.*.default_memory", 0) or 0)
    changes: dict[str, Any] = {"memory_mib": max(spec.memory_mib, 1024 + 2 * sandbox_mib)}
    if (version or "").startswith("1.") and LEGACY_CGROUPS not in spec.cmdline.split():
        changes["cmdline"] = f"{spec.cmdline} {LEGACY_CGROUPS}"
    return changes


def write_shim_config_on(host: Any, config: Any, root: Path | None, out_dir: Path, place: Path, *,
                         accel: tuple[str, str], guest: str = "initrd") -> ShimConfig:
    """The runnable configuration copy for a staging ``host`` where the release is installed at /opt/kata:
    what the host lacks and whether its qemu takes Kata's bare ``-machine`` flags are asked there; the copy is
    written into ``out_dir``, copied to ``place`` on the host, and its argv log read back through the host.
    ``accel``: what works there and why (:func:`~pytest_kata.hosts.accel.detect_on`)."""
    devices = host.run("for d in vhost-net vhost-vsock; do test -e /dev/$d && echo $d; done", timeout=30)
    present = devices.stdout.split()
    qemu = str(config.get("hypervisor.*.path", "") or "")
    refuses = bool(qemu) and host.run([qemu, *SHORT_BOOLEAN_PROBE], timeout=60).rc != 0
    written = write_shim_config(config, root, out_dir, accel=accel[0], vhost_net="vhost-net" in present,
                                vhost_vsock="vhost-vsock" in present, guest=guest, refuses_short_booleans=refuses,
                                place=place)
    host.run(["mkdir", "-p", str(place)], timeout=30, check=True)
    for item in sorted(out_dir.iterdir()):
        host.put(item, str(place / item.name), mode=item.stat().st_mode & 0o777)
    written.read_log = lambda path: host.run(["cat", str(path)], timeout=60).stdout
    written.changes.setdefault("accel", f"{accel[0]} ({accel[1]})")
    return written


def shim_binary_name(runtime: str) -> str:
    """The binary containerd looks up on its PATH for a runtime type: ``io.containerd.kata.v2`` →
    ``containerd-shim-kata-v2``."""
    parts = runtime.split(".")
    return f"containerd-shim-{'.'.join(parts[2:-1])}-{parts[-1]}"


CRI_CONTAINER_TYPE = "io.kubernetes.cri.container-type"  # what Kata 1.x's shim reads (pkg/oci, cri-containerd)
CRI_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"


def pod_member_annotations(sandbox_id: str) -> dict[str, str]:
    """The CRI annotations that make a Kata shim put a container into the running sandbox ``sandbox_id`` (its
    first container's id) instead of starting a VM of its own: the shim's ``StartShim`` hands containerd that
    sandbox's socket, and virtcontainers creates the container in that VM."""
    return {CRI_CONTAINER_TYPE: "container", CRI_SANDBOX_ID: sandbox_id}


def runtime_type(handler: str) -> str:
    """``runc`` → ``io.containerd.runc.v2``; ``kata-qemu`` → ``io.containerd.kata-qemu.v2``."""
    if handler in CONTROL_HANDLERS:
        return CONTROL_HANDLERS[handler]
    if handler == "kata" or handler.startswith("kata-"):
        return f"io.containerd.{handler}.v2"
    raise SandboxError(f"unknown runtime handler {handler!r}: use kata-<shim> (candidate), runc or runsc (controls)",
                       path="--kata-runtime")


HOST_VIEW_SCRIPT = r"""
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  match=0
  for want in $PIDS; do [ "$pid" = "$want" ] && match=1; done
  cmd=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
  case $cmd in *@@PID*) continue;; esac  # this very script
  if [ $match = 0 ] && [ -n "$PATTERN" ]; then case $cmd in *"$PATTERN"*) match=1;; esac; fi
  [ $match = 1 ] || continue
  echo "@@PID $pid"
  tr '\0' '\037' < $d/cmdline 2>/dev/null; echo
  grep -E '^(Seccomp|Uid):' $d/status 2>/dev/null
  echo "@@CG"; cat $d/cgroup 2>/dev/null
  echo "@@FD"; for f in $d/fd/*; do readlink "$f" 2>/dev/null; done
done
"""


def read_processes(host: Any, pids: list[int], pattern: str, roles: dict[int, str]) -> list[HostProcess]:
    """Read argv, seccomp, uid, cgroups and open files of processes on ``host`` (local or remote) via sh."""
    env = f"PIDS='{' '.join(map(str, pids))}' PATTERN='{pattern}'"
    out = host.run(f"{env}; export PIDS PATTERN; {HOST_VIEW_SCRIPT}", timeout=60).stdout
    processes = []
    for block in out.split("@@PID ")[1:]:
        head, _, rest = block.partition("\n")
        argv_line, _, rest = rest.partition("\n")
        status, _, rest = rest.partition("@@CG\n")
        cgroups, _, fds = rest.partition("@@FD\n")
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        pid = int(head.strip())
        argv = [a for a in argv_line.split("\x1f") if a]
        exe = Path(argv[0]).name if argv else ""
        role = roles.get(pid) or ("vmm" if exe.startswith(VMM_NAMES) else "virtiofsd" if "virtiofsd" in exe
                                  else "shim")
        seccomp = fields.get("Seccomp", "").strip()
        uid = fields.get("Uid", "").split()
        processes.append(HostProcess(pid, role, argv, int(seccomp) if seccomp.isdigit() else None,
                                     int(uid[0]) if uid else None, cgroups.splitlines(), fds.splitlines()))
    return processes


class ContainerdDriver(SandboxDriver):
    """One containerd, the probe image imported once, one ``ctr run --rm`` per probe.

    Without a ``host`` it starts a private containerd on this machine and drives it through
    :class:`~pytest_kata.hosts.base.LocalHost`; with a ``host`` (any :class:`~pytest_kata.hosts.base.Host`,
    e.g. a libvirt staging host) it drives that host's containerd at ``address`` in a namespace named after
    the run. Every ``ctr`` call and the host-side view go through ``host.run``, so both paths are the same code.
    """

    name = "containerd"
    _instances = 0

    def __init__(self, handler: str = "runc", *, bundle: Bundle | None = None, shim: str | None = None,
                 containerd: Any = None, host: Any = None, address: str = "/run/containerd/containerd.sock",
                 accel: str = "auto", guest: str = "initrd") -> None:
        self.handler = handler
        self.runtime = runtime_type(handler)
        self.is_vm = handler.startswith("kata")
        self.bundle = bundle
        self.shim = shim
        self.ctd = containerd
        self._own_ctd = containerd is None and host is None
        self.host = host
        self.address = address
        # Kata's shim wants a namespace whose dash-separated parts start with a letter, which a run id
        # (kt-<8 hex>) need not
        self.namespace = runid.current_run_id()
        if self.is_vm:
            self.namespace = f"{KATA_NAMESPACE}-{self.namespace.replace('-', '')}"
        self.image = ""
        self.holder = ""
        self.remote_tar = ""
        self.runtime_args: list[str] = []
        self.run_id = runid.current_run_id()
        self._counter = 0
        ContainerdDriver._instances += 1
        self.instance = ContainerdDriver._instances  # runc's state dir is per namespace, shared by containerds
        self.last_seconds: float | None = None
        self.accel = accel
        self.guest = guest
        self.shim_config: ShimConfig | None = None  # what the kata shim is handed (local candidate)
        self.syslog: Path | None = None  # the lent /dev/log listener's file (None: the machine's own or none)
        self._shim_dirs: list[Path] = []
        self._syslog_lent = False
        self.agent_retries = 0  # pods retried after Kata's agent connect deadline passed under TCG
        self.stalled_retries = 0  # pods on a staging host retried after they did not finish in time

    def _on(self) -> Any:
        if self.host is None:
            self.host = LocalHost()
        return self.host

    def ctr(self, *args: str, check: bool = True, timeout: float = 120.0, prefix: Sequence[str] = ()) -> Any:
        """``ctr -a ADDRESS -n NAMESPACE ARGS`` on the sandbox's host (after ``prefix``, a command that execs
        the rest: see :meth:`_ctr_prefix`); a failure raises when ``check``."""
        result = self._on().run([*prefix, "ctr", "-a", self.address, "-n", self.namespace, *args], timeout=timeout)
        if check and result.rc != 0:
            tail = (result.stderr or result.stdout).strip()[-300:]
            raise SandboxError(f"ctr {' '.join(args[:3])} failed with exit {result.rc}: {tail}",
                               path=f"{getattr(self.host, 'name', 'host')}:{self.address}")
        return result

    # availability --------------------------------------------------------------------------------------

    def check_available(self) -> None:
        """Raise :class:`SandboxUnavailable` (a skip reason) when this handler cannot run on the host."""
        host = self._on()
        tools = ["ctr"] + (["containerd"] if self._own_ctd else [])
        if self.handler in CONTROL_SHIMS:
            tools += list(CONTROL_SHIMS[self.handler])
        missing = [t for t in tools if host.run(f"command -v {t}", timeout=30).rc != 0]
        if missing:
            raise SandboxUnavailable(f"{', '.join(missing)} not installed", path=getattr(host, "name", "host"))
        if self.handler in CONTROL_SHIMS:
            return
        if self.bundle is None:
            raise SandboxUnavailable("a kata-* handler needs a candidate (--kata-candidate)", path=self.handler)
        shim = self.bundle.shim(self.shim)
        if not shim.binary:
            reason = self.bundle.missing.get("containerd-shim-kata-v2", "the bundle has no shim")
            raise SandboxUnavailable(f"no containerd-shim-kata-v2 in the candidate: {reason}",
                                     path=str(self.bundle.root))
        if not self._own_ctd:
            self._prepare_installed_shim(self.bundle, shim)
            return
        self._prepare_local_shim(self.bundle, shim)

    def _prepare_installed_shim(self, bundle: Bundle, shim: ShimInfo) -> None:
        """A staging host runs the candidate as installed there at ``/opt/kata``. The shim is named by its
        absolute path and handed a copy of its configuration written on the host, which differs only in what
        the host lacks, a hypervisor wrapper where KVM is unusable there or the hypervisor refuses Kata's bare
        ``-machine`` flags (:func:`~pytest_kata.sandbox.shimconfig.write_shim_config`), each with its reason."""
        accel = detect_on(self.host, self.accel)
        place = Path(sandbox_dir()) / f"{self.run_id}-kata-shim-{os.getpid()}-{self.instance}"
        out = unique_dir(cache_dir() / "runs" / self.run_id, "kata-shim")
        try:
            written = write_shim_config_on(self.host, shim.config, Path(bundle.root), out, place, accel=accel,
                                           guest=self.guest)
        except SandboxError as exc:
            raise SandboxUnavailable(str(exc), path=exc.path) from None
        self.shim_config, self.guest = written, written.guest
        self.runtime = f"{KATA_PREFIX}/{shim.binary}"
        self.runtime_args = config_args(bundle.version, written.runs_at)

    def _prepare_local_shim(self, bundle: Bundle, shim: ShimInfo) -> None:
        """Write the runnable copy of the shim's configuration (see :mod:`~pytest_kata.sandbox.shimconfig`)
        and a directory where containerd finds the shim under the name its runtime type asks for."""
        accel, why = detect_accel(self.accel)
        base = cache_dir() / "runs" / self.run_id
        base.mkdir(parents=True, exist_ok=True)
        out = unique_dir(base, "kata-shim")
        try:
            self.shim_config = write_shim_config(shim.config, Path(bundle.root), out, accel=accel,
                                                 vhost_net=Path("/dev/vhost-net").exists(),
                                                 vhost_vsock=Path("/dev/vhost-vsock").exists(), guest=self.guest)
        except SandboxError as exc:
            raise SandboxUnavailable(str(exc), path=exc.path) from None
        self.shim_config.changes.setdefault("accel", f"{accel} ({why})")
        self.guest = self.shim_config.guest  # what the pods boot, whichever form was asked for
        bindir = out / "bin"
        bindir.mkdir()
        (bindir / shim_binary_name(self.runtime)).symlink_to(Path(bundle.root) / str(shim.binary))
        self._shim_dirs = [bindir]

    # lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.image:
            return
        self.check_available()
        tar, name = build_oci_image()
        if self._own_ctd:
            if self.is_vm:
                self._syslog_lent = True
                self.syslog = lend_syslog(self.run_id)  # the Kata shim refuses to start without /dev/log
            # the private containerd's namespace is the fixed KATA_NAMESPACE; the run id is in every pod id and
            # cgroup path instead
            # the configuration goes to the shim as KATA_CONF_FILE: Kata 1.x shims do not understand the runtime
            # options type ctr 1.6+ sends for --runtime-config-path (the create fails with "not found")
            self.ctd = start_containerd(run_id=self.run_id, private_mounts=self.is_vm, path=self._shim_dirs,
                                        namespace=KATA_NAMESPACE if self.is_vm else None,
                                        env={"KATA_CONF_FILE": str(self.shim_config.path)} if self.shim_config
                                        else None)
            self.address, self.namespace = str(self.ctd.socket), self.ctd.namespace
            source = str(tar)
        else:
            if self.ctr("version", check=False, timeout=30).rc != 0:
                raise SandboxUnavailable("containerd does not answer", path=f"{self.host.name}:{self.address}")
            source = self.remote_tar = f"/var/tmp/{self.run_id}-probe-oci-{self.instance}.tar"
            self.host.put(tar, source)
        with timed("sandbox", f"importing the probe image {name}"):
            self.ctr("images", "import", source)
        self.image = name
        # a long-lived container of the same kind, so that the host-side view has something to read
        self.holder = self.start_pod(Workload(), ["sleep", "3600"], name="hold")

    # pods: what the probe, the escape tests and the rollback sequence run ----------------------------------

    def pod_id(self, name: str = "pod") -> str:
        """A fresh container (for Kata: sandbox) id carrying the run id, so a sweep finds whatever it leaves."""
        self._counter += 1
        return f"{self.run_id}-{name}-{os.getpid()}-{self.instance}-{self._counter}"

    def run_args(self, workload: Workload, cid: str) -> list[str]:
        """``ctr run`` options for ``workload``: runtime (and its configuration), privileged mode,
        annotations, mounts, devices, environment, and a cgroup path named after the run."""
        args = ["--runtime", self.runtime, *self.runtime_args, "--cgroup", f"/{self.run_id}/{cid}"]
        if workload.privileged:
            args.append("--privileged")
        for capability in workload.capabilities:
            args += ["--cap-add", capability]
        for key, value in workload.annotations.items():
            args += ["--annotation", f"{key}={value}"]
        for m in workload.mounts:
            mode = "ro" if m.read_only else "rw"
            args += ["--mount", f"type=bind,src={m.source},dst={m.destination},options=rbind:{mode}"]
        for dev in workload.devices:
            args += ["--device", dev]
        if workload.cpus:
            args += ["--cpus", f"{workload.cpus:g}"]
        if workload.memory_mb:
            args += ["--memory-limit", str(workload.memory_mb << 20)]
        for key, value in workload.env().items():
            args += ["--env", f"{key}={value}"]
        return args

    def run(self, workload: Workload, command: list[str], *, timeout: float = 300.0, name: str = "run") -> Any:
        """Run ``command`` in a fresh pod made from ``workload`` and remove the pod (``ctr run --rm``).

        Returns the host's result (``rc``, ``stdout``, ``stderr``); never raises for the command's own exit
        status, so a refused pod (e.g. a shim rejecting an annotation) is evidence, not an error."""
        for attempt in range(POD_RETRIES + 1):
            cid = self.pod_id(name)
            start = time.monotonic()
            result = self.ctr("run", "--rm", *self.run_args(workload, cid), self.image, cid, *command, check=False,
                              timeout=self._attempt_timeout(timeout, attempt), prefix=self._ctr_prefix(workload))
            self.last_seconds = time.monotonic() - start
            if result.rc != 0:  # a pod the runtime refused can leave its container record behind
                self.remove_pod(cid)
            if not self._retry(result):
                break
        return result

    def _attempt_timeout(self, timeout: float, attempt: int) -> float:
        """On a staging host every attempt but the last is cut at :data:`NESTED_POD_DEADLINE` (see
        :meth:`_retry`); the last one gets the whole ``timeout``."""
        if self._own_ctd or not self.is_vm or attempt == POD_RETRIES:
            return timeout
        return min(timeout, NESTED_POD_DEADLINE)

    def _retry(self, result: Any) -> bool:
        """Whether a failed pod is retried (at most :data:`POD_RETRIES` times), each retry said in the
        evidence: under TCG a slow guest can miss Kata's 20 s agent connect deadline; on a staging host whose
        pods are nested KVM guests of a TCG VM, a pod now and then never finishes starting (seen about once in
        twenty pods here), which the attempt's deadline cuts."""
        if result.rc == 0:
            return False
        tcg = self.shim_config is not None and self.shim_config.wrapper is not None and self.shim_config.tcg
        if AGENT_TIMEOUT in (result.stderr or "") and tcg:
            self.agent_retries += 1
            step("sandbox", f"Kata's agent connect timed out under TCG: retrying the pod ({self.agent_retries})")
            return True
        if result.rc == TIMED_OUT and not self._own_ctd and self.is_vm:
            self.stalled_retries += 1
            step("sandbox", f"a pod on {self.host.name} did not finish within {NESTED_POD_DEADLINE:g} s: retrying "
                            f"it ({self.stalled_retries})")
            return True
        return False

    def start_pod(self, workload: Workload, command: list[str], *, name: str = "pod", timeout: float = 300.0) -> str:
        """Start ``command`` in a pod that keeps running (``ctr run -d``); returns its id for :meth:`exec`,
        :meth:`pod_pids` and :meth:`remove_pod`."""
        for attempt in range(POD_RETRIES + 1):
            cid = self.pod_id(name)
            result = self.ctr("run", "-d", *self.run_args(workload, cid), self.image, cid, *command, check=False,
                              timeout=self._attempt_timeout(timeout, attempt), prefix=self._ctr_prefix(workload))
            if result.rc == 0:
                return cid
            self.remove_pod(cid)
            if not self._retry(result):
                break
        raise SandboxError(f"ctr run -d through {self.handler} failed with exit {result.rc}: "
                           f"{(result.stderr or result.stdout).strip()[-300:]}",
                           path=f"{getattr(self.host, 'name', 'host')}:{self.address}")

    def join_pod(self, sandbox_id: str, workload: Workload, command: list[str], *, cid: str = "",
                 timeout: float = 300.0) -> str:
        """Start ``command`` as a further container of the running pod ``sandbox_id`` (a pod started by
        :meth:`start_pod`): same VM, same shim, same shared directory, as a CRI runtime does for a
        multi-container pod. ``cid``: the container's id (default: a fresh :meth:`pod_id`), known before it
        exists. Returns the id; :meth:`remove_pod` removes just that container."""
        cid = cid or self.pod_id("member")
        joined = dataclasses.replace(workload, annotations={**workload.annotations,
                                                            **pod_member_annotations(sandbox_id)})
        result = self.ctr("run", "-d", *self.run_args(joined, cid), self.image, cid, *command, check=False,
                          timeout=timeout, prefix=self._ctr_prefix(joined))
        if result.rc != 0:
            self.remove_pod(cid)
            raise SandboxError(f"ctr run -d of {cid} in pod {sandbox_id} failed with exit {result.rc}: "
                               f"{(result.stderr or result.stdout).strip()[-300:]}",
                               path=f"{getattr(self.host, 'name', 'host')}:{self.address}")
        return cid

    def runtime_pid(self) -> int | None:
        """The pid of this run's private containerd on this machine: its mount namespace is the one Kata's shim
        (and so the runtime's host mounts) lives in. None for a containerd this driver does not own."""
        if not self._own_ctd or self.ctd is None:
            return None
        return int(self.ctd.pid)

    def _ctr_prefix(self, workload: Workload) -> list[str]:
        """How ctr runs for a privileged pod on a VM runtime. ``--privileged`` copies into the spec every device
        node ctr sees and every capability ctr holds: without ``host_devices`` ctr gets an empty ``/dev`` of its
        own (containerd's ``privileged_without_host_devices``, what Kata deployments set), and it never holds
        the capabilities newer than the ones a Kata 1.x agent knows (its runc refuses "unknown capability
        CAP_PERFMON"), so "privileged" is every capability the candidate's agent can grant."""
        if not (self.is_vm and workload.privileged):
            return []
        prefix = ["setpriv", "--bounding-set", "-" + ",-".join(CAPS_NEWER_THAN_KATA1), "--"]
        if not workload.host_devices:
            prefix += ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount -t tmpfs -o size=64k,mode=755 pytest-kata-nodev /dev && exec "$0" "$@"']
        return prefix

    def exec(self, cid: str, command: list[str], *, timeout: float = 120.0) -> Any:
        """Run ``command`` inside the running pod ``cid`` (``ctr tasks exec``); returns the host's result."""
        self._counter += 1
        return self.ctr("tasks", "exec", "--exec-id", f"x{self._counter}", cid, *command, check=False,
                        timeout=timeout)

    def remove_pod(self, cid: str) -> None:
        """Kill and delete a pod's task and container; quiet when it is already gone."""
        self.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
        for _ in range(100):
            if self.ctr("tasks", "delete", cid, check=False, timeout=60).rc == 0 or \
                    cid not in self.ctr("tasks", "ls", "-q", check=False, timeout=30).stdout.split():
                break
            time.sleep(0.1)
        self.ctr("containers", "delete", cid, check=False, timeout=60)

    def pod_processes(self, cid: str) -> list[HostProcess]:
        """The host processes a pod consists of (for Kata: its shim, qemu, proxy), found by its id in their
        argv; what escape tests read for proof that nothing crossed the boundary."""
        tasks = self.ctr("tasks", "ls", check=False, timeout=30).stdout
        task_pids = [int(f[1]) for f in (line.split() for line in tasks.splitlines()[1:])
                     if len(f) >= 2 and f[0] == cid and f[1].isdigit()]
        roles = {p: "container" for p in task_pids} if not self.is_vm else {}
        return read_processes(self._on(), task_pids, cid, roles)

    def describe(self) -> dict[str, Any]:
        out = {"driver": self.name, "is_vm": self.is_vm, "handler": self.handler, "runtime_type": self.runtime,
               "host": getattr(self.host, "name", None), "containerd": self.address, "namespace": self.namespace,
               "image": self.image}
        if self.shim_config is not None:
            out["shim_config"] = self.shim_config.to_json()
        return out

    def evidence(self) -> dict[str, Any]:
        """What every result that used this sandbox must carry: above all, whether Kata's hypervisor argv was
        changed (empty when the shim runs exactly as configured), and which pods were retried."""
        out: dict[str, Any] = {}
        if self.shim_config is not None and self.shim_config.rewrite_note:
            out["hypervisor_rewrite"] = self.shim_config.rewrite_note
        if self.agent_retries:
            out["agent_connect_retries"] = self.agent_retries
        if self.stalled_retries:
            out["stalled_pod_retries"] = self.stalled_retries
        return out

    def hypervisor_argv(self) -> list[list[str]]:
        """Every qemu argv Kata's shim produced, as Kata wrote it (before the TCG rewrite; empty when no
        wrapper runs: then :meth:`host_view` shows the VMM's real argv)."""
        return self.shim_config.original_argv() if self.shim_config is not None else []

    def guest_kernel_release(self) -> str | None:
        if self.is_vm and self.bundle is not None:
            kernel = self.bundle.shim(self.shim).config.get("hypervisor.*.kernel", "")
            return kernel_release_of(map_path(Path(self.bundle.root), str(kernel))) if kernel else None
        return None

    def probe(self, workload: Workload | None = None) -> ProbeFacts:
        workload = workload or Workload()
        refused = ""
        if workload.writes and not self.is_vm:
            refused = (f"{self.handler} is no VM: host-kernel writes (core_pattern, uevent_helper, block "
                       "devices) were not attempted")
            workload = dataclasses.replace(workload, writes=False)
        result = self.run(workload, ["sh", "/probe.sh"], name="probe")
        if result.rc != 0 and "KATA-PROBE-END" not in result.stdout:
            raise SandboxError(f"ctr run through {self.handler} failed with exit {result.rc}: "
                               f"{(result.stderr or result.stdout).strip()[-300:]}",
                               path=f"{getattr(self.host, 'name', 'host')}:{self.address}")
        facts = parse_output(result.stdout, source=f"ctr run through {self.handler}")
        facts.driver, facts.workload = f"{self.name}/{self.handler}", workload
        if refused:
            facts["writes_refused"] = refused
        facts.update(self.evidence())
        return facts

    def host_view(self) -> HostView:
        processes = self.pod_processes(self.holder)
        note = self.evidence().get("hypervisor_rewrite", "") if self.is_vm else \
            f"{self.handler} is no VM: the workload runs on the host kernel"
        return HostView(is_vm=self.is_vm and any(p.role == "vmm" for p in processes), processes=processes, note=note)

    def stop(self) -> None:
        if self.host is None and self.ctd is None:
            return
        if self.holder:
            self.remove_pod(self.holder)
            self.holder = ""
        if self._own_ctd and self.ctd is not None:
            self.ctd.stop()
            step("sandbox", f"stopped the private containerd for {self.handler}")
            self.ctd = None
        if self._syslog_lent:
            return_syslog(self.run_id)
            self._syslog_lent = False
        elif not self._own_ctd:
            if self.image:
                self.ctr("images", "rm", "--sync", self.image, check=False, timeout=60)
            gone = self.ctr("namespaces", "rm", self.namespace, check=False, timeout=30)
            if gone.rc != 0:
                step("sandbox", f"namespace {self.namespace} left on {self.host.name}: "
                                f"{(gone.stderr or gone.stdout).strip()[-200:]}")
            if self.remote_tar:
                self.host.run(["rm", "-f", self.remote_tar], timeout=30)
            if self.shim_config is not None and self.shim_config.place is not None:
                self.host.run(["rm", "-rf", str(self.shim_config.place)], timeout=30)
        self.image = ""
