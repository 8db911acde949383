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
        endpoint = port.endpoint
        if session is None or endpoint is None:
            port.staged.extend(frames)
            port.wake()
            return
        t0 = now_ns()
        buf, view = self._buf, self._view
        seal_into = session.seal_into  # type: ignore[attr-defined]
        sizes: list[int] = []
        off = 0
        nbytes = 0
        limit = len(buf) - 2048
        for frame in frames:
            n = seal_into(view, off, frame + _KIND_FRAME)
            sizes.append(n)
            off += n
            nbytes += len(frame)
            if off > limit:  # buffer full: send what we have, start over
                self._flush(port, view[:off], sizes, t0)
                sizes, off, t0 = [], 0, now_ns()
        if sizes:
            self._flush(port, view[:off], sizes, t0)
        port.tx_packets += len(frames)
        port.tx_bytes += nbytes
        port.last_sent = now
        del buf

    def _flush(self, port: PeerPort, data: memoryview, sizes: list[int], t0: int) -> None:
        stats = self.stats
        t1 = now_ns()
        stats["seal"].record(len(sizes), len(data), t0)
        assert port.endpoint is not None
        dropped = self.udp.send_runs(data, sizes, port.endpoint)
        if dropped:
            stats.drop("udp_send_failed", dropped)
        stats["udp_send"].record(len(sizes), len(data), t1)
