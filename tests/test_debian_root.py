"""The README's setup on a clean Debian 12: a minbase root made with mmdebstrap from this machine's apt sources,
``scripts/setup`` run inside it with Debian's own Python (``PYTHON`` unset), then a static validation of the
reference candidate there, which must reach the same verdict, check by check, as the same run here.

The root shares this machine's network (apt and PyPI as configured here) and process table: the validation
inside runs with ``PYTEST_KATA_NO_SWEEP=1``, because its own ``/run`` knows none of this machine's live runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kata.images.common import DEBIAN_SOURCES, cached, content_hash, mmdebstrap, mounts_under, safe_rmtree
from pytest_kata.progress import step, timed
from pytest_kata.resources import cache_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHECKOUT = "/srv/pytest-kata"
# Not part of a checkout a user would copy: build output, venvs, caches.
NOT_COPIED = {".git", ".venv", ".tox", ".mypy_cache", ".ruff_cache", "allure-results", "junit.xml", "verdict.json"}
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SETUP_TIMEOUT = 1800
STATIC = ["suites/hardening", "suites/advisories", "-m", "not vm", "-p", "no:cacheprovider", "-q"]


def pip_and_tls_files() -> list[Path]:
    """This machine's PyPI index configuration (pip's config files, the constraints and CAs they name)."""
    home = Path.home()
    candidates = [Path("/etc/pip.conf"), Path("/etc/xdg/pip"), home / ".config/pip", home / ".pip",
                  Path("/usr/local/share/ca-certificates"), Path("/etc/ssl/certs/ca-certificates.crt")]
    if os.environ.get("PIP_CONFIG_FILE"):
        candidates.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return [p for p in candidates if p.exists()]


def clean_debian_root() -> Path:
    """A Debian 12 minbase root, built once per mmdebstrap recipe (cached by content hash)."""
    sources = DEBIAN_SOURCES.read_text() if DEBIAN_SOURCES.exists() else "deb.debian.org"
    key = content_hash("debian-root", "bookworm", "minbase", sources)[:20]
    return cached("debian-root", key, lambda out: mmdebstrap(out / "root", variant="minbase",
                                                             label="clean-debian-12")) / "root"


def copy_checkout(dest: Path) -> None:
    """The checkout as a user would have it: no venvs, build output or caches."""
    def ignore(directory: str, names: list[str]) -> set[str]:
        skipped = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
        if Path(directory) == REPO:
            skipped |= NOT_COPIED & set(names)
        if Path(directory) == REPO / "fixtures":
            skipped |= {"out"} & set(names)
        return skipped
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)


def chroot_mounts(root: Path, downloads: Path) -> list[tuple[list[str], Path]]:
    """/proc, /sys (read-only), /dev and the download caches (apt's archives, pip's wheels) in the root."""
    return [(["-t", "proc", "proc"], root / "proc"), (["-t", "sysfs", "-o", "ro", "sysfs"], root / "sys"),
            (["--bind", "/dev"], root / "dev"),
            (["--bind", str(downloads / "apt")], root / "var/cache/apt/archives"),
            (["--bind", str(downloads / "pip")], root / "root/.cache/pip")]


@contextlib.contextmanager
def mounted(plan: list[tuple[list[str], Path]]) -> Iterator[None]:
    """Mount in order, each private; unmount in reverse at the end, also on failure, and check that none is left
    (a /dev bind left under a tree that is then removed would take the machine's /dev with it)."""
    done: list[Path] = []
    try:
        for args, point in plan:
            point.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", *args, str(point)], check=True, capture_output=True)
            done.append(point)
            subprocess.run(["mount", "--make-private", str(point)], check=True, capture_output=True)
        yield
    finally:
        for point in reversed(done):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)
        left = {str(p) for p in done} & {m for p in done for m in mounts_under(p)}
        assert not left, f"still mounted: {sorted(left)}"


def in_root(root: Path, script: str, log: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """``script`` by bash in the chroot, with a fresh environment: no PYTHON, this machine's PIP_* settings.

    setup's own progress lines (``[setup] ...``) are passed on as they come: setup takes minutes.
    """
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb", "PYTEST_KATA_NO_SWEEP": "1",
           **{k: v for k, v in os.environ.items() if k.startswith("PIP_")}}
    cmd = ["chroot", str(root), "/usr/bin/env", "-i", *[f"{k}={v}" for k, v in env.items()],
           "/bin/bash", "-c", f"set -euo pipefail; cd {CHECKOUT}; {script}"]
    lines: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                plain = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
                if plain.startswith("[setup]"):
                    step("debian-root", plain)
        finally:
            timer.cancel()
    output = "".join(lines)
    log.write_text(f"$ {script}\n{output}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, "")


def reference(which: str, variant: str) -> Path:
    sys.path.insert(0, str(REPO / "fixtures"))
    try:
        from reference import reference_tarball  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "fixtures"))
    return Path(reference_tarball(which, variant))


def statuses(report: Path) -> dict[str, str]:
    return {r["nodeid"]: r["status"] for r in json.loads(report.read_text())["results"]}


@pytest.mark.timeout(2400)  # cold: mmdebstrap ~70 s, then setup's apt and pip downloads and builds (~5-6 min)
@pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap, chroot and mounts need root")
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap is not installed (scripts/setup)")
def test_setup_and_a_static_validation_on_a_clean_debian_12(kata_run_id: str, tmp_path: Path) -> None:
    good, bad = reference("candidate", "hardened"), reference("candidate", "upstream")
    with timed("debian-root", "clean Debian 12 root (mmdebstrap minbase, cached)"):
        clean = clean_debian_root()
    scratch = cache_dir() / "runs" / kata_run_id / "debian-12-root"
    downloads = cache_dir() / "debian-root-downloads"
    for sub in ("apt", "pip"):
        (downloads / sub).mkdir(parents=True, exist_ok=True)
    safe_rmtree(scratch)
    try:
        # The root lives in a tmpfs: dpkg's fsyncs cost nothing and removing 2 GB is one unmount.
        with mounted([(["-t", "tmpfs", "-o", "size=8g,mode=0755", "tmpfs"], scratch)]):
            root = scratch
            subprocess.run(["cp", "-a", f"{clean}/.", str(root)], check=True)
            assert not (root / "usr/bin/python3").exists(), "the root must start without Python: setup installs it"
            # mmdebstrap's path-excludes leave no man directories, where a stock install has them; Java's
            # postinst (update-alternatives) writes its man-page links there
            (root / "usr/share/man/man1").mkdir(parents=True, exist_ok=True)
            copy_checkout(root / CHECKOUT.lstrip("/"))
            for path in pip_and_tls_files():
                dest = root / ("root" / path.relative_to(Path.home()) if path.is_relative_to(Path.home()) else
                               path.relative_to("/"))
                dest.parent.mkdir(parents=True, exist_ok=True)
                if path.is_dir():
                    shutil.copytree(path, dest, dirs_exist_ok=True)
                else:
                    shutil.copy2(path, dest)
            shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
            for tarball in (good, bad):
                shutil.copy2(tarball, root / "srv" / tarball.name)
            with mounted(chroot_mounts(root, downloads)):
                with timed("debian-root", "scripts/setup in the clean root (Debian's apt, Debian's python3)"):
                    setup = in_root(root, "scripts/setup", tmp_path / "setup.log", SETUP_TIMEOUT)
                assert setup.returncode == 0, (setup.stdout + setup.stderr)[-3000:]
                venv = in_root(root, ".venv/bin/python -c " + shlex.quote(
                    "import os, sys; print(sys.version.split()[0], os.path.realpath(sys._base_executable), "
                    "os.path.realpath('/usr/bin/python3'))"), tmp_path / "venv.log", 60)
                version, base, system = venv.stdout.split()
                assert version == "3.11.2" and base == system, venv.stdout + venv.stderr
                runs = {}
                for name, tarball in (("good", good), ("bad", bad)):
                    command = shlex.join([".venv/bin/pytest", *STATIC, "--kata-candidate", f"/srv/{tarball.name}",
                                          "--kata-report", f"/srv/verdict-{name}.json"])
                    with timed("debian-root", f"static validation of {tarball.name} in the clean root"):
                        runs[name] = in_root(root, command, tmp_path / f"{name}.log", 600)
            for name in runs:
                shutil.copy2(root / f"srv/verdict-{name}.json", tmp_path / f"inside-{name}.json")
    finally:
        safe_rmtree(scratch)
        assert not scratch.exists() and Path("/dev/null").exists()
    assert runs["good"].returncode == 0, (runs["good"].stdout + runs["good"].stderr)[-3000:]
    assert runs["bad"].returncode == 1, (runs["bad"].stdout + runs["bad"].stderr)[-3000:]
    inside = {name: json.loads((tmp_path / f"inside-{name}.json").read_text()) for name in runs}
    assert inside["good"]["verdict"] == "accept" and inside["bad"]["verdict"] == "reject"
    assert inside["good"]["totals"]["pass"] > 50 and not inside["good"]["totals"]["error"]
    here = subprocess.run([str(Path(sys.executable).with_name("pytest")), *STATIC, "--kata-candidate", str(good),
                           "--kata-report", str(tmp_path / "here.json")], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "PYTEST_KATA_NO_SWEEP": "1"}, timeout=600)
    assert here.returncode == 0, (here.stdout + here.stderr)[-3000:]
    assert statuses(tmp_path / "inside-good.json") == statuses(tmp_path / "here.json"), \
        "Debian's own Python in a clean root decides every check as this machine does"
