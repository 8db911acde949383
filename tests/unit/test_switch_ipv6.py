"""IPv6 on the overlay's switch: neighbour discovery answered for peers, the kernel's multicast
sorted by name, and a peer's IPv6 sources and ND claims checked (proto/ndp.py)."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop_trio.datapath.switch import VNET, ZERO_VNET, PeerPort, Switch
from ipop_trio.proto import ndp
from ipop_trio.stats import Stats

OWN = bytes.fromhex("020000000001")
B_MAC = bytes.fromhex("0a1122334455")
C_MAC = bytes.fromhex("020000000003")
OWN_IP6 = ipaddress.IPv6Address("fd77::1").packed
B_IP6 = ipaddress.IPv6Address("fd77::2").packed
C_IP6 = ipaddress.IPv6Address("fd77::3").packed
OWN_LL = ndp.link_local_for_mac(OWN)
B_LL = ndp.link_local_for_mac(B_MAC)
ALL_NODES = ipaddress.IPv6Address("ff02::1").packed


def ipv6(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, nxt: int, body: bytes) -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(body), nxt, 255, src, dst)
    return ZERO_VNET + dst_mac + src_mac + b"\x86\xdd" + header + body


def icmp6(kind: int, rest: bytes) -> bytes:
    return bytes([kind, 0, 0, 0]) + rest


def solicited_node(target: bytes) -> tuple[bytes, bytes]:
    """The solicited-node multicast address of `target` and its MAC (RFC 4291 §2.7.1)."""
    group = bytes.fromhex("ff0200000000000000000001ff") + target[13:]
    return group, b"\x33\x33" + group[12:]


def ns(src: bytes, target: bytes, src_mac: bytes = OWN) -> bytes:
    group, mac = solicited_node(target)
    body = icmp6(ndp.ICMPV6_NS, bytes(4) + target + bytes([1, 1]) + src_mac)
    return ipv6(mac, src_mac, src, group, 58, body)


def make() -> tuple[Switch, PeerPort, PeerPort, Stats]:
    stats = Stats()
    sw = Switch(OWN, stats)
    b, c = PeerPort("b", B_MAC, None), PeerPort("c", C_MAC, None)
    sw.add(b)
    sw.add(c)
    sw.set_ip6(b, B_IP6)
    return sw, b, c, stats


def ones_sum_ok(src: bytes, dst: bytes, payload: bytes) -> bool:
    """An ICMPv6 message with a right checksum sums, pseudo-header included, to 0xffff."""
    data = src + dst + struct.pack("!I", len(payload)) + b"\0\0\0\x3a" + payload
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def test_link_local_is_the_kernels_eui64() -> None:
    # RFC 4291 appendix A: flip the U/L bit, put ff:fe in the middle
    assert ipaddress.IPv6Address(ndp.link_local_for_mac(B_MAC)) == ipaddress.IPv6Address(
        "fe80::811:22ff:fe33:4455"
    )


@pytest.mark.parametrize("target", [B_IP6, B_LL], ids=["certified", "link-local"])
def test_a_solicitation_for_a_peer_is_answered_locally(target: bytes) -> None:
    sw, _b, _c, stats = make()
    out, local = sw.route_outbound([ns(OWN_IP6, target)])
    assert out == {}
    (na,) = local
    assert na[:VNET] == ZERO_VNET
    eth = na[VNET:]
    assert eth[:6] == OWN and eth[6:12] == B_MAC and eth[12:14] == b"\x86\xdd"
    ver, plen, nxt, hops, src, dst = struct.unpack_from("!IHBB16s16s", eth, 14)
    assert (ver >> 28, nxt, hops, src, dst) == (6, 58, 255, target, OWN_IP6)
    body = eth[54:]
    assert plen == len(body) == 32
    kind, code, _csum, flags = struct.unpack_from("!BBHI", body)
    assert (kind, code, flags) == (136, 0, 0x60000000)  # solicited, override, not a router
    assert body[8:24] == target and body[24:32] == bytes([2, 1]) + B_MAC
    assert ones_sum_ok(src, dst, body)
    assert stats.counters()["ipv6_nd_answered"] == 1 and stats.drops == {}


def test_the_kernels_multicast_chatter_stays_local_by_name() -> None:
    sw, _b, _c, stats = make()
    rs = ipv6(b"\x33\x33\0\0\0\x02", OWN, OWN_LL, ALL_NODES, 58, icmp6(133, bytes(4)))
    hop_by_hop = bytes([58, 0, 5, 2, 0, 0, 1, 0])  # router alert, then ICMPv6
    mld2 = ipv6(b"\x33\x33\0\0\0\x16", OWN, OWN_LL, ALL_NODES, 0, hop_by_hop + icmp6(143, b""))
    dad = ns(bytes(16), OWN_LL)
    unknown = ns(OWN_IP6, C_IP6)  # c's certificate holds no IPv6 address
    unsolicited = ipv6(b"\x33\x33\0\0\0\x01", OWN, OWN_IP6, ALL_NODES, 58, icmp6(136, bytes(20)))
    out, local = sw.route_outbound([rs, mld2, dad, unknown, unsolicited])
    assert out == {} and local == []
    counters = stats.counters()
    for name in (
        "ipv6_router_local",
        "ipv6_mld_local",
        "ipv6_nd_dad_local",
        "ipv6_nd_unknown_target",
        "ipv6_nd_advert_local",
    ):
        assert counters[name] == 1, name
    assert stats.drops == {}


def test_other_ipv6_multicast_and_unicast_go_as_ipv4_does() -> None:
    sw, b, c, stats = make()
    mdns_group = ipaddress.IPv6Address("ff02::fb").packed
    mdns = ipv6(b"\x33\x33\0\0\0\xfb", OWN, OWN_LL, mdns_group, 17, bytes(8))
    echo = ipv6(B_MAC, OWN, OWN_IP6, B_IP6, 58, icmp6(128, bytes(4)))
    out, local = sw.route_outbound([mdns, echo])
    assert out == {b: [mdns, echo], c: [mdns]} and local == []
    assert stats.counters()["ipv6_multicast_flooded"] == 1 and stats.drops == {}


def test_a_peer_sends_only_from_its_certified_and_link_local_addresses() -> None:
    sw, b, c, stats = make()
    echo = icmp6(129, bytes(4))
    assert sw.accept_inbound(b, ipv6(OWN, B_MAC, B_IP6, OWN_IP6, 58, echo), 0.0)
    assert sw.accept_inbound(b, ipv6(OWN, B_MAC, B_LL, OWN_LL, 58, echo), 0.0)
    assert not sw.accept_inbound(b, ipv6(OWN, B_MAC, C_IP6, OWN_IP6, 58, echo), 0.0)
    # c holds no certified IPv6 address: its link-local one only
    c_ll = ndp.link_local_for_mac(C_MAC)
    assert sw.accept_inbound(c, ipv6(OWN, C_MAC, c_ll, OWN_LL, 17, bytes(8)), 0.0)
    assert not sw.accept_inbound(c, ipv6(OWN, C_MAC, C_IP6, OWN_IP6, 17, bytes(8)), 0.0)
    assert not sw.accept_inbound(b, ZERO_VNET + OWN + B_MAC + b"\x86\xdd" + bytes(20), 0.0)
    assert stats.drops == {"spoofed_ip6": 2, "runt_ipv6": 1}


def test_a_certificate_without_ipv6_takes_back_the_peers_address() -> None:
    sw, b, _c, stats = make()
    sw.set_ip6(b, None)
    assert not sw.accept_inbound(b, ipv6(OWN, B_MAC, B_IP6, OWN_IP6, 17, bytes(8)), 0.0)
    _out, local = sw.route_outbound([ns(OWN_IP6, B_IP6)])
    assert local == [] and stats.counters()["ipv6_nd_unknown_target"] == 1
    sw.remove(b)
    _out, local = sw.route_outbound([ns(OWN_IP6, B_LL)])
    assert local == []


def na_from(mac: bytes, src: bytes, target: bytes, option_mac: bytes) -> bytes:
    body = icmp6(136, struct.pack("!I", 0x60000000) + target + bytes([2, 1]) + option_mac)
    return ipv6(OWN, mac, src, OWN_IP6, 58, body)


def test_a_peers_neighbour_discovery_may_only_speak_for_itself() -> None:
    sw, b, _c, stats = make()
    assert sw.accept_inbound(b, na_from(B_MAC, B_IP6, B_IP6, B_MAC), 0.0)
    assert sw.accept_inbound(b, ns(B_IP6, OWN_IP6, B_MAC), 0.0)
    assert not sw.accept_inbound(b, na_from(B_MAC, B_IP6, C_IP6, B_MAC), 0.0)  # c's address
    assert not sw.accept_inbound(b, na_from(B_MAC, B_IP6, B_IP6, C_MAC), 0.0)  # c's MAC
    assert not sw.accept_inbound(b, ns(B_IP6, OWN_IP6, B_MAC)[:-6] + C_MAC, 0.0)
    ra = ipv6(OWN, B_MAC, B_LL, ALL_NODES, 58, icmp6(134, bytes(12)))
    assert not sw.accept_inbound(b, ra, 0.0)  # no router on the overlay
    assert stats.drops == {"spoofed_nd": 4}


@given(st.binary(max_size=120))
def test_a_peers_garbage_ipv6_is_refused_or_passed_never_raised(tail: bytes) -> None:
    sw, b, _c, _stats = make()
    frame = ZERO_VNET + OWN + B_MAC + b"\x86\xdd" + bytes([0x60]) + bytes(7) + B_IP6 + tail
    sw.accept_inbound(b, frame, 0.0)
    sw.route_outbound([ZERO_VNET + b"\x33\x33" + bytes(4) + OWN + b"\x86\xdd" + tail])


def test_classification_never_raises_on_short_frames() -> None:
    base = ipv6(b"\x33\x33\0\0\0\x01", OWN, OWN_LL, ALL_NODES, 0, bytes([58, 9]) + bytes(14))
    for n in range(len(base) + 1):
        ndp.classify_multicast(base[:n])
        ndp.solicited_target(base[:n])
        ndp.nd_claims_ok(base[:n], B_MAC, (B_LL,))
