"""Hosts a candidate is installed on and tested from, behind one :class:`~pytest_kata.hosts.base.Host` Protocol."""

from __future__ import annotations

from pytest_kata.hosts.base import Host, HostError, LocalHost, RunResult

__all__ = ["Host", "HostError", "LocalHost", "RunResult"]
