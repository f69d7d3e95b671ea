"""Runtime configuration hardening: every rule of ``runtime-config.toml`` on every checked configuration.

Items are generated per (rule, configuration file) for every configuration the candidate ships
(``--kata-shim X`` narrows to one), with ids such as ``KATA-CFG-006[configuration-qemu.toml]``; the verdict
table groups them by file. Drift of an installed configuration (``--kata-installed-config``) is rule
KATA-CFG-060.
"""

from __future__ import annotations


def test_runtime_config(kata_config_case, kata_rule_check):
    """Runtime configuration rule."""
    kata_rule_check(kata_config_case)
