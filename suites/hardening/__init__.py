"""Hardening suite: runtime configuration, guest kernel and guest image rules, one item per rule and subject.

The rules are data (``pytest_kata/data/rules/*.toml``); profiles (``--kata-profile``) and waivers
(``--kata-waivers``) shape them. Run ``pytest suites/hardening --kata-candidate /opt/kata``.
"""
