"""Rebuild-and-scan: the scheduled job that keeps a guest image patched and says when it got worse.

    pytest-kata images rebuild-and-scan guest-minimal --feed debian-tracker.json --fail-on high

One run: (1) build the guest recipe; the build is cached by the content hash of the recipe *and the
resolved package versions*, so it really rebuilds only when Debian published new versions (after
``apt-get update``) or the recipe changed; (2) scan the image with :func:`pytest_kata.vuln.scan` against the
feed files, with the guest kernel's version and config; (3) compare the findings with the previous run's,
kept in a state file; (4) record this run; (5) exit 1 when a finding that is *new* since the previous run is
ranked at or above ``--fail-on`` (the first run compares against nothing, so everything is new).

Triggers (see ``vm-images/guest/README.md``): a schedule (daily cron / CI schedule), a new feed file
(refresh the feed, run again: new findings on an unchanged image show), new base packages (``apt-get
update`` changes the resolved versions, hence the key, hence a rebuild).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.images.common import host_kernel
from pytest_kata.images.guest import build_guest, load_recipe
from pytest_kata.progress import step, timed
from pytest_kata.resources import cache_dir
from pytest_kata.severities import SEVERITIES
from pytest_kata.vuln import scan, write_outputs


@dataclass
class PipelineRun:
    """What one rebuild-and-scan run found, relative to the previous run."""

    image: str
    key: str
    previous_key: str | None
    rebuilt: bool
    findings: list[dict[str, Any]]
    new: list[dict[str, Any]]
    resolved: list[dict[str, Any]]
    gate: list[dict[str, Any]] = field(default_factory=list)  # new findings at or above fail_on
    fail_on: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "key": self.key, "previous_key": self.previous_key, "rebuilt": self.rebuilt,
                "findings": len(self.findings), "new": self.new, "resolved": self.resolved,
                "gate": {"fail_on": self.fail_on, "failing": self.gate}, "seconds": round(self.seconds, 1)}


def _identity(finding: dict[str, Any]) -> tuple[str, str]:
    return str(finding.get("id")), str(finding.get("package") or finding.get("kernel") or "")


def default_state(name: str) -> Path:
    return cache_dir() / "pipeline" / f"guest-{name}.json"


def rebuild_and_scan(name: str, feeds: list[str], *, fail_on: str | None = "high", state: Path | None = None,
                     force: bool = False, sbom: str | None = None) -> PipelineRun:
    """Run the pipeline once (see the module docstring); raises KataError on bad input."""
    if fail_on is not None and fail_on not in SEVERITIES:
        raise KataError(f"unknown severity {fail_on!r}; expected one of {', '.join(SEVERITIES)}")
    if not feeds:
        raise KataError("rebuild-and-scan needs at least one --feed file or directory")
    for feed in feeds:
        if not Path(feed).exists():
            raise KataError("no such feed file or directory", path=feed)
    start = time.monotonic()
    recipe = load_recipe(name)
    state = state or default_state(recipe.name)
    previous = _load_state(state)
    step("pipeline", f"[1/3] guest-{recipe.name}: rebuild if packages or recipe changed")
    guest = build_guest(recipe.name, force=force)
    target = guest.image or guest.initrd
    if target is None:
        raise KataError(f"guest-{recipe.name} produced neither an image nor an initrd", path=recipe.path)
    kernel = host_kernel()
    kernel_version = kernel.upstream_version
    step("pipeline", f"[2/3] scanning {target.name} against {len(feeds)} feed(s)")
    with timed("pipeline", f"scan of guest-{recipe.name}"):
        result = scan(target, list(feeds), kernel_version=kernel_version, kernel_config=[str(kernel.config)])
    if sbom:
        write_outputs(result, sbom=sbom)
    findings = result.to_json()["findings"] + [k for k in result.to_json()["kernel"]
                                               if k.get("version_status") == "affected"]
    before = {_identity(f) for f in previous.get("findings", [])} if previous else set()
    now = {_identity(f) for f in findings}
    new = [f for f in findings if _identity(f) not in before]
    resolved = [f for f in previous.get("findings", []) if _identity(f) not in now] if previous else []
    floor = SEVERITIES.index(fail_on) if fail_on else None
    gate = [f for f in new if floor is not None and f.get("rank") in SEVERITIES
            and SEVERITIES.index(f["rank"]) >= floor]
    step("pipeline", f"[3/3] {len(findings)} findings, {len(new)} new, {len(resolved)} resolved; "
                     f"recording {state}")
    run = PipelineRun(image=f"guest-{recipe.name}", key=guest.key,
                      previous_key=previous.get("key") if previous else None, rebuilt=guest.built,
                      findings=findings, new=new, resolved=resolved, gate=gate, fail_on=fail_on,
                      seconds=time.monotonic() - start)
    _save_state(state, {"image": run.image, "key": guest.key, "target": str(target), "feeds": list(feeds),
                        "when": datetime.now(UTC).isoformat(timespec="seconds"), "findings": findings})
    return run


def _load_state(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise KataError(f"state file is not JSON ({exc}); delete it to start over", path=path)
    if not isinstance(data, dict) or not isinstance(data.get("findings"), list):
        raise KataError("state file has no findings list; delete it to start over", path=path)
    return data


def _save_state(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def format_run(run: PipelineRun) -> str:
    lines = [f"{run.image}: key {run.key} ({'rebuilt' if run.rebuilt else 'cached'}"
             + (f", previous {run.previous_key}" if run.previous_key and run.previous_key != run.key else "")
             + f"), {len(run.findings)} findings, {len(run.new)} new, {len(run.resolved)} resolved"]
    for title, items in (("new", run.new), ("resolved", run.resolved)):
        for f in items[:50]:
            lines.append(f"  {title:<8} {f.get('rank', '?'):<9} {f.get('id')}  "
                         f"{f.get('package') or f.get('kernel', '')} {f.get('installed', '')}")
        if len(items) > 50:
            lines.append(f"  ... {len(items) - 50} more {title}")
    if run.fail_on:
        lines.append(f"gate: {len(run.gate)} new finding(s) ranked {run.fail_on} or above"
                     + (" -> FAIL" if run.gate else " -> pass"))
    return "\n".join(lines)
