"""Placeholder: replaced by the bundle implementation."""
from __future__ import annotations
from typing import Any

def open_bundle(paths: Any) -> Any:
    raise NotImplementedError

def identify(paths: Any) -> dict[str, Any]:
    return {"path": paths, "version": None, "sha256": None}
