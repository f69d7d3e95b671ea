"""Every ``--kata-*`` option in one table, so that the CLI flag, the ini twin and ``kata.toml`` agree.

Precedence, highest first: command line, ini file (``[pytest]``/``[tool.pytest.ini_options]``), ``kata.toml``
(or ``[tool.pytest_kata]`` in ``pyproject.toml``) in the rootdir, then the default. Library code reads the
resolved values from :class:`KataSettings`; it never sees pytest.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from pytest_kata.errors import ConfigError
from pytest_kata.resources import LOCAL_LIBVIRT_URI
from pytest_kata.severities import SEVERITIES

OptType = Literal["path", "paths", "str", "int", "float", "bool", "choice"]


@dataclass(frozen=True)
class Option:
    name: str  # settings attribute; flag is --kata-<name with - for _>, ini/toml key is kata_<name> / <name>
    type: OptType
    help: str
    default: Any = None
    choices: tuple[str, ...] = ()
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--kata-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "kata_" + self.name


OPTIONS: tuple[Option, ...] = (
    # the candidate and its gate
    Option("candidate", "paths", "candidate bundle: a kata-static .tar.xz/.tar.gz/.tar.zst, an /opt/kata tree or a "
           "root holding opt/kata; repeat (or comma-separate) to give the split 4.1 tarballs together", metavar="PATH"),
    Option("baseline", "paths", "the release the candidate replaces (same forms as --kata-candidate)", metavar="PATH"),
    Option("shim", "str", "narrow the configuration checks to one configuration/handler, e.g. qemu, clh, "
           "qemu-runtime-rs (default: every shipped configuration, as 'all'; workloads use the bundle's default "
           "shim)", metavar="SHIM"),
    Option("profile", "choice", "rule profile: which rules apply and at what severity", "default",
           choices=("default", "strict", "confidential")),
    Option("waivers", "path", "TOML file of waivers (rule id, justification, expiry)", metavar="FILE"),
    Option("advisories", "paths", "advisory feed: OSV JSON file, directory or GitHub advisory-database tree "
           "(default: the Kata advisories shipped with pytest-kata)", metavar="FEED"),
    Option("commit", "str", "the candidate is a commit build: the advisory gate decides by git ancestry (fix "
           "commit an ancestor of SHA?) in --kata-repo", metavar="SHA"),
    Option("repo", "path", "a kata-containers git clone for commit builds (--kata-commit, or a pseudo-version / "
           "git describe version)", metavar="PATH"),
    Option("backports", "path", "vendor builds (e.g. 3.19.1.kata2): TOML [backports] table of advisory id = "
           "the backported fix; judged by the upstream base plus this list", metavar="FILE"),
    Option("report", "path", "write the JSON verdict to FILE", metavar="FILE"),
    Option("fail_on", "choice", "lowest severity whose failure rejects the candidate", "high", choices=SEVERITIES),
    Option("keep_on_failure", "bool", "keep failed hosts/sandboxes running for inspection and print how to reach them",
           False),
    Option("installed_config", "path", "an installed configuration.toml to check for drift against the shipped one",
           metavar="FILE"),
    # hosts
    Option("hosts", "int", "how many KVM hosts to provision per run", 1, metavar="N"),
    Option("host_provider", "choice", "where hosts come from", "libvirt", choices=("libvirt", "local", "ssh")),
    Option("libvirt_uri", "str", "libvirt connection URI (remote qemu+ssh:// URIs scale out)", LOCAL_LIBVIRT_URI,
           metavar="URI"),
    Option("host_image", "path", "prebuilt host image (qcow2/raw); default: build vm-images' host recipe (cached)",
           metavar="FILE"),
    Option("accel", "choice", "VM acceleration: auto detects whether KVM really works here", "auto",
           choices=("auto", "kvm", "tcg")),
    Option("boot_timeout", "float", "seconds a host may take to reach its prompt", 240.0, metavar="SECONDS"),
    Option("host_panic", "choice", "what a kernel panic/oops/BUG/call trace in a host's console or journal during a "
           "test does", "fail", choices=("fail", "warn", "ignore")),
    Option("ssh_hosts", "str", "comma-separated user@host for --kata-host-provider ssh", metavar="LIST"),
    # sandboxes
    Option("runtime", "str", "runtime handler for workload tests: kata-<shim> (candidate), runc or runsc (controls)",
           metavar="HANDLER"),
    Option("driver", "choice", "sandbox driver: direct boots the guest kernel+image; containerd uses ctr + a "
           "runtime handler", "auto", choices=("auto", "direct", "containerd")),
    # guest image
    Option("vulns", "paths", "vulnerability feed(s): Debian tracker JSON, OSV dir/zip, Alpine secdb, kernel CNA "
           "records", metavar="FEED"),
    Option("surface_budget", "float", "allowed growth (percent) of the guest image attack surface against the "
           "baseline", 10.0, metavar="PERCENT"),
)

BY_NAME = {o.name: o for o in OPTIONS}


@dataclass
class KataSettings:
    """The resolved value of every option (one typed field per entry of :data:`OPTIONS`), plus where each
    came from (for the run header) and the rootdir relative paths were resolved against."""

    candidate: list[str] | None = None
    baseline: list[str] | None = None
    shim: str | None = None
    profile: str = "default"
    waivers: str | None = None
    advisories: list[str] | None = None
    commit: str | None = None
    repo: str | None = None
    backports: str | None = None
    report: str | None = None
    fail_on: str = "high"
    keep_on_failure: bool = False
    installed_config: str | None = None
    hosts: int = 1
    host_provider: str = "libvirt"
    libvirt_uri: str = LOCAL_LIBVIRT_URI
    host_image: str | None = None
    accel: str = "auto"
    boot_timeout: float = 240.0
    host_panic: str = "fail"
    ssh_hosts: str | None = None
    runtime: str | None = None
    driver: str = "auto"
    vulns: list[str] | None = None
    surface_budget: float = 10.0
    sources: dict[str, str] = field(default_factory=dict)
    rootdir: Path = field(default_factory=Path.cwd)

    @property
    def given(self) -> bool:
        """Whether any option was set (command line, ini or kata.toml): the session asks for Kata."""
        return any(source != "default" for source in self.sources.values())

    def value(self, name: str) -> Any:
        """The value of the option ``name`` (an entry of :data:`OPTIONS`)."""
        if name not in BY_NAME:
            raise KeyError(name)
        return getattr(self, name)


SETTING_FIELDS = frozenset(f.name for f in fields(KataSettings)) - {"sources", "rootdir"}


def _convert(option: Option, raw: Any, origin: str, base: Path) -> Any:
    """Turn a CLI/ini/toml value into the option's type; bad values name their origin."""
    if raw is None:
        return None
    where = f"{origin}: {option.name}"
    try:
        if option.type == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true/false, got {raw!r}")
        if option.type == "int":
            return int(raw)
        if option.type == "float":
            return float(raw)
        if option.type == "choice":
            value = str(raw).strip().lower()
            if value not in option.choices:
                raise ValueError(f"expected one of {', '.join(option.choices)}, got {raw!r}")
            return value
        if option.type == "path":
            return _resolve(str(raw), base)
        if option.type == "paths":
            items = raw if isinstance(raw, list | tuple) else [raw]
            out: list[str] = []
            for item in items:
                out.extend(p.strip() for p in str(item).replace("\n", ",").split(",") if p.strip())
            return [_resolve(p, base) for p in out] or None
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value for {option.flag}: {exc}", path=where) from None


def _resolve(text: str, base: Path) -> str:
    if "://" in text:  # URLs (feeds) stay as given
        return text
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p))


def read_kata_toml(rootdir: Path) -> tuple[dict[str, Any], Path | None]:
    """Options from ``kata.toml`` or ``[tool.pytest_kata]`` in ``pyproject.toml`` (kata.toml wins)."""
    kata_toml = rootdir / "kata.toml"
    pyproject = rootdir / "pyproject.toml"
    for path, section in ((kata_toml, None), (pyproject, ("tool", "pytest_kata"))):
        if not path.is_file():
            continue
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read options: {exc}", path=path) from None
        if section:
            for key in section:
                data = data.get(key, {}) if isinstance(data, dict) else {}
            if not data:
                continue
        if not isinstance(data, dict):
            raise ConfigError("expected a table of options", path=path)
        table = data.get("kata", data) if path == kata_toml else data
        normalised = {str(k).replace("-", "_").removeprefix("kata_"): v for k, v in table.items()}
        unknown = sorted(set(normalised) - set(BY_NAME))
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(BY_NAME))}",
                              path=path)
        return normalised, path
    return {}, None


def resolve_settings(cli: dict[str, Any], ini: dict[str, Any], rootdir: Path, cwd: Path | None = None) -> KataSettings:
    """Merge the sources by precedence. ``cli``/``ini`` hold None for options not given there."""
    toml_values, toml_path = read_kata_toml(rootdir)
    cwd = cwd or Path.cwd()
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        for origin, given, base in (("command line", cli, cwd), ("ini", ini, rootdir),
                                    (str(toml_path), toml_values, rootdir)):
            raw = given.get(option.name)
            if raw is not None and raw != [] and raw != "":
                values[option.name] = _convert(option, raw, origin, base)
                sources[option.name] = origin
                break
        else:
            values[option.name] = option.default
            sources[option.name] = "default"
    return KataSettings(**values, sources=sources, rootdir=rootdir)

