"""IPv6 on the overlay's one Ethernet segment: neighbour discovery answered for peers, the
kernel's multicast chatter sorted, and the addresses a peer may send from.

The switch (datapath/switch.py) treats IPv6 as it treats IPv4 (docs/architecture.md, "What a
node does"): every peer's MAC is known from its key, so a neighbour solicitation (RFC 4861
§7.2.3) for a peer's address is answered locally, as ARP is, and never crosses the overlay.
What else a node's kernel multicasts on its TAP from the first second is sorted by
`classify_multicast`:

    router solicitation, router advertisement, redirect   no router on the overlay: kept local
    MLD reports and queries (RFC 2710, RFC 3810)          the switch floods all multicast to
                                                          every peer anyway: kept local
    neighbour solicitation                                answered for a peer's address, kept
                                                          local otherwise (DAD, a non-member)
    unsolicited neighbour advertisement                   peers know our MAC: kept local
    anything else (mDNS, an application's group, a        flooded, as IPv4 multicast is
    ping to ff02::1)

A peer may send only from its certified overlay address and its link-local address, which is
derived from its MAC (EUI-64, RFC 4291 §2.5.6, as the kernel derives ours) and so from its
key: `link_local_for_mac`. What a peer's neighbour discovery claims is checked as ARP is
(`nd_spoofed`): an advertisement only for the peer's own addresses, any link-layer address
option only the peer's MAC; a router advertisement or redirect from a peer is refused.

    IPv6 header (RFC 8200):  ver/tc/flow (4) | payload length (2) | next header | hop limit
                             source (16) | destination (16)
    ICMPv6 (RFC 4443):       type | code | checksum (2) | body
    NS / NA body (RFC 4861): reserved or R|S|O flags (4) | target (16) | options
    option:                  type | length in 8-byte units | data (1: source, 2: target
                             link-layer address, 6 bytes on Ethernet)

Pure: frames in (virtio_net_hdr + Ethernet, as the TAP hands them over), frames out. Nothing
here raises for what a frame holds.
"""

from __future__ import annotations

import enum
import struct

VNET = 10  # virtio_net_hdr in front of every frame (proto/offload.py)
ETH_HLEN = 14
IP6 = VNET + ETH_HLEN  # where the IPv6 header starts in a TAP frame
IPV6_HLEN = 40
ETH_P_IPV6 = b"\x86\xdd"
IPPROTO_HOPOPTS = 0
IPPROTO_ICMPV6 = 58
ICMP6 = IP6 + IPV6_HLEN  # where ICMPv6 starts when no extension header comes first

ICMPV6_MLD_QUERY = 130
ICMPV6_MLD_REPORT = 131
ICMPV6_MLD_DONE = 132
ICMPV6_RS = 133
ICMPV6_RA = 134
ICMPV6_NS = 135
ICMPV6_NA = 136
ICMPV6_REDIRECT = 137
ICMPV6_MLD2_REPORT = 143
OPT_SOURCE_LL = 1
OPT_TARGET_LL = 2
NA_SOLICITED_OVERRIDE = 0x60000000  # RFC 4861 §4.4: S and O set, R clear (not a router)
HOP_LIMIT_ND = 255  # RFC 4861 §7.1.2: ND messages are sent, and checked, with 255

UNSPECIFIED = bytes(16)
LINK_LOCAL_PREFIX = bytes.fromhex("fe80000000000000")

_MLD = frozenset({ICMPV6_MLD_QUERY, ICMPV6_MLD_REPORT, ICMPV6_MLD_DONE, ICMPV6_MLD2_REPORT})
_ROUTER = frozenset({ICMPV6_RS, ICMPV6_RA, ICMPV6_REDIRECT})
_IPV6 = struct.Struct("!IHBB16s16s")
_ZERO_VNET = bytes(VNET)


class Multicast(enum.Enum):
    """What the switch does with an IPv6 multicast frame from our TAP (the counter's name)."""

    ROUTER = "ipv6_router_local"  # RS / RA / redirect: the overlay has no router
    MLD = "ipv6_mld_local"  # group membership reports: the switch floods every group
    SOLICIT = "ipv6_nd_solicit"  # an NS: answered when its target is a peer's
    ADVERT = "ipv6_nd_advert_local"  # an unsolicited NA: peers know our MAC
    FLOOD = "ipv6_multicast_flooded"  # anything else: to every peer
    MALFORMED = "ipv6_malformed"  # shorter than its headers (our own kernel's; a drop)


def link_local_for_mac(mac: bytes) -> bytes:
    """fe80::/64 with the modified EUI-64 interface identifier of `mac` (RFC 4291 §2.5.6,
    appendix A): what a Linux TAP with this MAC takes as its link-local address."""
    return LINK_LOCAL_PREFIX + bytes((mac[0] ^ 0x02, mac[1], mac[2], 0xFF, 0xFE)) + mac[3:6]


def _icmp_type(frame: bytes) -> int | None:
    """The ICMPv6 type of `frame`, after at most one hop-by-hop header (MLD carries one,
    RFC 2710 §3); None when it is not ICMPv6 or too short to tell."""
    n = len(frame)
    if n < ICMP6 or frame[IP6] >> 4 != 6:
        return None
    nxt = frame[IP6 + 6]
    at = ICMP6
    if nxt == IPPROTO_HOPOPTS:
        if n < at + 8:
            return None
        nxt = frame[at]
        at += (frame[at + 1] + 1) * 8
    if nxt != IPPROTO_ICMPV6 or n < at + 4:
        return None
    return frame[at]


def classify_multicast(frame: bytes) -> Multicast:
    """Sort an IPv6 frame to a multicast MAC (33:33:...) from our own TAP."""
    if len(frame) < ICMP6 or frame[IP6] >> 4 != 6:
        return Multicast.MALFORMED
    kind = _icmp_type(frame)
    if kind is None:
        return Multicast.FLOOD
    if kind == ICMPV6_NS:
        return Multicast.SOLICIT
    if kind in _MLD:
        return Multicast.MLD
    if kind in _ROUTER:
        return Multicast.ROUTER
    if kind == ICMPV6_NA:
        return Multicast.ADVERT
    return Multicast.FLOOD


def is_neighbour_discovery(frame: bytes) -> bool:
    """Is `frame` an RFC 4861 message (router or neighbour solicitation or advertisement,
    redirect)? What IPv6 needs on a link, as IPv4 needs ARP (the firewall passes it)."""
    return (
        len(frame) > ICMP6
        and frame[IP6 + 6] == IPPROTO_ICMPV6
        and ICMPV6_RS <= frame[ICMP6] <= ICMPV6_REDIRECT
    )


def solicited_target(frame: bytes) -> bytes | None:
    """The target address of a neighbour solicitation that is not duplicate address
    detection (its source is not ::), or None."""
    if len(frame) < ICMP6 + 24 or frame[IP6 + 6] != IPPROTO_ICMPV6 or frame[ICMP6] != ICMPV6_NS:
        return None
    if frame[IP6 + 8 : IP6 + 24] == UNSPECIFIED:
        return None  # DAD: overlay addresses are unique by certificate
    return bytes(frame[ICMP6 + 8 : ICMP6 + 24])


def checksum6(src: bytes, dst: bytes, payload: bytes) -> int:
    """The ICMPv6 checksum (RFC 4443 §2.3) over the RFC 8200 §8.1 pseudo-header."""
    data = src + dst + struct.pack("!IxxxB", len(payload), IPPROTO_ICMPV6) + payload
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def advertisement(frame: bytes, target: bytes, mac: bytes) -> bytes:
    """The neighbour advertisement that answers the solicitation `frame` for `target`, which
    `mac` owns: from that MAC and address, to the solicitor (RFC 4861 §7.2.4)."""
    solicitor_mac = frame[VNET + 6 : VNET + 12]
    solicitor = frame[IP6 + 8 : IP6 + 24]
    body = struct.pack("!BBHI", ICMPV6_NA, 0, 0, NA_SOLICITED_OVERRIDE) + target
    body += bytes((OPT_TARGET_LL, 1)) + mac
    csum = checksum6(target, solicitor, body)
    body = body[:2] + struct.pack("!H", csum) + body[4:]
    ip = _IPV6.pack(6 << 28, len(body), IPPROTO_ICMPV6, HOP_LIMIT_ND, target, solicitor)
    return _ZERO_VNET + solicitor_mac + mac + ETH_P_IPV6 + ip + body


def nd_claims_ok(frame: bytes, mac: bytes, addresses: tuple[bytes, ...]) -> bool:
    """May a peer with this MAC and these addresses send this IPv6 frame, as far as
    neighbour discovery goes? Router messages never; an advertisement only for its own
    addresses; any link-layer address option only its own MAC. Frames that are not ND
    (or too short to be ND) pass: the source check has already been made."""
    if len(frame) < ICMP6 + 4 or frame[IP6 + 6] != IPPROTO_ICMPV6:
        return True
    kind = frame[ICMP6]
    if kind in _ROUTER:
        return False
    if kind != ICMPV6_NS and kind != ICMPV6_NA:
        return True
    if len(frame) < ICMP6 + 24:
        return False
    if kind == ICMPV6_NA and bytes(frame[ICMP6 + 8 : ICMP6 + 24]) not in addresses:
        return False
    at = ICMP6 + 24
    n = len(frame)
    while at + 2 <= n:
        units = frame[at + 1]
        if units == 0:
            return False  # RFC 4861 §4.6: a zero length is invalid
        if frame[at] in (OPT_SOURCE_LL, OPT_TARGET_LL) and frame[at + 2 : at + 8] != mac:
            return False
        at += units * 8
    return True
