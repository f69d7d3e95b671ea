"""Remove what runs left behind, found by the run id (``kt-<8hex>``) every resource carries.

A run that crashed, was SIGKILLed or lost its machine mid-way cannot clean up after itself; the next run
does, at its start (:func:`sweep` with ``dead_only=True``), and every run cleans its own resources at its end
(``sweep(dead_only=False, run_id=own)``). Liveness comes from :func:`pytest_kata.runid.is_alive`: resources of
a live run are never touched, and nothing without a run id is ever touched.

What is found, per run id, and how it is removed (in this order):

1. libvirt domains whose name, title, description or ``<metadata>`` carry the id (destroyed, undefined with
   their snapshot/checkpoint metadata, managed save and nvram), and pools/networks named with it;
2. processes of qemu, containerd, containerd shims, virtiofsd and dnsmasq whose command line carries it;
3. daemons recorded in ``<state>/<run-id>/daemons/`` (stopped by pid, checked against their start time); a
   libvirtd still used by another live run is handed over to that run instead;
4. mounts whose mount point carries it (lazy unmount, deepest first);
5. network namespaces named with it, and root-netns links ``k<8hex><n>`` (see :mod:`pytest_kata.network`);
6. containerd's cgroups for a namespace named after it (their processes are killed first: a container
   outlives a killed shim), its runc state and the Kata state of its sandboxes (``/run/vc``,
   ``/run/kata-containers``, with the netns file Kata made for each); its hold on the ``/dev/log`` socket
   lent to Kata shims (the last run holding it removes the listener and the socket, see
   :func:`services.lend_syslog`);
7. libvirt's per-domain logs ``/var/log/libvirt/qemu/<name>.log`` of the run's domains, the run's scratch
   directory ``cache_dir()/runs/<run-id>/`` (overlays, volumes, containerd roots: every
   run keeps its scratch files there) and its state ``<state>/<run-id>/`` and ``<run-id>.pid``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata import network, runid, services
from pytest_kata.progress import step
from pytest_kata.resources import cache_dir

KEPT_MARK = "kept"  # in a run's state dir: --kata-keep-on-failure kept it for inspection
PROCESS_PROGRAMS = ("qemu-system", "qemu-kvm", "containerd", "virtiofsd", "dnsmasq", "kata-proxy", "kata-netmon")


@dataclass
class SweepReport:
    """What a sweep removed (or would remove, in a dry run), what failed, and which runs it left alone."""

    dry_run: bool = False
    runs: list[str] = field(default_factory=list)  # runs whose leftovers were removed
    removed: list[str] = field(default_factory=list)  # "kt-1a2b3c4d: netns kt-1a2b3c4d-main-net0-a"
    errors: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)  # runs skipped because they are alive
    kept: list[str] = field(default_factory=list)  # dead runs kept by --kata-keep-on-failure

    def add(self, run_id: str, what: str) -> None:
        self.removed.append(f"{run_id}: {what}")
        step("sweep", f"{'would remove' if self.dry_run else 'removed'} {what} ({run_id})")

    def fail(self, run_id: str, what: str, exc: BaseException) -> None:
        self.errors.append(f"{run_id}: {what}: {exc}")

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        text = f"{verb} {len(self.removed)} leftovers of {len(self.runs)} runs"
        if self.errors:
            text += f", {len(self.errors)} errors"
        return text


def sweep(dead_only: bool = True, run_id: str | None = None, *, dry_run: bool = False,
          uri: str = services.DEFAULT_URI, libvirt: bool = True) -> SweepReport:
    """Remove the leftovers of dead runs (or of ``run_id``; ``dead_only=False`` also takes live runs).

    A dead run that ``--kata-keep-on-failure`` kept for inspection is skipped unless named by ``run_id`` or
    ``dead_only=False`` (``pytest-kata sweep --run ID`` / ``--all``).

    Never raises for a resource it could not remove: the error is in the report, the sweep goes on.
    ``libvirt=False`` leaves libvirt out (the end of a run that never used it: see :func:`used_libvirt`).
    """
    report = SweepReport(dry_run=dry_run)
    conn = _libvirt_connection(uri) if libvirt else None
    try:
        found = _discover(conn)
        if run_id is not None:
            found = {run_id: found.get(run_id, set())}
        for rid in sorted(found):
            if dead_only and runid.is_alive(rid):
                report.live.append(rid)
                continue
            if dead_only and run_id is None and (runid.state_dir() / rid / KEPT_MARK).exists():
                report.kept.append(rid)
                continue
            before = len(report.removed)
            _clean_run(rid, conn, report)
            if len(report.removed) > before:
                report.runs.append(rid)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
    return report


def leftovers(run_id: str | None = None, *, dead_only: bool = True) -> list[str]:
    """What a sweep would remove now (``"<run-id>: <what>"`` lines), removing nothing: the no-leftovers check."""
    quiet = os.environ.get("PYTEST_KATA_QUIET")
    os.environ["PYTEST_KATA_QUIET"] = "1"
    try:
        return sweep(dead_only=dead_only, run_id=run_id, dry_run=True).removed
    finally:
        if quiet is None:
            os.environ.pop("PYTEST_KATA_QUIET", None)
        else:
            os.environ["PYTEST_KATA_QUIET"] = quiet


def clean_run(run_id: str, *, dry_run: bool = False) -> SweepReport:
    """Remove everything of one run, alive or not (the end of a run; ``pytest-kata sweep --run ID``)."""
    return sweep(dead_only=False, run_id=run_id, dry_run=dry_run)


# --------------------------------------------------------------------------------------------------------
# Discovery


LIBVIRT_TIMEOUT = 20.0  # seconds a sweep waits for libvirtd to accept a connection


def _libvirt_connection(uri: str) -> Any:
    """A connection to the local libvirtd if one answers in time (the sweep must work without libvirt too).

    A frozen or overloaded libvirtd accepts the socket and never answers; libvirt has no connect timeout, so
    the connection is made in a daemon thread and given up after :data:`LIBVIRT_TIMEOUT` (said as progress)."""
    box: dict[str, Any] = {}

    def connect() -> None:
        try:
            if services.libvirt_answers(uri):
                import libvirt

                box["conn"] = libvirt.open(uri)
        except Exception:
            pass

    thread = threading.Thread(target=connect, name="kata-sweep-libvirt", daemon=True)
    thread.start()
    thread.join(LIBVIRT_TIMEOUT)
    if thread.is_alive():
        step("sweep", f"libvirtd does not answer on {uri} within {LIBVIRT_TIMEOUT:g} s: libvirt leftovers are "
                      "not swept this time (is libvirtd stopped or overloaded?)")
        return None
    return box.get("conn")


def used_libvirt(run_id: str) -> bool:
    """Whether a run asked for the local libvirtd (:func:`services.ensure_libvirtd` marks it) or started one.

    The end of a run that did not (Ctrl-C included) leaves libvirt out of its clean-up: it must not wait on
    another run's libvirtd, which TCG hosts in long jobs can make slow to answer."""
    run_dir = runid.state_dir() / run_id
    if (run_dir / services.LIBVIRT_USED_MARK).exists() or (run_dir / services.LIBVIRT_USER_MARK).exists():
        return True
    return any(r.name == "libvirtd" for r in services.daemon_records(run_id))


def _ids_in(text: str) -> set[str]:
    return set(runid.RUN_ID_RE.findall(text))


def _domain_run_ids(dom: Any) -> set[str]:
    """Run ids a domain carries: in its name (every domain we define), else in its title/description/metadata.

    The name comes with the listing; the XML is another call into libvirtd, which a busy daemon (other runs'
    TCG hosts in long jobs) can make slow, so it is read only for domains whose name carries no id."""
    ids = _ids_in(dom.name())
    if ids:
        return ids
    with contextlib.suppress(Exception):
        root = ET.fromstring(dom.XMLDesc(0))
        for tag in ("title", "description", "metadata"):
            element = root.find(tag)
            if element is not None:
                ids |= _ids_in(ET.tostring(element, encoding="unicode"))
    return ids


def _discover(conn: Any) -> dict[str, set[str]]:
    """Every run id with something on this machine, and what kinds of things."""
    found: dict[str, set[str]] = {}

    def note(ids: Iterable[str | None], kind: str) -> None:
        for rid in ids:
            if rid:
                found.setdefault(rid, set()).add(kind)

    state = runid.state_dir()
    note((runid.run_id_of(p.name) for p in state.glob("kt-*")), "state")
    with contextlib.suppress(OSError):
        note((runid.run_id_of(p.name) for p in LIBVIRT_QEMU_LOGS.glob("kt-*")), "log")
    with contextlib.suppress(Exception):
        note((runid.run_id_of(n) for n in network.netns_names()), "netns")
    with contextlib.suppress(Exception):
        note((network.link_run_id(n) for n in network.link_names()), "link")
    if conn is not None:
        with contextlib.suppress(Exception):
            for dom in conn.listAllDomains(0):
                note(_domain_run_ids(dom), "domain")
        with contextlib.suppress(Exception):
            note((runid.run_id_of(p.name()) for p in conn.listAllStoragePools(0)), "pool")
        with contextlib.suppress(Exception):
            note((runid.run_id_of(n.name()) for n in conn.listAllNetworks(0)), "libvirt-network")
    for _pid, argv in _run_processes():
        note(_ids_in(" ".join(argv)), "process")
    note((rid for m in services.mountpoints() for rid in _ids_in(m)), "mount")
    runs_dir = _runs_dir()
    if runs_dir.is_dir():
        note((runid.run_id_of(p.name) for p in runs_dir.iterdir()), "scratch")
    for group in Path("/sys/fs/cgroup").glob("*/kt-*"):
        note([runid.run_id_of(group.name)], "cgroup")
    if services.RUNC_STATE_ROOT.is_dir():
        note((runid.run_id_of(p.name) for p in services.RUNC_STATE_ROOT.iterdir()), "runc")
    note(services.syslog_users(), "syslog")
    note((runid.run_id_of(d.name) for d in services.kata_state_dirs()), "kata")
    return found


def _runs_dir() -> Path:
    return cache_dir() / "runs"


def _run_processes() -> list[tuple[int, list[str]]]:
    """Processes of the programs a run starts (qemu, containerd and its shims, ...) that carry a run id."""
    me = os.getpid()
    out = []
    for pid, argv in services.process_cmdlines():
        if pid == me or not argv:
            continue
        if os.path.basename(argv[0]).startswith(PROCESS_PROGRAMS) and _ids_in(" ".join(argv)):
            out.append((pid, argv))
    return out


# --------------------------------------------------------------------------------------------------------
# Removal


def _clean_run(rid: str, conn: Any, report: SweepReport) -> None:
    dry = report.dry_run
    live_libvirt_users: set[str] = set()
    if conn is not None:
        live_libvirt_users = _clean_libvirt(rid, conn, report)
    for pid, argv in _run_processes():
        if rid in _ids_in(" ".join(argv)):
            if not dry:
                services.kill_with_files(pid)
            report.add(rid, f"process {pid} {os.path.basename(argv[0])}")
    _stop_daemons(rid, report, live_libvirt_users)
    with contextlib.suppress(Exception):
        for item in services.kill_cgroup_processes(rid, dry_run=dry):
            report.add(rid, item)
    for point in sorted({m for m in services.mountpoints() if rid in m and not m.startswith("/run/netns/")},
                        key=len, reverse=True):
        try:
            if not dry and not services.unmount(point):
                raise OSError("umount2(MNT_DETACH) failed")
            report.add(rid, f"mount {point}")
        except OSError as exc:
            report.fail(rid, f"mount {point}", exc)
    _clean_network(rid, report)
    with contextlib.suppress(Exception):
        for item in services.remove_cgroups(rid, dry_run=dry) + services.remove_runc_state(rid, dry_run=dry) + \
                services.remove_kata_state(rid, dry_run=dry):
            report.add(rid, item)
    if not dry:
        services.prune_containerd_run_dirs()
        services.prune_kata_run_dirs()
    with contextlib.suppress(Exception):
        for item in services.return_syslog(rid, dry_run=dry, whole_run=True):
            report.add(rid, item)
    _remove_files(rid, report)


def _clean_libvirt(rid: str, conn: Any, report: SweepReport) -> set[str]:
    """Destroy and undefine the run's domains, pools and networks; returns live runs that still have domains."""
    import libvirt

    live_users: set[str] = set()
    flags = 0
    for name in ("VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA", "VIR_DOMAIN_UNDEFINE_MANAGED_SAVE",
                 "VIR_DOMAIN_UNDEFINE_NVRAM", "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA"):
        flags |= getattr(libvirt, name, 0)
    try:
        domains = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        report.fail(rid, "list libvirt domains", exc)
        return live_users
    for dom in domains:
        ids = _domain_run_ids(dom)
        if rid not in ids:
            live_users |= {i for i in ids if runid.is_alive(i)}
            continue
        name = dom.name()
        try:
            if not report.dry_run:
                if dom.isActive():
                    dom.destroy()
                if dom.isPersistent():
                    try:
                        dom.undefineFlags(flags)
                    except libvirt.libvirtError:
                        dom.undefine()
            report.add(rid, f"libvirt domain {name}")
        except libvirt.libvirtError as exc:
            report.fail(rid, f"libvirt domain {name}", exc)
    for kind, lister in (("pool", conn.listAllStoragePools), ("network", conn.listAllNetworks)):
        with contextlib.suppress(libvirt.libvirtError):
            for obj in lister(0):
                if runid.run_id_of(obj.name()) != rid:
                    continue
                try:
                    if not report.dry_run:
                        persistent = obj.isPersistent()  # ask first: a transient object vanishes on destroy
                        if obj.isActive():
                            obj.destroy()
                        if persistent:
                            obj.undefine()
                    report.add(rid, f"libvirt {kind} {obj.name()}")
                except libvirt.libvirtError as exc:
                    report.fail(rid, f"libvirt {kind} {obj.name()}", exc)
    return live_users


def _stop_daemons(rid: str, report: SweepReport, live_libvirt_users: set[str]) -> None:
    """Stop the run's recorded daemons; a libvirtd other live runs use (and its virtlogd) is handed over."""
    serving = services.serving_libvirtd_pid()
    order = {"libvirtd": 1, "virtlogd": 2}  # containerd and the rest first; virtlogd after libvirtd
    records = sorted(services.daemon_records(rid), key=lambda r: order.get(r.name, 0))
    own_libvirtd = {r.pid for r in records if r.name == "libvirtd"}
    handed_over = False
    for record in records:
        what = f"daemon {record.name} (pid {record.pid})"
        try:
            if not record.matches():
                if not report.dry_run:
                    record.path.unlink(missing_ok=True)
                continue
            if record.name == "libvirtd":
                users = set(services.libvirt_users(record.pid, None, exclude=rid))
                if record.pid == serving:  # the domains we listed are this daemon's
                    users |= live_libvirt_users
                heirs = sorted(users - {rid})
                if heirs:
                    if not report.dry_run:
                        services.hand_over_libvirtd(record, heir=heirs[0])
                    report.add(rid, f"{what}: handed over to live run {heirs[0]}")
                    handed_over = True
                    continue
            elif record.name == "virtlogd":
                if handed_over:
                    continue  # it went to the heir together with its libvirtd
                if serving is not None and serving not in own_libvirtd:
                    report.add(rid, f"{what}: left running, it serves libvirtd (pid {serving})")
                    continue
            if not report.dry_run:
                services.stop_process(record)
            report.add(rid, what)
        except OSError as exc:
            report.fail(rid, what, exc)


def _clean_network(rid: str, report: SweepReport) -> None:
    reg = network.registry(rid)
    try:
        namespaces = {n for n in network.netns_names() if runid.run_id_of(n) == rid} | set(reg.get("netns", {}))
    except Exception as exc:
        report.fail(rid, "list network namespaces", exc)
        namespaces = set()
    for ns in sorted(namespaces):
        try:
            if report.dry_run or network.delete_netns(ns):
                report.add(rid, f"netns {ns}")
        except Exception as exc:
            report.fail(rid, f"netns {ns}", exc)
    try:
        links = {n for n in network.link_names() if network.link_run_id(n) == rid}
    except Exception as exc:
        report.fail(rid, "list links", exc)
        links = set()
    links |= {n for n in reg.get("links", {}) if network.link_run_id(n) == rid}
    for link in sorted(links):
        try:
            if report.dry_run:
                if link in network.link_names():
                    report.add(rid, f"link {link}")
            elif network.delete_link(link):
                report.add(rid, f"link {link}")
        except Exception as exc:
            report.fail(rid, f"link {link}", exc)


LIBVIRT_QEMU_LOGS = Path("/var/log/libvirt/qemu")


def _remove_files(rid: str, report: SweepReport) -> None:
    with contextlib.suppress(OSError):
        for log in sorted(LIBVIRT_QEMU_LOGS.glob(f"*{rid}*.log*")):  # libvirt keeps a log per domain name
            if runid.run_id_of(log.name) == rid:
                if not report.dry_run:
                    log.unlink(missing_ok=True)
                report.add(rid, f"file {log}")
    targets = [_runs_dir() / rid, runid.state_dir() / rid]
    for path in targets:
        if not path.exists():
            continue
        left = services.mounts_under(path)
        if left:
            report.fail(rid, f"directory {path}", OSError(f"still mounted: {', '.join(left)}"))
            continue
        if not report.dry_run:
            shutil.rmtree(path, ignore_errors=True)
            if path.exists():
                report.fail(rid, f"directory {path}", OSError("could not remove every file"))
                continue
        report.add(rid, f"directory {path}")
    pidfile = runid.state_dir() / f"{rid}.pid"
    if pidfile.exists() and not runid.is_alive(rid):  # a live run's own end unregisters it itself
        if not report.dry_run:
            pidfile.unlink(missing_ok=True)
        report.add(rid, f"pid file {pidfile}")
