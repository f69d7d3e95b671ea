"""Install, upgrade and roll back a Kata bundle on any Host: atomic, journaled, and proven.

The install follows Kata's release layout (contents under ``/opt/kata``) but recoverably:

1. ``capture-before`` — the host's state (:mod:`.state`) is saved on the host with the journal;
2. ``stage`` — the (already safely opened) bundle is packed and copied to the host;
3. ``unpack`` — extracted into ``/opt/kata-releases/<version>-<sha12>.partial-<tx>`` and renamed into place;
4. ``switch`` — ``/opt/kata`` becomes a symlink to that release by ``rename(2)`` (atomic: a reader sees
   the old or the new release, never a mix); a legacy real ``/opt/kata`` is moved aside, not deleted;
5. ``containerd-config`` — runtime handlers ``kata-<shim>`` (kata-deploy's names) with explicit
   ``runtime_path`` and ``ConfigPath``: a drop-in per shim in ``/etc/containerd/conf.d``; when
   ``config.toml`` does not import that directory yet, it is added to ``imports`` (file backed up first);
   a version-1 config (no drop-in support) is edited as a whole, again after a backup;
6. ``containerd-restart`` and 7. ``verify-handlers`` — through a :class:`ContainerdService` (systemd on a
   real host, a private containerd for a local sysroot, or skipped with the reason);
8. ``commit`` — the state after is recorded.

Each step is journaled before and after it runs (:mod:`.journal`). Any failure undoes the steps in
reverse and checks that the state digest equals the one captured first. ``rollback()`` undoes the last
committed install the same way and reports the exact difference and any residue. ``layout="in-place"``
mimics upstream's ``tar -C /`` over the old tree (no delete pass): its rollback re-extracts the previous
release and leaves the candidate's new files behind, which the verification reports as residue.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from pytest_kata import progress
from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.hosts.base import Host
from pytest_kata.hosts.resolve import check_sysroot, resolve_host
from pytest_kata.install.containerd import (
    ContainerdService,
    NoContainerd,
    SysrootContainerd,
    SystemdContainerd,
    containerd_for,
)
from pytest_kata.install.errors import InstallError
from pytest_kata.install.journal import Journal, Transaction
from pytest_kata.install.state import (
    BIN_LINKS,
    CONTAINERD_CONFIG,
    CONTAINERD_DIR,
    CRI_PLUGINS,
    PREFIX,
    RELEASES,
    State,
    StateDiff,
    capture_state,
    diff_states,
    host_path,
    merge_toml,
    residue,
)
from pytest_kata.install.workloads import KataArgs

DROPIN_DIR = "/etc/containerd/conf.d"
DROPIN_NAME = "kata-runtimes.toml"
STAGED = "bundle.tar.gz"
SHIM_GO = "bin/containerd-shim-kata-v2"
SHIM_RS = "runtime-rs/bin/containerd-shim-kata-v2"


# ------------------------------------------------------------------------------------------- reports


@dataclass
class InstallReport:
    host: str
    tx: str
    release: str
    version: str | None
    layout: str
    digest_before: str
    digest_after: str
    handlers: dict[str, dict[str, str]]
    containerd_mode: str
    steps: dict[str, str]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RollbackReport:
    host: str
    tx: str | None
    undone: str | None  # the install transaction that was undone
    noop: bool
    message: str
    digest_expected: str | None = None
    digest_after: str | None = None
    diff: StateDiff | None = None
    residue: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def restored(self) -> bool:
        # both None: the install failed before it captured (or changed) anything
        return self.noop or self.digest_after == self.digest_expected

    def difference(self) -> list[str]:
        return self.diff.lines() if self.diff is not None else []

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "tx": self.tx, "undone": self.undone, "noop": self.noop,
                "message": self.message, "restored": self.restored, "digest_expected": self.digest_expected,
                "digest_after": self.digest_after, "residue": self.residue, "difference": self.difference(),
                "timings": self.timings}


# ------------------------------------------------------------------------------------------- installer


Inject = Callable[[str, "Installer"], None]


@dataclass
class StepRun:
    """What every install step of one transaction sees (``data``: each done step's journaled result)."""

    tx: str
    bundle: Bundle
    release: str
    shims: list[str]
    data: dict[str, dict[str, Any]]


# The install steps in order: name (journaled), the Installer method that does it (returns the data its undo
# needs, and is idempotent when re-run on resume), the method that undoes it (given that data). A rollback
# undoes the journaled steps in reverse; methods are looked up on the instance so a subclass can override one.
STEPS: tuple[tuple[str, str, str], ...] = (
    ("capture-before", "_step_capture_before", "_undo_nothing"),
    ("stage", "_step_stage", "_undo_stage"),
    ("unpack", "_step_unpack", "_undo_unpack"),
    ("switch", "_step_switch", "_undo_switch"),
    ("containerd-config", "_step_containerd_config", "_undo_containerd_config"),
    ("containerd-restart", "_step_restart", "_undo_nothing"),  # the rollback restarts containerd once, after
    ("verify-handlers", "_step_verify", "_undo_nothing"),      # the configuration is restored
)
INSTALL_STEPS = tuple(name for name, _do, _undo in STEPS)


class Installer:
    """Install bundles on one host (below ``sysroot``), journaled, with automatic and explicit rollback."""

    def __init__(self, host: Host, sysroot: str | Path = "/", *, containerd: ContainerdService | None = None,
                 layout: str = "versioned", inject: Inject | None = None) -> None:
        if layout not in ("versioned", "in-place"):
            raise KataError(f"unknown install layout {layout!r}; use versioned or in-place")
        self.host = host
        self.sysroot = str(sysroot)
        self.containerd: ContainerdService = containerd or NoContainerd("no containerd service given")
        self.layout = layout
        self.inject = inject
        self.journal = Journal(host, self.sysroot)
        # how Kata workloads run on this host (runnable configuration copies), for every probe of its installs
        self.kata_args: KataArgs | None = None

    # paths as seen on the host
    def p(self, path: str) -> str:
        return host_path(self.sysroot, path)

    def run(self, cmd: str, *, timeout: float = 600.0, stdin: bytes | None = None) -> str:
        result = self.host.run(cmd, timeout=timeout, stdin=stdin)
        if not result.ok:
            tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
            raise InstallError(f"`{cmd[:120]}` failed with exit {result.rc}: {tail}", path=self.host.name)
        return result.stdout

    def exists(self, path: str) -> bool:
        return self.host.run(f"test -e {shlex.quote(path)} || test -L {shlex.quote(path)}").ok

    def missing_dirs(self, path: str) -> list[str]:
        """The directories ``mkdir -p path`` would create, deepest first (journaled, so undo removes them)."""
        out = self.run(f'p={shlex.quote(path)}; while [ ! -e "$p" ] && [ ! -L "$p" ]; do echo "$p"; '
                       'p=$(dirname "$p"); done')
        return [line for line in out.splitlines() if line]

    def remove_dirs(self, dirs: list[str]) -> None:
        for directory in dirs:  # deepest first; only if empty: never delete what someone else put there
            self.host.run(f"rmdir {shlex.quote(directory)} 2>/dev/null || true")

    def capture(self) -> State:
        return capture_state(self.host, self.sysroot, containerd=self.containerd)

    def _save_state(self, tx: str, name: str, state: State) -> None:
        target = f"{self.journal.tx_dir(tx)}/{name}"
        self.run(f"mkdir -p {shlex.quote(self.journal.tx_dir(tx))} && cat > {shlex.quote(target)}",
                 stdin=json.dumps(state.to_json()).encode())

    def _load_state(self, tx: str, name: str) -> State:
        text = self.run(f"cat {shlex.quote(self.journal.tx_dir(tx) + '/' + name)}")
        return State.from_json(json.loads(text))

    # ---------------------------------------------------------------------------------------- install

    def install(self, bundle: Bundle, *, shims: list[str] | None = None, resume_tx: Transaction | None = None
                ) -> InstallReport:
        """Install ``bundle`` (a :class:`pytest_kata.bundle.Bundle`); on failure, undo and re-raise."""
        release = f"{bundle.version or 'unknown'}-{bundle.sha256[:12]}"
        wanted = sorted(shims or bundle.shims)
        missing = [s for s in wanted if s not in bundle.shims]
        if missing:
            known = ", ".join(sorted(bundle.shims))
            raise KataError(f"no shim {', '.join(missing)} in the bundle; known: {known}",
                            path=bundle.label)
        tx = resume_tx.id if resume_tx else self.journal.new_tx_id("install")
        done = set(resume_tx.done_steps) if resume_tx else set()
        data: dict[str, dict[str, Any]] = {name: dict(s.data) for name, s in (resume_tx.steps.items()
                                                                             if resume_tx else [])}
        if not resume_tx:
            self.journal.write(tx, "install", "tx", "begin", bundle=bundle.label, release=release,
                               version=bundle.version, layout=self.layout, shims=wanted, sysroot=self.sysroot)
        timings: dict[str, float] = {}
        notes: list[str] = []
        run = StepRun(tx, bundle, release, wanted, data)
        current = ""
        try:
            with progress.timed("install", f"{self.host.name}: installing {release} ({self.layout})"):
                for name, do, _undo in STEPS:
                    if name in done:
                        continue
                    current = name
                    if self.layout == "in-place" and name == "switch":
                        continue
                    self.journal.write(tx, "install", name, "begin", **data.get(name, {}))
                    if self.inject is not None:
                        self.inject(name, self)
                    start = time.monotonic()
                    result = getattr(self, do)(run)
                    timings[name] = round(time.monotonic() - start, 3)
                    status = "skipped" if result.pop("skipped", None) else "done"
                    if status == "skipped":
                        notes.append(f"{name} skipped: {result.get('reason')}")
                    data[name] = {**data.get(name, {}), **result}
                    self.journal.write(tx, "install", name, status, **result)
                    progress.step("install", f"{self.host.name}: {name} {status}")
        except BaseException as exc:
            self.journal.write(tx, "install", current or "?", "failed", error=str(exc))
            report = self._undo(self.journal.last("install") or Transaction(tx, "install", "running"),
                                reason=f"install failed at {current}: {exc}")
            self.journal.write(tx, "install", "tx", "aborted", error=str(exc), restored=report.restored)
            if isinstance(exc, KeyboardInterrupt):
                raise
            state = ("host state restored (digest equal to before)" if report.restored else
                     "ROLLBACK INCOMPLETE: " + "; ".join(report.difference()[:5]))
            raise InstallError(f"install of {release} failed at step {current}: {exc}; rolled back, {state}",
                               path=self.host.name) from None
        after = self.capture()
        self._save_state(tx, "state-after.json", after)
        before_digest = data["capture-before"].get("digest", "")
        self.journal.write(tx, "install", "tx", "committed", digest_after=after.digest, release=release)
        self._cleanup_stage(tx)
        return InstallReport(self.host.name, tx, release, bundle.version, self.layout, before_digest,
                             after.digest, after.handlers, data.get("containerd-config", {}).get("mode", ""),
                             {n: "done" for n in INSTALL_STEPS if n in data}, notes, timings)

    def resume(self, bundle: Bundle, *, shims: list[str] | None = None) -> InstallReport:
        """Continue an interrupted install from the step after the last one the journal says is done."""
        last = self.journal.last("install")
        if last is None or last.status != "running":
            raise KataError("no interrupted install to resume", path=f"{self.host.name}:{self.journal.path}")
        return self.install(bundle, shims=shims or last.data.get("shims"), resume_tx=last)

    # the steps: each returns the data its undo needs (and is idempotent when re-run on resume)

    def _step_capture_before(self, run: StepRun) -> dict[str, Any]:
        tx = run.tx
        state = self.capture()
        self._save_state(tx, "state-before.json", state)
        prefix = state.entries.get(PREFIX)
        return {"digest": state.digest, "release_before": state.release,
                "prefix_before": None if prefix is None else prefix.kind}

    def _pack(self, bundle: Bundle) -> Path:
        """The bundle as a gzip tarball (gzip -1: cheap, and everything a host has can read it; small bundles
        then fit a console transfer)."""
        tmp = Path(tempfile.mkdtemp(prefix="pytest-kata-stage-"))
        archive = tmp / STAGED
        proc = subprocess.run(f"tar -C {shlex.quote(str(bundle.root))} --numeric-owner --owner=0 --group=0 "
                              f"--sort=name -cf - . | gzip -1 > {shlex.quote(str(archive))}",
                              shell=True, capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise InstallError(f"cannot pack the bundle: {proc.stderr.strip()[-200:]}", path=str(bundle.root))
        return archive

    def _step_stage(self, run: StepRun) -> dict[str, Any]:
        tx, bundle = run.tx, run.bundle
        staged = f"{self.journal.tx_dir(tx)}/{STAGED}"
        archive = self._pack(bundle)
        try:
            self.run(f"mkdir -p {shlex.quote(self.journal.tx_dir(tx))}")
            self.host.put(archive, staged)
        finally:
            shutil.rmtree(archive.parent, ignore_errors=True)
        return {"staged": staged}

    def _cleanup_stage(self, tx: str) -> None:
        keep = self.layout == "in-place"  # in-place rollback re-extracts the previous release from it
        if not keep:
            self.host.run(f"rm -f {shlex.quote(self.journal.tx_dir(tx) + '/' + STAGED)}")

    def _step_unpack(self, run: StepRun) -> dict[str, Any]:
        tx, release, data = run.tx, run.release, run.data
        staged = shlex.quote(data["stage"]["staged"])
        if self.layout == "in-place":
            prefix = self.p(PREFIX)
            existed = self.exists(prefix)
            previous = self._previous_in_place_archive(tx)
            created = self.missing_dirs(prefix)
            self.journal.write(tx, "install", "unpack", "begin", prefix_existed=existed,
                               previous_archive=previous, created_dirs=created)
            self.run(f"mkdir -p {shlex.quote(prefix)} && tar -xf {staged} -C {shlex.quote(prefix)} "
                     "--numeric-owner --no-overwrite-dir")
            return {"prefix_existed": existed, "previous_archive": previous, "created_dirs": created}
        dest = self.p(f"{RELEASES}/{release}")
        partial = f"{dest}.partial-{tx}"
        if self.exists(dest):
            return {"dest": dest, "created": False}
        created = self.missing_dirs(self.p(RELEASES))
        self.journal.write(tx, "install", "unpack", "begin", dest=dest, partial=partial, created=True,
                           created_dirs=created)
        self.run(f"mkdir -p {shlex.quote(partial)} && tar -xf {staged} -C {shlex.quote(partial)} "
                 "--numeric-owner"
                 f" && mv -T {shlex.quote(partial)} {shlex.quote(dest)}")
        return {"dest": dest, "partial": partial, "created": True, "created_dirs": created}

    def _previous_in_place_archive(self, tx: str) -> str | None:
        for old in reversed(self.journal.transactions()):
            if old.id != tx and old.kind == "install" and old.status == "committed" \
                    and old.data.get("layout") == "in-place":
                return f"{self.journal.tx_dir(old.id)}/{STAGED}"
        return None

    def _step_switch(self, run: StepRun) -> dict[str, Any]:
        tx, release = run.tx, run.release
        prefix = self.p(PREFIX)
        target = f"kata-releases/{release}"  # relative: valid below a sysroot and on the real host alike
        q = shlex.quote(prefix)
        kind = self.run(f"if [ -L {q} ]; then echo link; elif [ -d {q} ]; then echo dir; "
                        f"elif [ -e {q} ]; then echo other; else echo absent; fi").strip()
        previous = self.run(f"readlink {shlex.quote(prefix)}").strip() if kind == "link" else None
        moved_to = None
        if kind == "other":
            raise InstallError(f"{PREFIX} is neither a directory nor a symlink; move it away first",
                               path=self.host.name)
        created = self.missing_dirs(str(Path(prefix).parent))
        self.journal.write(tx, "install", "switch", "begin", previous_kind=kind, previous_target=previous,
                           created_dirs=created)
        if kind == "dir":  # a legacy tar -C / install: keep it, as the release we roll back to
            moved_to = self.p(f"{RELEASES}/legacy-{tx}")
            self.journal.write(tx, "install", "switch", "begin", moved_to=moved_to)
            self.run(f"mkdir -p {shlex.quote(self.p(RELEASES))} && mv -T {shlex.quote(prefix)} "
                     f"{shlex.quote(moved_to)}")
        self._atomic_link(target, prefix, tx)
        return {"previous_kind": kind, "previous_target": previous, "moved_to": moved_to, "target": target,
                "created_dirs": created}

    def _atomic_link(self, target: str, link: str, tx: str) -> None:
        tmp = f"{link}.new-{tx}"
        self.run(f"mkdir -p {shlex.quote(str(Path(link).parent))} && ln -sfn {shlex.quote(target)} "
                 f"{shlex.quote(tmp)} && mv -T {shlex.quote(tmp)} {shlex.quote(link)}")

    # containerd

    def handler_specs(self, bundle: Bundle, shims: list[str]) -> dict[str, dict[str, str]]:
        """``kata-<shim>`` -> runtime_type/runtime_path/config_path, as kata-deploy writes them."""
        prefix = self.p(PREFIX)
        specs = {}
        for name in shims:
            shim = bundle.shims[name]
            binary = SHIM_RS if shim.runtime_rs else SHIM_GO
            config_rel = Path(shim.config_path).resolve().relative_to(Path(bundle.root).resolve()) \
                if Path(shim.config_path).is_absolute() else Path(shim.config_path)
            specs[f"kata-{name}"] = {"runtime_type": f"io.containerd.kata-{name}.v2",
                                     "runtime_path": f"{prefix}/{binary}",
                                     "config_path": f"{prefix}/{config_rel}"}
        return specs

    @staticmethod
    def _runtime_table(plugin: str, handler: str, spec: dict[str, str]) -> dict[str, Any]:
        return {"plugins": {plugin: {"containerd": {"runtimes": {handler: {
            "runtime_type": spec["runtime_type"], "runtime_path": spec["runtime_path"],
            "privileged_without_host_devices": True, "pod_annotations": ["io.katacontainers.*"],
            "container_annotations": ["io.kubernetes.container.terminationMessage*"],
            "options": {"ConfigPath": spec["config_path"]}}}}}}}

    def _read_config(self) -> tuple[str | None, dict[str, Any]]:
        path = self.p(CONTAINERD_CONFIG)
        result = self.host.run(f"cat {shlex.quote(path)}")
        if not result.ok:
            return None, {}
        try:
            return result.stdout, tomllib.loads(result.stdout)
        except tomllib.TOMLDecodeError as exc:
            raise InstallError(f"not valid TOML ({exc}); fix it before installing",
                               path=f"{self.host.name}:{path}") from None

    def containerd_mode(self, parsed: dict[str, Any] | None, text: str | None) -> str:
        """dropin (already imported), imports (add our drop-in dir to imports) or whole-file (version 1)."""
        if text is None:
            return "imports"  # no config: create a minimal one that imports the drop-ins
        version = int(parsed.get("version", 1) or 1) if parsed else 1
        if version < 2:
            return "whole-file"
        probe = self.p(f"{DROPIN_DIR}/kata-probe.toml")
        for pattern in parsed.get("imports", []) or [] if parsed else []:
            full = pattern if pattern.startswith("/") else f"{self.p(CONTAINERD_DIR)}/{pattern}"
            if fnmatch.fnmatch(probe, full):
                return "dropin"
        return "imports"

    def _backup(self, tx: str, path: str) -> str:
        backup = f"{path}.pytest-kata-{tx}.bak"
        self.run(f"cp -p {shlex.quote(path)} {shlex.quote(backup)}")
        return backup

    def _write_file(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp-pytest-kata"
        self.run(f"mkdir -p {shlex.quote(str(Path(path).parent))} && cat > {shlex.quote(tmp)} && "
                 f"chmod 0644 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} {shlex.quote(path)}",
                 stdin=text.encode())

    def _step_containerd_config(self, run: StepRun) -> dict[str, Any]:
        tx, bundle, shims = run.tx, run.bundle, run.shims
        text, parsed = self._read_config()
        mode = self.containerd_mode(parsed, text)
        specs = self.handler_specs(bundle, shims)
        config_path = self.p(CONTAINERD_CONFIG)
        created = self.missing_dirs(self.p(DROPIN_DIR) if mode != "whole-file" else self.p(CONTAINERD_DIR))
        record: dict[str, Any] = {"mode": mode, "config": config_path, "handlers": specs,
                                  "config_created": False, "config_backup": None,
                                  "dropins_written": [], "dropins_removed": [], "created_dirs": created}
        self.journal.write(tx, "install", "containerd-config", "begin", mode=mode, config=config_path,
                           created_dirs=created)
        version = int(parsed.get("version", 1) or 1) if parsed else 2
        plugin = CRI_PLUGINS[0] if version >= 3 else (CRI_PLUGINS[1] if version == 2 else CRI_PLUGINS[2])
        if mode == "whole-file":
            record["config_backup"] = self.backup_config(tx, config_path)
            self.journal.write(tx, "install", "containerd-config", "begin",
                               config_backup=record["config_backup"])
            merged = dict(parsed)
            for handler, spec in specs.items():
                merged = merge_toml(merged, self._runtime_table(plugin, handler, spec))
            self._write_file(config_path, tomli_w.dumps(merged))
            return record
        dropin_dir = self.p(DROPIN_DIR)
        if mode == "imports":
            pattern = f"{dropin_dir}/*.toml"
            if text is None:
                record["config_created"] = True
                self.journal.write(tx, "install", "containerd-config", "begin", config_created=True)
                self._write_file(config_path, f"version = 2\nimports = [{json.dumps(pattern)}]\n")
            else:
                record["config_backup"] = self.backup_config(tx, config_path)
                self.journal.write(tx, "install", "containerd-config", "begin",
                                   config_backup=record["config_backup"])
                self._write_file(config_path, add_import(text, parsed, pattern))
        # ONE drop-in for every handler: containerd 1.x merges imported files per plugin table, shallowly, so
        # a second file for the same plugin would replace the first (and the CRI section of config.toml);
        # on 1.x the drop-in therefore carries config.toml's CRI section too.
        path = f"{dropin_dir}/{DROPIN_NAME}"
        existing = self.run(f"ls -1 {shlex.quote(dropin_dir)} 2>/dev/null || true").split()
        table: dict[str, Any] = {}
        for handler, spec in specs.items():
            table = merge_toml(table, self._runtime_table(plugin, handler, spec))
        base_cri = (parsed.get("plugins") or {}).get(plugin) if parsed else None
        major = self.containerd_major()
        if isinstance(base_cri, dict) and (major is None or major < 2):
            table = merge_toml({"plugins": {plugin: base_cri}}, table)
            record["carries_cri_section"] = f"containerd {major or 'unknown'}.x merges imports shallowly"
        backup = self._backup(tx, path) if DROPIN_NAME in existing else None
        record["dropins_written"].append({"path": path, "backup": backup})
        self.journal.write(tx, "install", "containerd-config", "begin", dropins_written=record["dropins_written"])
        body = tomli_w.dumps({"version": max(version, 2), **table})
        self._write_file(path, f"# written by pytest-kata install ({tx}): handlers {', '.join(specs)}\n{body}")
        return record

    def containerd_major(self) -> int | None:
        """containerd's major version on the host (None when it is not installed there)."""
        match = re.search(r"\s v?(\d+)\.\d+", " " + self.host.run("containerd --version 2>/dev/null").stdout)
        return int(match.group(1)) if match else None

    def backup_config(self, tx: str, path: str) -> str | None:
        """Back up ``config.toml`` before editing it (a subclass that skips this is a negative control)."""
        return self._backup(tx, path)

    def _step_restart(self, run: StepRun) -> dict[str, Any]:
        reason = self.containerd.unavailable()
        if reason:
            return {"skipped": True, "reason": reason}
        self.containerd.restart()
        return {"service": self.containerd.description}

    def _step_verify(self, run: StepRun) -> dict[str, Any]:
        bundle, data = run.bundle, run.data
        reason = self.containerd.unavailable()
        if reason:
            return {"skipped": True, "reason": reason}
        if not self.containerd.answers():
            raise InstallError("containerd does not answer after the restart", path=self.host.name)
        reported = self.containerd.handlers()
        expected = data["containerd-config"]["handlers"]
        wrong = {h: reported.get(h) for h, spec in expected.items() if reported.get(h) != spec}
        if wrong:
            first = next(iter(wrong))
            raise InstallError(f"containerd reports handler {first} as {wrong[first]}, "
                               f"expected {expected[first]}"
                               f" ({len(wrong)} of {len(expected)} handlers wrong)", path=self.host.name)
        shim_missing = [h for h, spec in expected.items() if not self.exists(spec["runtime_path"])]
        notes = {}
        if shim_missing:
            why = getattr(bundle, "missing", {}).get("containerd-shim-kata-v2", "not in the bundle")
            notes["shim_absent"] = f"{len(shim_missing)} handlers have no shim binary: {why}"
        return {"handlers": sorted(expected), **notes}

    # ---------------------------------------------------------------------------------------- rollback

    def rollback(self, *, uninstall: bool = False) -> RollbackReport:
        """Undo the last install (or finish undoing an interrupted one) and prove the state is restored."""
        last = self.journal.last("install")
        if last is None:
            return RollbackReport(self.host.name, None, None, True,
                                  f"nothing to roll back: no install recorded in {self.journal.path}")
        if last.status in ("rolled-back", "aborted"):
            return RollbackReport(self.host.name, None, last.id, True,
                                  f"nothing to roll back: install {last.id} was already {last.status}; "
                                  "a second rollback is a no-op")
        before = last.step("capture-before")
        if last.status == "committed" and before is not None and before.data.get("prefix_before") is None \
                and not uninstall:
            raise InstallError(f"no previous release to roll back to: install {last.id} "
                               f"({last.data.get('release')}) was the first Kata install on this host "
                               f"({PREFIX} was absent before it); pass --uninstall to remove it",
                               path=self.host.name)
        return self._undo(last, reason="rollback requested")

    def _undo(self, tx: Transaction, *, reason: str) -> RollbackReport:
        rb = self.journal.new_tx_id("rollback")
        self.journal.write(rb, "rollback", "tx", "begin", undoes=tx.id, reason=reason)
        timings: dict[str, float] = {}
        start = time.monotonic()
        with progress.timed("rollback", f"{self.host.name}: undoing {tx.id} ({reason})"):
            undo_of = {name: undo for name, _do, undo in STEPS}
            order = [n for n in reversed(list(tx.steps)) if n in undo_of]
            for name in order:
                step = tx.steps[name]
                self.journal.write(rb, "rollback", f"undo-{name}", "begin")
                getattr(self, undo_of[name])(tx, step.data)
                self.journal.write(rb, "rollback", f"undo-{name}", "done")
            restarted = "containerd-config" in tx.steps and self.containerd.unavailable() is None
            if restarted:
                self.containerd.restart()
                self.journal.write(rb, "rollback", "containerd-restart", "done")
            timings["undo"] = round(time.monotonic() - start, 3)
            expected_digest: str | None = None
            after_digest: str | None = None
            diff: StateDiff | None = None
            left: list[str] = []
            if "capture-before" in tx.steps and tx.steps["capture-before"].status == "done":
                t0 = time.monotonic()
                expected = self._load_state(tx.id, "state-before.json")
                after = self.capture()
                timings["verify"] = round(time.monotonic() - t0, 3)
                diff = diff_states(expected, after)
                expected_digest = expected.digest
                left = [f"{p}: {e.describe()}" for p, e in sorted(residue(expected, after).items())]
                after_digest = after.digest
        status = "rolled-back" if tx.status == "committed" else "aborted"
        self.journal.write(tx.id, "install", "tx", status, by=rb)
        restored = expected_digest is None or expected_digest == after_digest
        self.journal.write(rb, "rollback", "tx", "done", restored=restored, digest_after=after_digest,
                           residue=left[:50])
        self.host.run(f"rm -f {shlex.quote(self.journal.tx_dir(tx.id) + '/' + STAGED)}"
                      if self.layout != "in-place" else "true")
        message = (f"rolled back {tx.id}: state digest equals the one before the install" if restored else
                   f"rolled back {tx.id} but the state differs from before the install "
                   f"({len(left)} residue paths)")
        return RollbackReport(self.host.name, rb, tx.id, False, message, expected_digest, after_digest, diff,
                              left, timings)

    def _undo_nothing(self, tx: Transaction, data: dict[str, Any]) -> None:
        """A step that changed nothing on the host."""

    def _undo_stage(self, tx: Transaction, data: dict[str, Any]) -> None:
        if self.layout != "in-place":
            self.host.run(f"rm -f {shlex.quote(self.journal.tx_dir(tx.id) + '/' + STAGED)}")

    def _undo_unpack(self, tx: Transaction, data: dict[str, Any]) -> None:
        if self.layout == "in-place" or "prefix_existed" in data:
            prefix = shlex.quote(self.p(PREFIX))
            previous = data.get("previous_archive")
            if previous and self.exists(previous):  # upstream's "rollback": extract the old release over it
                self.run(f"tar -xf {shlex.quote(previous)} -C {prefix} --numeric-owner --no-overwrite-dir")
            elif not data.get("prefix_existed"):
                self.run(f"rm -rf {prefix}")
            self.remove_dirs(data.get("created_dirs", []))
            return
        if data.get("partial"):
            self.run(f"rm -rf {shlex.quote(data['partial'])}")
        if data.get("created") and data.get("dest"):
            self.run(f"rm -rf {shlex.quote(data['dest'])}")
        self.remove_dirs(data.get("created_dirs", []))

    def _undo_switch(self, tx: Transaction, data: dict[str, Any]) -> None:
        prefix = self.p(PREFIX)
        kind = data.get("previous_kind")
        self.host.run(f"rm -f {shlex.quote(prefix)}.new-{tx.id}")
        if kind == "link" and data.get("previous_target"):
            self._atomic_link(data["previous_target"], prefix, tx.id)
        elif kind in ("absent", "dir"):
            self.run(f"if [ -L {shlex.quote(prefix)} ]; then rm -f {shlex.quote(prefix)}; fi")
            moved = data.get("moved_to")
            if kind == "dir" and moved and self.exists(moved):
                self.run(f"mv -T {shlex.quote(moved)} {shlex.quote(prefix)}")
        self.remove_dirs(data.get("created_dirs", []))

    def _undo_containerd_config(self, tx: Transaction, data: dict[str, Any]) -> None:
        for entry in data.get("dropins_removed", []):
            if self.exists(entry["backup"]):
                self.run(f"mv -f {shlex.quote(entry['backup'])} {shlex.quote(entry['path'])}")
        for entry in data.get("dropins_written", []):
            if entry.get("backup") and self.exists(entry["backup"]):
                self.run(f"mv -f {shlex.quote(entry['backup'])} {shlex.quote(entry['path'])}")
            else:
                path = shlex.quote(entry["path"])
                self.host.run(f"rm -f {path} {path}.tmp-pytest-kata")
        config = data.get("config") or self.p(CONTAINERD_CONFIG)
        if data.get("config_backup") and self.exists(data["config_backup"]):
            self.run(f"mv -f {shlex.quote(data['config_backup'])} {shlex.quote(config)}")
        elif data.get("config_created"):
            self.host.run(f"rm -f {shlex.quote(config)}")
        self.host.run(f"rm -f {shlex.quote(config)}.tmp-pytest-kata")
        self.remove_dirs(data.get("created_dirs", []))

    # ---------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        txs = self.journal.transactions()
        return {"host": self.host.name, "sysroot": self.sysroot, "journal": self.journal.path,
                "transactions": [{"id": t.id, "kind": t.kind, "status": t.status,
                                  "release": t.data.get("release"), "steps": t.done_steps} for t in txs]}


def open_installer(host: str, sysroot: str | Path = "/", *, containerd: str = "auto",
                   layout: str = "versioned") -> Installer:
    """The installer a command line names: ``host`` as ``--host`` takes it, ``containerd`` a mode of
    :func:`~pytest_kata.install.containerd.containerd_for`. The host is checked first, so that a wrong
    ``--host`` fails before anything is unpacked; :func:`close_installer` ends what this opened."""
    target = resolve_host(host)
    check_sysroot(target, sysroot)
    return Installer(target, str(sysroot), containerd=containerd_for(containerd, sysroot, target), layout=layout)


def close_installer(installer: Installer) -> None:
    """Stop a private containerd the installer started and end the host's connection (an SSH host's shared
    connection goes at once, not at its idle limit)."""
    stop = getattr(installer.containerd, "stop", None)
    if stop is not None:
        stop()
    installer.host.close()


def add_import(text: str, parsed: dict[str, Any], pattern: str) -> str:
    """``config.toml`` with ``pattern`` added to its top-level ``imports``; every other byte unchanged."""
    imports = list(parsed.get("imports", []) or [])
    if pattern in imports:
        return text
    line = "imports = " + json.dumps([*imports, pattern])
    if "imports" in parsed:
        new, n = re.subn(r"(?ms)^imports\s*=\s*\[.*?\]", line.replace("\\", "\\\\"), text, count=1)
        if n:
            return new
    return f"{line}\n{text}"


__all__ = ["BIN_LINKS", "DROPIN_DIR", "INSTALL_STEPS", "STEPS", "ContainerdService", "InstallError", "InstallReport",
           "Installer", "NoContainerd", "RollbackReport", "SysrootContainerd", "SystemdContainerd", "add_import",
           "close_installer", "open_installer"]
