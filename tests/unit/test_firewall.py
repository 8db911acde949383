"""The firewall's pure core (proto/firewall.py): rules by certified identity, protocol, port
and CIDR; the state table's replies, bounds and timeouts; reloads."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from ipop_trio.datapath.outbound import Outbound
from ipop_trio.datapath.switch import PeerPort, Switch
from ipop_trio.proto import firewall as fwm
from ipop_trio.proto.firewall import Action, Firewall, FirewallRules, Rule
from ipop_trio.stats import Stats
from ipop_trio.status import format_status

VNET = bytes(10)
US_MAC, PEER_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
US, PEER, OTHER = "10.77.0.1", "10.77.0.2", "10.77.0.3"
TCP, UDP, ICMP = 6, 17, 1
SYN, ACK, FIN, RST = 0x02, 0x10, 0x01, 0x04


def ipv4(src: str, dst: str, proto: int, l4: bytes, *, frag: int = 0, ihl: int = 5) -> bytes:
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        20 + len(l4),
        0,
        frag,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return VNET + US_MAC + PEER_MAC + b"\x08\x00" + ip + bytes(4 * max(0, ihl - 5)) + l4


def tcp(src: str, dst: str, sport: int, dport: int, flags: int = ACK) -> bytes:
    return ipv4(src, dst, TCP, struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 0, 0, 0))


def udp(src: str, dst: str, sport: int, dport: int) -> bytes:
    return ipv4(src, dst, UDP, struct.pack("!HHHH", sport, dport, 8, 0))


def icmp(src: str, dst: str, kind: int, ident: int) -> bytes:
    return ipv4(src, dst, ICMP, struct.pack("!BBHHH", kind, 0, 0, ident, 1))


def rules(
    inbound: tuple[Rule, ...] = (), outbound: tuple[Rule, ...] = (), **kw: int
) -> FirewallRules:
    return FirewallRules(inbound=inbound, outbound=outbound, **kw)


def allow(proto: int | None, port: int | tuple[int, int] | None = None, **kw: object) -> Rule:
    ports = (port, port) if isinstance(port, int) else port
    if not {"host", "groups", "cidr"} & set(kw):
        kw["host"] = None  # "any"
    return Rule(proto=proto, ports=ports, **kw)  # type: ignore[arg-type]


def deny(proto: int | None, port: int | None = None, **kw: object) -> Rule:
    return Rule(proto=proto, ports=None if port is None else (port, port), action=Action.DENY, **kw)  # type: ignore[arg-type]


def status(fw: Firewall, direction: str = "inbound") -> dict:
    return fw.status(0.0)[direction]


# --- matching ------------------------------------------------------------------------------


def test_an_allowed_port_opens_and_others_are_refused_on_the_default() -> None:
    fw = Firewall(rules(inbound=(allow(TCP, 22, groups=frozenset({"ops"})),)))
    ops = fw.peer(1, "beta", frozenset({"ops", "web"}))
    assert ops.inbound(tcp(PEER, US, 40000, 22, SYN), 0.0)
    assert not ops.inbound(tcp(PEER, US, 40000, 23, SYN), 0.0)
    web = fw.peer(2, "gamma", frozenset({"web"}))  # the rule needs every group it names
    assert not web.inbound(tcp(OTHER, US, 40000, 22, SYN), 0.0)
    s = status(fw)
    assert s["rules"][0]["hits"] == 1 and s["refused"]["default"] == 2 and s["default"] == "deny"


def test_first_match_wins_and_a_deny_is_counted_on_its_rule() -> None:
    fw = Firewall(rules(inbound=(deny(TCP, 5001, host=None), allow(TCP, (5000, 5010)))))
    p = fw.peer(1, "beta", frozenset())
    assert not p.inbound(tcp(PEER, US, 40000, 5001, SYN), 0.0)
    assert p.inbound(tcp(PEER, US, 40000, 5000, SYN), 0.0)
    assert p.inbound(tcp(PEER, US, 40001, 5010, SYN), 0.0)
    assert not p.inbound(tcp(PEER, US, 40002, 5011, SYN), 0.0)  # past the range's end
    s = status(fw)
    assert [r["hits"] for r in s["rules"]] == [1, 2]
    assert s["refused"] == {"default": 1, "non_ipv4": 0, "malformed": 0, "rules": 1}
    assert s["rules"][0]["rule"] == "deny tcp port 5001 host=any"
    assert s["rules"][1]["rule"] == "allow tcp ports 5000-5010 host=any"


def test_host_and_cidr_conditions() -> None:
    net = ipaddress.IPv4Network("10.77.0.0/30")  # .0 - .3
    fw = Firewall(
        rules(inbound=(allow(UDP, 53, host="beta"),), outbound=(allow(UDP, 53, cidr=net),))
    )
    beta, gamma = fw.peer(1, "beta", frozenset()), fw.peer(2, "gamma", frozenset())
    assert beta.inbound(udp(PEER, US, 5353, 53), 0.0)
    assert not gamma.inbound(udp(OTHER, US, 5353, 53), 0.0)
    # outbound, the CIDR is the packet's remote address: the destination
    assert gamma.outbound(udp(US, OTHER, 5000, 53), 0.0)
    assert not gamma.outbound(udp(US, "10.77.0.9", 5000, 53), 0.0)


def test_icmp_by_rule_and_echo_replies_by_identifier() -> None:
    fw = Firewall(
        rules(inbound=(allow(ICMP, groups=frozenset({"ops"})),), outbound=(allow(TCP, 22),))
    )
    ops, web = fw.peer(1, "beta", frozenset({"ops"})), fw.peer(2, "gamma", frozenset({"web"}))
    assert ops.inbound(icmp(PEER, US, 8, 7), 0.0)  # echo request
    assert ops.outbound(icmp(US, PEER, 0, 7), 0.0)  # its reply: the flow's
    assert not ops.outbound(icmp(US, PEER, 8, 9), 0.0)  # our own ping: no outbound rule
    assert not web.inbound(icmp(OTHER, US, 8, 7), 0.0)
    assert fw.status(0.0)["outbound"]["refused"]["default"] == 1


def test_replies_pass_both_ways_and_only_from_the_flows_peer() -> None:
    # Outbound allowed to port 80; inbound: only port 22. The reply from 80 passes inbound.
    fw = Firewall(rules(inbound=(allow(TCP, 22),), outbound=(allow(TCP, 80),)))
    beta, gamma = fw.peer(1, "beta", frozenset()), fw.peer(2, "gamma", frozenset())
    assert beta.outbound(tcp(US, PEER, 40000, 80, SYN), 0.0)
    assert beta.inbound(tcp(PEER, US, 80, 40000, SYN | ACK), 0.1)
    assert beta.outbound(tcp(US, PEER, 40000, 80), 0.2)
    # the same addresses from another peer's port are not that flow
    assert not gamma.inbound(tcp(PEER, US, 80, 40000, ACK), 0.3)
    # an unsolicited packet from port 80 to another of our ports is not a reply
    assert not beta.inbound(tcp(PEER, US, 80, 40001, ACK), 0.3)
    # inbound-opened: ssh in, its replies out (outbound allows only 80)
    assert beta.inbound(tcp(PEER, US, 50000, 22, SYN), 0.4)
    assert beta.outbound(tcp(US, PEER, 22, 50000, SYN | ACK), 0.5)


def test_a_direction_without_rules_passes_everything_and_tracks_it() -> None:
    fw = Firewall(rules(inbound=(allow(TCP, 22),)))
    p = fw.peer(1, "beta", frozenset())
    ipv6 = VNET + US_MAC + PEER_MAC + b"\x86\xdd" + bytes(40)
    assert p.outbound(ipv6, 0.0) and p.outbound(udp(US, PEER, 5000, 9999), 0.0)
    assert p.inbound(udp(PEER, US, 9999, 5000), 0.1)  # the reply to what went out
    assert not p.inbound(udp(PEER, US, 9999, 5001), 0.1)
    assert fw.status(0.0)["outbound"]["default"] == "allow"


def test_arp_always_passes_and_other_ethertypes_are_refused_where_rules_are() -> None:
    fw = Firewall(rules(inbound=(allow(TCP, 22),)))
    p = fw.peer(1, "beta", frozenset())
    arp = VNET + US_MAC + PEER_MAC + b"\x08\x06" + bytes(28)
    ipv6 = VNET + US_MAC + PEER_MAC + b"\x86\xdd" + bytes(40)
    vlan = VNET + US_MAC + PEER_MAC + b"\x81\x00" + bytes(40)
    # IPv6's neighbour discovery is its ARP: a neighbour advertisement (ICMPv6 136) passes
    na = VNET + US_MAC + PEER_MAC + b"\x86\xdd" + bytes([0x60]) + bytes(5) + b"\x3a\xff"
    na += bytes(32) + bytes([136]) + bytes(23)
    echo = na[: len(VNET) + 54] + bytes([128]) + bytes(23)  # an echo request does not
    assert p.inbound(arp, 0.0) and p.inbound(na, 0.0)
    assert not p.inbound(ipv6, 0.0) and not p.inbound(vlan, 0.0) and not p.inbound(echo, 0.0)
    assert status(fw)["refused"]["non_ipv4"] == 3


def test_unreadable_headers_are_refused_and_counted() -> None:
    fw = Firewall(rules(inbound=(allow(None, host=None),)))
    p = fw.peer(1, "beta", frozenset())
    good = tcp(PEER, US, 1, 2)
    assert p.inbound(good, 0.0)
    assert not p.inbound(good[:-8], 0.0)  # TCP header cut short
    assert not p.inbound(ipv4(PEER, US, TCP, bytes(20), ihl=4), 0.0)
    assert not p.inbound(good[: 10 + 14 + 12], 0.0)
    bad_version = bytearray(good)
    bad_version[24] = 0x65
    assert not p.inbound(bytes(bad_version), 0.0)
    assert status(fw)["refused"]["malformed"] == 4


def test_options_and_fragments() -> None:
    fw = Firewall(rules(inbound=(allow(UDP, 53), allow(UDP, host=None))))
    p = fw.peer(1, "beta", frozenset())
    with_options = ipv4(PEER, US, UDP, struct.pack("!HHHH", 1000, 53, 8, 0), ihl=6)
    assert p.inbound(with_options, 0.0)
    assert status(fw)["rules"][0]["hits"] == 1
    # a later fragment has no ports: only a rule without a port can match it
    later = ipv4(PEER, US, UDP, bytes(16), frag=185)
    assert p.inbound(later, 0.0)
    assert status(fw)["rules"][1]["hits"] == 1


def test_rules_are_compiled_per_peer() -> None:
    fw = Firewall(
        rules(inbound=(allow(TCP, 1, host="beta"), allow(TCP, 2, groups=frozenset({"db"}))))
    )
    assert [c[0] for c in fw.peer(1, "beta", frozenset()).rules[1] or ()] == [0]
    assert [c[0] for c in fw.peer(1, "gamma", frozenset({"db"})).rules[1] or ()] == [1]
    assert fw.peer(1, "delta", frozenset()).rules == (None, ())


# --- the state table ------------------------------------------------------------------------


def test_the_table_is_bounded_and_evicts_the_least_recently_used() -> None:
    fw = Firewall(rules(inbound=(allow(UDP, host=None),), conntrack_max=3))
    p = fw.peer(1, "beta", frozenset())
    for port in (1, 2, 3):
        assert p.inbound(udp(PEER, US, port, 9), 0.0)
    assert p.outbound(udp(US, PEER, 9, 1), 1.0)  # flow 1 used again: 2 is now the oldest
    assert p.inbound(udp(PEER, US, 4, 9), 2.0)
    ct = fw.status(2.0)["conntrack"]
    assert ct["entries"] == 3 and ct["evicted"] == 1 and ct["created"] == 4
    # an evicted flow's replies are refused where the direction has rules
    fw2 = Firewall(rules(inbound=(allow(TCP, 22),), conntrack_max=3))
    q = fw2.peer(1, "beta", frozenset())
    for port in (1, 2, 3, 4):
        assert q.outbound(udp(US, PEER, port, 9), float(port))  # no outbound rules: passes
    assert not q.inbound(udp(PEER, US, 9, 1), 5.0)  # flow 1 was evicted
    assert q.inbound(udp(PEER, US, 9, 4), 5.0)
    assert fw2.status(5.0)["conntrack"]["evicted"] == 1


def test_timeouts_udp_and_icmp_are_short() -> None:
    fw = Firewall(rules(outbound=(allow(UDP, 53), allow(ICMP)), inbound=(allow(TCP, 22),)))
    p = fw.peer(1, "beta", frozenset())
    assert p.outbound(udp(US, PEER, 5000, 53), 0.0)
    assert p.inbound(udp(PEER, US, 53, 5000), fwm.UDP_TIMEOUT - 1)  # refreshed here
    assert p.inbound(udp(PEER, US, 53, 5000), 2 * fwm.UDP_TIMEOUT - 2)
    assert not p.inbound(udp(PEER, US, 53, 5000), 3 * fwm.UDP_TIMEOUT)
    assert p.outbound(icmp(US, PEER, 8, 3), 0.0)
    assert not p.inbound(icmp(PEER, US, 0, 3), fwm.ICMP_TIMEOUT + 0.1)
    assert fw.status(1e6)["conntrack"]["expired"] == 2


def test_timeouts_tcp_opening_established_closing() -> None:
    fw = Firewall(rules(outbound=(allow(TCP, 80),), inbound=(allow(TCP, 22),)))
    p = fw.peer(1, "beta", frozenset())
    # never answered: gone after TCP_OPENING
    assert p.outbound(tcp(US, PEER, 1, 80, SYN), 0.0)
    assert not p.inbound(tcp(PEER, US, 80, 1, SYN | ACK), fwm.TCP_OPENING + 0.1)
    # answered: established, lives TCP_ESTABLISHED from its last packet
    assert p.outbound(tcp(US, PEER, 2, 80, SYN), 0.0)
    assert p.inbound(tcp(PEER, US, 80, 2, SYN | ACK), 1.0)
    t = 1.0 + fwm.TCP_ESTABLISHED - 1
    assert p.inbound(tcp(PEER, US, 80, 2), t)
    # a FIN: closing, short again
    assert p.outbound(tcp(US, PEER, 2, 80, FIN | ACK), t)
    assert not p.inbound(tcp(PEER, US, 80, 2), t + fwm.TCP_CLOSING + 0.1)
    assert fwm.TCP_OPENING < fwm.TCP_CLOSING < fwm.TCP_ESTABLISHED
    assert fwm.UDP_TIMEOUT < fwm.TCP_ESTABLISHED and fwm.ICMP_TIMEOUT < fwm.TCP_ESTABLISHED


# --- reloads ---------------------------------------------------------------------------------


def test_a_reload_checks_existing_flows_against_the_new_rules() -> None:
    out = (allow(TCP, 443),)
    fw = Firewall(rules(inbound=(allow(TCP, 22), allow(TCP, 80)), outbound=out))
    p = fw.peer(1, "beta", frozenset())
    assert p.inbound(tcp(PEER, US, 1000, 22, SYN), 0.0)
    assert p.inbound(tcp(PEER, US, 1001, 80, SYN), 0.0)
    fw.load(rules(inbound=(allow(TCP, 80),), outbound=out))
    p = fw.peer(1, "beta", frozenset())  # the switch compiles every port again
    assert not p.outbound(tcp(US, PEER, 22, 1000), 1.0)  # the ssh flow is no longer allowed
    assert not p.inbound(tcp(PEER, US, 1000, 22), 1.0)
    assert p.outbound(tcp(US, PEER, 80, 1001), 1.0)  # the web flow still is
    ct = fw.status(1.0)["conntrack"]
    assert ct["revoked"] == 1 and ct["entries"] == 1
    assert status(fw)["rules"] == [
        {"rule": "allow tcp port 80 host=any", "action": "allow", "hits": 0}
    ]


def test_a_reload_to_a_smaller_table_evicts_the_oldest() -> None:
    fw = Firewall(rules(inbound=(allow(UDP, host=None),)))
    p = fw.peer(1, "beta", frozenset())
    for port in range(10):
        p.inbound(udp(PEER, US, port, 9), float(port))
    fw.load(rules(inbound=(allow(UDP, host=None),), conntrack_max=4))
    assert fw.status(10.0)["conntrack"]["entries"] == 4


@given(st.binary(max_size=120), st.integers(0, 1))
def test_no_frame_makes_it_raise(tail: bytes, inbound: int) -> None:
    fw = Firewall(rules(inbound=(allow(TCP, 22),), outbound=(allow(None, host=None),)))
    p = fw.peer(1, "beta", frozenset())
    for frame in (tail, VNET + US_MAC + PEER_MAC + b"\x08\x00" + tail):
        assert (p.inbound if inbound else p.outbound)(frame, 0.0) in (True, False)


# --- on the data path: the switch and the outbound stage -----------------------------------


def _switch() -> tuple[Switch, PeerPort, Stats]:
    stats = Stats()
    sw = Switch(US_MAC, stats)
    port = PeerPort("beta", PEER_MAC, ipaddress.IPv4Address(PEER).packed, frozenset({"web"}))
    sw.add(port)
    return sw, port, stats


def test_no_rules_means_no_firewall_and_no_filter() -> None:
    sw, port, _ = _switch()
    sw.configure_firewall(None)
    assert sw.firewall is None and port.filter is None
    sw.configure_firewall(FirewallRules(conntrack_max=5))  # a section without rules
    assert sw.firewall is None and port.filter is None


def test_the_switch_compiles_ports_and_counts_what_the_rules_refuse() -> None:
    sw, port, stats = _switch()
    sw.configure_firewall(rules(inbound=(allow(TCP, 22, groups=frozenset({"ops"})),)))
    assert port.filter is not None
    frame = tcp(PEER, US, 40000, 22, SYN)  # frames from the peer's MAC to ours
    assert not sw.accept_inbound(port, frame, 0.0)  # beta is not (yet) in ops
    assert stats.drops == {"firewall_inbound": 1}
    sw.set_groups(port, frozenset({"ops"}))  # its handshake proved a certificate with ops
    assert sw.accept_inbound(port, frame, 0.0)
    arp = VNET + US_MAC + PEER_MAC + b"\x08\x06"
    arp += struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, PEER_MAC, port.ip4, US_MAC, bytes(4))
    assert sw.accept_inbound(port, arp, 0.0)
    sw.configure_firewall(None)  # SIGHUP to a config without [firewall]
    assert port.filter is None and sw.accept_inbound(port, tcp(PEER, US, 22, 9), 0.0)


def test_outbound_checks_each_routed_frame_once() -> None:
    sw, port, stats = _switch()
    sw.configure_firewall(rules(outbound=(allow(TCP, 80),)))
    out = Outbound(sw, None, stats, send_relayed=lambda *a: 0)  # type: ignore[arg-type]

    def to_peer(frame: bytes) -> bytes:
        return frame[:10] + PEER_MAC + US_MAC + frame[22:]

    web, ssh = to_peer(tcp(US, PEER, 1, 80, SYN)), to_peer(tcp(US, PEER, 1, 22, SYN))
    assert out.process([web, ssh, web], 0.0) == []
    assert list(port.staged) == [web, web]  # no session yet: staged, as before
    assert stats.drops == {"firewall_outbound": 1}
    fw = sw.firewall
    assert fw is not None and fw.status(0.0)["outbound"]["rules"][0]["hits"] == 1  # one flow


def test_status_text_names_each_rule_and_default() -> None:
    fw = Firewall(rules(inbound=(deny(TCP, 5001, host=None), allow(TCP, 5000))))
    p = fw.peer(1, "beta", frozenset())
    p.inbound(tcp(PEER, US, 1, 5001, SYN), 0.0)
    p.inbound(tcp(PEER, US, 1, 5000, SYN), 0.0)
    p.inbound(tcp(PEER, US, 1, 5002, SYN), 0.0)
    text = format_status({"node": {"name": "alpha"}, "peers": [], "firewall": fw.status(0.0)})
    assert "firewall: conntrack 1/65536 flows" in text
    assert "inbound: 2 rules, default deny: 1 refused" in text
    assert "inbound[0] deny tcp port 5001 host=any: 1 refused" in text
    assert "inbound[1] allow tcp port 5000 host=any: 1 flows opened" in text
    assert "outbound: no rules, everything passes" in text
    assert "firewall" not in format_status({"node": {"name": "alpha"}, "peers": []})
