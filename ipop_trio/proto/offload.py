"""TAP offload core: TAP reads with a virtio_net_hdr become inner payloads, and back.

The TAP is opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and TUNSETOFFLOAD(TUN_F_CSUM |
TUN_F_TSO4 | TUN_F_TSO6), so the kernel hands us frames whose checksum is left to us and TCP
super-frames of up to ~64 KiB (docs/architecture.md, "The data path"). Outbound,
`encode_outbound` cuts one TAP read into inner payloads that each fit one UDP datagram and are
sealed on their own, so one lost datagram costs at most one inner TCP segment. Inbound, one
`Reassembler` per peer glues the pieces of a super-frame back into the byte-identical TAP write
(the receiving kernel segments and checksums it), or, when a piece is missing, rebuilds the
pieces that did arrive as individual valid segments (the split half of wireguard-go's
`tun/offload_linux.go` gsoSplit, done lazily).

This module never does I/O and never computes an L4 checksum over payload in Python: it only
forwards NEEDS_CSUM so the kernel finishes it (at most an IPv4 header checksum and a TCP
pseudo-header sum, which are header-sized). Both our own kernel's reads and a peer's payloads are
untrusted input: every function here raises only `OffloadError` (a `BadPacket`).

TAP read and write: legacy `struct virtio_net_hdr` (virtio v1.2 §5.1.6; host endian for a legacy
TAP, little endian here) then one Ethernet frame. csum_start counts from the frame start.

     0       1       2               4               6               8              10
    +-------+-------+---------------+---------------+---------------+---------------+-----...
    | flags |  gso  |    hdr_len    |   gso_size    |  csum_start   |  csum_offset  | frame
    |       |  type |   (u16 le)    |   (u16 le)    |   (u16 le)    |   (u16 le)    |
    +-------+-------+---------------+---------------+---------------+---------------+-----...
    flags: NEEDS_CSUM 1 (the kernel left the L4 checksum to finish: csum_start+csum_offset holds
           the pseudo-header sum), DATA_VALID 2.   gso_type: NONE 0, TCPV4 1, TCPV6 4, ECN 0x80.

TCP super-frame (gso_type TCPV4/TCPV6), as the kernel hands it over:

    +---------+------------------+------------+--------+--------+-----+-----------+
    | Eth 14  | IPv4 (IHL*4) or  | TCP        | chunk0 | chunk1 | ... | chunk n-1 |
    |         | IPv6 40, no ext  | (doff*4)   |gso_size|gso_size|     | <=gso_size|
    +---------+------------------+------------+--------+--------+-----+-----------+
    ^frame    ^14                ^csum_start  ^hdr_len = csum_start + doff*4 (recomputed:
                                               the kernel's hdr_len is not trusted)

Inner payloads (proto/wire.py draws the trailers; the kind byte is last):

    frame | 0x00                                            gso NONE, checksum complete
    frame | csum_start csum_offset (CSUM_META) | 0x01       gso NONE, NEEDS_CSUM forwarded
    chunk_i | frame[:hdr_len] | PIECE_META | 0x02           piece i of a TCP super-frame

    PIECE_META "<IHHHHBHH" (17 bytes): frame_id, index, count, hdr_len, gso_size, gso_type,
    csum_start, csum_offset. Every piece carries the whole header block, so any piece can be
    rebuilt into a valid segment on its own.

With the default budget of 1440 bytes a piece holds gso_size + hdr_len + 18 bytes, i.e. the
TAP MTU + 14 + 18: a TAP MTU of at most 1408 always fits.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import BadPacket
from .wire import CSUM_META, INNER_CSUM, INNER_FRAME, INNER_PIECE, PIECE_META

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h; virtio v1.2 §5.1.6):
# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size  # 10

# virtio_net_hdr flags (VIRTIO_NET_HDR_F_*)
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
# virtio_net_hdr gso_type (VIRTIO_NET_HDR_GSO_*)
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
GSO_BY_FRAGS = 0xFFFF  # a gso_size the kernel reserves for itself (include/linux/netdevice.h)

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
IPPROTO_UDP = 17
UDP_CSUM_OFFSET = 6  # offsetof(struct udphdr, check)
IPV6_HLEN = 40
TCP_CSUM_OFFSET = 16  # offsetof(struct tcphdr, check)
TCP_FIN = 0x01
TCP_PSH = 0x08
MAX_IP_LEN = 0xFFFF  # an IPv4 total length / IPv6 payload length is a u16

# Pieces of one super-frame, at most (wireguard-go's gsoSplit bound of 128 segments).
MAX_PIECES = 128
# Tuning knob: the inner payload budget the caller can seal into one datagram.
DEFAULT_MAX_PAYLOAD = 1440

CSUM_TRAILER = CSUM_META.size + 1  # 5
PIECE_TRAILER = PIECE_META.size + 1  # 18

_ZERO_VNET = bytes(VNET_HDR_LEN)
_KIND_FRAME = bytes((INNER_FRAME,))
_KIND_CSUM = bytes((INNER_CSUM,))
_KIND_PIECE = bytes((INNER_PIECE,))
_U16LE = tuple(i.to_bytes(2, "little") for i in range(MAX_PIECES))
# PIECE_META without its leading frame_id and index (hot path: pack once per super-frame).
_PIECE_TAIL = struct.Struct("<HHHBHH")
_FID_INDEX = struct.Struct("<IH")  # ... and that leading part
_TAIL_LEN = _PIECE_TAIL.size + 1  # the part after the index, with the kind byte
_TCP_GSO = (GSO_TCPV4, GSO_TCPV6)


class OffloadError(BadPacket):
    """A TAP read or an inner payload this module refuses (counted drop, never a crash)."""


@dataclass(frozen=True, slots=True)
class VirtioHeader:
    """One legacy virtio_net_hdr (10 bytes, little endian)."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @classmethod
    def parse(cls, buf: bytes | memoryview) -> VirtioHeader:
        """Read the header at the start of `buf` (a TAP read or write)."""
        if len(buf) < VNET_HDR_LEN:
            raise OffloadError("shorter than a virtio_net_hdr")
        return cls(*VNET_HDR.unpack_from(buf))

    def pack(self) -> bytes:
        try:
            return VNET_HDR.pack(
                self.flags,
                self.gso_type,
                self.hdr_len,
                self.gso_size,
                self.csum_start,
                self.csum_offset,
            )
        except struct.error as exc:
            raise OffloadError(f"virtio_net_hdr field out of range: {exc}") from None


def _l4_csum_fields(p: bytes | memoryview, frame_len: int) -> tuple[int, int]:
    """(csum_start, csum_offset) of the frame at the start of `p` (`frame_len` bytes), from
    its own headers: the TCP or UDP header of an unfragmented IPv4 packet or of an IPv6
    packet without extension headers. A peer's NEEDS_CSUM frame must carry exactly these:
    chosen freely, the kernel's checksum write could land anywhere past the Ethernet header,
    the IPv4 source the switch has just checked included (wireguard-go derives them too)."""
    if frame_len < ETH_HLEN + 20:
        raise OffloadError("NEEDS_CSUM frame shorter than an IP header")
    ethertype = (p[12] << 8) | p[13]
    version = p[ETH_HLEN] >> 4
    if ethertype == ETH_P_IP and version == 4:
        ihl = p[ETH_HLEN] & 0x0F
        if ihl < 5:
            raise OffloadError("IPv4 IHL < 5")
        if p[ETH_HLEN + 6] & 0x3F or p[ETH_HLEN + 7]:  # MF, fragment offset
            raise OffloadError("NEEDS_CSUM frame that is an IPv4 fragment")
        proto, l4 = p[ETH_HLEN + 9], ETH_HLEN + ihl * 4
    elif ethertype == ETH_P_IPV6 and version == 6:
        proto, l4 = p[ETH_HLEN + 6], ETH_HLEN + IPV6_HLEN
    else:
        raise OffloadError("NEEDS_CSUM frame that is not IPv4 or IPv6")
    if proto == IPPROTO_TCP:
        offset, l4_len = TCP_CSUM_OFFSET, 20
    elif proto == IPPROTO_UDP:
        offset, l4_len = UDP_CSUM_OFFSET, 8
    else:
        raise OffloadError("NEEDS_CSUM frame that is not TCP or UDP directly over IP")
    if l4 + l4_len > frame_len:
        raise OffloadError("NEEDS_CSUM frame's TCP/UDP header beyond the frame")
    return l4, offset


def _tcp_hdr_len(frame: memoryview, gso_type: int, csum_start: int, csum_offset: int) -> int:
    """Validate the Ethernet/IP/TCP headers at the start of `frame` for a TCP GSO frame and
    return hdr_len = csum_start + TCP data offset * 4 (handleVirtioRead in wireguard-go's
    tun/offload_linux.go recomputes it too: the kernel's hdr_len can cover payload)."""
    n = len(frame)
    if csum_offset != TCP_CSUM_OFFSET:
        raise OffloadError("TCP GSO frame with csum_offset != 16")
    ethertype = (frame[12] << 8) | frame[13] if n >= ETH_HLEN else -1
    if gso_type == GSO_TCPV4:
        if ethertype != ETH_P_IP or n < ETH_HLEN + 20 or frame[ETH_HLEN] >> 4 != 4:
            raise OffloadError("TCPV4 GSO frame without an IPv4 header")
        ihl = frame[ETH_HLEN] & 0x0F
        if ihl < 5:
            raise OffloadError("IPv4 IHL < 5")
        if frame[ETH_HLEN + 9] != IPPROTO_TCP:
            raise OffloadError("TCPV4 GSO frame that is not TCP")
        l4 = ETH_HLEN + ihl * 4
    elif gso_type == GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or n < ETH_HLEN + IPV6_HLEN or frame[ETH_HLEN] >> 4 != 6:
            raise OffloadError("TCPV6 GSO frame without an IPv6 header")
        if frame[ETH_HLEN + 6] != IPPROTO_TCP:
            raise OffloadError("TCPV6 GSO frame with extension headers or not TCP")
        l4 = ETH_HLEN + IPV6_HLEN
    else:
        raise OffloadError(f"unsupported gso_type {gso_type:#x}")
    if csum_start != l4:
        raise OffloadError("csum_start does not point at the TCP header")
    if l4 + 20 > n:
        raise OffloadError("TCP header beyond the frame")
    doff = frame[l4 + 12] >> 4
    if doff < 5:
        raise OffloadError("TCP data offset < 5")
    hdr_len = l4 + doff * 4
    if hdr_len > n:
        raise OffloadError("TCP header beyond the frame")
    return hdr_len


def encode_outbound(
    read: bytes | memoryview, frame_id: int, max_payload: int = DEFAULT_MAX_PAYLOAD
) -> list[bytes]:
    """Turn one TAP read (virtio_net_hdr + Ethernet frame) into inner payloads, each at most
    `max_payload` bytes and ending with its kind byte (see the module docstring).

    `frame_id` (taken modulo 2**32) tags the pieces of a TCP super-frame; the caller gives
    each read of one peer the next id. Raises OffloadError for what we will not carry: UDP
    GSO, TSO with ECN, headers that are not Ethernet/IPv4-or-IPv6/TCP where the virtio
    header says so, or pieces that would not fit `max_payload` / MAX_PIECES.
    """
    n = len(read)
    if n < VNET_HDR_LEN + ETH_HLEN:
        raise OffloadError("TAP read shorter than virtio_net_hdr + Ethernet header")
    flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(read)
    mv = memoryview(read)
    frame_len = n - VNET_HDR_LEN
    if gso_type == GSO_NONE:
        if flags & F_NEEDS_CSUM:
            # What the peer's Reassembler would refuse goes no further than here.
            if (csum_start, csum_offset) != _l4_csum_fields(mv[VNET_HDR_LEN:], frame_len):
                raise OffloadError("NEEDS_CSUM fields do not match the frame's headers")
            if frame_len + CSUM_TRAILER > max_payload:
                raise OffloadError("frame larger than the inner payload budget")
            meta = CSUM_META.pack(csum_start, csum_offset)
            return [b"".join((mv[VNET_HDR_LEN:], meta, _KIND_CSUM))]
        if frame_len + 1 > max_payload:
            raise OffloadError("frame larger than the inner payload budget")
        return [b"".join((mv[VNET_HDR_LEN:], _KIND_FRAME))]
    if gso_type not in _TCP_GSO:
        if gso_type & GSO_ECN:
            raise OffloadError("TSO with ECN (TUN_F_TSO_ECN was not negotiated)")
        raise OffloadError(f"unsupported gso_type {gso_type:#x}")
    if not flags & F_NEEDS_CSUM:
        raise OffloadError("TCP GSO frame without NEEDS_CSUM")
    frame = mv[VNET_HDR_LEN:]
    hdr_len = _tcp_hdr_len(frame, gso_type, csum_start, csum_offset)
    if frame_len - ETH_HLEN > MAX_IP_LEN:
        raise OffloadError("super-frame longer than an IP packet")
    data_len = frame_len - hdr_len
    if data_len <= 0:
        raise OffloadError("TCP GSO frame without payload")
    if gso_size == 0 or gso_size == GSO_BY_FRAGS:
        raise OffloadError(f"bad gso_size {gso_size}")
    count = -(-data_len // gso_size)
    if count > MAX_PIECES:
        raise OffloadError(f"super-frame of {count} pieces (max {MAX_PIECES})")
    if min(gso_size, data_len) + hdr_len + PIECE_TRAILER > max_payload:
        raise OffloadError("a piece would exceed the inner payload budget")
    # Each piece: chunk | headers | frame_id | index | tail (count .. csum_offset) | kind.
    head = b"".join((frame[:hdr_len], (frame_id & 0xFFFFFFFF).to_bytes(4, "little")))
    tail = _PIECE_TAIL.pack(count, hdr_len, gso_size, gso_type, csum_start, csum_offset)
    tail += _KIND_PIECE
    join = b"".join
    u16 = _U16LE
    start = VNET_HDR_LEN + hdr_len
    return [
        join((mv[s : s + gso_size], head, u16[i], tail))
        for i, s in enumerate(range(start, n, gso_size))
    ]


_BE16 = struct.Struct("!H")
_BE16X2 = struct.Struct("!HH")
_BE32 = struct.Struct("!I")


def _runs_of(pieces: list[tuple[int, bytes]]) -> list[tuple[int, list[bytes]]]:
    """Group (index, chunk) pieces, in index order, into runs of consecutive indices."""
    runs: list[tuple[int, list[bytes]]] = []
    for index, chunk in pieces:
        if runs and runs[-1][0] + len(runs[-1][1]) == index:
            runs[-1][1].append(chunk)
        else:
            runs.append((index, [chunk]))
    return runs


def _rebuild_segments(
    headers: bytes,
    key: tuple[int, ...],
    pieces: list[tuple[int, bytes]],
    out: list[bytes],
) -> None:
    """Append the pieces (index, chunk) of one TCP super-frame that did arrive to `out` as
    valid TAP writes: each run of consecutive pieces becomes one smaller super-frame (the
    kernel segments it, as it would the original), a lone piece a stand-alone segment.
    So one lost datagram costs two TAP writes, not one per surviving piece.

    Per run starting at piece s: IPv4 total length, id + s and header checksum, or IPv6
    payload length; TCP seq + s * gso_size, FIN and PSH only on the run holding the last
    piece (wireguard-go's gsoSplit does the same per segment); the TCP checksum is left to
    the kernel: NEEDS_CSUM with the pseudo-header sum of the run's length in the field.
    `headers` and `key` were validated by `_tcp_hdr_len` (csum_offset is 16), so every
    offset below is in range. Checksums use 2**16 ≡ 1 (mod 0xFFFF): a big-endian integer's
    residue mod 0xFFFF is the one's-complement sum of its 16-bit words (RFC 1071), and a
    non-zero sum folds to 1..0xFFFF (`or 0xFFFF`); every sum here has a non-zero word.
    """
    count, hdr_len, gso_size, gso_type, cs, csum_offset = key
    vnet_one = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs, csum_offset)
    vnet_run = VNET_HDR.pack(F_NEEDS_CSUM, gso_type, hdr_len, gso_size, cs, csum_offset)
    # TCP: ports | seq | ack, data offset | flags | window | checksum | urgent, options
    tcp_ports = headers[cs : cs + 4]
    seq0 = int.from_bytes(headers[cs + 4 : cs + 8], "big")
    tcp_ack = headers[cs + 8 : cs + 13]
    last_flags = headers[cs + 13 : cs + 14]
    mid_flags = bytes((last_flags[0] & ~(TCP_FIN | TCP_PSH) & 0xFF,))
    tcp_window = headers[cs + 14 : cs + 16]
    tcp_rest = headers[cs + 18 : hdr_len]
    tcp_hdr = hdr_len - cs
    v4 = gso_type == GSO_TCPV4
    if v4:
        # Ethernet, version/IHL/TOS | total length, id | flags/frag, TTL, proto | checksum
        # | addresses, options (RFC 791 §3.1)
        ip_head = headers[:16]
        id0 = int.from_bytes(headers[18:20], "big")
        ip_mid = headers[20:24]
        ip_tail = headers[26:cs]
        ip_sum0 = int.from_bytes(headers[14:16], "big") + int.from_bytes(ip_mid + ip_tail, "big")
        pseudo0 = int.from_bytes(headers[26:34], "big") + IPPROTO_TCP
    else:
        # Ethernet, version/class/flow | payload length | next header ... addresses (RFC 8200)
        ip_head = headers[:18]
        ip_tail = headers[20:cs]
        pseudo0 = int.from_bytes(headers[22:54], "big") + IPPROTO_TCP  # RFC 8200 §8.1
    for start, chunks in _runs_of(pieces):
        payload = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        last = start + len(chunks) - 1
        tcp_len = tcp_hdr + len(payload)
        if v4:
            total = cs - ETH_HLEN + tcp_len
            ip_id = (id0 + start) & 0xFFFF
            ip_sum = (ip_sum0 + total + ip_id) % 0xFFFF or 0xFFFF
            ip: tuple[bytes, ...] = (
                ip_head,
                _BE16X2.pack(total, ip_id),
                ip_mid,
                _BE16.pack(0xFFFF - ip_sum),
                ip_tail,
            )
        else:
            ip = (ip_head, _BE16.pack(tcp_len), ip_tail)
        out.append(
            b"".join(
                (
                    vnet_one if len(chunks) == 1 else vnet_run,
                    *ip,
                    tcp_ports,
                    _BE32.pack((seq0 + start * gso_size) & 0xFFFFFFFF),
                    tcp_ack,
                    last_flags if last == count - 1 else mid_flags,
                    tcp_window,
                    _BE16.pack((pseudo0 + tcp_len) % 0xFFFF or 0xFFFF),
                    tcp_rest,
                    payload,
                )
            )
        )


class Reassembler:
    """Inner payloads from one peer → TAP writes (virtio_net_hdr + Ethernet frame).

    At most one super-frame is pending, so at most MAX_PIECES pieces are held. A piece of a
    newer frame_id flushes the pending frame first; a piece of a frame already completed or
    flushed (up to 2**31 ids behind, modulo 2**32) comes out on its own as a rebuilt segment.
    The driver calls `flush` when the peer goes quiet while `pending` is non-zero, and
    `reset` when the peer's session changes.

    A payload that is not `bytes` is copied first, so no caller buffer is ever kept.
    """

    __slots__ = (
        "_chunks",
        "_fid",
        "_have",
        "_headers",
        "_key",
        "_last_max",
        "_newest",
        "_tail",
        "frames_partial",
        "frames_whole",
        "pieces_late",
        "segments_rebuilt",
    )

    def __init__(self) -> None:
        self.frames_whole = 0  # super-frames written back whole
        self.frames_partial = 0  # super-frames flushed incomplete, as segments
        self.segments_rebuilt = 0  # segments written from single pieces (flushed or late)
        self.pieces_late = 0  # pieces of a frame already completed or flushed
        self._newest: int | None = None  # newest frame_id seen
        # The pending frame (when _have > 0): its id, its PIECE_META fields after the index
        # (count, hdr_len, gso_size, gso_type, csum_start, csum_offset), header block, the
        # largest last chunk that keeps it one IP packet, and the chunks by index.
        self._fid = -1
        self._key: tuple[int, ...] = ()
        self._headers = b""
        self._last_max = 0
        self._tail = b""  # PIECE_META after the index, and the kind byte: same in every piece
        self._chunks: list[bytes | None] = []
        self._have = 0

    @property
    def pending(self) -> int:
        """Pieces held for the pending super-frame (0: nothing to flush)."""
        return self._have

    def push_untrusted(self, payload: bytes | memoryview, out: list[bytes]) -> None:
        """Take one opened inner payload (kind byte last) and append to `out` the TAP writes
        it completes. An empty payload is a keepalive. Raises only OffloadError, leaving the
        pending frame as it was (the refused piece is dropped)."""
        p = payload if type(payload) is bytes else bytes(payload)
        n = len(p)
        if n == 0:
            return
        kind = p[-1]
        if kind == INNER_PIECE:
            if n < PIECE_TRAILER:
                raise OffloadError("piece shorter than its trailer")
            fid, index = _FID_INDEX.unpack_from(p, n - PIECE_TRAILER)
            if self._have and fid == self._fid:
                # Hot path: a piece of the pending frame, whose first piece was validated.
                # Its meta after the index (and its kind) must be the frame's, byte for byte.
                if p[n - _TAIL_LEN :] != self._tail:
                    raise OffloadError("piece disagrees with the other pieces of its frame")
                count, hdr_len, gso_size, _, _, _ = self._key
                chunk_len = n - PIECE_TRAILER - hdr_len
                if index >= count:
                    raise OffloadError("piece index out of range")
                if index == count - 1:
                    if not 0 < chunk_len <= self._last_max:
                        raise OffloadError("last piece size does not match its frame")
                elif chunk_len != gso_size:
                    raise OffloadError("piece size does not match gso_size")
                if p[chunk_len : n - PIECE_TRAILER] != self._headers:
                    raise OffloadError("piece headers differ from its frame's")
                chunks = self._chunks
                if chunks[index] is not None:
                    raise OffloadError("duplicate piece")
                chunks[index] = p[:chunk_len]
                self._have += 1
                if self._have == count:
                    self._complete(out)
                return
            meta = PIECE_META.unpack_from(p, n - PIECE_TRAILER)[2:]
            self._other_piece(p, fid, index, meta, out)
        elif kind == INNER_FRAME:
            if n - 1 < ETH_HLEN:
                raise OffloadError("inner frame shorter than an Ethernet header")
            out.append(_ZERO_VNET + p[:-1])
        elif kind == INNER_CSUM:
            frame_len = n - CSUM_TRAILER
            if frame_len < ETH_HLEN:
                raise OffloadError("inner frame shorter than an Ethernet header")
            csum_start, csum_offset = CSUM_META.unpack_from(p, frame_len)
            if (csum_start, csum_offset) != _l4_csum_fields(p, frame_len):
                raise OffloadError("NEEDS_CSUM fields do not match the frame's headers")
            vnet = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, csum_start, csum_offset)
            out.append(vnet + p[:frame_len])
        else:
            raise OffloadError(f"unknown inner payload kind {kind}")

    def _other_piece(
        self, p: bytes, fid: int, index: int, meta: tuple[int, ...], out: list[bytes]
    ) -> None:
        """A piece that starts a new frame, or a late one; validated fully on its own."""
        count, hdr_len, gso_size, gso_type, csum_start, csum_offset = meta
        n = len(p)
        chunk_len = n - PIECE_TRAILER - hdr_len
        if chunk_len <= 0:
            raise OffloadError("piece without payload")
        if not 0 < count <= MAX_PIECES or index >= count:
            raise OffloadError("piece index/count out of range")
        if gso_size == 0 or gso_size == GSO_BY_FRAGS:
            raise OffloadError(f"bad gso_size {gso_size}")
        # The last chunk must keep the whole frame one IP packet (and be at most gso_size).
        last_max = min(gso_size, MAX_IP_LEN - (hdr_len - ETH_HLEN + (count - 1) * gso_size))
        if index == count - 1:
            if chunk_len > last_max:
                raise OffloadError("last piece size does not match its frame")
        elif chunk_len != gso_size or last_max <= 0:
            raise OffloadError("piece size does not match gso_size")
        if gso_type not in _TCP_GSO:
            raise OffloadError(f"piece with gso_type {gso_type:#x}")
        headers = p[chunk_len : chunk_len + hdr_len]
        if _tcp_hdr_len(memoryview(headers), gso_type, csum_start, csum_offset) != hdr_len:
            raise OffloadError("piece hdr_len does not match its TCP header")
        newest = self._newest
        if newest is not None:
            ahead = (fid - newest) & 0xFFFFFFFF
            if ahead == 0 or ahead >= 1 << 31:
                # A frame already completed or flushed: this piece goes out on its own.
                _rebuild_segments(headers, meta, [(index, p[:chunk_len])], out)
                self.pieces_late += 1
                self.segments_rebuilt += 1
                return
        self.flush(out)
        self._newest = self._fid = fid
        self._key = (count, hdr_len, gso_size, gso_type, csum_start, csum_offset)
        self._tail = p[n - _TAIL_LEN :]
        self._headers = headers
        self._last_max = last_max
        chunks = self._chunks = [None] * count
        chunks[index] = p[:chunk_len]
        self._have = 1
        if count == 1:
            self._complete(out)

    def _complete(self, out: list[bytes]) -> None:
        _, hdr_len, gso_size, gso_type, csum_start, csum_offset = self._key
        vnet = VNET_HDR.pack(F_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start, csum_offset)
        # Every chunk is present here (no None left).
        out.append(b"".join([vnet, self._headers, *self._chunks]))  # type: ignore[list-item]
        self.frames_whole += 1
        self._chunks = []
        self._have = 0

    def reset(self, out: list[bytes]) -> None:
        """Flush, then forget the frame ids seen: call it when the peer's session changes (a
        restarted peer counts its frame ids from scratch, and its new frames must not look
        late)."""
        self.flush(out)
        self._newest = None

    def flush(self, out: list[bytes]) -> None:
        """Write the pending incomplete super-frame, if any, as the individual valid segments
        of the pieces that arrived; later pieces of that frame come out as late segments."""
        if not self._have:
            return
        pieces = [(i, chunk) for i, chunk in enumerate(self._chunks) if chunk is not None]
        _rebuild_segments(self._headers, self._key, pieces, out)
        self.segments_rebuilt += len(pieces)
        self.frames_partial += 1
        self._chunks = []
        self._have = 0
