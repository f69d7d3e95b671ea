"""Guest kernel hardening: every rule of ``kernel.toml`` (KSPP-derived, version-aware) on every guest kernel
configuration of the candidate (``config-*`` beside the kernel, or the kernel's IKCONFIG).

Items are ``KATA-KCONF-001[config-6.1.0-ref]``; Kata's structural needs (BPF for the cgroup device controller,
user namespaces, ...) are waived with their reason by the built-in ``kata-guest`` profile. When
kernel-hardening-checker is installed, its rows for the options a rule reads are attached as a cross-check.
"""

from __future__ import annotations


def test_guest_kernel(kata_kernel_case, kata_rule_check):
    """Guest kernel configuration rule."""
    kata_rule_check(kata_kernel_case)
