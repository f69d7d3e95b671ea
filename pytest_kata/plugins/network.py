"""Test-network fixtures: a session-scoped maker and a per-test network with fresh peers.

``make_kata_network(name="net0")`` creates (once per xdist worker and name) a run-owned bridge on its own
/24; hosts attach to it with ``net.interface_xml()``. ``kata_network`` is the default network with the peers
a test added removed after the test, so every test starts from an empty segment (hosts stay attached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from pytest_kata.errors import KataError
from pytest_kata.network import TestNetwork


@pytest.fixture(scope="session")
def make_kata_network(kata_run_id: str) -> Iterator[Callable[..., TestNetwork]]:
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
    for net in networks.values():
        net.destroy()


@pytest.fixture
def kata_network(make_kata_network: Callable[..., TestNetwork]) -> Iterator[TestNetwork]:
    """The session's default network, reset after the test: peers and taps the test added are removed."""
    net = make_kata_network()
    before = [*net.peers, *net.taps]
    yield net
    net.reset(keep=before)
