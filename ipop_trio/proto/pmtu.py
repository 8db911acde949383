"""Path MTU towards one peer: which TAP frames are too big for it, and the ICMP the node writes
back into its own TAP for each, as a router on the way would.

When the underlay towards a peer turns out narrower than the TAP's MTU assumed (a send fails
with EMSGSIZE: the route's or the interface's MTU, or a PMTU the kernel learned), a datagram
carrying a full-size IPv4 packet cannot leave. The node then answers each such frame with an
ICMP "fragmentation needed" (RFC 792 type 3 code 4, with the next-hop MTU of RFC 1191 §4)
written into its TAP: the sending host's stack lowers its path MTU for that destination (TCP
its MSS, and with it the size of TSO segments), and what follows fits. This is what a router
with a narrower next hop does, and what Tailscale does for its peers (its "PMTUD"). An IPv6
packet gets its "packet too big" (RFC 4443 §3.2) instead.

Pure: frames in (virtio_net_hdr + Ethernet, as the TAP hands them over), frames out. A frame
from our own kernel is still checked for length before it is read: this raises nothing.

    ICMP written back:  Ethernet (to the frame's source MAC, from its destination MAC)
                        IPv4 (from the frame's destination address, to its source; TTL 64)
                        ICMP type 3 code 4 | checksum | unused (2) | next-hop MTU (2)
                        the frame's IP header and the first 8 bytes after it (RFC 792)
    ICMPv6 written back: Ethernet as above
                        IPv6 (from the frame's destination address, to its source; hops 64)
                        ICMPv6 type 2 code 0 | checksum | MTU (4)
                        as much of the frame's packet as keeps the reply within 1280 bytes
"""

from __future__ import annotations

import struct

from .ndp import checksum6
from .offload import GSO_NONE, GSO_TCPV4, GSO_TCPV6, VNET_HDR, VNET_HDR_LEN

ETH_HLEN = 14
ETH_P_IP = b"\x08\x00"
ETH_P_IPV6 = b"\x86\xdd"
IPPROTO_ICMPV6 = 58
ICMPV6_PACKET_TOO_BIG = 2
IPV6_MIN_MTU = 1280  # RFC 8200 §5: every IPv6 link takes this much
_IPV6 = struct.Struct("!IHBB16s16s")
IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4
MIN_PATH_MTU = 576  # RFC 791: every IPv4 host takes this much
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP = struct.Struct("!BBHHH")


def _checksum(data: bytes) -> int:
    """RFC 1071 one's-complement sum of 16-bit words, complemented."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_packet_len(frame: bytes) -> int:
    """The largest IP packet `frame` puts on a wire: for a TCP super-frame (TSO) one of its
    segments (IP and TCP headers and gso_size bytes), else the frame's IP packet; 0 for what
    is not IPv4 or IPv6, or too short to tell."""
    if len(frame) < VNET_HDR_LEN + ETH_HLEN + 20:
        return 0
    ethertype = frame[22:24]
    if ethertype != ETH_P_IP and ethertype != ETH_P_IPV6:
        return 0
    _flags, gso_type, _hdr_len, gso_size, csum_start, _off = VNET_HDR.unpack_from(frame)
    if gso_type & 0x7F in (GSO_TCPV4, GSO_TCPV6) and gso_size:
        doff_at = VNET_HDR_LEN + csum_start + 12
        if csum_start < ETH_HLEN + 20 or doff_at >= len(frame):
            return len(frame) - VNET_HDR_LEN - ETH_HLEN
        tcp_hdr = (frame[doff_at] >> 4) * 4
        return csum_start - ETH_HLEN + tcp_hdr + gso_size
    return len(frame) - VNET_HDR_LEN - ETH_HLEN


def frag_needed(frame: bytes, mtu: int) -> bytes | None:
    """The TAP write that tells `frame`'s sender the path takes IP packets of at most `mtu`
    bytes; None when `frame` is not an IPv4 packet one can answer (too short, a fragment
    after the first, or itself an ICMP error: RFC 1812 §4.3.2.7)."""
    ip = VNET_HDR_LEN + ETH_HLEN
    if len(frame) < ip + 20 or frame[22:24] != ETH_P_IP or frame[ip] >> 4 != 4:
        return None
    ihl = (frame[ip] & 0x0F) * 4
    if ihl < 20 or len(frame) < ip + ihl:
        return None
    if struct.unpack_from("!H", frame, ip + 6)[0] & 0x1FFF:  # not the first fragment
        return None
    proto = frame[ip + 9]
    if proto == IPPROTO_ICMP and len(frame) > ip + ihl and frame[ip + ihl] in (3, 4, 5, 11, 12):
        return None  # never an error about an error
    quoted = bytes(frame[ip : ip + ihl + 8])
    icmp = _ICMP.pack(ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, max(mtu, MIN_PATH_MTU)) + quoted
    icmp = icmp[:2] + struct.pack("!H", _checksum(icmp)) + icmp[4:]
    src, dst = frame[ip + 12 : ip + 16], frame[ip + 16 : ip + 20]
    header = _IPV4.pack(0x45, 0xC0, 20 + len(icmp), 0, 0, 64, IPPROTO_ICMP, 0, dst, src)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    eth = frame[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] + frame[VNET_HDR_LEN : VNET_HDR_LEN + 6]
    vnet = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0)
    return vnet + eth + ETH_P_IP + header + icmp


def packet_too_big(frame: bytes, mtu: int) -> bytes | None:
    """The TAP write that tells `frame`'s IPv6 sender the path takes packets of at most `mtu`
    bytes (never less than IPv6's 1280); None when `frame` is not an IPv6 packet one can
    answer (too short, or itself an ICMPv6 error: RFC 4443 §2.4 (e))."""
    ip = VNET_HDR_LEN + ETH_HLEN
    if len(frame) < ip + 40 or frame[22:24] != ETH_P_IPV6 or frame[ip] >> 4 != 6:
        return None
    if frame[ip + 6] == IPPROTO_ICMPV6 and len(frame) > ip + 40 and frame[ip + 40] < 128:
        return None  # never an error about an error
    quoted = bytes(frame[ip : ip + IPV6_MIN_MTU - 48])
    body = struct.pack("!BBHI", ICMPV6_PACKET_TOO_BIG, 0, 0, max(mtu, IPV6_MIN_MTU)) + quoted
    src, dst = bytes(frame[ip + 24 : ip + 40]), bytes(frame[ip + 8 : ip + 24])
    body = body[:2] + struct.pack("!H", checksum6(src, dst, body)) + body[4:]
    header = _IPV6.pack(6 << 28, len(body), IPPROTO_ICMPV6, 64, src, dst)
    eth = frame[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] + frame[VNET_HDR_LEN : VNET_HDR_LEN + 6]
    vnet = VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0)
    return vnet + eth + ETH_P_IPV6 + header + body


def split_too_big(frames: list[bytes], mtu: int, replies: list[bytes]) -> tuple[list[bytes], int]:
    """The frames whose IP packets fit `mtu`, and how many did not; each frame that did not
    gets its "fragmentation needed" (IPv4) or "packet too big" (IPv6) appended to `replies`
    (when one can be sent)."""
    fit: list[bytes] = []
    refused = 0
    for frame in frames:
        if ip_packet_len(frame) <= mtu:
            fit.append(frame)
            continue
        refused += 1
        if frame[22:24] == ETH_P_IPV6:
            reply = packet_too_big(frame, mtu)
        else:
            reply = frag_needed(frame, mtu)
        if reply is not None:
            replies.append(reply)
    return fit, refused
