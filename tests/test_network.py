"""Test networks on real network namespaces, bridges and veth pairs (pyroute2), with negative controls."""

from __future__ import annotations

import ipaddress
import os
import shutil
import textwrap
from collections.abc import Iterator

import pytest

from pytest_kata import network, runid
from pytest_kata.network import NetworkError, TestNetwork, choose_subnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and bridges need root")


@pytest.fixture
def net(kata_run_id: str, request: pytest.FixtureRequest) -> Iterator[TestNetwork]:
    created = TestNetwork.create(kata_run_id, f"t{abs(hash(request.node.name)) % 10000}")
    yield created
    created.destroy()


def _root_addresses() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [ipaddress.ip_interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}") for a in ipr.get_addr()]


def _addresses_of(ifname: str) -> list[str]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index)]


def test_two_peers_ping_each_other_across_the_bridge(net: TestNetwork) -> None:
    a, b = net.add_peer("a"), net.add_peer("b")
    assert ipaddress.ip_address(a.ip) in net.subnet and ipaddress.ip_address(b.ip) in net.subnet
    assert a.ip != b.ip
    assert net.ping(a, b.ip)
    assert net.ping("b", a.ip)
    unused = str(list(net.subnet.hosts())[-1])
    assert not net.ping(a, unused, timeout=1), "an address nobody holds must not answer"


def test_addresses_live_only_inside_the_namespaces(net: TestNetwork) -> None:
    a = net.add_peer("a")
    assert not any(ipaddress.ip_interface(i).network.overlaps(net.subnet) for i in _root_addresses()
                   if i.version == 4), "the root netns must hold no address of the test network"
    assert _addresses_of(net.bridge) == [], "the bridge has no IPv4 nor link-local IPv6 address"
    assert _addresses_of(a.link) == []
    inside = a.run(["ip", "-4", "-o", "addr", "show", "dev", "eth0"], check=True).stdout
    assert f"{a.ip}/24" in inside
    routes = a.run(["ip", "-4", "route"], check=True).stdout
    assert "default" not in routes, "a peer has no way out of the segment"


def test_networks_of_one_run_are_isolated_from_each_other(kata_run_id: str, net: TestNetwork) -> None:
    with TestNetwork.create(kata_run_id, "other") as other:
        assert other.subnet != net.subnet and other.bridge != net.bridge
        a, b = net.add_peer("a"), other.add_peer("b")
        # give b an address of a's segment: only the bridge separates them, and it must
        spoof = net.allocate_ip("spoof")
        b.run(["ip", "addr", "add", f"{spoof}/24", "dev", "eth0"], check=True)
        assert not a.ping(spoof, timeout=1), "a peer on another bridge must be unreachable"
        c = net.add_peer("c")  # positive control: the same kind of extra address on a's own bridge answers
        c.run(["ip", "addr", "add", f"{spoof}/24", "dev", "eth0"], check=True)
        assert a.ping(spoof)


def test_names_carry_the_run_id_and_are_mapped(net: TestNetwork, kata_run_id: str) -> None:
    peer = net.add_peer("a")
    tap = net.attach_tap("h1")
    for link in (net.bridge, peer.link, tap):
        assert len(link) <= 15 and network.link_run_id(link) == kata_run_id
    assert runid.run_id_of(peer.netns) == kata_run_id
    reg = network.registry(kata_run_id)
    assert {net.bridge, peer.link, tap} <= set(reg["links"])
    assert reg["links"][tap]["kind"] == "tap" and peer.netns in reg["netns"]
    assert str(net.subnet) in reg["subnets"]


def test_tap_and_libvirt_interface_attach_to_the_bridge(net: TestNetwork) -> None:
    from pyroute2 import IPRoute

    tap = net.attach_tap("h1")
    with IPRoute() as ipr:
        bridge_index = ipr.link_lookup(ifname=net.bridge)[0]
        assert ipr.get_links(ipr.link_lookup(ifname=tap)[0])[0].get_attr("IFLA_MASTER") == bridge_index
    xml = net.interface_xml(mac="52:54:00:12:34:56")
    assert f"<source bridge='{net.bridge}'/>" in xml and "52:54:00:12:34:56" in xml


def test_destroy_leaves_no_link_namespace_or_subnet(kata_run_id: str) -> None:
    net = TestNetwork.create(kata_run_id, "gone")
    peers = [net.add_peer("a"), net.add_peer("b")]
    tap = net.attach_tap()
    names = {net.bridge, tap, *(p.link for p in peers)}
    assert names <= set(network.link_names())
    net.destroy()
    net.destroy()  # idempotent
    assert not names & set(network.link_names())
    assert not {p.netns for p in peers} & set(network.netns_names())
    assert str(net.subnet) not in network.registry(kata_run_id)["subnets"]
    with pytest.raises(NetworkError, match="destroyed"):
        net.add_peer("late")


def test_reset_removes_peers_but_keeps_host_addresses(net: TestNetwork) -> None:
    host_ip = net.allocate_ip("host-0")
    keep = net.add_peer("keep")
    temp = net.add_peer("temp")
    net.reset(keep=["keep"])
    assert set(net.peers) == {"keep"} and temp.netns not in network.netns_names()
    assert net.allocate_ip("host-0") == host_ip
    assert net.add_peer("new").ip not in (host_ip, keep.ip)


def test_subnet_choice_avoids_machine_routes_and_other_runs() -> None:
    first = choose_subnet("seed", taken=set(), machine=[])
    assert first.subnet_of(network.SUBNET_POOL) and first.prefixlen == 24
    assert choose_subnet("seed", taken=set(), machine=[]) == first, "the choice is stable for a seed"
    assert choose_subnet("seed", taken={first}, machine=[]) != first
    assert choose_subnet("seed", taken=set(), machine=[ipaddress.ip_network(f"{first.network_address}/28")]) != first
    everything = set(network.SUBNET_POOL.subnets(new_prefix=24))
    with pytest.raises(NetworkError, match="no free /24"):
        choose_subnet("seed", taken=everything, machine=[])
    with pytest.raises(NetworkError, match="no free /24"):
        choose_subnet("seed", taken=set(), machine=[ipaddress.ip_network("10.0.0.0/8")])


def test_a_real_route_on_the_machine_is_never_shadowed() -> None:
    """The live check: whatever /24 is chosen, it overlaps no address or route of the root netns."""
    chosen = choose_subnet("live-check")
    for existing in network._machine_networks():
        assert not chosen.overlaps(existing)


@pytest.mark.skipif(not shutil.which("socat"), reason="socat is not installed")
def test_tcp_reachability_between_peers_and_listeners_die_with_their_peer(net: TestNetwork) -> None:
    server, client = net.add_peer("server"), net.add_peer("client")
    listener = server.serve_tcp(8080, reply="hello-peer")
    assert client.connect_tcp(server.ip, 8080) == "hello-peer"
    assert client.connect_tcp(server.ip, 8081, timeout=1) is None, "a closed port is reported unreachable"
    assert listener.pid in network.processes_in_netns(server.netns)
    net.remove_peer(server)
    assert listener.wait(timeout=10) is not None, "a listener must not outlive (and pin) its namespace"
    assert client.connect_tcp(server.ip, 8080, timeout=1) is None


def test_duplicate_peer_is_a_clear_error(net: TestNetwork) -> None:
    net.add_peer("a")
    with pytest.raises(NetworkError, match="already exists"):
        net.add_peer("a")


def test_kata_network_fixture_gives_each_test_fresh_peers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(textwrap.dedent("""
        from pytest_kata import network

        def test_one(kata_network):
            peer = kata_network.add_peer("x")
            assert kata_network.ping(peer, peer.ip)
            open("netns.txt", "w").write(peer.netns)

        def test_two(kata_network):
            assert "x" not in kata_network.peers
            assert open("netns.txt").read() not in network.netns_names()
            kata_network.add_peer("x")  # the name is free again
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    leftover = (pytester.path / "netns.txt").read_text()
    assert runid.run_id_of(leftover) not in {runid.run_id_of(n) for n in network.netns_names()}
