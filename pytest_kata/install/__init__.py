"""Install, upgrade and roll back Kata bundles on hosts, recorded in a journal and proven by state digests.

* :mod:`.state` — capture what an install may touch (manifest, containerd config, handlers) and diff it;
* :mod:`.journal` — the JSON-lines install journal kept on each host;
* :mod:`.installer` — the atomic, journaled installer with automatic and explicit rollback (its steps are one
  table of name, do and undo);
* :mod:`.containerd` — how the installer restarts containerd and reads its handlers (systemd, a private
  containerd for a sysroot, or none);
* :mod:`.workloads` — workloads planted before an upgrade that must start again after its rollback;
* :mod:`.rollout` — rolling updates across hosts with a health gate after each batch.
"""

from __future__ import annotations

from pytest_kata.install.containerd import NoContainerd, SysrootContainerd, SystemdContainerd
from pytest_kata.install.errors import InstallError
from pytest_kata.install.installer import Installer, InstallReport, RollbackReport
from pytest_kata.install.state import State, StateDiff, capture_state, diff_states

__all__ = ["InstallError", "InstallReport", "Installer", "NoContainerd", "RollbackReport", "State",
           "StateDiff", "SysrootContainerd", "SystemdContainerd", "capture_state", "diff_states"]
