"""Vulnerability scan of a Kata guest image, tailored to what runs in the guest.

:mod:`feeds` reads Debian tracker JSON, debsecan feeds, OSV, Alpine secdb and kernel CNA records from files;
:mod:`match` compares versions with python-debian / univers (never by hand) using debsecan's semantics;
:mod:`context` ranks findings by what the agent and its tools run or load; :mod:`kernel` weights kernel CVEs
by the guest kernel config; :mod:`scan` ties them together and writes JSON and CycloneDX.
"""

from __future__ import annotations

from pytest_kata.vuln.scan import ScanResult, cyclonedx, format_table, scan, write_outputs

__all__ = ["ScanResult", "cyclonedx", "format_table", "scan", "write_outputs"]
