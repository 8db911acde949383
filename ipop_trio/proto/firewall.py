"""The firewall: which IPv4 flows may cross a link, decided by the peer's certified identity.

Modelled on Nebula's firewall: rules name the peer by its certificate (name, groups) or by
the packet's overlay address (CIDR), plus the protocol and the destination port; the state
table lets the replies of an allowed flow pass both ways.

    [[firewall.inbound]]                  # what peers may open towards us
    proto = "tcp"                         # tcp, udp, icmp, any
    port = "8000-8100"                    # one port, a range, or "any" (tcp and udp only)
    groups = ["web"]                      # the peer's certificate holds all of these
    host = "beta"                         # the peer's certified name ("any": every peer)
    cidr = "10.77.0.0/24"                 # the packet's remote overlay address
    action = "allow"                      # or "deny"

The default (stated in README.md, "Firewall"): no rules at all, no firewall (everything
passes, at no cost: the data path holds None and makes no call). Any rule in a direction:
that direction refuses what no rule allows. A direction without rules passes everything, but
its flows are still tracked, so that their replies pass the other direction's rules.

Per frame (`PeerFilter.inbound` / `.outbound`; a TSO super-frame is one frame, one check):
  1. not IPv4: ARP and IPv6 neighbour discovery pass (IPv4 and IPv6 need them; the switch
     checks both against the certificate); anything else (other IPv6, VLAN, ...) is refused
     where the direction has rules (`non_ipv4`): the rules speak of IPv4;
  2. IPv4 headers that cannot be read (version, IHL, a truncated L4 header) are refused
     where the direction has rules (`malformed`);
  3. the state table: a live entry for the flow passes (and is refreshed), from either
     direction; an entry made under rules a reload replaced is checked again, as Nebula
     does, against the current rules of the direction that opened it;
  4. the direction's rules, in order, first match wins: allow opens a flow (an entry),
     deny refuses; each rule counts the packets it decided;
  5. no rule matched: refused, counted on the direction's default.

Rules are compiled per peer when its identity is known (`Firewall.peer`): the name and group
conditions are settled then, so the per-frame work is only protocol, port and CIDR checks.
A rule's port is the destination port of the packet that opens the flow (ours inbound, the
peer's outbound); ICMP and non-first fragments have no port and match only rules without one.
ICMP echo flows are told apart by their identifier; other ICMP (errors) needs a rule.

The state table is bounded (`conntrack_max` entries, least recently used evicted first,
counted) and every entry expires: TCP 30 s until the other side answers, 720 s once it has
(Nebula's 12 minutes), 60 s after a FIN or RST; UDP 120 s; ICMP 30 s; other protocols 60 s.
Expired entries are dropped when next looked up, and by `status`'s sweep.

Pure: no I/O and no clock (`now` comes in, monotonic seconds). Frames are TAP reads and
writes: a virtio_net_hdr, then Ethernet. Nothing here raises for what a frame holds.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .ndp import is_neighbour_discovery
from .offload import ETH_HLEN, VNET_HDR_LEN

# -- tuning knobs (README.md, "Firewall", states them) ------------------------------------
CONNTRACK_MAX = 65536  # default state-table size (about 200 bytes an entry)
MAX_CONNTRACK_MAX = 1 << 22
MAX_RULES = 256  # per direction
TCP_OPENING = 30.0  # seconds: a TCP flow the other side has not answered yet
TCP_ESTABLISHED = 720.0
TCP_CLOSING = 60.0  # after a FIN or an RST
UDP_TIMEOUT = 120.0
ICMP_TIMEOUT = 30.0
OTHER_TIMEOUT = 60.0

# -- what a frame looks like here --------------------------------------------------------
#   virtio_net_hdr(10) | dst(6) src(6) ethertype(2) | IPv4 header (IHL*4) | TCP/UDP/ICMP
ETYPE = VNET_HDR_LEN + 12
IP = VNET_HDR_LEN + ETH_HLEN
ETH_P_IP = b"\x08\x00"
ETH_P_ARP = b"\x08\x06"
PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
PROTOCOLS: dict[str, int | None] = {
    "any": None,
    "icmp": PROTO_ICMP,
    "tcp": PROTO_TCP,
    "udp": PROTO_UDP,
}
_PROTO_NAMES = {v: k for k, v in PROTOCOLS.items() if v is not None}
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
TCP_FIN_RST = 0x01 | 0x04
_NO_PORTS = bytes(4)
_OUT, _IN = 0, 1  # counter slots per direction


class Action(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[firewall.inbound]]` / `[[firewall.outbound]]` entry, as validated by config.py."""

    proto: int | None = None  # IPv4 protocol number; None: any
    ports: tuple[int, int] | None = None  # destination port range, inclusive; None: any
    host: str | None = None  # the peer's certified name; None: any peer
    groups: frozenset[str] = frozenset()  # the peer's certificate holds every one
    cidr: ipaddress.IPv4Network | None = None  # the packet's remote address is in it
    action: Action = Action.ALLOW

    def applies_to(self, name: str, groups: frozenset[str]) -> bool:
        return (self.host is None or self.host == name) and self.groups <= groups

    def describe(self) -> str:
        """One line for `status`: `allow tcp port 22 groups=ops`."""
        parts = [self.action.value, "any" if self.proto is None else _PROTO_NAMES[self.proto]]
        if self.ports is not None:
            lo, hi = self.ports
            parts.append(f"port {lo}" if lo == hi else f"ports {lo}-{hi}")
        if self.host is not None:
            parts.append(f"host={self.host}")
        if self.groups:
            parts.append("groups=" + ",".join(sorted(self.groups)))
        if self.cidr is not None:
            parts.append(f"cidr={self.cidr}")
        if self.host is None and not self.groups and self.cidr is None:
            parts.append("host=any")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class FirewallRules:
    """The `[firewall]` section. Empty (no rule in either direction): no firewall."""

    inbound: tuple[Rule, ...] = ()
    outbound: tuple[Rule, ...] = ()
    conntrack_max: int = CONNTRACK_MAX

    @property
    def empty(self) -> bool:
        return not self.inbound and not self.outbound


# A compiled rule: (index in its direction, allow, proto or -1, port low, port high,
# network, netmask). A rule without a port has low -1 (packets without ports carry -1);
# a rule without a CIDR has mask 0.
_Compiled = tuple[int, bool, int, int, int, int, int]


def _compile(rules: tuple[Rule, ...], name: str, groups: frozenset[str]) -> tuple[_Compiled, ...]:
    out = []
    for i, r in enumerate(rules):
        if not r.applies_to(name, groups):
            continue
        lo, hi = (-1, 0xFFFF) if r.ports is None else r.ports
        net = mask = 0
        if r.cidr is not None:
            net, mask = int(r.cidr.network_address), int(r.cidr.netmask)
        proto = -1 if r.proto is None else r.proto
        out.append((i, r.action is Action.ALLOW, proto, lo, hi, net, mask))
    return tuple(out)


def _match(rules: tuple[_Compiled, ...], proto: int, dport: int, remote: int) -> _Compiled | None:
    for rule in rules:
        _i, _allow, p, lo, hi, net, mask = rule
        if (p < 0 or p == proto) and lo <= dport <= hi and remote & mask == net:
            return rule
    return None


class _Flow:
    """A state-table entry: what opened the flow (to check it again after a reload) and
    when it expires."""

    __slots__ = (
        "closing",
        "dport",
        "expires",
        "generation",
        "inbound",
        "proto",
        "remote",
        "replied",
        "timeout",
    )

    def __init__(self, proto: int, dport: int, remote: int, inbound: bool, generation: int) -> None:
        self.proto = proto
        self.dport = dport
        self.remote = remote
        self.inbound = inbound  # opened by an inbound packet
        self.generation = generation
        self.replied = False  # TCP: a packet went the other way
        self.closing = False  # TCP: a FIN or RST was seen
        self.timeout = _timeout(self)
        self.expires = 0.0


def _timeout(flow: _Flow) -> float:
    proto = flow.proto
    if proto == PROTO_TCP:
        if flow.closing:
            return TCP_CLOSING
        return TCP_ESTABLISHED if flow.replied else TCP_OPENING
    if proto == PROTO_UDP:
        return UDP_TIMEOUT
    return ICMP_TIMEOUT if proto == PROTO_ICMP else OTHER_TIMEOUT


class Firewall:
    """The node's rules, state table and counters; `peer` compiles a peer's view of them."""

    def __init__(self, rules: FirewallRules) -> None:
        self.flows: OrderedDict[tuple[int, bytes], _Flow] = OrderedDict()
        self.generation = 0
        self.created = self.evicted = self.expired = self.revoked = 0
        self.load(rules)

    def load(self, rules: FirewallRules) -> None:
        """New rules (SIGHUP): the state table is kept; each entry is checked against the
        new rules when next used. Rule counters start again (they are the rules')."""
        self.rules = rules
        self.generation += 1
        self.hits = ([0] * len(rules.outbound), [0] * len(rules.inbound))
        self.default = [0, 0]
        self.non_ipv4 = [0, 0]
        self.malformed = [0, 0]
        while len(self.flows) > rules.conntrack_max:
            self.flows.popitem(last=False)
            self.evicted += 1

    def changed(self) -> None:
        """A peer's identity changed (new groups): entries are checked again when used."""
        self.generation += 1

    def peer(self, peer_id: int, name: str, groups: frozenset[str]) -> PeerFilter:
        """The rules as they apply to one peer (its certified name and groups)."""
        r = self.rules
        inbound = _compile(r.inbound, name, groups) if r.inbound else None
        outbound = _compile(r.outbound, name, groups) if r.outbound else None
        return PeerFilter(self, peer_id, inbound, outbound)

    def sweep(self, now: float) -> None:
        """Drop every expired entry (they are otherwise dropped when next looked up)."""
        dead = [k for k, f in self.flows.items() if f.expires <= now]
        for k in dead:
            del self.flows[k]
        self.expired += len(dead)

    def status(self, now: float) -> dict[str, Any]:
        self.sweep(now)
        r = self.rules

        def direction(rules: tuple[Rule, ...], slot: int) -> dict[str, Any]:
            return {
                "default": "deny" if rules else "allow",
                "rules": [
                    {"rule": rule.describe(), "action": rule.action.value, "hits": hits}
                    for rule, hits in zip(rules, self.hits[slot], strict=True)
                ],
                "refused": {
                    "default": self.default[slot],
                    "non_ipv4": self.non_ipv4[slot],
                    "malformed": self.malformed[slot],
                    "rules": sum(
                        h
                        for rule, h in zip(rules, self.hits[slot], strict=True)
                        if rule.action is Action.DENY
                    ),
                },
            }

        return {
            "inbound": direction(r.inbound, _IN),
            "outbound": direction(r.outbound, _OUT),
            "conntrack": {
                "entries": len(self.flows),
                "max": r.conntrack_max,
                "created": self.created,
                "evicted": self.evicted,
                "expired": self.expired,
                "revoked": self.revoked,  # refused on a check against reloaded rules
                "timeouts": {
                    "tcp_opening": TCP_OPENING,
                    "tcp_established": TCP_ESTABLISHED,
                    "tcp_closing": TCP_CLOSING,
                    "udp": UDP_TIMEOUT,
                    "icmp": ICMP_TIMEOUT,
                    "other": OTHER_TIMEOUT,
                },
            },
        }


class PeerFilter:
    """One peer's compiled rules (None for a direction without rules) over the node's
    shared state table. Held by the peer's `PeerPort`; recompiled when the rules or the
    peer's certified identity change."""

    __slots__ = ("fw", "id", "rules")

    def __init__(
        self,
        fw: Firewall,
        peer_id: int,
        inbound: tuple[_Compiled, ...] | None,
        outbound: tuple[_Compiled, ...] | None,
    ) -> None:
        self.fw = fw
        self.id = peer_id
        self.rules = (outbound, inbound)  # by direction slot

    def inbound(self, frame: bytes, now: float) -> bool:
        """May this TAP write from the peer go to our TAP?"""
        return self._check(frame, now, _IN)

    def outbound(self, frame: bytes, now: float) -> bool:
        """May this TAP read go to the peer?"""
        return self._check(frame, now, _OUT)

    def outbound_batch(self, frames: list[bytes], now: float) -> list[bytes]:
        """The frames of one peer's TAP batch that may go to it."""
        check = self._check
        return [f for f in frames if check(f, now, _OUT)]

    def _check(self, frame: bytes, now: float, slot: int) -> bool:
        rules = self.rules[slot]
        fw = self.fw
        n = len(frame)
        ethertype = frame[ETYPE:IP]
        if ethertype != ETH_P_IP:
            if ethertype == ETH_P_ARP or rules is None or is_neighbour_discovery(frame):
                return True
            fw.non_ipv4[slot] += 1
            return False
        if n < IP + 20:
            return self._malformed(rules, slot)
        vihl = frame[IP]
        l4 = IP + (vihl & 0x0F) * 4
        if vihl >> 4 != 4 or l4 < IP + 20 or n < l4:
            return self._malformed(rules, slot)
        proto = frame[IP + 9]
        flags = 0
        dport = -1
        if (frame[IP + 6] & 0x1F) or frame[IP + 7]:  # not the first fragment: no ports
            ports = _NO_PORTS
        elif proto in (PROTO_TCP, PROTO_UDP):
            if n < l4 + (14 if proto == PROTO_TCP else 4):
                return self._malformed(rules, slot)
            if slot:  # inbound: local = destination
                ports = frame[l4 + 2 : l4 + 4] + frame[l4 : l4 + 2]
                dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
            else:
                ports = frame[l4 : l4 + 4]
                dport = (frame[l4 + 2] << 8) | frame[l4 + 3]
            if proto == PROTO_TCP:
                flags = frame[l4 + 13]
        elif proto == PROTO_ICMP:
            if n < l4 + 8:
                return self._malformed(rules, slot)
            kind = frame[l4]
            if kind in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY):
                ident = frame[l4 + 4 : l4 + 6]
                ports = ident + ident
            else:
                ports = _NO_PORTS
        else:
            ports = _NO_PORTS
        if slot:  # key: proto, local address, remote address, local port, remote port
            key = (
                self.id,
                frame[IP + 9 : IP + 10]
                + frame[IP + 16 : IP + 20]
                + frame[IP + 12 : IP + 16]
                + ports,
            )
        else:
            key = (self.id, frame[IP + 9 : IP + 10] + frame[IP + 12 : IP + 20] + ports)
        flows = fw.flows
        flow = flows.get(key)
        if flow is not None:
            if flow.expires <= now:
                del flows[key]
                fw.expired += 1
            elif flow.generation != fw.generation and not self._still_allowed(flow):
                del flows[key]
                fw.revoked += 1
            else:
                flow.generation = fw.generation
                if flags:  # TCP: its state sets its timeout
                    if slot != flow.inbound and not flow.replied:
                        flow.replied = True
                        flow.timeout = _timeout(flow)
                    if flags & TCP_FIN_RST and not flow.closing:
                        flow.closing = True
                        flow.timeout = _timeout(flow)
                flow.expires = now + flow.timeout
                flows.move_to_end(key)
                return True
        remote = int.from_bytes(frame[IP + 12 : IP + 16] if slot else frame[IP + 16 : IP + 20])
        if rules is not None:
            rule = _match(rules, proto, dport, remote)
            if rule is None:
                fw.default[slot] += 1
                return False
            fw.hits[slot][rule[0]] += 1
            if not rule[1]:
                return False
        flow = _Flow(proto, dport, remote, bool(slot), fw.generation)
        if flags & TCP_FIN_RST:
            flow.closing = True
            flow.timeout = _timeout(flow)
        flow.expires = now + flow.timeout
        if len(flows) >= fw.rules.conntrack_max:
            flows.popitem(last=False)
            fw.evicted += 1
        flows[key] = flow
        fw.created += 1
        return True

    def _malformed(self, rules: tuple[_Compiled, ...] | None, slot: int) -> bool:
        if rules is None:
            return True
        self.fw.malformed[slot] += 1
        return False

    def _still_allowed(self, flow: _Flow) -> bool:
        """An entry made under older rules (or another identity): would the packet that
        opened it be allowed now, by the current rules of its direction?"""
        rules = self.rules[_IN if flow.inbound else _OUT]
        if rules is None:
            return True
        rule = _match(rules, flow.proto, flow.dport, flow.remote)
        return rule is not None and rule[1]


__all__ = [
    "CONNTRACK_MAX",
    "PROTOCOLS",
    "Action",
    "Firewall",
    "FirewallRules",
    "PeerFilter",
    "Rule",
]
