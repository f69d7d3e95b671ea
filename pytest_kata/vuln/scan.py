"""Scan a guest image (or rootfs directory, or a bare dpkg status file) against feeds; report JSON and a
CycloneDX 1.6 SBOM with VEX-style analysis.

Scan the built artefact, not the build directory: only what is in the final image counts. An image without a
package database is reported as such (it cannot be scanned by package).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import KataError
from pytest_kata.images.facts import image_facts
from pytest_kata.images.packages import InstalledPackage, PackageDB, parse_dpkg_status, read_packages
from pytest_kata.images.read import RootView, open_image
from pytest_kata.progress import step
from pytest_kata.severities import SEVERITIES
from pytest_kata.vuln.context import rank_findings
from pytest_kata.vuln.feeds import FeedSet, Release
from pytest_kata.vuln.kernel import KernelFinding, evaluate_kernel, load_kbuild_map, read_kconfig
from pytest_kata.vuln.match import Finding, match_packages

FAMILIES = {"debian": "debian", "ubuntu": "ubuntu", "alpine": "alpine", "raspbian": "debian"}


@dataclass
class ScanResult:
    target: str
    release: Release
    package_db: str
    packages: list[InstalledPackage]
    findings: list[Finding]
    kernel: list[KernelFinding] = field(default_factory=list)
    feeds: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def at_or_above(self, severity: str) -> list[Finding | KernelFinding]:
        floor = SEVERITIES.index(severity)
        out: list[Finding | KernelFinding] = [f for f in self.findings if SEVERITIES.index(f.rank) >= floor]
        out += [k for k in self.kernel if k.version_status == "affected" and SEVERITIES.index(k.rank) >= floor]
        return out

    def summary(self) -> dict[str, Any]:
        by_rank = {s: sum(1 for f in self.findings if f.rank == s) for s in reversed(SEVERITIES)}
        return {"packages": len(self.packages), "findings": len(self.findings),
                "cves": len({f.id for f in self.findings}), "by_rank": by_rank,
                "kernel_affected": sum(1 for k in self.kernel if k.version_status == "affected"),
                "seconds": round(self.seconds, 3)}

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "os": {"family": self.release.family, "version_id": self.release.version_id,
                                              "codename": self.release.codename},
                "package_db": self.package_db, "feeds": self.feeds, "summary": self.summary(),
                "findings": [f.to_json() for f in self.findings], "kernel": [k.to_json() for k in self.kernel],
                "notes": self.notes}


def release_of(os_release: dict[str, str], override: str | None = None) -> Release:
    family = FAMILIES.get(os_release.get("ID", "").lower(), os_release.get("ID", "").lower())
    codename = os_release.get("VERSION_CODENAME", "")
    version = os_release.get("VERSION_ID", "")
    if override:  # --suite bookworm / --release alpine:3.18
        fam, _, rest = override.partition(":")
        if rest:
            return Release(fam, rest, "")
        return Release(family or "debian", version, override)
    return Release(family, version, codename)


DEBIAN_CODENAMES = {"10": "buster", "11": "bullseye", "12": "bookworm", "13": "trixie", "14": "forky"}


def infer_debian_release(packages: list[InstalledPackage]) -> tuple[Release, str]:
    """No os-release (a 'custom' mmdebstrap rootfs without base-files): the stable-update suffixes of the
    installed versions (``+deb12u3``, ``~deb12u1``) name the release; said in the notes, never silent."""
    seen = Counter(m.group(1) for p in packages for m in [re.search(r"[+~]deb(\d+)u\d+", p.version)] if m)
    if not seen:
        return Release("debian", "", ""), ""
    number, count = seen.most_common(1)[0]
    codename = DEBIAN_CODENAMES.get(number, "")
    return Release("debian", number, codename), (
        f"no etc/os-release: Debian {number} ({codename or 'unknown codename'}) inferred from {count} package "
        f"version(s) carrying +deb{number}u; pass --suite to override")


def scan(target: str | Path, feed_paths: list[str | Path], *, suite: str | None = None,
         kernel_version: str | None = None, kernel_config: Sequence[str | Path] | None = None,
         kbuild_map: str | Path | None = None, trust: str = "kata", cmdline: str | None = None) -> ScanResult:
    """Scan one target. ``target``: an image/initrd/rootfs directory, or a dpkg status file."""
    start = time.monotonic()
    feeds = FeedSet.load(feed_paths)
    step("scan", f"loaded {len(feeds.feeds)} feed(s): {', '.join(f.describe() for f in feeds.feeds)}")
    p = Path(target)
    if p.is_dir() and not any(p.iterdir()):
        raise KataError("empty directory: nothing to scan", path=p)
    root: RootView | None = None
    facts = None
    try:
        if p.is_file() and p.read_bytes()[:9] in (b"Package: ",):
            db = PackageDB("dpkg", str(p), {}, parse_dpkg_status(p.read_bytes(), origin=str(p)))
            notes = ["scanned a bare dpkg status file: no image, so reachability is unknown"]
        else:
            root = open_image(p)
            step("scan", f"reading {root.describe()}")
            db = read_packages(root)

            facts = image_facts(root, cmdline=cmdline)
            notes = list(facts.notes)
        release = release_of(db.os_release, suite)
        if db.kind == "dpkg" and not suite and not (release.codename or release.version_id):
            release, why = infer_debian_release(db.packages)
            if why:
                notes.append(why)
        if db.kind == "none":
            notes.append("no package database found (dpkg/apk): the image cannot be scanned by package; "
                         "binary analysis would be needed")
        elif not release.family or not (release.codename or release.version_id):
            raise KataError("cannot tell the guest's distribution release (no etc/os-release)", path=p,
                            hint="pass --suite CODENAME, e.g. --suite bookworm")
        covered = {r for f in feeds.feeds for r in f.releases()}
        if covered and db.packages and not (covered & ({release.codename} | release.osv_ecosystems())):
            notes.append(f"no feed covers {release.family} {release.codename or release.version_id} "
                         f"(feeds cover: {', '.join(sorted(covered)[:6])})")
        findings = match_packages(db.packages, feeds, release)
        step("scan", f"{len(db.packages)} packages, {len(findings)} findings before ranking")

        notes += rank_findings(findings, db.packages, root, facts, trust=trust)
        kernel: list[KernelFinding] = []
        if feeds.kernel_records:
            if kernel_version:
                kconfig = read_kconfig(list(kernel_config)) if kernel_config else None
                kernel = evaluate_kernel(feeds.kernel_records, kernel_version, kconfig, load_kbuild_map(kbuild_map))
                affected = sum(1 for k in kernel if k.version_status == "affected")
                notes.append(f"guest kernel {kernel_version}: {len(feeds.kernel_records)} CNA record(s) checked, "
                             f"{affected} affect this version"
                             + ("" if kconfig else " (no kernel config: code reachability unknown)"))
            else:
                notes.append(f"{len(feeds.kernel_records)} kernel record(s) given but no guest kernel version "
                             "(--kernel-version): not evaluated")
    finally:
        if root is not None:
            root.close()
    return ScanResult(str(p), release, db.kind, db.packages, findings, kernel,
                      [f.describe() for f in feeds.feeds], notes, time.monotonic() - start)


# ------------------------------------------------------------------------------------------ CycloneDX
def cyclonedx(result: ScanResult) -> str:
    """CycloneDX 1.6 JSON: one component per installed package (purl), vulnerabilities with an analysis that
    records the Kata tailoring (reachability) so every downgrade is auditable."""
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.model.impact_analysis import ImpactAnalysisJustification, ImpactAnalysisState
    from cyclonedx.model.vulnerability import (
        BomTarget,
        Vulnerability,
        VulnerabilityAnalysis,
        VulnerabilityRating,
        VulnerabilitySeverity,
    )
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    bom = Bom()
    root_component = Component(name=Path(result.target).name, type=ComponentType.OPERATING_SYSTEM,
                               version=result.release.version_id or None)
    bom.metadata.component = root_component
    refs = {}
    distro = f"{result.release.family}-{result.release.version_id}" if result.release.version_id else None
    for pkg in result.packages:
        qualifiers = {k: v for k, v in (("arch", pkg.arch), ("distro", distro)) if v}
        if pkg.source != pkg.name:
            qualifiers["upstream"] = f"{pkg.source}@{pkg.source_version}"
        ptype = {"deb": "deb", "apk": "apk", "rpm": "rpm"}[pkg.ecosystem]
        ns = {"deb": result.release.family or "debian", "apk": "alpine",
              "rpm": result.release.family}[pkg.ecosystem]
        purl = PackageURL(type=ptype, namespace=ns, name=pkg.name, version=pkg.version, qualifiers=qualifiers)
        comp = Component(name=pkg.name, version=pkg.version, type=ComponentType.LIBRARY, purl=purl,
                         bom_ref=str(purl))
        bom.components.add(comp)
        refs[pkg.name] = comp.bom_ref
    bom.register_dependency(root_component, list(bom.components))
    sev = {s: getattr(VulnerabilitySeverity, s.upper()) for s in SEVERITIES}
    for f in result.findings:
        not_run = f.reachability == "present-not-run"
        analysis = VulnerabilityAnalysis(
            state=ImpactAnalysisState.IN_TRIAGE if not_run else ImpactAnalysisState.EXPLOITABLE,
            justification=ImpactAnalysisJustification.CODE_NOT_REACHABLE if not_run else None,
            detail="; ".join(f.reasons))
        vuln = Vulnerability(id=f.id, bom_ref=f"{f.id}:{f.package}", description=f.summary or None,
                             ratings=[VulnerabilityRating(severity=sev.get(f.rank, VulnerabilitySeverity.UNKNOWN),
                                                          method=None, justification="kata-tailored rank")],
                             affects=[BomTarget(ref=str(refs[f.package]))] if f.package in refs else [],
                             analysis=analysis, recommendation=f"upgrade {f.source} to {f.fixed_in}"
                             if f.fixed_in else "no fix available yet",
                             properties=[Property(name="pytest-kata:reachability", value=f.reachability),
                                         Property(name="pytest-kata:feed-severity", value=f.severity)])
        bom.vulnerabilities.add(vuln)
    kernel_versions = sorted({k.kernel for k in result.kernel})
    kernel_refs = {}
    for version in kernel_versions:
        purl = PackageURL(type="generic", name="linux", version=version)
        comp = Component(name="linux", version=version, type=ComponentType.OPERATING_SYSTEM, purl=purl,
                         bom_ref=f"guest-kernel:{version}")
        bom.components.add(comp)
        bom.register_dependency(root_component, [comp])
        kernel_refs[version] = comp.bom_ref
    for k in result.kernel:
        if k.version_status != "affected":
            continue
        state, justification = {
            "built": (ImpactAnalysisState.EXPLOITABLE, None),
            "not-built": (ImpactAnalysisState.NOT_AFFECTED, ImpactAnalysisJustification.CODE_NOT_PRESENT),
        }.get(k.config_reachability, (ImpactAnalysisState.IN_TRIAGE, None))
        bom.vulnerabilities.add(Vulnerability(
            id=k.id, bom_ref=f"{k.id}:linux-{k.kernel}", description=k.title or None,
            ratings=[VulnerabilityRating(severity=sev.get(k.rank, VulnerabilitySeverity.UNKNOWN),
                                         justification="kata-tailored rank (guest kernel config)")],
            affects=[BomTarget(ref=str(kernel_refs[k.kernel]))],
            analysis=VulnerabilityAnalysis(state=state, justification=justification, detail="; ".join(k.reasons)),
            properties=[Property(name="pytest-kata:kconfig", value=",".join(k.kconfig) or "unmapped"),
                        Property(name="pytest-kata:config-reachability", value=k.config_reachability)]))
    return JsonV1Dot6(bom).output_as_string(indent=2)


def write_outputs(result: ScanResult, *, sbom: str | Path | None = None, json_out: str | Path | None = None) -> None:
    if sbom:
        Path(sbom).write_text(cyclonedx(result), encoding="utf-8")
    if json_out:
        Path(json_out).write_text(json.dumps(result.to_json(), indent=2), encoding="utf-8")


def format_table(result: ScanResult) -> str:
    """Human output: findings ranked for the Kata guest, with the reasons."""
    lines = [f"{result.target}: {result.release.family} {result.release.codename or result.release.version_id}, "
             f"{result.package_db}, {len(result.packages)} packages, {len(result.findings)} findings "
             f"({result.seconds:.2f}s)"]
    order = {s: i for i, s in enumerate(reversed(SEVERITIES))}
    for f in sorted(result.findings, key=lambda f: (order.get(f.rank, 9), f.id, f.package)):
        fix = f"fixed in {f.fixed_in}" if f.fixed_in else "no fix yet"
        lines.append(f"  {f.rank:<8} {f.id:<18} {f.package} {f.installed} ({f.source} {f.source_version}; {fix})")
        lines.append(f"           feed severity {f.severity}; {'; '.join(f.reasons)}")
    for k in result.kernel:
        lines.append(f"  {k.rank:<8} {k.id:<18} linux {k.kernel}: {k.version_status}, {k.config_reachability} "
                     f"({', '.join(k.kconfig) or 'no Kconfig mapping'})")
        lines.append(f"           {'; '.join(k.reasons)}")
    for note in result.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
