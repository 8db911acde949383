"""Datagram formats of the one UDP socket, and the first-byte demultiplexer.

Everything a node sends on its underlay socket is one of these (RFC 7983 style ranges,
docs/architecture.md, "Wire format"). This module only names bytes; it never does I/O.

    first byte   what
    0..3         STUN (ICE checks, STUN/TURN servers)
    64..79       TURN ChannelData
    0xA1         handshake initiation            (proto/handshake.py)
    0xA2         handshake response              (proto/handshake.py)
    0xA3         cookie reply (handshake under load)  (proto/cookie.py)
    0xA4         data, secure link               (proto/session.py)
    0xA5         data, plain link                (proto/session.py)
    other        counted drop

Data datagram (secure and plain links share the header; it is the AEAD's associated data):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  type 0xA4/A5 |                 pad (zero)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 receiver_index (u32, little endian)           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 counter (u64, little endian)                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  ciphertext (secure) or plaintext (plain) ...                 |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  tag (16 bytes, secure links only)                            |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Inner payload (what a data datagram carries once opened) ends in a one-byte `kind`, so the
receiver parses it from the end and the body needs no copy:

    empty                       keepalive
    frame | 0x00                one whole Ethernet frame
    frame | csum_start csum_offset (u16 le each) | 0x01
                                a frame whose L4 checksum the receiving kernel finishes
                                (virtio NEEDS_CSUM forwarded, never computed in Python)
    chunk | headers | piece meta (PIECE.size) | 0x02
                                one segment-sized piece of a TSO super-frame (offload.py):
                                every piece carries the super-frame's headers so it can be
                                rebuilt into a valid segment on its own when others are lost
"""

from __future__ import annotations

import enum
import struct


class Kind(enum.IntEnum):
    """First byte of an underlay datagram, for the kinds ipop-trio owns."""

    HANDSHAKE_INIT = 0xA1
    HANDSHAKE_RESP = 0xA2
    COOKIE_REPLY = 0xA3
    DATA_SECURE = 0xA4
    DATA_PLAIN = 0xA5


class Demux(enum.Enum):
    """Where the receiver routes a datagram by its first byte (RFC 7983 §7)."""

    STUN = "stun"
    CHANNEL_DATA = "channel_data"
    HANDSHAKE = "handshake"
    DATA = "data"
    DROP = "drop"


# type(1) pad(3) receiver_index(4) counter(8)
DATA_HEADER = struct.Struct("<B3xIQ")
DATA_HEADER_SIZE = DATA_HEADER.size  # 16
TAG_SIZE = 16
# Secure datagram overhead on top of the inner payload.
DATA_OVERHEAD = DATA_HEADER_SIZE + TAG_SIZE

# Inner payload trailers.
INNER_FRAME = 0
INNER_CSUM = 1
INNER_PIECE = 2
CSUM_META = struct.Struct("<HH")  # csum_start, csum_offset (from the frame start)
# frame_id, index, count, hdr_len, gso_size, gso_type, csum_start, csum_offset
PIECE_META = struct.Struct("<IHHHHBHH")

_DEMUX = [Demux.DROP] * 256
for _b in range(0, 4):
    _DEMUX[_b] = Demux.STUN
for _b in range(64, 80):
    _DEMUX[_b] = Demux.CHANNEL_DATA
for _k in (Kind.HANDSHAKE_INIT, Kind.HANDSHAKE_RESP, Kind.COOKIE_REPLY):
    _DEMUX[_k] = Demux.HANDSHAKE
for _k in (Kind.DATA_SECURE, Kind.DATA_PLAIN):
    _DEMUX[_k] = Demux.DATA
DEMUX: tuple[Demux, ...] = tuple(_DEMUX)
