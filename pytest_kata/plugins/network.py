"""Test-network fixtures: a session-scoped maker and a per-test network with fresh peers.

``make_kata_network(name="net0")`` creates (once per xdist worker and name) a run-owned bridge on its own
/24; hosts attach to it with ``net.interface_xml()``. ``kata_network`` is the default network with the peers
a test added removed after the test, so every test starts from an empty segment (hosts stay attached).
With ``--kata-keep-on-failure`` a failed test's peers, and the networks of a failed session, are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pytest_kata.errors import KataError
from pytest_kata.network import TestNetwork
from pytest_kata.options import KataSettings
from pytest_kata.progress import step

FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(scope="session")
def make_kata_network(kata_run_id: str, kata_settings: KataSettings,
                      request: pytest.FixtureRequest) -> Iterator[Callable[..., TestNetwork]]:
    """``make_kata_network(name="net0") -> TestNetwork``: one network per name for the session."""
    networks: dict[str, TestNetwork] = {}

    def make(name: str = "net0") -> TestNetwork:
        if name not in networks:
            try:
                networks[name] = TestNetwork.create(kata_run_id, name)
            except KataError as exc:
                pytest.skip(f"no test network: {exc}")
            except PermissionError as exc:
                pytest.skip(f"no test network (needs root): {exc}")
        return networks[name]

    yield make
    if kata_settings.keep_on_failure and request.session.testsfailed:
        for net in networks.values():
            step("network", f"--kata-keep-on-failure: keeping {net.bridge} ({net.subnet}) with peers "
                 f"{', '.join(p.netns for p in net.peers.values()) or '-'}")
        return
    for net in networks.values():
        net.destroy()


@pytest.fixture
def kata_network(make_kata_network: Callable[..., TestNetwork], kata_settings: KataSettings,
                 request: pytest.FixtureRequest) -> Iterator[TestNetwork]:
    """The session's default network, reset after the test: peers and taps the test added are removed."""
    net = make_kata_network()
    before = [*net.peers, *net.taps]
    yield net
    if kata_settings.keep_on_failure and request.node.stash.get(FAILED, False):
        return
    net.reset(keep=before)
