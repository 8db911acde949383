"""Inbound: UDP (GRO) -> demux by first byte -> open + replay check -> TAP writer queue.

Per receive call the datagrams are views into one reused buffer; each is opened (which
copies it out) before the next call. Handshake datagrams are copied to the control plane's
channel; anything unauthenticated or unexpected becomes a counted drop. Nothing that did not
open under a live session (or arrive on a plain link's current path) reaches the TAP.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import BadPacket
from ..proto.wire import DATA_HEADER, Demux, demux
from ..stats import Stats, now_ns
from .switch import VNET, PeerPort, Switch

MAX_RECV_CALLS = 64  # receive calls drained per batch before yielding to other tasks
# An incomplete super-frame waits this long for its missing pieces (a lost datagram), then
# its pieces go to the TAP as individual segments. GRO implementations hold ~1 ms too.
PENDING_FLUSH = 0.001


class SessionEntry:
    """A receiving session and the peer it belongs to (keyed by our local index)."""

    __slots__ = ("confirm", "port", "session")

    def __init__(self, session: object, port: PeerPort, confirm: Callable[[], None] | None) -> None:
        self.session = session
        self.port = port
        self.confirm = confirm  # first datagram opened on it: tell the link (rekey handover)


class Inbound:
    def __init__(
        self,
        switch: Switch,
        stats: Stats,
        sessions: dict[int, SessionEntry],
        on_handshake: Callable[[bytes, tuple[str, int]], None],
    ) -> None:
        self.switch = switch
        self.stats = stats
        self.sessions = sessions
        self.on_handshake = on_handshake
        self.pending: set[PeerPort] = set()  # peers with a super-frame still missing pieces

    def process(
        self, datagrams: list[memoryview], addr: tuple[str, int], now: float, out: list[bytes]
    ) -> None:
        """Open one receive call's datagrams; accepted frames are appended to `out`."""
        t0 = now_ns()
        stats = self.stats
        sessions = self.sessions
        writes: list[bytes] = []
        nbytes = 0
        for d in datagrams:
            if len(d) < DATA_HEADER.size:
                stats.drop("runt_datagram")
                continue
            where = demux(d[0])
            if where is not Demux.DATA:
                if where is Demux.HANDSHAKE:
                    self.on_handshake(bytes(d), addr)
                else:
                    stats.drop(f"unhandled_{where.value}")
                continue
            index = DATA_HEADER.unpack_from(d)[1]
            entry = sessions.get(index)
            if entry is None:
                stats.drop("unknown_session")
                continue
            session = entry.session
            port = entry.port
            secure = session.secure  # type: ignore[attr-defined]
            if not secure and port.endpoint != addr:
                stats.drop("plain_wrong_path")
                continue
            try:
                payload = session.open_untrusted(d)  # type: ignore[attr-defined]
            except BadPacket:
                stats.drop("bad_datagram")
                port.drops += 1
                continue
            if secure and port.endpoint != addr:
                port.endpoint = addr  # authenticated roaming, as WireGuard does
            if entry.confirm is not None:
                entry.confirm()
            port.last_received = now
            if not payload:
                continue  # keepalive
            port.last_data = now
            reassembler = port.reassembler
            try:
                reassembler.push_untrusted(payload, writes)
            except BadPacket:
                stats.drop("bad_inner_payload")
                port.drops += 1
            if writes:
                nbytes += self._accept(port, writes, out)
            if reassembler.pending:
                self.pending.add(port)
        stats["open"].record(len(datagrams), nbytes, t0)

    def _accept(self, port: PeerPort, writes: list[bytes], out: list[bytes]) -> int:
        """Move the TAP writes the switch accepts from `writes` to `out`; return their bytes."""
        accept = self.switch.accept_inbound
        nbytes = 0
        for w in writes:
            if accept(port, w):
                port.rx_packets += 1
                port.rx_bytes += len(w) - VNET
                nbytes += len(w)
                out.append(w)
            else:
                port.drops += 1
        writes.clear()
        return nbytes

    def flush_pending(self, out: list[bytes]) -> None:
        """Write out super-frames still missing pieces, as the individual segments that did
        arrive (called when the socket has been quiet for PENDING_FLUSH)."""
        writes: list[bytes] = []
        for port in self.pending:
            port.reassembler.flush(writes)
            self._accept(port, writes, out)
        self.pending.clear()
