"""Outbound: TAP frames -> route -> seal -> UDP (GSO).

Per batch (never per packet: no await, no logging, no allocation beyond the frame bytes):
  1. switch: split the TAP batch by destination peer; ARP for known peers answered locally;
  2. seal: each frame becomes one datagram (frame | kind byte, AEAD-sealed on secure links),
     laid back to back into one reused send buffer;
  3. udp_send: equal-sized neighbours leave in one UDP GSO send per peer.
A peer without a usable session keeps up to 128 frames staged and wakes its link task.
"""

from __future__ import annotations

from ..net.udp import UdpSocket
from ..proto.wire import INNER_FRAME
from ..stats import Stats, now_ns
from .switch import PeerPort, Switch

SEND_BUFFER = 1 << 20
_KIND_FRAME = bytes([INNER_FRAME])


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
        payloads = [frame + _KIND_FRAME for frame in frames]
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
        port.tx_packets += n
        port.tx_bytes += sum(sizes) - n * (overhead + 1)
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
