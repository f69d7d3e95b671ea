"""Match installed packages against normalised feed entries, with debsecan's semantics for Debian.

Rules (shared by Trivy, Grype and debsecan): match on the *source* package and its version (a binNMU's
``Source: pkg (ver)``), report on each installed binary; only packages whose dpkg status says ``installed``
count; the distribution release's fixed version decides; a feed entry flagged as binary applies to the binary
package; a source with no feed entry falls back to the binary name (debsecan does the same).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_kata.images.packages import InstalledPackage
from pytest_kata.vuln.feeds import FeedSet, PackageVuln, Release
from pytest_kata.vuln.versions import Undetermined, compare


@dataclass
class Finding:
    """One vulnerability on one installed binary package, with its Kata-tailored rank and the reasons."""

    id: str
    package: str
    installed: str
    source: str
    source_version: str
    fixed_in: str | None
    fix_available: bool
    severity: str  # from the feed; "unknown" when it gives none
    status: str = "affected"  # affected | undetermined
    rank: str = ""  # Kata-tailored severity (what --fail-on compares)
    reachability: str = "unknown"  # runs-in-guest | loaded-by-guest-process | present-not-run | unknown
    reasons: list[str] = field(default_factory=list)
    scope: str = ""
    nodsa: str = ""
    aliases: list[str] = field(default_factory=list)
    feeds: list[str] = field(default_factory=list)
    summary: str = ""
    ecosystem: str = "deb"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def is_affected(vuln: PackageVuln, version: str) -> bool:
    """OSV/debsecan evaluation of one version against one entry (raises Undetermined)."""
    eco = vuln.ecosystem
    for other in vuln.not_affected_versions:
        if compare(eco, version, other) == 0:
            return False
    for listed in vuln.versions:
        if compare(eco, version, listed) == 0:
            return True
    for rng in vuln.ranges:
        if rng.introduced not in (None, "0") and compare(eco, version, rng.introduced) < 0:
            continue
        if rng.fixed and compare(eco, version, rng.fixed) >= 0:
            continue
        if rng.last_affected and compare(eco, version, rng.last_affected) > 0:
            continue
        return True
    return False


def match_packages(packages: list[InstalledPackage], feeds: FeedSet, release: Release) -> list[Finding]:
    findings: dict[tuple[str, str], Finding] = {}
    for pkg in packages:
        vulns = feeds.lookup(pkg.source, release)
        if not vulns and not feeds.has_package(pkg.source) and pkg.name != pkg.source:
            vulns = feeds.lookup(pkg.name, release)
        for vuln in vulns:
            if vuln.binary:
                if vuln.package != pkg.name:
                    continue
                version = pkg.version
            else:
                if vuln.package != pkg.source:
                    continue  # a source entry found through the binary-name fallback: debsecan skips it too
                version = pkg.source_version
            status = "affected"
            try:
                if not is_affected(vuln, version):
                    continue
            except Undetermined as exc:
                status = "undetermined"
                reason = str(exc)
            else:
                reason = ""
            key = (vuln.id, pkg.name)
            if key in findings:
                if vuln.feed not in findings[key].feeds:
                    findings[key].feeds.append(vuln.feed)
                continue
            f = Finding(id=vuln.id, package=pkg.name, installed=pkg.version, source=pkg.source,
                        source_version=pkg.source_version, fixed_in=vuln.fixed_in,
                        fix_available=vuln.fix_available, severity=vuln.severity or "unknown", status=status,
                        scope=vuln.scope, nodsa=vuln.nodsa, aliases=list(vuln.aliases), feeds=[vuln.feed],
                        summary=vuln.summary, ecosystem=pkg.ecosystem)
            if reason:
                f.reasons.append(reason)
            findings[key] = f
    return sorted(findings.values(), key=lambda f: (f.id, f.package))
