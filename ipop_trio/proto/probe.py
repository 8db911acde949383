"""`ipop-trio ping`'s probes: Ethernet frames between two nodes, never seen by a TAP.

A probe is an ordinary frame from one node's MAC to a peer's, carried by the link like any
other (sealed on a secure link, through the relay on a relayed path), so its round trip is
the data path's: the peer's switch recognises the EtherType after its usual source checks,
answers a ping with a pong through the same link, and writes neither to its TAP. No new
datagram type, nothing the native core needs to know.

    dst MAC (6) | src MAC (6) | 0x88B5 | "IPOP" | kind (1: ping, 2: pong) | 0 0 0 | id (u64)

0x88B5 is IEEE 802's "local experimental" EtherType 1: no protocol of the overlay's
applications uses it. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import enum
import struct

from ..errors import BadPacket

ETH_P_PROBE = b"\x88\xb5"
MAGIC = b"IPOP"
_BODY = struct.Struct("!4sB3xQ")
SIZE = 14 + _BODY.size


class ProbeKind(enum.IntEnum):
    PING = 1
    PONG = 2


def build(dst_mac: bytes, src_mac: bytes, kind: ProbeKind, probe_id: int) -> bytes:
    """The Ethernet frame of one probe (no virtio header)."""
    return dst_mac + src_mac + ETH_P_PROBE + _BODY.pack(MAGIC, kind, probe_id)


def parse_untrusted(body: bytes | memoryview) -> tuple[ProbeKind, int]:
    """A probe's kind and id from what follows its Ethernet header; BadPacket otherwise."""
    if len(body) < _BODY.size:
        raise BadPacket(f"probe of {len(body)} bytes, want {_BODY.size}")
    magic, kind, probe_id = _BODY.unpack_from(body)
    if magic != MAGIC:
        raise BadPacket("probe without the IPOP magic")
    try:
        return ProbeKind(kind), probe_id
    except ValueError:
        raise BadPacket(f"unknown probe kind {kind}") from None


__all__ = ["ETH_P_PROBE", "SIZE", "ProbeKind", "build", "parse_untrusted"]
