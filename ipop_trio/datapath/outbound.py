"""Outbound: TAP frames -> route -> seal -> UDP (GSO).

Per batch (never per packet: no await, no logging, no allocation beyond the frame bytes):
  1. switch: split the TAP batch by destination peer; ARP for known peers answered locally;
  2. encode + seal: each TAP read becomes inner payloads (proto/offload.py: a frame, a frame
     whose checksum the peer's kernel finishes, or the segment-sized pieces of a TSO
     super-frame), each sealed into its own datagram, laid back to back in one send buffer;
  3. udp_send: equal-sized neighbours leave in one UDP GSO send per peer.
A peer without a usable session keeps up to 128 frames staged and wakes its link task.
"""

from __future__ import annotations

from ..net.udp import UdpSocket
from ..proto.offload import OffloadError, encode_outbound
from ..stats import Stats, now_ns
from .switch import VNET, PeerPort, Switch

SEND_BUFFER = 1 << 20


class Outbound:
    def __init__(self, switch: Switch, udp: UdpSocket, stats: Stats) -> None:
        self.switch = switch
        self.udp = udp
        self.stats = stats
        self._buf = bytearray(SEND_BUFFER)
        self._view = memoryview(self._buf)
        self.local_frames: list[bytes] = []  # ARP replies for the TAP writer, taken per batch

    def process(self, frames: list[bytes], now: float) -> list[bytes]:
        """Route and send one TAP batch; return frames to write back to our own TAP."""
        t0 = now_ns()
        per_peer, local = self.switch.route_outbound(frames)
        self.stats["switch"].record(len(frames), 0, t0)
        for port, batch in per_peer.items():
            self.send(port, batch, now)
        return local

    def send(self, port: PeerPort, frames: list[bytes], now: float) -> None:
        session = port.session
        if session is None or port.endpoint is None:
            port.staged.extend(frames)
            port.wake()
            return
        t0 = now_ns()
        view = self._view
        cap = len(view)
        overhead: int = session.overhead()  # type: ignore[attr-defined]
        seal_batch_into = session.seal_batch_into  # type: ignore[attr-defined]
        payloads: list[bytes] = []
        frame_id = port.frame_id
        for frame in frames:
            try:
                payloads.extend(encode_outbound(frame, frame_id))
            except OffloadError:
                self.stats.drop("bad_tap_frame")
            frame_id = (frame_id + 1) & 0xFFFFFFFF
        port.frame_id = frame_id
        sizes = [len(p) + overhead for p in payloads]
        i, n = 0, len(payloads)
        while i < n:  # as many datagrams as fit the send buffer, then flush
            j, total = i, 0
            while j < n and total + sizes[j] <= cap:
                total += sizes[j]
                j += 1
            end = seal_batch_into(view, 0, payloads[i:j])
            self._flush(port, view[:end], sizes[i:j], t0)
            i, t0 = j, now_ns()
        port.tx_packets += len(frames)
        port.tx_bytes += sum(map(len, frames)) - VNET * len(frames)
        port.last_sent = now

    def _flush(self, port: PeerPort, data: memoryview, sizes: list[int], t0: int) -> None:
        stats = self.stats
        t1 = now_ns()
        stats["seal"].record(len(sizes), len(data), t0)
        assert port.endpoint is not None
        dropped = self.udp.send_runs(data, sizes, port.endpoint)
        if dropped:
            stats.drop("udp_send_failed", dropped)
        stats["udp_send"].record(len(sizes), len(data), t1)
