"""One test per container-escape class that can cross into the host, run against the sandbox.

Classes: leaked file descriptors / working directory into the host, and symlinks in mount sources. Classes
that hold for any VM by construction (a ``/proc/self/exe`` overwrite hits a guest binary; a privileged
``core_pattern``/``uevent_helper`` write lands in the guest kernel) are not checks here: whether a hostile
privileged workload changed the host is KATA-ISO-011's host-side comparison.
"""

from __future__ import annotations

import os

import pytest

from pytest_kata.sandbox import Workload, checks
from pytest_kata.sandbox.base import Mount

pytestmark = pytest.mark.vm  # every escape class is tried in a running sandbox

HOST_ONLY_PREFIXES = ("/var/lib/containerd", "/run/containerd", "/var/cache/pytest-kata", "/var/tmp/pytest-kata",
                      "/opt/kata", "/work", "/root", "/home")


@pytest.mark.kata_advisory("CVE-2024-21626")
@pytest.mark.kata_check("KATA-ESC-102", severity="high", title="no host file descriptor or directory leaks into the "
                        "workload")
@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_leaked_fds_and_cwd(privileged, kata_probe, kata_result):
    facts = kata_probe(privileged=privileged)
    fds = facts.get("fds", [])
    leaked = [f for f in fds if len(f.split(" ", 1)) == 2 and f.split(" ", 1)[1].startswith(HOST_ONLY_PREFIXES)]
    cwd = facts.get("cwd")
    ev = {"fds": fds, "cwd": cwd, "mode": "dynamic",
          "effect": f"{'privileged' if privileged else 'unprivileged'} workload's open fds {fds} and cwd {cwd!r}"}
    if leaked or (cwd or "/").startswith(HOST_ONLY_PREFIXES):
        return checks.Outcome("fail", f"host paths reachable through fds/cwd: {leaked or cwd}", ev).apply(kata_result)
    checks.Outcome("pass", f"{len(fds)} open fds and cwd {cwd!r} point inside the sandbox", ev).apply(kata_result)


@pytest.mark.kata_advisory("CVE-2021-30465")
@pytest.mark.kata_check("KATA-ESC-103", severity="high", title="a symlink in a mount source resolves inside the "
                        "sandbox, never on the host")
def test_symlink_in_mount_path(kata_sandbox, kata_host_marker, kata_host_baseline, kata_result, tmp_path):
    if kata_sandbox.name == "direct":
        return checks.Outcome("skipped", "dynamic: the direct driver mounts no host directory into the guest",
                              {"mode": "dynamic", "effect": "not tried"}).apply(kata_result)
    volume = tmp_path / "volume"
    volume.mkdir()
    os.symlink(os.path.dirname(kata_host_marker), volume / "link")
    seen_through = f"/volume/link/{os.path.basename(kata_host_marker)}"
    facts = kata_sandbox.probe(Workload(mounts=[Mount(str(volume), "/volume")], host_paths=[seen_through]))
    visible = facts.get("host_paths", {}).get(seen_through)
    ev = {"symlink": f"{volume}/link -> {os.path.dirname(kata_host_marker)}", "marker_through_link": visible,
          "host_diff": kata_host_baseline.diff(), "mode": "dynamic",
          "effect": f"a volume holding a symlink to the host directory of {kata_host_marker}; the marker through "
                    f"the link inside: {'visible' if visible else 'absent'}"}
    if visible:
        return checks.Outcome("fail", "a symlink in the volume resolved on the host: the host marker is visible",
                              ev).apply(kata_result)
    checks.host_unchanged(ev["host_diff"], what="a volume with a host-pointing symlink").apply(kata_result)
