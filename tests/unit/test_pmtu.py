"""proto/pmtu.py: which frames are too big for a path, and the ICMP 'fragmentation needed'
written back for them (RFC 792, RFC 1191)."""

from __future__ import annotations

import struct

from ipop_trio.proto import pmtu
from ipop_trio.proto.offload import F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR

SRC_MAC, DST_MAC = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
SRC_IP, DST_IP = bytes([10, 77, 0, 1]), bytes([10, 77, 0, 2])


def tcp_frame(payload: int, *, gso_size: int = 0, frag: int = 0x4000) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + payload, 7, frag, 64, 6, 0, SRC_IP, DST_IP)
    tcp = struct.pack("!HHIIBBHHH", 5000, 5201, 1234, 0, 5 << 4, 0x18, 65535, 0, 0)
    gso = GSO_TCPV4 if gso_size else GSO_NONE
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso, 54 if gso_size else 0, gso_size, 34, 16)
    return vnet + DST_MAC + SRC_MAC + b"\x08\x00" + ip + tcp + bytes(payload)


def csum_ok(data: bytes) -> bool:
    return pmtu._checksum(data) == 0


def test_packet_length_is_a_segments_for_tso_and_the_packets_otherwise() -> None:
    assert pmtu.ip_packet_len(tcp_frame(1360)) == 1400
    assert pmtu.ip_packet_len(tcp_frame(64000, gso_size=1360)) == 1400
    assert pmtu.ip_packet_len(tcp_frame(64000, gso_size=1200)) == 1240
    arp = bytes(10) + DST_MAC + SRC_MAC + b"\x08\x06" + bytes(28)
    assert pmtu.ip_packet_len(arp) == 0 and pmtu.ip_packet_len(b"short") == 0


def test_frag_needed_is_a_valid_icmp_to_the_sender_quoting_the_packet() -> None:
    frame = tcp_frame(1360)
    reply = pmtu.frag_needed(frame, 1304)
    assert reply is not None
    vnet, eth, ip = reply[:10], reply[10:24], reply[24:]
    assert VNET_HDR.unpack(vnet)[:2] == (0, GSO_NONE)
    assert eth == SRC_MAC + DST_MAC + b"\x08\x00"
    assert csum_ok(ip[:20]) and ip[9] == 1 and ip[12:16] == DST_IP and ip[16:20] == SRC_IP
    assert struct.unpack_from("!H", ip, 2)[0] == len(ip)
    icmp = ip[20:]
    assert csum_ok(icmp)
    kind, code, _sum, _unused, mtu = struct.unpack_from("!BBHHH", icmp)
    assert (kind, code, mtu) == (3, 4, 1304)
    assert icmp[8:] == frame[24 : 24 + 20 + 8]  # the IP header and 8 bytes of TCP


def test_no_icmp_about_a_later_fragment_or_an_icmp_error() -> None:
    assert pmtu.frag_needed(tcp_frame(1360, frag=0x2000 | 185), 1304) is None
    error = bytearray(tcp_frame(1360))
    error[24 + 9] = 1  # ICMP
    error[24 + 20] = 3  # destination unreachable
    assert pmtu.frag_needed(bytes(error), 1304) is None
    assert pmtu.frag_needed(b"\x00" * 30, 1304) is None


def test_split_keeps_what_fits_and_answers_the_rest() -> None:
    small, big, tso = tcp_frame(100), tcp_frame(1360), tcp_frame(64000, gso_size=1360)
    replies: list[bytes] = []
    fit, refused = pmtu.split_too_big([small, big, tso], 1304, replies)
    assert fit == [small] and refused == 2 and len(replies) == 2
    assert pmtu.split_too_big([small], 1304, replies)[1] == 0


SRC_IP6 = bytes.fromhex("fd770000000000000000000000000001")
DST_IP6 = bytes.fromhex("fd770000000000000000000000000002")


def tcp6_frame(payload: int, *, gso_size: int = 0) -> bytes:
    ip = struct.pack("!IHBB16s16s", 6 << 28, 20 + payload, 6, 64, SRC_IP6, DST_IP6)
    tcp = struct.pack("!HHIIBBHHH", 5000, 5201, 1234, 0, 5 << 4, 0x18, 65535, 0, 0)
    gso = GSO_TCPV6 if gso_size else GSO_NONE
    vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso, 74 if gso_size else 0, gso_size, 54, 16)
    return vnet + DST_MAC + SRC_MAC + b"\x86\xdd" + ip + tcp + bytes(payload)


def test_ipv6_packet_length_and_packet_too_big_for_the_sender() -> None:
    assert pmtu.ip_packet_len(tcp6_frame(1340)) == 1400
    assert pmtu.ip_packet_len(tcp6_frame(64000, gso_size=1340)) == 1400
    replies: list[bytes] = []
    small, tso = tcp6_frame(1000), tcp6_frame(64000, gso_size=1340)
    fit, refused = pmtu.split_too_big([small, tso], 1300, replies)
    assert fit == [small] and refused == 1
    (reply,) = replies
    eth = reply[10:]
    assert eth[:6] == SRC_MAC and eth[6:12] == DST_MAC and eth[12:14] == b"\x86\xdd"
    ver, plen, nxt, _hops, src, dst = struct.unpack_from("!IHBB16s16s", eth, 14)
    assert (ver >> 28, nxt, src, dst) == (6, 58, DST_IP6, SRC_IP6)
    body = eth[54:]
    assert len(eth) - 14 <= 1280 and plen == len(body)  # RFC 4443 §3.2: within 1280
    kind, code, _csum, mtu = struct.unpack_from("!BBHI", body)
    assert (kind, code, mtu) == (2, 0, 1300)
    assert body[8:48] == tso[24:64]  # the invoking packet's header, quoted
    pseudo = src + dst + struct.pack("!I", len(body)) + b"\0\0\0\x3a"
    assert pmtu._checksum(pseudo + body) == 0
    # below IPv6's minimum MTU the reply says 1280; an ICMPv6 error is never answered
    assert struct.unpack_from("!I", pmtu.packet_too_big(tso, 1200) or b"", 68)[0] == 1280
    error = bytearray(tcp6_frame(100))
    error[30] = 58
    error[64] = 1  # destination unreachable
    assert pmtu.packet_too_big(bytes(error), 1300) is None
