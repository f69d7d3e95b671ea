"""Kata runtime configuration files: load, merge ``config.d/`` drop-ins as Kata does, and address keys.

Kata reads the base file, then every ``*.toml`` in the ``config.d`` directory beside it in lexical order,
each deep-merged over the result (tables merge, scalars and arrays replace). Keys are addressed with dotted
paths such as ``hypervisor.qemu.enable_annotations``; ``hypervisor.*.x`` matches whichever hypervisor
table the file has.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata.errors import ConfigError

MISSING: Any = object()


def _load_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("no such file", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", path=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=path) from None


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@dataclass
class KataConfig:
    """One effective runtime configuration (base file plus drop-ins)."""

    path: Path
    data: dict[str, Any]
    dropins: list[Path] = field(default_factory=list)
    base_data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def shim(self) -> str:
        """``configuration-qemu-runtime-rs.toml`` → ``qemu-runtime-rs``."""
        return self.path.stem.removeprefix("configuration-").removeprefix("configuration")  or "default"

    @property
    def runtime_rs(self) -> bool:
        return "runtime-rs" in self.path.parts or self.shim.endswith("runtime-rs") or self.shim == "dragonball"

    @property
    def hypervisor(self) -> str | None:
        """The hypervisor table name (qemu, clh, firecracker, dragonball, ...)."""
        tables = self.data.get("hypervisor", {})
        return next(iter(tables), None) if isinstance(tables, dict) else None

    @property
    def confidential(self) -> bool:
        """A TEE guest by content: ``confidential_guest = true`` in the file as shipped or after drop-ins (so
        that a drop-in turning the TEE off still meets the confidential rules, and fails them)."""
        hv = self.hypervisor
        shipped = self.base_data.get("hypervisor", {}).get(hv, {}) if hv else {}
        return self.hypervisor_table().get("confidential_guest") is True or (
            isinstance(shipped, dict) and shipped.get("confidential_guest") is True)

    def hypervisor_table(self) -> dict[str, Any]:
        hv = self.hypervisor
        return self.data.get("hypervisor", {}).get(hv, {}) if hv else {}

    def get(self, keypath: str, default: Any = MISSING) -> Any:
        """Value at a dotted path; ``*`` in the hypervisor position means this file's hypervisor."""
        return lookup(self.data, keypath, default)

    def with_changes(self, changes: dict[str, Any]) -> KataConfig:
        """A copy with dotted keys set (or removed when the value is MISSING): how tests mutate configs."""
        data = copy.deepcopy(self.data)
        for keypath, value in changes.items():
            parts = keypath.split(".")
            node = data
            for i, part in enumerate(parts[:-1]):
                if part == "*":
                    part = next(iter(node))
                    parts[i] = part
                node = node.setdefault(part, {})
            if value is MISSING:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
        return KataConfig(self.path, data, list(self.dropins), self.base_data)


def lookup(data: dict[str, Any], keypath: str, default: Any = MISSING) -> Any:
    """The value at a dotted path in nested tables; ``*`` takes the first (for Kata: the only) sub-table."""
    node: Any = data
    for part in keypath.split("."):
        if part == "*" and isinstance(node, dict) and node:
            part = next(iter(node))
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def dropin_dir(path: Path) -> Path:
    return path.parent / "config.d"


def load_config(path: str | Path, *, dropins: bool = True) -> KataConfig:
    """Load a configuration file and merge its ``config.d/*.toml`` drop-ins in lexical order."""
    path = Path(path)
    base = _load_toml(path)
    data = base
    used: list[Path] = []
    ddir = dropin_dir(path)
    if dropins and ddir.is_dir():
        for dropin in sorted(ddir.glob("*.toml"), key=lambda p: p.name):
            data = deep_merge(data, _load_toml(dropin))
            used.append(dropin)
    return KataConfig(path, data, used, base)


def dumps(data: dict[str, Any]) -> str:
    """Serialise a configuration back to TOML (for attachments and mutated copies)."""
    import tomli_w

    return str(tomli_w.dumps(data))
