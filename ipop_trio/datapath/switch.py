"""The overlay's Ethernet switch: which peer a frame goes to, ARP answered locally.

The overlay is one Ethernet segment (docs/architecture.md, "What a node does"). Every node's TAP
MAC is derived from its certificate key, so the switch knows every peer's MAC without learning:
  * unicast to a peer's MAC goes to that peer;
  * an ARP request for a known peer's address is answered locally from the peer table
    (the request never crosses the overlay);
  * other broadcast and multicast frames are flooded once to every linked peer (no peer
    re-floods: the mesh is full, so there are no loops);
  * IPv6 is carried as IPv4 is (proto/ndp.py): a neighbour solicitation for a peer's
    address (its certified one, or its link-local one derived from its MAC) is answered
    locally; the kernel's router solicitations, MLD reports, DAD probes and unsolicited
    advertisements stay on the node, each counted under its own name (not as a drop);
    other IPv6 multicast is flooded;
  * a frame of another protocol (anything but IPv4, IPv6 and ARP) is not sent at all, since
    every peer would refuse it: counted as `ethertype_not_carried`, not as a drop;
  * anything else is a counted drop.
Inbound, a frame is accepted only if its source MAC is the sending peer's own and it is
addressed to us (our MAC, broadcast or multicast); an IPv4 or IPv6 packet only from the
peer's certified addresses, an ARP or a neighbour discovery message only for them.

With a firewall (`[firewall]` rules, proto/firewall.py) each port holds its peer's compiled
filter: `accept_inbound` asks it last, and datapath/outbound.py asks it once per routed frame
(a TSO super-frame is one frame). Without one the ports hold None and no call is made.

Frames here are TAP reads and writes: a 10-byte virtio_net_hdr (`VNET`) then the Ethernet
frame. The TAP always has IFF_VNET_HDR; whether the kernel hands us offloaded super-frames
is a separate switch (TUNSETOFFLOAD), so there is one code path.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from collections.abc import Callable

from ..proto import ndp
from ..proto.firewall import Firewall, FirewallRules, PeerFilter
from ..proto.offload import Reassembler
from ..proto.probe import ETH_P_PROBE
from ..stats import Stats

ETH_P_ARP = b"\x08\x06"
ETH_P_IP = b"\x08\x00"
ETH_P_IPV6 = b"\x86\xdd"
ARP_REQUEST_HDR = b"\x00\x01\x08\x00\x06\x04\x00\x01"  # Ethernet/IPv4, request
ARP_REPLY_HDR = b"\x00\x01\x08\x00\x06\x04\x00\x02"
VNET = 10  # virtio_net_hdr in front of every frame (proto/offload.py)
ZERO_VNET = bytes(VNET)
STAGED_FRAMES = 128  # frames kept per peer while its link comes up (WireGuard keeps 128)

_ARP = struct.Struct("!8s6s4s6s4s")  # header, sha, spa, tha, tpa
_PORT_IDS = itertools.count(1)

Path = tuple[tuple[str, int], object | None]  # (address, relay or None)


class PeerPort:
    """What the data path knows about one peer. Mutated by the peer's link task."""

    __slots__ = (
        "_endpoint",
        "_paths",
        "_relay",
        "drops",
        "filter",
        "frame_id",
        "groups",
        "id",
        "ip4",
        "ip6",
        "ip6_sources",
        "last_data",
        "last_received",
        "last_sent",
        "mac",
        "name",
        "on_path_change",
        "path_mtu",
        "path_mtu_why",
        "reassembler",
        "roam",
        "rx_bytes",
        "rx_packets",
        "session",
        "staged",
        "tx_bytes",
        "tx_packets",
        "wake",
    )

    def __init__(
        self, name: str, mac: bytes, ip4: bytes | None, groups: frozenset[str] = frozenset()
    ) -> None:
        self.id = next(_PORT_IDS)  # the native session table's name for this peer
        self.name = name
        self.mac = mac
        self.ip4 = ip4  # 4 bytes once the peer's certificate is known
        self.ip6: bytes | None = None  # 16 bytes, when its certificate holds an IPv6 address
        # The IPv6 sources the peer may use: its link-local address (from its MAC, so from
        # its key) and its certified address.
        self.ip6_sources: tuple[bytes, ...] = (ndp.link_local_for_mac(mac),)
        self.groups = groups  # certified, as far as known (the firewall's rules use them)
        # The firewall's rules as they apply to this peer; None: no firewall (no call made).
        self.filter: PeerFilter | None = None
        # Told when the peer's paths change (the native data path keeps its own copy).
        self.on_path_change: Callable[[PeerPort], None] | None = None
        # The path to the peer is (endpoint, relay): relay None sends from our socket to
        # the endpoint; a TURN client sends through it (ICE chose a relayed pair).
        self._endpoint: tuple[str, int] | None = None
        self._relay: object | None = None
        self._paths: frozenset[Path] = frozenset()  # ICE-valid
        self.roam = True  # follow authenticated data to a new address (not when ICE chooses)
        self.session: object | None = None  # proto.session.Session to send on, when up
        self.staged: deque[bytes] = deque(maxlen=STAGED_FRAMES)
        self.tx_bytes = self.rx_bytes = self.tx_packets = self.rx_packets = 0
        self.drops = 0  # datagrams from this peer refused (bad tag, replay, spoofed frame)
        self.frame_id = 0  # numbers our super-frames to this peer (pieces name it)
        self.reassembler = Reassembler()
        self.last_sent = self.last_received = 0.0
        self.last_data = 0.0  # last time a data frame (not a keepalive) arrived
        self.wake = _nothing
        # Largest IP packet the path to the peer takes, once a send proved it narrower than
        # the TAP's MTU (datapath/outbound.py); None: the TAP's MTU fits.
        self.path_mtu: int | None = None
        self.path_mtu_why = ""

    # The paths a plain session accepts data on: (endpoint, relay) and the ICE-valid ones.
    @property
    def endpoint(self) -> tuple[str, int] | None:
        return self._endpoint

    @endpoint.setter
    def endpoint(self, value: tuple[str, int] | None) -> None:
        if value != self._endpoint:
            self._endpoint = value
            if self.on_path_change is not None:
                self.on_path_change(self)

    @property
    def relay(self) -> object | None:
        return self._relay

    @relay.setter
    def relay(self, value: object | None) -> None:
        if value is not self._relay:
            self._relay = value
            if self.on_path_change is not None:
                self.on_path_change(self)

    @property
    def paths(self) -> frozenset[Path]:
        return self._paths

    @paths.setter
    def paths(self, value: frozenset[Path]) -> None:
        if value != self._paths:
            self._paths = value
            if self.on_path_change is not None:
                self.on_path_change(self)

    def accepted_paths(self) -> set[Path]:
        """Every path a plain session of this peer accepts data from."""
        out = set(self._paths)
        if self._endpoint is not None:
            out.add((self._endpoint, self._relay))
        return out


def _nothing() -> None:
    return None


class Switch:
    """Routes outbound frames to peers and checks inbound ones."""

    def __init__(self, own_mac: bytes, stats: Stats) -> None:
        self.own_mac = own_mac
        self.stats = stats
        self.by_mac: dict[bytes, PeerPort] = {}
        self.by_ip4: dict[bytes, PeerPort] = {}
        self.by_ip6: dict[bytes, PeerPort] = {}  # certified and link-local addresses
        self.firewall: Firewall | None = None  # None: no rules, no per-frame work at all
        # A probe frame from an authenticated peer (proto/probe.py): the prober's.
        self.on_probe: Callable[[PeerPort, bytes], None] = self._unhandled_probe

    def _unhandled_probe(self, _port: PeerPort, _body: bytes) -> None:
        self.stats.drop("probe_unhandled")

    def add(self, port: PeerPort) -> None:
        self.by_mac[port.mac] = port
        if port.ip4 is not None:
            self.by_ip4[port.ip4] = port
        for address in port.ip6_sources:
            self.by_ip6[address] = port
        self._compile(port)

    def configure_firewall(self, rules: FirewallRules | None) -> None:
        """The firewall's rules (at start and on SIGHUP): every port's filter is compiled
        again; the state table survives a reload (its entries are checked against the new
        rules when next used). No rules: no firewall, and no per-frame work."""
        if rules is None or rules.empty:
            self.firewall = None
        elif self.firewall is None:
            self.firewall = Firewall(rules)
        else:
            self.firewall.load(rules)
        for port in self.by_mac.values():
            self._compile(port)

    def set_groups(self, port: PeerPort, groups: frozenset[str]) -> None:
        """The peer's certified groups, from the certificate its handshake just proved."""
        if groups == port.groups:
            return
        port.groups = groups
        if self.firewall is not None:
            self.firewall.changed()
            self._compile(port)

    def _compile(self, port: PeerPort) -> None:
        fw = self.firewall
        port.filter = None if fw is None else fw.peer(port.id, port.name, port.groups)

    def remove(self, port: PeerPort) -> None:
        """Forget a peer (its link was torn down): frames to it become unknown unicast."""
        if self.by_mac.get(port.mac) is port:
            del self.by_mac[port.mac]
        if port.ip4 is not None and self.by_ip4.get(port.ip4) is port:
            del self.by_ip4[port.ip4]
        for address in port.ip6_sources:
            if self.by_ip6.get(address) is port:
                del self.by_ip6[address]

    def has(self, port: PeerPort) -> bool:
        """Is `port` the switch's port for its MAC (not removed, not replaced)?"""
        return self.by_mac.get(port.mac) is port

    def set_ip4(self, port: PeerPort, ip4: bytes) -> None:
        if port.ip4 is not None and self.by_ip4.get(port.ip4) is port:
            del self.by_ip4[port.ip4]
        port.ip4 = ip4
        self.by_ip4[ip4] = port

    def set_ip6(self, port: PeerPort, ip6: bytes | None) -> None:
        """The peer's certified IPv6 address (None: its certificate holds none): what it may
        send from, and what our neighbour solicitations for it are answered with."""
        for address in port.ip6_sources:
            if self.by_ip6.get(address) is port:
                del self.by_ip6[address]
        port.ip6 = ip6
        link_local = ndp.link_local_for_mac(port.mac)
        port.ip6_sources = (link_local,) if ip6 is None else (link_local, ip6)
        for address in port.ip6_sources:
            self.by_ip6[address] = port

    def route_outbound(
        self, frames: list[bytes]
    ) -> tuple[dict[PeerPort, list[bytes]], list[bytes]]:
        """Split a TAP batch into per-peer lists and local replies (ARP) for the TAP."""
        out: dict[PeerPort, list[bytes]] = {}
        local: list[bytes] = []
        by_mac = self.by_mac
        for frame in frames:
            if len(frame) < VNET + 14:
                self.stats.drop("runt_frame")
                continue
            ethertype = frame[VNET + 12 : VNET + 14]
            if ethertype != ETH_P_IP and ethertype != ETH_P_ARP and ethertype != ETH_P_IPV6:
                # Every peer's accept_inbound refuses these: sending them would only make
                # drops on healthy links.
                self.stats.count("ethertype_not_carried")
                continue
            dst = frame[VNET : VNET + 6]
            port = by_mac.get(dst)
            if port is not None:
                lst = out.get(port)
                if lst is None:
                    out[port] = [frame]
                else:
                    lst.append(frame)
                continue
            if not frame[VNET] & 1:
                self.stats.drop("unknown_unicast")
                continue
            if ethertype == ETH_P_ARP:
                reply = self._answer_arp(frame)
                if reply is not None:
                    local.append(reply)
                    continue
            elif ethertype == ETH_P_IPV6 and not self._flood_ipv6(frame, local):
                continue
            for port in by_mac.values():  # flood once
                lst = out.get(port)
                if lst is None:
                    out[port] = [frame]
                else:
                    lst.append(frame)
        return out, local

    def _answer_arp(self, frame: bytes) -> bytes | None:
        if len(frame) < VNET + 14 + _ARP.size:
            return None
        hdr, sha, spa, _tha, tpa = _ARP.unpack_from(frame, VNET + 14)
        if hdr != ARP_REQUEST_HDR:
            return None
        port = self.by_ip4.get(tpa)
        if port is None:
            return None
        arp = _ARP.pack(ARP_REPLY_HDR, port.mac, tpa, sha, spa)
        return ZERO_VNET + sha + port.mac + ETH_P_ARP + arp

    def _flood_ipv6(self, frame: bytes, local: list[bytes]) -> bool:
        """Should this IPv6 multicast frame from our TAP go to every peer? Neighbour
        solicitations for a peer are answered into `local`; what is kept on the node is
        counted under its own name (proto/ndp.py)."""
        kind = ndp.classify_multicast(frame)
        if kind is ndp.Multicast.FLOOD:
            self.stats.count(kind.value)
            return True
        if kind is ndp.Multicast.MALFORMED:
            self.stats.drop(kind.value)
        elif kind is ndp.Multicast.SOLICIT:
            target = ndp.solicited_target(frame)
            port = None if target is None else self.by_ip6.get(target)
            if target is None:
                self.stats.count("ipv6_nd_dad_local")  # addresses are unique by certificate
            elif port is None:
                self.stats.count("ipv6_nd_unknown_target")  # no member has it
            else:
                local.append(ndp.advertisement(frame, target, port.mac))
                self.stats.count("ipv6_nd_answered")
        else:
            self.stats.count(kind.value)
        return False

    def accept_inbound(self, port: PeerPort, frame: bytes, now: float) -> bool:
        """May a TAP write built from `port`'s datagrams go to our TAP? (`now`: the
        firewall's clock, monotonic seconds.)"""
        if len(frame) < VNET + 14 or frame[VNET + 6 : VNET + 12] != port.mac:
            self.stats.drop("spoofed_source")
            return False
        if frame[VNET : VNET + 6] != self.own_mac and not frame[VNET] & 1:
            self.stats.drop("not_for_us")
            return False
        ethertype = frame[VNET + 12 : VNET + 14]
        if ethertype == ETH_P_PROBE:  # `ipop-trio ping`: the node's, never the TAP's
            self.on_probe(port, frame[VNET + 14 :])
            return False
        if ethertype == ETH_P_IP:
            if port.ip4 is not None and frame[VNET + 26 : VNET + 30] != port.ip4:
                self.stats.drop("spoofed_ip")
                return False
        elif ethertype == ETH_P_ARP:
            # An ARP from a peer may only speak for the peer itself: otherwise one member
            # could claim another's address in our neighbour table (ARP poisoning).
            if len(frame) < VNET + 14 + _ARP.size:
                self.stats.drop("runt_arp")
                return False
            _hdr, sha, spa, _tha, _tpa = _ARP.unpack_from(frame, VNET + 14)
            if sha != port.mac or (port.ip4 is not None and spa != port.ip4):
                self.stats.drop("spoofed_arp")
                return False
        elif ethertype == ETH_P_IPV6:
            if len(frame) < ndp.ICMP6 or frame[ndp.IP6] >> 4 != 6:
                self.stats.drop("runt_ipv6")
                return False
            if frame[ndp.IP6 + 8 : ndp.IP6 + 24] not in port.ip6_sources:
                self.stats.drop("spoofed_ip6")
                return False
            if not ndp.nd_claims_ok(frame, port.mac, port.ip6_sources):
                self.stats.drop("spoofed_nd")
                return False
        else:
            # Other protocols carry source addresses this switch does not check: refuse
            # rather than let a peer spoof them.
            self.stats.drop("unchecked_ethertype")
            return False
        flt = port.filter
        if flt is not None and not flt.inbound(frame, now):
            self.stats.drop("firewall_inbound")
            return False
        return True
