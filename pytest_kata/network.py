"""Test networks the run owns: a bridge, network namespaces as test peers, veth pairs, taps (pyroute2).

Layout and why
    One :class:`TestNetwork` = one Linux bridge in the **root** network namespace, with no address and no
    route there (IPv6 is disabled on it, and its ``nf_call_iptables``/``ip6tables``/``arptables`` are off so
    the machine's firewall neither sees nor filters its frames). The bridge must live in the root netns
    because libvirtd does: on a user's machine the harness uses the libvirtd that is already running, and
    there is only one libvirtd per machine (its socket path is fixed), so a bridge inside a run netns would
    be invisible to it. Hosts attach with ``<interface type='bridge'>`` (:meth:`TestNetwork.interface_xml`);
    raw qemu attaches a tap (:meth:`TestNetwork.attach_tap`). Test peers are network namespaces joined to the
    bridge by a veth pair; every IP address lives inside a peer namespace or a guest, never in the root
    netns, so no traffic ever leaves the bridge. The harness defines no libvirt networks (a libvirt NAT
    network would only be acceptable inside a namespace the run created, and nothing here needs one).

Use
    ``net = TestNetwork.create(run_id, "net0")`` (or the ``make_kata_network``/``kata_network`` fixtures);
    ``peer = net.add_peer("p")`` → ``Peer(netns, ip)`` with ``run``/``popen``/``ping``/``serve_tcp``/
    ``connect_tcp``; a libvirt host gets ``net.interface_xml()`` in its domain XML and an address from
    ``net.allocate_ip(host_name)``, which it configures itself (``ip addr add IP/24 dev <nic>``); raw qemu
    gets ``net.attach_tap(owner)``; ``net.reset()`` drops peers and taps, ``net.destroy()`` everything.

Address ranges
    Each network gets a /24 inside ``10.213.0.0/16``, chosen from a hash of run id, xdist worker and network
    name, skipping any /24 that overlaps an address or route of the machine (default routes aside) or a
    subnet another run has registered. ``.1`` is never handed out (left for a gateway a test might add);
    peers and hosts get ``.2`` upwards via :meth:`TestNetwork.allocate_ip`.

Names
    Network namespaces: ``kt-<8hex>-<worker>-<network>-<peer>`` (no length limit). Interface names are
    limited to 15 characters, so links in the root netns are ``k<8hex><n>`` (``n`` a counter per run), e.g.
    ``k1a2b3c4d7``; ``<state>/<run-id>/network.json`` maps each name to its kind, network and owner, so a
    sweep finds them even without the pattern. Inside a peer namespace the veth end is ``eth0``.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kata import runid
from pytest_kata.errors import KataError
from pytest_kata.locking import exclusive
from pytest_kata.processes import parent_pid
from pytest_kata.progress import step
from pytest_kata.runid import worker_id

SUBNET_POOL = ipaddress.IPv4Network("10.213.0.0/16")
PREFIXLEN = 24
LINK_RE = re.compile(r"^k([0-9a-f]{8})(\d{1,6})$")
NETNS_DIR = Path("/run/netns")
PEER_IFNAME = "eth0"


class NetworkError(KataError):
    """A test network cannot be created (no free range, missing privileges, ...)."""


def link_run_id(ifname: str) -> str | None:
    """The run id a root-netns link name ``k<8hex><n>`` belongs to."""
    m = LINK_RE.match(ifname)
    return f"{runid.PREFIX}{m.group(1)}" if m else None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)[:48]


# --------------------------------------------------------------------------------------------------------
# The run's registry of names and subnets: <state>/<run-id>/network.json, under a machine-wide lock


@contextlib.contextmanager
def _locked_registry(run_id: str) -> Iterator[dict]:
    """Read-modify-write the run's ``network.json`` while holding the machine-wide network lock."""
    with exclusive(runid.state_dir() / "network.lock"):
        path = runid.run_dir(run_id) / "network.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault("counter", 0)
        data.setdefault("links", {})
        data.setdefault("netns", {})
        data.setdefault("subnets", {})
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)


def registry(run_id: str) -> dict:
    """The run's name map as recorded (empty if the run made no network)."""
    try:
        return json.loads((runid.state_dir() / run_id / "network.json").read_text())
    except (OSError, ValueError):
        return {}


def _registered_subnets() -> set[ipaddress.IPv4Network]:
    """Subnets recorded by any run whose state still exists (dead runs' ones stay taken until swept)."""
    taken: set[ipaddress.IPv4Network] = set()
    for path in runid.state_dir().glob("kt-*/network.json"):
        with contextlib.suppress(OSError, ValueError):
            taken |= {ipaddress.IPv4Network(cidr) for cidr in json.loads(path.read_text()).get("subnets", {})}
    return taken


def _machine_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 address and route of the root netns, except default routes: ranges we must not shadow."""
    from pyroute2 import IPRoute

    nets: list[ipaddress.IPv4Network] = []
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            with contextlib.suppress(ValueError, TypeError):
                nets.append(ipaddress.IPv4Interface(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}").network)
        for route in ipr.get_routes(family=2, table=0):
            dst, length = route.get_attr("RTA_DST"), route["dst_len"]
            if dst and length:
                with contextlib.suppress(ValueError):
                    nets.append(ipaddress.IPv4Network(f"{dst}/{length}", strict=False))
    return nets


def choose_subnet(seed: str, *, taken: set[ipaddress.IPv4Network] | None = None,
                  machine: list[ipaddress.IPv4Network] | None = None) -> ipaddress.IPv4Network:
    """The first free /24 of :data:`SUBNET_POOL`, starting from a hash of ``seed``."""
    taken = _registered_subnets() if taken is None else taken
    machine = _machine_networks() if machine is None else machine
    subnets = list(SUBNET_POOL.subnets(new_prefix=PREFIXLEN))
    start = int(hashlib.sha256(seed.encode()).hexdigest(), 16) % len(subnets)
    for i in range(len(subnets)):
        candidate = subnets[(start + i) % len(subnets)]
        if candidate in taken or any(candidate.overlaps(n) for n in machine):
            continue
        return candidate
    raise NetworkError(f"no free /{PREFIXLEN} left in {SUBNET_POOL}: every range has an address, a route or "
                       "another run's network", path=str(SUBNET_POOL), hint="run `pytest-kata sweep`")


# --------------------------------------------------------------------------------------------------------
# Low-level helpers (pyroute2)


def _ipr() -> Any:  # pyroute2's IPRoute (its types are dynamic)
    from pyroute2 import IPRoute

    return IPRoute()


def _disable_ipv6(ifname: str) -> None:
    """No link-local address in the root netns: the bridge must not make the machine reachable."""
    with contextlib.suppress(OSError):
        Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6").write_text("1")


def link_names() -> list[str]:
    with _ipr() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def netns_names() -> list[str]:
    from pyroute2 import netns

    return list(netns.listnetns())


def delete_link(ifname: str) -> bool:
    """Delete a root-netns link by name; False if it was already gone."""
    from pyroute2.netlink.exceptions import NetlinkError

    with _ipr() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: went away with its peer meanwhile
                return False
            raise
    return True


def processes_in_netns(name: str) -> list[int]:
    """Processes living in the named network namespace (they would keep it alive after its removal)."""
    try:
        inode = (NETNS_DIR / name).stat().st_ino
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if (entry / "ns" / "net").stat().st_ino == inode:
                    pids.append(int(entry.name))
    return pids


def delete_netns(name: str) -> bool:
    """Kill what runs inside the namespace (a listener a test left), then remove it; False if it was gone."""
    from pyroute2 import netns

    if name not in netns.listnetns():
        return False
    for pid in processes_in_netns(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if parent_pid(pid) == os.getpid():  # our own Popen: reap it, or it lingers as a zombie
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
    netns.remove(name)
    return True


def netns_exec_argv(ns: str, cmd: str | Sequence[str]) -> list[str]:
    """argv that runs ``cmd`` inside the named network namespace (nsenter: no ``ip`` needed)."""
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    return ["nsenter", f"--net={NETNS_DIR / ns}", "--", *argv]


# --------------------------------------------------------------------------------------------------------
# The public API


@dataclass
class Peer:
    """A test peer: a network namespace with one address on the bridge."""

    name: str
    netns: str
    ip: str
    link: str  # the veth end on the bridge, in the root netns
    prefixlen: int = PREFIXLEN
    ifname: str = PEER_IFNAME

    def run(self, cmd: str | Sequence[str], *, timeout: float = 60.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run a command inside the peer's namespace (a shell line or an argv)."""
        proc = subprocess.run(netns_exec_argv(self.netns, cmd), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise NetworkError(f"command failed with exit {proc.returncode}: {cmd!r}; {tail}", path=self.netns)
        return proc

    def popen(self, cmd: str | Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a long-running process (a listener, a server) inside the peer's namespace; it is killed
        when the peer is removed."""
        return subprocess.Popen(netns_exec_argv(self.netns, cmd), **kwargs)

    def serve_tcp(self, port: int, reply: str = "kata-peer") -> subprocess.Popen:
        """A TCP listener on ``port`` that answers every connection with ``reply``: a reachability target."""
        proc = self.popen(["socat", f"TCP-LISTEN:{port},reuseaddr,fork", f"SYSTEM:echo {reply}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while f":{port:04X} " not in self.run(["cat", "/proc/net/tcp"]).stdout:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise NetworkError(f"could not listen on TCP port {port}", path=self.netns)
            time.sleep(0.05)
        return proc

    def connect_tcp(self, ip: str, port: int, *, timeout: float = 3.0) -> str | None:
        """What a TCP server at ``ip:port`` says to this peer, or None if it cannot be reached."""
        proc = self.run(["socat", "-T", str(timeout), "-", f"TCP:{ip}:{port},connect-timeout={timeout}"],
                        timeout=timeout + 10)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def ping(self, ip: str, *, count: int = 1, timeout: float = 2.0) -> bool:
        """Whether ``ip`` answers ICMP echo from this peer."""
        wait = str(max(1, round(timeout)))
        proc = self.run(["ping", "-n", "-q", "-c", str(count), "-W", wait, ip], timeout=timeout * count + 10)
        return proc.returncode == 0


@dataclass
class TestNetwork:
    """A run-owned L2 segment: an unaddressed root-netns bridge, peers in namespaces, taps for qemu."""

    __test__ = False  # not a pytest test class

    run_id: str
    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    worker: str = field(default_factory=worker_id)
    peers: dict[str, Peer] = field(default_factory=dict)
    taps: list[str] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)  # owner -> ip
    destroyed: bool = False

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen

    # creation -------------------------------------------------------------------------------------
    @classmethod
    def create(cls, run_id: str | None = None, name: str = "net0", *, worker: str | None = None) -> TestNetwork:
        """Create the bridge on a fresh /24 the run owns (nothing else is configured in the root netns)."""
        if os.geteuid() != 0:
            raise NetworkError("test networks need root (network namespaces, bridges)", path=name)
        if not shutil.which("nsenter"):
            raise NetworkError("nsenter is missing", path=name, hint="apt-get install util-linux")
        run_id = run_id or runid.current_run_id()
        worker = worker or worker_id()
        with _locked_registry(run_id) as reg:
            subnet = choose_subnet(f"{run_id}/{worker}/{name}")
            bridge = _next_link(reg, run_id, "bridge", name, owner="bridge")
            reg["subnets"][str(subnet)] = f"{worker}/{name}"
        net = cls(run_id, name, bridge, subnet, worker)
        with _ipr() as ipr:
            ipr.link("add", ifname=bridge, kind="bridge", br_nf_call_iptables=0, br_nf_call_ip6tables=0,
                     br_nf_call_arptables=0)
            _disable_ipv6(bridge)
            ipr.link("set", index=ipr.link_lookup(ifname=bridge)[0], state="up")
        step("network", f"{net.label}: bridge {bridge} on {subnet} (no address in the root netns)")
        return net

    @property
    def label(self) -> str:
        return f"{self.run_id}-{self.worker}-{self.name}"

    def allocate_ip(self, owner: str) -> str:
        """An address of this network for ``owner`` (a peer or a host), stable for the network's life."""
        if owner in self.addresses:
            return self.addresses[owner]
        used = set(self.addresses.values())
        for host in list(self.subnet.hosts())[1:]:  # .1 stays free (a gateway a test may add)
            if str(host) not in used:
                self.addresses[owner] = str(host)
                return str(host)
        raise NetworkError(f"no address left in {self.subnet}", path=self.label)

    def add_peer(self, name: str) -> Peer:
        """A new network namespace attached to the bridge by a veth pair, with one address inside it."""
        self._alive()
        if name in self.peers:
            raise NetworkError(f"peer {name!r} already exists", path=self.label)
        from pyroute2 import NetNS, netns

        ns = _safe(f"{self.label}-{name}")
        with _locked_registry(self.run_id) as reg:
            link = _next_link(reg, self.run_id, "veth", self.name, owner=name)
            reg["netns"][ns] = self.name
        ip = self.allocate_ip(name)
        netns.create(ns)
        peer = Peer(name, ns, ip, link, self.prefixlen)
        self.peers[name] = peer
        with _ipr() as ipr:
            ipr.link("add", ifname=link, kind="veth", peer={"ifname": PEER_IFNAME, "net_ns_fd": ns})
            _disable_ipv6(link)
            index = ipr.link_lookup(ifname=link)[0]
            ipr.link("set", index=index, master=ipr.link_lookup(ifname=self.bridge)[0], state="up")
        with NetNS(ns) as inside:
            index = inside.link_lookup(ifname=PEER_IFNAME)[0]
            inside.addr("add", index=index, address=ip, prefixlen=self.prefixlen)
            inside.link("set", index=index, state="up")
            inside.link("set", index=inside.link_lookup(ifname="lo")[0], state="up")
        return peer

    def remove_peer(self, which: Peer | str) -> None:
        peer = self.peers.pop(which if isinstance(which, str) else which.name, None)
        if peer is None:
            return
        delete_netns(peer.netns)  # takes both veth ends with it
        delete_link(peer.link)
        self.addresses.pop(peer.name, None)
        with _locked_registry(self.run_id) as reg:
            reg["netns"].pop(peer.netns, None)
            reg["links"].pop(peer.link, None)

    def attach_tap(self, owner: str = "tap") -> str:
        """A tap device enslaved to the bridge, for ``qemu -netdev tap,ifname=NAME,script=no,downscript=no``
        or libvirt ``<interface type='ethernet'><target dev='NAME' managed='no'/>``."""
        self._alive()
        with _locked_registry(self.run_id) as reg:
            tap = _next_link(reg, self.run_id, "tap", self.name, owner=owner)
        with _ipr() as ipr:
            ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
            _disable_ipv6(tap)
            ipr.link("set", index=ipr.link_lookup(ifname=tap)[0], master=ipr.link_lookup(ifname=self.bridge)[0],
                     state="up")
        self.taps.append(tap)
        return tap

    def interface_xml(self, *, mac: str | None = None, model: str = "virtio") -> str:
        """The libvirt ``<interface>`` element that attaches a domain to this network's bridge."""
        mac_xml = f"<mac address='{mac}'/>" if mac else ""
        return (f"<interface type='bridge'>{mac_xml}<source bridge='{self.bridge}'/>"
                f"<model type='{model}'/></interface>")

    def ping(self, from_peer: Peer | str, to_ip: str, *, count: int = 1, timeout: float = 2.0) -> bool:
        """Whether ``to_ip`` answers from ``from_peer`` across this network."""
        peer = self.peers[from_peer] if isinstance(from_peer, str) else from_peer
        return peer.ping(to_ip, count=count, timeout=timeout)

    # teardown -------------------------------------------------------------------------------------
    def reset(self, keep: Sequence[str] = ()) -> None:
        """Remove peers and taps (except those named in ``keep``): the cheap per-test clean slate.

        Addresses handed to hosts with :meth:`allocate_ip` stay theirs: hosts outlive a test.
        """
        for name in [n for n in self.peers if n not in keep]:
            self.remove_peer(name)
        gone = [tap for tap in self.taps if tap not in keep]
        for tap in gone:
            delete_link(tap)
        if gone:
            with _locked_registry(self.run_id) as reg:
                for tap in gone:
                    reg["links"].pop(tap, None)
        self.taps = [tap for tap in self.taps if tap in keep]

    def destroy(self) -> None:
        """Remove every peer, tap and the bridge, and release the subnet. Idempotent."""
        if self.destroyed:
            return
        self.reset()
        delete_link(self.bridge)
        with _locked_registry(self.run_id) as reg:
            reg["links"].pop(self.bridge, None)
            reg["subnets"].pop(str(self.subnet), None)
        self.destroyed = True
        step("network", f"{self.label}: removed")

    def _alive(self) -> None:
        if self.destroyed:
            raise NetworkError("network was destroyed", path=self.label)

    def __enter__(self) -> TestNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _next_link(reg: dict, run_id: str, kind: str, network: str, *, owner: str) -> str:
    """The next ``k<8hex><n>`` name of the run, recorded before the link exists (a crash cannot hide it)."""
    hex8 = run_id[len(runid.PREFIX):]
    while True:
        reg["counter"] += 1
        name = f"k{hex8}{reg['counter']}"
        if len(name) > 15:
            raise NetworkError("too many interfaces in one run", path=run_id)
        if name not in reg["links"]:
            reg["links"][name] = {"kind": kind, "network": network, "owner": owner, "worker": worker_id()}
            return name
