"""CVE-2020-2024 and CVE-2020-2026 on real Kata 1.11.0 and 1.11.5 pods (TCG here), judged on the host.

One hostile pod per release: a privileged container (every capability the agent grants, no host devices)
takes the guest's root through the guest kernel's core_pattern helper, and from there writes the host/guest
shared directory. The checks and what each release shows:

- KATA-ESC-016 (the boundary both stand on): a file the guest writes into the share appears in the
  sandbox's shared directory on the host on 1.11.0 (fail); 1.11.5 shares a read-only bind, the guest gets
  EROFS and nothing appears (pass).
- KATA-ESC-004, CVE-2020-2026: the guest plants ``<share>/<next container id>`` → a host directory; on 1.11.0
  the runtime bind-mounts that container's rootfs at ``<host directory>/rootfs`` (seen in the runtime's host
  mount table): fail. On 1.11.5 the symlink cannot be planted and the rootfs goes to the host-only mounts
  directory: pass.
- KATA-ESC-002, CVE-2020-2024: the guest swaps a running container's share directory for a symlink → a host
  directory holding a host mount; removing the container unmounts that host mount on 1.11.0 (fail: its
  isSymlink check uses os.Stat, which follows the link, and UMOUNT_NOFOLLOW covers only the last component,
  so the 1.11.0 fix the advisory feed credits does not hold) and leaves it mounted on 1.11.5 (pass).

The flawed release is the negative control: a configuration cannot re-open the read-only share of 1.11.5.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from test_escape_real_kata import kata_tree
from test_isolation_controls import run_suites

pytestmark = [pytest.mark.slow, pytest.mark.vm]

SHARE_CHECKS = "2020_2026 or 2020_2024"  # ESC-016, ESC-004, ESC-002 (dynamic and static): one hostile pod
DYNAMIC = ("KATA-ESC-016[dynamic]", "KATA-ESC-004[dynamic]", "KATA-ESC-002[dynamic]")


def share_checks_on(pytester, tree: Path) -> tuple[str, dict, dict[str, dict], float]:
    start = time.monotonic()
    result, verdict = run_suites(pytester, "--kata-candidate", str(tree), "--kata-runtime", "kata", "-k",
                                 SHARE_CHECKS, suites=("escape_regression",))
    got = {r["id"]: r for r in verdict.get("results", [])}
    return result.stdout.str(), verdict, got, time.monotonic() - start


def assert_dynamic_evidence(result: dict, advisory: str) -> None:
    ev = result["evidence"]
    assert ev["mode"] == "dynamic" and ev["advisory"] == advisory and ev["effect"]
    assert ev.get("hypervisor_rewrite") or Path("/dev/kvm").exists()


def test_1_11_0_lets_the_guest_redirect_host_mounts_and_unmounts(pytester):
    output, verdict, got, seconds = share_checks_on(pytester, kata_tree("1.11.0"))
    share, mount, unmount = (got.get(i) for i in DYNAMIC)
    assert share and share["status"] == "fail", output[-3000:]
    assert_dynamic_evidence(share, "CVE-2020-2026")
    assert "appeared holding" in share["evidence"]["effect"]
    assert mount and mount["status"] == "fail", output[-3000:]
    assert_dynamic_evidence(mount, "CVE-2020-2026")
    assert "in the runtime's host mount table" in mount["evidence"]["effect"]
    assert "CVE-2020-2026: a symlink the guest planted in the shared directory made the runtime mount" in output
    assert mount["evidence"]["planted_on_host"]
    assert unmount and unmount["status"] == "fail", output[-3000:]
    assert_dynamic_evidence(unmount, "CVE-2020-2024")
    assert "is no longer mounted" in unmount["evidence"]["effect"]
    assert "CVE-2020-2024: removing a container unmounted the host mount" in output
    assert verdict["verdict"] == "reject"
    assert seconds < 600, seconds


def test_1_11_5_keeps_the_share_read_only_to_the_guest(pytester):
    output, verdict, got, seconds = share_checks_on(pytester, kata_tree("1.11.5"))
    for check in DYNAMIC:
        assert got.get(check, {}).get("status") == "pass", (check, output[-3000:])
        assert "Read-only file system" in got[check]["evidence"]["guest_output"]
    assert_dynamic_evidence(got["KATA-ESC-016[dynamic]"], "CVE-2020-2026")
    assert_dynamic_evidence(got["KATA-ESC-002[dynamic]"], "CVE-2020-2024")
    assert "is still mounted" in got["KATA-ESC-002[dynamic]"]["evidence"]["effect"]
    assert not got["KATA-ESC-004[dynamic]"]["evidence"]["planted_on_host"]
    assert not {r["status"] for r in verdict["results"]} & {"fail", "error"}
    assert seconds < 600, seconds
