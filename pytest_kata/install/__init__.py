"""Install, upgrade and roll back Kata bundles on hosts, recorded in a journal and proven by state digests.

* :mod:`.state` — capture what an install may touch (manifest, containerd config, handlers) and diff it;
* :mod:`.journal` — the JSON-lines install journal kept on each host;
* :mod:`.installer` — the atomic, journaled installer with automatic and explicit rollback;
* :mod:`.rollout` — rolling updates across hosts with a health gate after each batch.
"""

from __future__ import annotations

from pytest_kata.install.installer import (
    Installer,
    InstallError,
    InstallReport,
    NoContainerd,
    RollbackReport,
    SysrootContainerd,
    SystemdContainerd,
)
from pytest_kata.install.state import State, StateDiff, capture_state, diff_states

__all__ = ["InstallError", "InstallReport", "Installer", "NoContainerd", "RollbackReport", "State",
           "StateDiff", "SysrootContainerd", "SystemdContainerd", "capture_state", "diff_states"]
