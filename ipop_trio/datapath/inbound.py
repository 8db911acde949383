"""Inbound: UDP (GRO) -> demux by first byte -> open + replay check -> TAP writer queue.

Per receive call the datagrams are views into one reused buffer; each is opened (which
copies it out) before the next call. Handshake datagrams are copied to the control plane's
channel (`on_handshake`); STUN and TURN ChannelData go to the ICE service (`on_ice`), which
hands back the link datagrams a relay carried: they are processed like the others, with
`via` naming the relay (a path is an address *and* the relay it goes through). Anything
unauthenticated or unexpected becomes a counted drop. Nothing that did not open under a
live session (or arrive on a plain link's current path) reaches the TAP.

This stage never imports the control plane: it reads the session table the link tasks
write, and hands the control plane what is its (handshakes, STUN) through the two callables
it was built with.

`Inbound` is the reference implementation, in Python; `NativeInbound` hands each receive
call to the native core (datapath/native.py) in one call and does in Python only what is
per session or per TAP write: roaming, the rekey handover, the switch's checks.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable
from typing import Any

from ..errors import BadPacket
from ..net.udp import cut
from ..proto.wire import DATA_HEADER_SIZE, DEMUX, Demux
from ..stats import Stats, now_ns
from .sessions import SessionTable
from .switch import VNET, PeerPort, Switch

MAX_RECV_CALLS = 64  # receive calls drained per batch before yielding to other tasks
# An incomplete super-frame waits this long for its missing pieces (a lost datagram), then
# its pieces go to the TAP as individual segments. GRO implementations hold ~1 ms too.
PENDING_FLUSH = 0.001


_INDEX = struct.Struct("<I")
REASSEMBLY_COUNTERS = ("frames_whole", "frames_partial", "segments_rebuilt", "pieces_late")


Addr = tuple[str, int]
# (handshake datagram, source, relay it came through or None)
OnHandshake = Callable[[bytes, Addr, "object | None"], None]
# (STUN or ChannelData datagram, source) -> a link datagram a relay carried, or None.
OnIce = Callable[[memoryview, Addr], "tuple[object, Addr, bytes] | None"]


class Inbound:
    def __init__(
        self,
        switch: Switch,
        stats: Stats,
        sessions: SessionTable[Any],
        *,
        on_handshake: OnHandshake,
        on_ice: OnIce | None = None,
    ) -> None:
        self.switch = switch
        self.stats = stats
        self.sessions = sessions
        self.on_handshake = on_handshake
        self.on_ice = on_ice
        self.pending: set[PeerPort] = set()  # peers with a super-frame still missing pieces
        stats.providers.append(self.reassembly_counters)

    def reassembly_counters(self) -> dict[str, int]:
        """How inbound super-frames fared, over all peers: written back whole, or (pieces
        lost or late) rebuilt as individual segments."""
        out = dict.fromkeys(REASSEMBLY_COUNTERS, 0)
        for port in self.switch.by_mac.values():
            r = port.reassembler
            for key in REASSEMBLY_COUNTERS:
                out[key] += getattr(r, key)
        return out

    def has_pending(self) -> bool:
        """Some peer holds an incomplete super-frame: flush it after PENDING_FLUSH."""
        return bool(self.pending)

    def receive(
        self, data: memoryview, segment: int, addr: Addr, now: float, out: list[bytes]
    ) -> None:
        """One receive call (`data` cut every `segment` bytes, net/udp.py `recv_raw`)."""
        self.process(cut(data, segment), addr, now, out)

    def process(
        self,
        datagrams: list[memoryview] | list[bytes],
        addr: tuple[str, int],
        now: float,
        out: list[bytes],
        via: object | None = None,
    ) -> None:
        """Open one receive call's datagrams; accepted TAP writes are appended to `out`.

        A GRO batch comes from one sender, so runs of datagrams share a session: each run
        is opened by one `open_batch` call and its payloads pushed into the peer's
        reassembler, with the per-peer bookkeeping done once per run, not per datagram."""
        t0 = now_ns()
        stats = self.stats
        sessions = self.sessions.entries
        payloads: list[bytes] = []
        writes: list[bytes] = []
        nbytes = opened = 0
        reassemble_ns = 0
        relayed: list[tuple[object, Addr, bytes]] | None = None
        i, n = 0, len(datagrams)
        while i < n:
            d = datagrams[i]
            if len(d) < DATA_HEADER_SIZE or DEMUX[d[0]] is not Demux.DATA:
                got = self._not_data(d, addr, via)
                if got is not None:
                    relayed = relayed or []
                    relayed.append(got)
                i += 1
                continue
            entry = sessions.get(_INDEX.unpack_from(d, 4)[0])
            if entry is None:
                stats.drop("unknown_session")
                i += 1
                continue
            session, port = entry.session, entry.port
            on_path = port.endpoint == addr and port.relay is via
            if not session.secure and not on_path and (addr, via) not in port.paths:
                stats.drop("plain_wrong_path")
                i += 1
                continue
            j = session.open_batch(datagrams, i, payloads)
            t1 = now_ns()
            if j == i:  # not a datagram this session can open at all (type, pad, length)
                j += 1
            refused = j - i - len(payloads)
            i = j
            if refused:
                stats.drop("bad_datagram", refused)
                port.drops += refused
            if not payloads:
                continue
            if session.secure and not on_path and port.roam:
                port.endpoint = addr  # authenticated roaming, as WireGuard does
                port.relay = via
            if entry.confirm is not None:
                entry.confirm()
            port.last_received = now
            opened += len(payloads)
            reassembler = port.reassembler
            push = reassembler.push_untrusted
            data = False
            for payload in payloads:
                if payload:  # empty: keepalive
                    data = True
                    try:
                        push(payload, writes)
                    except BadPacket:
                        stats.drop("bad_inner_payload")
                        port.drops += 1
            payloads.clear()
            if data:
                port.last_data = now
            if writes:
                nbytes += self._accept(port, writes, out, now)
            if reassembler.pending:
                self.pending.add(port)
            reassemble_ns += now_ns() - t1
        stats["reassemble"].add(opened, nbytes, reassemble_ns)
        stats["open"].add(n, sum(map(len, datagrams)), now_ns() - t0 - reassemble_ns)
        if relayed:
            # Link datagrams a TURN relay carried: one call per run from one peer through
            # one relay (a batch, as a GRO run is), never per datagram.
            for (relay, peer), run in itertools.groupby(relayed, key=lambda r: (r[0], r[1])):
                self.process([payload for _, _, payload in run], peer, now, out, via=relay)

    def _not_data(
        self, d: memoryview | bytes, addr: Addr, via: object | None
    ) -> tuple[object, Addr, bytes] | None:
        kind = DEMUX[d[0]] if len(d) else None
        if kind is Demux.HANDSHAKE:
            self.on_handshake(bytes(d), addr, via)
        elif kind in (Demux.STUN, Demux.CHANNEL_DATA) and self.on_ice is not None:
            if via is None:  # never unwrap a relay inside a relay
                return self.on_ice(memoryview(d), addr)
            self.stats.drop("relayed_stun_in_data_path")
        elif kind is Demux.DATA:
            self.stats.drop("runt_datagram")
        else:
            self.stats.drop(f"unhandled_{kind.value}" if kind is not None else "empty_datagram")
        return None

    def _accept(self, port: PeerPort, writes: list[bytes], out: list[bytes], now: float) -> int:
        """Move the TAP writes the switch accepts from `writes` to `out`; return their bytes."""
        accept = self.switch.accept_inbound
        nbytes = 0
        for w in writes:
            if accept(port, w, now):
                port.rx_packets += 1
                port.rx_bytes += len(w) - VNET
                nbytes += len(w)
                out.append(w)
            else:
                port.drops += 1
        writes.clear()
        return nbytes

    def flush_pending(self, out: list[bytes], now: float) -> None:
        """Write out super-frames still missing pieces, as the individual segments that did
        arrive (called when the socket has been quiet for PENDING_FLUSH). A peer removed
        meanwhile (no longer in the switch) writes nothing more."""
        writes: list[bytes] = []
        for port in self.pending:
            if not self.switch.has(port):
                continue
            port.reassembler.flush(writes)
            self._accept(port, writes, out, now)
        self.pending.clear()


class NativeInbound(Inbound):
    """The inbound stage with the per-datagram loop in the native core: one `open_batch`
    per receive call (header parse, session lookup, plain-path check, replay window, open,
    reassembly), then Python per session touched and per TAP write."""

    def __init__(
        self,
        switch: Switch,
        stats: Stats,
        sessions: SessionTable[Any],
        *,
        on_handshake: OnHandshake,
        on_ice: OnIce | None = None,
    ) -> None:
        if sessions.native is None:
            raise ValueError("NativeInbound needs a session table with a native table")
        super().__init__(switch, stats, sessions, on_handshake=on_handshake, on_ice=on_ice)
        self.table = sessions.native
        self._pending = False

    def reassembly_counters(self) -> dict[str, int]:
        return dict(self.table.reassembly_counters())

    def has_pending(self) -> bool:
        return self._pending

    def receive(
        self, data: memoryview, segment: int, addr: Addr, now: float, out: list[bytes]
    ) -> None:
        self._open(data, segment, addr, None, now, out)

    def process(
        self,
        datagrams: list[memoryview] | list[bytes],
        addr: tuple[str, int],
        now: float,
        out: list[bytes],
        via: object | None = None,
    ) -> None:
        """Datagrams one by one (relayed ones; tests): runs of equal size, the last maybe
        shorter, are one `open_batch` each, as GRO would have handed them over."""
        i, n = 0, len(datagrams)
        while i < n:
            seg = len(datagrams[i])
            j = i + 1
            while j < n and len(datagrams[j]) == seg and seg:
                j += 1
            if j < n and j > i and 0 < len(datagrams[j]) < seg:
                j += 1
            data = datagrams[i] if j == i + 1 else b"".join(datagrams[i:j])
            self._open(memoryview(data), seg, addr, via, now, out)
            i = j

    def _open(
        self,
        data: memoryview,
        segment: int,
        addr: Addr,
        via: object | None,
        now: float,
        out: list[bytes],
    ) -> None:
        t0 = now_ns()
        stats = self.stats
        sessions = self.sessions
        got = self.table.open_batch(data, segment, sessions.paths.get((addr, via)))
        t1 = now_ns()
        for name, n in got.drops:
            stats.drop(name, n)
        entries, ports_by_id = sessions.entries, sessions.ports
        ports: list[PeerPort | None] = []
        opened_total = 0
        for index, peer, opened, refused, bad_inner, data_seen, _nbytes in got.sessions:
            port = ports_by_id.get(peer)
            ports.append(port)
            if port is None:
                continue
            if refused or bad_inner:
                port.drops += refused + bad_inner
            if not opened:
                continue
            opened_total += opened
            entry = entries.get(index)
            if entry is not None:
                if (
                    entry.session.secure
                    and port.roam
                    and (port.endpoint != addr or port.relay is not via)
                ):
                    port.endpoint = addr  # authenticated roaming, as WireGuard does
                    port.relay = via
                if entry.confirm is not None:
                    entry.confirm()
            port.last_received = now
            if data_seen:
                port.last_data = now
        nbytes = 0
        if got.writes:
            nbytes = self._take(got.writes, ports, out, now)
        self._pending = got.pending
        relayed: list[tuple[object, Addr, bytes]] | None = None
        for off, n in got.others:
            extra = self._not_data(data[off : off + n], addr, via)
            if extra is not None:
                relayed = relayed or []
                relayed.append(extra)
        t2 = now_ns()
        stats["open"].add(got.datagrams, len(data), t1 - t0)
        stats["reassemble"].add(opened_total, nbytes, t2 - t1)
        if relayed:  # as Inbound: one call per run from one peer through one relay
            for (relay, peer), run in itertools.groupby(relayed, key=lambda r: (r[0], r[1])):
                self.process([payload for _, _, payload in run], peer, now, out, via=relay)

    def _take(
        self,
        writes: list[tuple[bytes, int]],
        ports: list[PeerPort | None],
        out: list[bytes],
        now: float,
    ) -> int:
        """The TAP writes (each its own bytes, with the slot of its port) the switch
        accepts, into `out`."""
        nbytes = 0
        for frame, slot in writes:
            port = ports[slot]
            if port is not None:  # the switch's checks and accounting, as Inbound's
                nbytes += self._accept(port, [frame], out, now)
        return nbytes

    def flush_pending(self, out: list[bytes], now: float) -> None:
        """As Inbound.flush_pending: a peer removed meanwhile writes nothing more."""
        written = self.table.flush_pending()
        self._pending = False
        ports_by_id, has = self.sessions.ports, self.switch.has
        ports: list[PeerPort | None] = []
        for _frame, peer in written:
            port = ports_by_id.get(peer)
            ports.append(port if port is not None and has(port) else None)
        self._take([(frame, i) for i, (frame, _peer) in enumerate(written)], ports, out, now)
