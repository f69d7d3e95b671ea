"""The guest's package database, read from an image's :class:`~pytest_kata.images.read.RootView`: dpkg and
apk (rpm is detected and reported as unsupported unless the ``rpm`` binary is on PATH), and ``os-release``;
what vulnerability matching and the attack-surface measures need of each package."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from urllib.parse import quote

from pytest_kata.images.read import ImageError, RootView


@dataclass
class InstalledPackage:
    """A package the guest's database says is installed, with what vulnerability matching needs."""

    name: str
    version: str
    source: str
    source_version: str
    arch: str = ""
    installed_size_kib: int = 0
    files: list[str] = field(default_factory=list)
    ecosystem: str = "deb"  # deb, apk, rpm

    @property
    def purl(self) -> str:
        ns = {"deb": "debian", "apk": "alpine", "rpm": "rpm"}.get(self.ecosystem, "")
        q = f"?arch={self.arch}" if self.arch else ""
        return f"pkg:{self.ecosystem}/{ns}/{quote(self.name)}@{quote(self.version)}{q}"


@dataclass
class PackageDB:
    """The guest's package inventory and OS identity."""

    kind: str  # dpkg, apk, rpm, none
    path: str | None
    os_release: dict[str, str]
    packages: list[InstalledPackage]

    @property
    def os_id(self) -> str:
        return self.os_release.get("ID", "")

    @property
    def codename(self) -> str:
        return self.os_release.get("VERSION_CODENAME", "")

    def by_name(self) -> dict[str, InstalledPackage]:
        return {p.name: p for p in self.packages}


DPKG_STATUS = "/var/lib/dpkg/status"
APK_INSTALLED = "/lib/apk/db/installed"
RPM_DBS = ("/var/lib/rpm/rpmdb.sqlite", "/var/lib/rpm/Packages", "/usr/lib/sysimage/rpm/rpmdb.sqlite")
_SOURCE_RE = re.compile(r"^([a-zA-Z0-9.+-]+)(?:\s+\((\S+)\))?$")


def parse_os_release(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            out[key] = value.strip().strip('"').strip("'")
    return out


def read_packages(root: RootView, *, with_files: bool = True) -> PackageDB:
    """Find and parse the package database (dpkg, apk); rpm is reported clearly as unsupported."""
    osr = parse_os_release(root.read_text("/etc/os-release") or root.read_text("/usr/lib/os-release"))
    if root.exists(DPKG_STATUS):
        return PackageDB("dpkg", DPKG_STATUS, osr, parse_dpkg_status(root.read(DPKG_STATUS), root, with_files,
                                                                     origin=f"{root.source}:{DPKG_STATUS}"))
    if root.exists(APK_INSTALLED):
        return PackageDB("apk", APK_INSTALLED, osr, parse_apk_installed(root.read(APK_INSTALLED),
                                                                        origin=f"{root.source}:{APK_INSTALLED}"))
    for rpmdb in RPM_DBS:
        if root.exists(rpmdb):
            raise ImageError(f"rpm database {rpmdb} present, but reading rpm databases is unsupported",
                             path=root.source, hint="scan an SBOM made with `rpm --root` instead")
    return PackageDB("none", None, osr, [])


def parse_dpkg_status(data: bytes, root: RootView | None = None, with_files: bool = False,
                      origin: str = "status") -> list[InstalledPackage]:
    """Installed packages of a dpkg status file (the same reading as debsecan: Status contains 'installed')."""
    from debian import deb822

    packages: list[InstalledPackage] = []
    try:
        paragraphs = list(deb822.Deb822.iter_paragraphs(data.decode("utf-8", "replace").splitlines(True),
                                                        use_apt_pkg=False))
    except Exception as exc:
        raise ImageError(f"malformed dpkg status: {exc}", path=origin) from None
    for para in paragraphs:
        name, status, version = para.get("Package"), para.get("Status"), para.get("Version")
        if not name or not status:
            raise ImageError("malformed dpkg status: a stanza lacks Package or Status", path=origin)
        if "installed" not in status.split():
            continue
        if not version:
            raise ImageError(f"malformed dpkg status: {name} has no Version", path=origin)
        source, source_version = name, version
        if para.get("Source"):
            m = _SOURCE_RE.match(para["Source"].strip())
            if not m:
                raise ImageError(f"malformed dpkg status: {name} has Source {para['Source']!r}", path=origin)
            source, source_version = m.group(1), m.group(2) or version
        try:
            size = int(para.get("Installed-Size", "0") or 0)
        except ValueError:
            size = 0
        packages.append(InstalledPackage(name, version, source, source_version, para.get("Architecture", ""),
                                         size))
    if with_files and root is not None:
        lists = {}
        for pkg in packages:
            for cand in (f"/var/lib/dpkg/info/{pkg.name}:{pkg.arch}.list", f"/var/lib/dpkg/info/{pkg.name}.list"):
                if root.entry(cand) is not None:
                    lists[pkg.name] = cand
                    break
        contents = root.read_many(lists.values())
        for pkg in packages:
            body = contents.get(lists.get(pkg.name, ""))
            if body:
                pkg.files = [line for line in body.decode("utf-8", "replace").splitlines() if line and line != "/."]
    return packages


def parse_apk_installed(data: bytes, origin: str = "installed") -> list[InstalledPackage]:
    """Alpine ``lib/apk/db/installed``: blank-line separated records of ``K:value`` lines (no library exists)."""
    packages: list[InstalledPackage] = []
    for block in data.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        files: list[str] = []
        directory = ""
        for line in block.splitlines():
            if len(line) < 2 or line[1] != ":":
                if line.strip():
                    raise ImageError(f"malformed apk database line {line[:40]!r}", path=origin)
                continue
            key, value = line[0], line[2:]
            if key == "F":
                directory = value
            elif key == "R":
                files.append("/" + posixpath.join(directory, value))
            else:
                fields.setdefault(key, value)
        if not fields:
            continue
        if "P" not in fields or "V" not in fields:
            raise ImageError("malformed apk database: a record lacks P: or V:", path=origin)
        try:
            size_kib = int(fields.get("I", "0")) // 1024
        except ValueError:
            size_kib = 0
        packages.append(InstalledPackage(fields["P"], fields["V"], fields.get("o", fields["P"]), fields["V"],
                                         fields.get("A", ""), size_kib, files, "apk"))
    return packages

