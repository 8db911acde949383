"""The native data-path core (`ipop_trio._native`, built from native/), when there is one.

The pure-Python modules stay the specification and the fallback: proto/session.py
(`Session`), proto/offload.py (`encode_outbound`, `Reassembler`), and the per-batch loops of
datapath/outbound.py and datapath/inbound.py. The native core makes the same decisions,
byte for byte (tests/unit/test_native_differential.py), with one call per batch, no Python
object per datagram, and the GIL released while it works.

`AVAILABLE` says whether it can be used; `WHY` says why not ("" when it can), for status and
logs. It is off when the extension was not built (no cargo at install time) or when
IPOP_TRIO_PURE_PYTHON=1 is set.

Contract (every `*_untrusted` call counts what the network sent, it never raises for it):

* `Session(*, local_index, remote_index, cipher, secure, created=0.0, chaining_key,
  initiator)`: what a finished handshake leaves, as proto/session.py's `Session` takes it
  (cipher: a `Cipher` or its value). Noise's Split() runs in the extension: the transport
  keys are derived there and never exist as Python objects (`send_key` and `recv_key`
  instead of the chaining key: fixed keys, for tests and tools). It has the Python Session's
  counters (`send_counter`, `recv_highest`, `tx_bytes`, `rx_bytes`, `rx_packets`, `refused`
  by `Refusal` name), timers (`should_rekey`, `expired`),
  `overhead()`, `seal(payload)` (keepalives) and `open_untrusted(datagram)` (raises
  `Refused(reason)`, a BadPacket, args[0] one of the `Refusal` values).
* `Session.seal_tap_batch(reads, frame_id, out, *, max_payload, max_segments, max_bytes)`
  -> `OutboundBatch`: `reads` are one peer's TAP reads (bytes: virtio_net_hdr + frame);
  each is encoded as `encode_outbound(read, frame_id + i)` would, refused ones counted in
  `bad_tap_frame` (stats.drop "bad_tap_frame") and still using their frame id; every inner
  payload is sealed with the next counter, and `out` (a bytearray the caller owns and
  reuses; no view of it alive during the call) is made to hold the datagrams back to back.
  `runs` are (offset, length, segment size, count): one UDP GSO sendmsg each, grouped as
  net/udp.py's `_runs` groups sizes. Also `frame_id` (next), `datagrams`, `nbytes`,
  `frame_bytes` (for port.tx_bytes). Counter exhaustion raises LocalProtocolError with
  nothing sealed. An `out` that cannot be resized (a view of it still alive) raises
  BufferError after sealing: those counters are spent, the datagrams lost (as a send
  failure would lose them).
* `SessionTable()`: local index -> (session, peer), `peer` an int the caller chooses; each
  peer has one reassembler, shared by its sessions. `insert(session, peer)`,
  `remove(local_index)`, `remove_peer(peer)`, `set_paths(peer, tokens)` (where a plain
  session's datagrams may come from: ints the caller assigns to distinct (address, relay)
  paths, its endpoint's and the ICE-valid ones), `pending(peer)`, `reassembly_counters(peer=None)`.
* `SessionTable.open_batch(data, segment, path)` -> `InboundBatch`: one
  receive call (`data` the filled part of the receive buffer, cut every `segment` bytes as
  recv_once cuts it, all from path token `path`). Per datagram, as Inbound.process: not data
  (STUN, ChannelData, handshake, other, runt, empty) -> `others` (offset, length) for
  Python's handlers, in order; unknown index -> "unknown_session"; plain session off its
  paths -> "plain_wrong_path"; refused by the session -> "bad_datagram"; opened -> pushed
  into the peer's reassembler (refused -> "bad_inner_payload"). `writes` are (TAP write,
  slot): each write (virtio_net_hdr + frame) its own bytes, copied once out of the table's
  buffer, as the TAP writer thread needs; slot indexes `sessions`: (local_index, peer,
  opened, refused, bad_inner, data, nbytes) per session touched. `drops`: (name, count)
  pairs, non-zero only; `pending`: some peer holds an incomplete super-frame (flush it
  after PENDING_FLUSH with `flush_pending()`, which returns (TAP write, peer) per write,
  as `reset_peer(peer)` and `remove_peer(peer)` do).
* `encode_outbound(read, frame_id, max_payload=1440)` and `Reassembler` (push_untrusted,
  flush, reset, pending, the four counters): proto/offload.py's, for tests and fuzzing.

What stays Python: the switch (routing, ARP, `accept_inbound` per TAP write), roaming and
`last_received` / `last_data` / `confirm` per session result, the handlers of `others`, the
sockets (one sendmsg per run, one recvmsg_into per call) and the stats.
"""

from __future__ import annotations

import os
from typing import Any

AVAILABLE: bool
WHY: str
_native: Any

if os.environ.get("IPOP_TRIO_PURE_PYTHON") == "1":
    _native, AVAILABLE, WHY = None, False, "disabled by IPOP_TRIO_PURE_PYTHON=1"
else:
    try:
        from .. import _native  # type: ignore[attr-defined, no-redef]
    except ImportError as exc:
        _native, AVAILABLE, WHY = None, False, f"extension not built ({exc})"
    else:
        AVAILABLE, WHY = True, ""

if _native is not None:
    Session = _native.Session
    SessionTable = _native.SessionTable
    Reassembler = _native.Reassembler
    OutboundBatch = _native.OutboundBatch
    InboundBatch = _native.InboundBatch
    Refused = _native.Refused
    encode_outbound = _native.encode_outbound

__all__ = [
    "AVAILABLE",
    "WHY",
    "InboundBatch",
    "OutboundBatch",
    "Reassembler",
    "Refused",
    "Session",
    "SessionTable",
    "encode_outbound",
]
