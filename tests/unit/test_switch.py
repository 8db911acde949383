import struct

from ipop_trio.datapath.switch import ETH_P_ARP, VNET, ZERO_VNET, PeerPort, Switch
from ipop_trio.stats import Stats

OWN = bytes.fromhex("020000000001")
B_MAC = bytes.fromhex("020000000002")
C_MAC = bytes.fromhex("020000000003")
OWN_IP = bytes([10, 77, 0, 1])
B_IP = bytes([10, 77, 0, 2])
C_IP = bytes([10, 77, 0, 3])


def arp_request(target: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, OWN, OWN_IP, b"\0" * 6, target)
    return ZERO_VNET + b"\xff" * 6 + OWN + ETH_P_ARP + arp


def ipv4_frame(dst_mac: bytes, src_mac: bytes, src_ip: bytes, dst_ip: bytes) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + src_ip + dst_ip + b"\0" * 8
    return ZERO_VNET + dst_mac + src_mac + b"\x08\x00" + ip


def make() -> tuple[Switch, PeerPort, PeerPort, Stats]:
    stats = Stats()
    sw = Switch(OWN, stats)
    b, c = PeerPort("b", B_MAC, B_IP), PeerPort("c", C_MAC, None)
    sw.add(b)
    sw.add(c)
    return sw, b, c, stats


def test_unicast_goes_to_the_owner_of_the_mac() -> None:
    sw, b, c, _ = make()
    f1, f2 = ipv4_frame(B_MAC, OWN, OWN_IP, B_IP), ipv4_frame(C_MAC, OWN, OWN_IP, C_IP)
    out, local = sw.route_outbound([f1, f2, f1])
    assert out == {b: [f1, f1], c: [f2]} and local == []


def test_arp_for_known_peer_is_answered_locally() -> None:
    sw, _b, _c, _ = make()
    out, local = sw.route_outbound([arp_request(B_IP)])
    assert out == {}
    (reply,) = local
    assert reply[:VNET] == ZERO_VNET
    eth = reply[VNET:]
    assert eth[:6] == OWN and eth[6:12] == B_MAC and eth[12:14] == ETH_P_ARP
    _h, _p, _hl, _pl, op, sha, spa, tha, tpa = struct.unpack_from("!HHBBH6s4s6s4s", eth, 14)
    assert (op, sha, spa, tha, tpa) == (2, B_MAC, B_IP, OWN, OWN_IP)


def test_arp_for_unknown_address_and_broadcasts_are_flooded_once() -> None:
    sw, b, c, _ = make()
    req = arp_request(bytes([10, 77, 0, 9]))
    out, local = sw.route_outbound([req])
    assert out == {b: [req], c: [req]} and local == []
    # learning C's address later makes ARP for it local
    sw.set_ip4(c, C_IP)
    out, local = sw.route_outbound([arp_request(C_IP)])
    assert out == {} and len(local) == 1


def test_unknown_unicast_and_runts_are_counted_drops() -> None:
    sw, *_, stats = make()
    out, local = sw.route_outbound(
        [ipv4_frame(b"\x02" * 6, OWN, OWN_IP, B_IP), ZERO_VNET + b"short"]
    )
    assert out == {} and local == []
    assert stats.drops == {"unknown_unicast": 1, "runt_frame": 1}


def test_inbound_checks_source_mac_destination_and_source_ip() -> None:
    sw, b, _c, stats = make()
    assert sw.accept_inbound(b, ipv4_frame(OWN, B_MAC, B_IP, OWN_IP), 0.0)
    assert sw.accept_inbound(b, ipv4_frame(b"\xff" * 6, B_MAC, B_IP, OWN_IP), 0.0)
    assert not sw.accept_inbound(b, ipv4_frame(OWN, C_MAC, B_IP, OWN_IP), 0.0)  # claims C's MAC
    assert not sw.accept_inbound(b, ipv4_frame(OWN, B_MAC, C_IP, OWN_IP), 0.0)  # claims C's IP
    assert not sw.accept_inbound(b, ipv4_frame(C_MAC, B_MAC, B_IP, C_IP), 0.0)  # not for us
    assert stats.drops == {"spoofed_source": 1, "spoofed_ip": 1, "not_for_us": 1}


def test_removed_peer_is_unknown_unicast_and_its_arp_floods() -> None:
    sw, b, c, stats = make()
    sw.remove(b)
    out, local = sw.route_outbound([ipv4_frame(B_MAC, OWN, OWN_IP, B_IP), arp_request(B_IP)])
    assert b not in out and local == []
    assert out == {c: [arp_request(B_IP)]}
    assert stats.drops == {"unknown_unicast": 1}


def arp_reply_from(sender_mac: bytes, sender_ip: bytes) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, sender_mac, sender_ip, OWN, OWN_IP)
    return ZERO_VNET + OWN + sender_mac + ETH_P_ARP + arp


def test_a_peer_may_only_speak_arp_for_itself_and_other_ethertypes_are_refused() -> None:
    sw, b, _c, stats = make()
    assert sw.accept_inbound(b, arp_reply_from(B_MAC, B_IP), 0.0)
    assert not sw.accept_inbound(b, arp_reply_from(B_MAC, C_IP), 0.0)  # claims C's address
    lldp = ZERO_VNET + OWN + B_MAC + b"\x88\xcc" + bytes(40)
    assert not sw.accept_inbound(b, lldp, 0.0)
    assert stats.drops == {"spoofed_arp": 1, "unchecked_ethertype": 1}


def test_what_the_overlay_does_not_carry_is_not_sent_and_not_a_drop() -> None:
    """Ethertypes other than IPv4, IPv6 and ARP never leave: every peer would refuse them.
    Counted by name, and IPv4 in the same batch still goes."""
    sw, b, _c, stats = make()
    lldp = ZERO_VNET + bytes.fromhex("0180c200000e") + OWN + b"\x88\xcc" + bytes(30)
    ok = ipv4_frame(B_MAC, OWN, OWN_IP, B_IP)
    out, local = sw.route_outbound([lldp, ok, lldp])
    assert out == {b: [ok]} and local == []
    assert stats.counters()["ethertype_not_carried"] == 2
    assert stats.drops == {}
