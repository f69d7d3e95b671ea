"""Attack surface of a guest image in numbers, and the comparison users choose a minimal image by.

Static measures (read from the image, nothing booted): packages, installed size, executables, setuid files,
enabled services, network daemons that would listen, shells, package managers. With ``--boot`` (Kata trees
only) the guest is also booted with the direct sandbox driver for its boot time and the sockets listening
after boot; that needs a console shell in the guest, which systemd guests without a serial getty lack.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.bundle import PREFIX, open_bundle
from pytest_kata.errors import KataError
from pytest_kata.images import guest
from pytest_kata.images.facts import image_facts
from pytest_kata.images.packages import read_packages
from pytest_kata.images.read import ImageError, open_image
from pytest_kata.progress import timed
from pytest_kata.sandbox.direct import DirectDriver, GuestSpec

# metric name -> (label, unit); the order is the table's
METRICS: dict[str, tuple[str, str]] = {
    "packages": ("packages", ""),
    "installed_kib": ("installed size", "KiB"),
    "files": ("regular files", ""),
    "executables": ("executables", ""),
    "setuid": ("setuid/setgid files", ""),
    "file_capabilities": ("files with capabilities", ""),
    "services": ("enabled services", ""),
    "listeners": ("network daemons (static)", ""),
    "shells": ("shells", ""),
    "package_managers": ("package managers", ""),
    "listening_sockets": ("listening sockets (booted)", ""),
}
BUDGET_METRICS = ("packages", "installed_kib", "executables", "setuid", "file_capabilities", "services",
                  "listeners", "shells", "package_managers", "listening_sockets")


@dataclass
class Surface:
    """Measured surface of one image (``details`` keeps the lists behind the counts)."""

    name: str
    metrics: dict[str, int]
    details: dict[str, list[str]] = field(default_factory=dict)
    boot_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure(path: str | Path, name: str | None = None, *, boot_seconds: float | None = None) -> Surface:
    """Open an image (or rootfs directory) and measure it."""
    with open_image(path) as root:
        return measure_root(root, name or Path(path).name, boot_seconds=boot_seconds)


def measure_root(root: Any, name: str, *, boot_seconds: float | None = None) -> Surface:
    facts = image_facts(root)
    entries = root.entries()
    notes = list(facts.notes)
    try:
        db = read_packages(root, with_files=False)
        packages = [f"{p.name} {p.version}" for p in db.packages]
        installed_kib = sum(p.installed_size_kib for p in db.packages)
        if db.kind == "none":
            notes.append("no package database: packages counted as 0, installed size from file sizes")
    except ImageError as exc:
        packages, installed_kib = [], 0
        notes.append(str(exc))
    file_bytes = sum(e.size for e in entries.values() if e.kind == "file")
    if not installed_kib:
        installed_kib = file_bytes // 1024
    executables = sorted(e.path for e in entries.values() if e.executable)
    metrics = {
        "packages": len(packages),
        "installed_kib": installed_kib,
        "files": sum(1 for e in entries.values() if e.kind == "file"),
        "executables": len(executables),
        "setuid": facts["image.setuid_files.count"],
        "file_capabilities": facts["image.file_capabilities.count"],
        "services": facts["services.enabled.count"],
        "listeners": facts["image.network_daemons.count"],
        "shells": facts["image.shells.count"],
        "package_managers": facts["image.package_managers.count"],
    }
    details = {"packages": packages, "executables": executables, "setuid": facts["image.setuid_files"],
               "file_capabilities": facts["image.file_capabilities"],
               "services": facts["services.units"], "listeners": facts["image.network_daemons"],
               "shells": facts["image.shells"], "package_managers": facts["image.package_managers"]}
    notes.append("listening sockets are static (daemon binaries present); a booted measurement needs the "
                 "direct sandbox driver")
    return Surface(name, metrics, details, boot_seconds, notes)


PROC_NET = ("tcp", "tcp6", "udp", "udp6")


def parse_proc_net(texts: dict[str, str]) -> list[str]:
    """Listening sockets from ``/proc/net/{tcp,tcp6,udp,udp6}``: TCP in state 0A (LISTEN), UDP unconnected (07)."""
    out = []
    for proto, text in texts.items():
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4:
                continue
            local, state = fields[1], fields[3]
            if (proto.startswith("tcp") and state == "0A") or (proto.startswith("udp") and state == "07"):
                addr, _, port = local.rpartition(":")
                out.append(f"{proto}:{int(port, 16)}" + ("" if set(addr) <= {"0"} else f"@{addr}"))
    return sorted(out)


def measure_booted(bundle: str | Path, shim: str | None = None, *, boot_timeout: float = 240.0
                   ) -> tuple[float, list[str]]:
    """Boot the bundle's guest with the direct sandbox driver (qemu, TCG where KVM does not work) and read
    the listening sockets and the boot time: the dynamic half of the surface. Needs a console shell in the
    guest (agent-init images with the placeholder agent have one)."""
    driver = DirectDriver(GuestSpec.from_bundle(open_bundle(bundle), shim), boot_timeout=boot_timeout)
    try:
        driver.start()
        texts = {}
        for proto in PROC_NET:
            rc, out = driver.run(f"cat /proc/net/{proto} 2>/dev/null")
            texts[proto] = out.replace("\r", "") if rc == 0 else ""
        return float(driver.boot_seconds or 0.0), parse_proc_net(texts)
    finally:
        driver.stop()


def growth(base: int, new: int) -> float | None:
    """Percent growth; None means 'from nothing to something' (infinite)."""
    if base == 0:
        return 0.0 if new == 0 else None
    return (new - base) * 100.0 / base


def over_budget(baseline: Surface, candidate: Surface, budget_percent: float) -> list[str]:
    """The metrics that grew by more than the budget, each explained and naming what is new (paths, units,
    packages) where the surface keeps the list behind the count."""
    out = []
    for key in BUDGET_METRICS:
        if key not in baseline.metrics and key not in candidate.metrics:
            continue
        b, c = baseline.metrics.get(key, 0), candidate.metrics.get(key, 0)
        g = growth(b, c)
        if g is None or g > budget_percent:
            shown = "from 0" if g is None else f"+{g:.1f}%"
            new = sorted(set(candidate.details.get(key, [])) - set(baseline.details.get(key, [])))
            named = f"; new: {', '.join(new[:12])}" + (f" and {len(new) - 12} more" if len(new) > 12 else "") \
                if new else ""
            out.append(f"{METRICS[key][0]}: {b} -> {c} ({shown}, budget {budget_percent:g}%{named})")
    return out


def table(a: Surface, b: Surface) -> str:
    """A side-by-side table, B relative to A."""
    rows = [("metric", a.name, b.name, "change")]
    for key, (label, unit) in METRICS.items():
        if key not in a.metrics and key not in b.metrics:
            continue
        va, vb = a.metrics.get(key, 0), b.metrics.get(key, 0)
        g = growth(va, vb)
        change = "=" if va == vb else ("new" if g is None else f"{vb - va:+d} ({g:+.1f}%)")
        rows.append((label + (f" ({unit})" if unit else ""), str(va), str(vb), change))
    if a.boot_seconds is not None or b.boot_seconds is not None:
        rows.append(("boot time (s)", _num(a.boot_seconds), _num(b.boot_seconds), ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(r))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.1f}"


def _bundle_image(p: Path) -> Path | None:
    """The guest image a Kata tree (a dir holding opt/kata, or /opt/kata itself) ships, if ``p`` is one."""
    for kata in (p / PREFIX, p):
        share = kata / "share/kata-containers"
        if (kata / "share/defaults/kata-containers").is_dir() and share.is_dir():
            for name in ("kata-containers.img", "kata-containers-initrd.img"):
                if (share / name).exists():
                    return (share / name).resolve()
    return None


def _resolve_image(spec: str) -> tuple[Path, str]:
    """An image file / rootfs directory, a Kata tree (its shipped image), or a guest recipe name built
    (cached) by the guest image builder."""
    p = Path(spec)
    if p.is_dir() and (image := _bundle_image(p)) is not None:
        return image, f"{p.name}:{image.name}"
    if p.exists():
        return p, p.name
    built = guest.build_guest(spec)
    artefact = built.image or built.initrd
    if artefact is None:
        raise KataError(f"guest recipe {spec!r} built neither an image nor an initrd")
    return Path(artefact), spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="baseline: image file, initrd, rootfs directory or guest recipe name")
    parser.add_argument("b", metavar="B", help="candidate: same forms as A")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.add_argument("--budget", type=float, default=None, metavar="PERCENT",
                        help="exit 1 when B grows any surface metric beyond A by more than PERCENT")
    parser.add_argument("--boot", action="store_true",
                        help="A and B are Kata trees: also boot each guest (direct driver) for its boot time "
                             "and listening sockets")


def compare_command(args: argparse.Namespace) -> int:
    """``pytest-kata images compare A B``: measure both, print the table; with --budget, gate on growth."""
    surfaces = []
    for spec in (args.a, args.b):
        path, name = _resolve_image(spec)
        with timed("surface", f"measuring {name}"):
            surface = measure(path, name)
        if getattr(args, "boot", False):
            if _bundle_image(Path(spec)) is None:
                raise KataError(f"{spec}: --boot needs a Kata tree (a directory holding opt/kata)")
            surface.boot_seconds, sockets = measure_booted(spec)
            surface.metrics["listening_sockets"] = len(sockets)
            surface.details["listening_sockets"] = sockets
            surface.notes = [n for n in surface.notes if not n.startswith("listening sockets are static")]
        surfaces.append(surface)
    a, b = surfaces
    if getattr(args, "json", False):
        print(json.dumps({"a": a.to_json(), "b": b.to_json()}, indent=2))
    else:
        print(table(a, b))
        for note in sorted(set(a.notes + b.notes)):
            print(f"note: {note}")
    if getattr(args, "budget", None) is not None:
        over = over_budget(a, b, args.budget)
        for line in over:
            print(f"over budget: {line}")
        return 1 if over else 0
    return 0
