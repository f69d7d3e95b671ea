"""Vulnerability scan of the candidate's guest image(s) and guest kernel, tailored to the Kata guest.

Run: ``pytest suites/hardening -k vulns --kata-candidate BUNDLE --kata-vulns debian-tracker.json
[--kata-vulns linux-cve/]``. Findings are ranked by what runs in the guest (the agent and the tools it calls);
a check's severity is the highest rank among its failing findings, so ``--kata-fail-on`` decides whether they
reject the candidate. The SBOM (CycloneDX) and the findings JSON are attached as evidence.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_kata.bundle import Bundle
from pytest_kata.errors import KataError
from pytest_kata.options import KataSettings
from pytest_kata.plugins.recorder import CheckRecorder
from pytest_kata.severities import SEVERITIES
from pytest_kata.vuln import cyclonedx, scan
from pytest_kata.vuln.kernel import kernel_from_bundle_names


def _worst(ranks: list[str]) -> str:
    return max(ranks, key=SEVERITIES.index) if ranks else "info"


def _guest_files(bundle: Bundle) -> list[str]:
    return [*bundle.images, *bundle.initrds]


def _kernel_version(bundle: Bundle) -> str | None:
    """versions.yaml ``assets.kernel.version`` (what kata-static ships), else the kernel file name."""
    versions = Path(bundle.path("versions.yaml"))
    if versions.is_file():
        try:
            data = yaml.safe_load(versions.read_text()) or {}
            version = ((data.get("assets") or {}).get("kernel") or {}).get("version")
        except (OSError, yaml.YAMLError, AttributeError):
            version = None
        if version:
            return str(version)
    return kernel_from_bundle_names(list(bundle.kernels))


@pytest.fixture(scope="session")
def kata_vuln_scans(kata_candidate: Bundle, kata_settings: KataSettings) -> dict[str, Any]:
    """One scan per guest image/initrd of the candidate (feeds from --kata-vulns), run once per session."""
    feeds = kata_settings.vulns
    if not feeds:
        pytest.skip("vulnerability scan not run: no feed: pass --kata-vulns FEED (Debian tracker JSON, OSV dir/zip, "
                    "Alpine secdb, kernel CNA records)")
    kernel = _kernel_version(kata_candidate)
    configs = [str(kata_candidate.path(c)) for c in kata_candidate.kernel_configs][:1]
    out: dict[str, Any] = {}
    for rel in dict.fromkeys(_guest_files(kata_candidate)):
        path = Path(kata_candidate.path(rel)).resolve()
        if any(getattr(r, "target", None) == str(path) for r in out.values()):
            continue  # kata-containers.img -> kata-debian-12-ref.image: scan once
        try:
            out[rel] = scan(path, feeds, kernel_version=kernel, kernel_config=configs or None)
        except KataError as exc:  # a feed or image problem: each check reports it as an error, in one line
            out[rel] = exc
    if not out:
        pytest.skip("the candidate ships no guest image or initrd")
    return out


def _scans(kata_vuln_scans: dict[str, Any], kata_result: CheckRecorder) -> dict[str, Any]:
    """The successful scans; a scan that failed (bad feed, unreadable image) makes the check an error."""
    errors = {rel: str(r) for rel, r in kata_vuln_scans.items() if isinstance(r, KataError)}
    if errors:
        kata_result.record(scan_errors=errors)
        kata_result.conclude("error", "; ".join(errors.values()))
    return kata_vuln_scans


def _attach(kata_result: CheckRecorder, rel: str, result: Any) -> None:
    kata_result.attach(f"sbom-{Path(rel).name}.cdx.json", cyclonedx(result), "application/json")
    kata_result.attach(f"findings-{Path(rel).name}.json", json.dumps(result.to_json(), indent=2),
                       "application/json")


@pytest.mark.kata_check("KATA-VULN-001", severity="high",
                        title="No fixable known vulnerability in the guest image's packages")
def test_guest_packages_have_no_fixable_vulnerabilities(kata_vuln_scans: dict[str, Any],
                                                        kata_result: CheckRecorder) -> None:
    """Every package vulnerability with a fix available is a failure, at the rank the Kata guest gives it."""
    failing: list[str] = []
    ranks: list[str] = []
    for rel, result in _scans(kata_vuln_scans, kata_result).items():
        _attach(kata_result, rel, result)
        fixable = [f for f in result.findings if f.fix_available and f.rank != "info"]
        ranks += [f.rank for f in fixable]
        failing += [f"{rel}: {f.id} {f.package} {f.installed} -> {f.fixed_in} [{f.rank}: {f.reachability}]"
                    for f in fixable]
        kata_result.record(**{f"scan:{rel}": {**result.summary(), "notes": result.notes,
                                              "findings": [f.to_json() for f in result.findings]}})
    kata_result.record(severity=_worst(ranks) if ranks else "high")
    if failing:
        kata_result.conclude("fail", f"{len(failing)} fixable finding(s): " + "; ".join(failing[:12]))
    kata_result.conclude("pass", "no fixable vulnerability in the guest packages")


@pytest.mark.kata_check("KATA-VULN-002", severity="high",
                        title="No known guest-kernel CVE affecting code built into the guest kernel")
def test_guest_kernel_has_no_reachable_cves(kata_vuln_scans: dict[str, Any], kata_result: CheckRecorder) -> None:
    """Kernel CNA records matched by version and weighted by the guest kernel config."""
    results = list(_scans(kata_vuln_scans, kata_result).values())
    kernel = results[0].kernel
    if not kernel:
        if any("no guest kernel version" in n for r in results for n in r.notes):
            kata_result.conclude("error", "kernel records given but the candidate's kernel version is unknown "
                                 "(no versions.yaml assets.kernel.version, no vmlinuz-X.Y.Z name)")
        if not any("kernel" in f for r in results for f in r.feeds):
            kata_result.conclude("notapplicable", "no kernel CNA records among the --kata-vulns feeds")
    affected = [k for k in kernel if k.version_status == "affected"]
    kata_result.record(kernel=[k.to_json() for k in kernel])
    serious = [k for k in affected if k.rank != "info"]
    kata_result.record(severity=_worst([k.rank for k in serious]) if serious else "high")
    if serious:
        kata_result.conclude("fail", "; ".join(f"{k.id} linux {k.kernel}: {k.config_reachability} "
                                               f"({', '.join(k.kconfig) or 'unmapped'}) [{k.rank}]" for k in serious))
    kata_result.conclude("pass", f"{len(affected)} affected record(s), none in code built into the guest kernel")


@pytest.mark.kata_check("KATA-VULN-003", severity="low",
                        title="The guest image can be scanned (package database present)")
def test_guest_image_is_scannable(kata_vuln_scans: dict[str, Any], kata_result: CheckRecorder) -> None:
    """An image without a package database cannot be scanned by package: that is a finding of its own."""
    missing = [rel for rel, r in _scans(kata_vuln_scans, kata_result).items() if r.package_db == "none"]
    kata_result.record(package_dbs={rel: r.package_db for rel, r in kata_vuln_scans.items()})
    if missing:
        kata_result.conclude("fail", f"no package database in {', '.join(missing)}: keep var/lib/dpkg/status "
                             "(or lib/apk/db/installed) in the image, or ship an SBOM")
    kata_result.conclude("pass", "every guest image has a package database")
