"""The link machine in pairs: two `Link`s driven by a tiny node and a simulated wire.

No sleeps, no sockets: time is a float the `Wire` advances from deadline to deadline.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket, LocalProtocolError, RemoteProtocolError
from ipop_trio.proto import handshake as hs
from ipop_trio.proto.cert import TrustAnchor
from ipop_trio.proto.handshake import (
    MAC_SIZE,
    consume_initiation_untrusted,
    create_initiation,
    response_receiver_index_untrusted,
)
from ipop_trio.proto.link import (
    MAX_INITIATION_AGE,
    MAX_SESSIONS,
    HandshakeFailed,
    Link,
    LinkEvent,
    LinkState,
    PeerRefused,
    SessionEstablished,
    SessionRetired,
)
from ipop_trio.proto.session import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    Cipher,
    Session,
)
from ipop_trio.proto.wire import DATA_HEADER

from ._lab_identities import NOW, Node, alice, bob, ca, carol, node

INIT, RESP = 0xA1, 0xA2


class Peer:
    """What the node does around a Link: index table, routing, the data path's calls."""

    def __init__(self, me: Node, other: Node, cipher: Cipher, seed: int, **kw: Any) -> None:
        self.me = me
        self.rng = random.Random(seed)
        self.indices: set[int] = set()  # allocated and not yet freed
        self.sessions: dict[int, Session] = {}
        self.events: list[LinkEvent] = []
        self.received: list[bytes] = []
        self.keepalives = 0
        self.dropped: list[BadPacket] = []
        self.link = Link(
            me.local,
            other.public_key,
            allocate_index=self._allocate,
            cipher=cipher,
            rng=random.Random(seed),
            **kw,
        )

    def _allocate(self) -> int:
        while True:
            index = self.rng.getrandbits(32)
            if index not in self.indices:
                self.indices.add(index)
                return index

    def pump(self) -> None:
        while (event := self.link.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, SessionEstablished):
                assert event.session.local_index in self.indices
                self.sessions[event.session.local_index] = event.session
            elif isinstance(event, SessionRetired):
                assert event.local_index in self.indices, "index freed twice"
                self.indices.discard(event.local_index)
                self.sessions.pop(event.local_index, None)
        # The index table holds exactly the live sessions (plus a pending handshake).
        assert set(self.sessions) == {s.local_index for s in self.link.sessions}

    def deliver(self, data: bytes, now: float) -> None:
        try:
            if data[0] == INIT:
                state = consume_initiation_untrusted(self.me.local, data, self.link.cipher, now)
                assert state.peer_static == self.link.peer_static
                self.link.receive_initiation(state, now)
            elif data[0] == RESP:
                if response_receiver_index_untrusted(data) not in self.indices:
                    raise BadPacket("response for an unknown index")
                self.link.receive_response_untrusted(data, now)
            else:
                _, index, _ = DATA_HEADER.unpack_from(data)
                session = self.sessions.get(index)
                if session is None:
                    raise BadPacket("data for an unknown index")
                payload = session.open_untrusted(data)
                self.link.note_received(now, data=bool(payload))
                self.link.confirm(index, now)
                if payload:
                    self.received.append(payload)
                else:
                    self.keepalives += 1
        except BadPacket as exc:
            self.dropped.append(exc)
        self.pump()

    def send(self, payload: bytes, now: float) -> bytes | None:
        session = self.link.current
        if session is None:
            self.link.connect(now)
            self.pump()
            return None
        datagram = session.seal(payload)
        self.link.note_sent(now)
        return datagram

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


Drop = Callable[[str, bytes, float], bool]


@dataclass
class Wire:
    """Two peers, a fixed latency, a loss rule; advances time deadline by deadline."""

    a: Peer
    b: Peer
    now: float = NOW
    latency: float = 0.01
    drop: Drop = lambda src, data, now: False
    log: list[tuple[float, str, int]] = field(default_factory=list)
    _queue: list[tuple[float, int, str, bytes]] = field(default_factory=list)
    _seq: int = 0

    def _peer(self, name: str) -> Peer:
        return self.a if name == "a" else self.b

    def put(self, src: str, data: bytes) -> None:
        self.log.append((self.now, src, data[0]))
        if self.drop(src, data, self.now):
            return
        self._seq += 1
        heapq.heappush(self._queue, (self.now + self.latency, self._seq, src, data))

    def flush(self) -> None:
        for name in ("a", "b"):
            for data in self._peer(name).link.datagrams_to_send():
                self.put(name, data)

    def sent(self, src: str, kind: int) -> list[float]:
        return [t for t, s, k in self.log if s == src and k == kind]

    def run(
        self,
        until: float,
        app: Callable[[float], None] | None = None,
        tick: float = 0.05,
    ) -> None:
        next_tick = self.now
        for _ in range(10_000_000):
            candidates = [until]
            candidates += [t for t, *_ in self._queue[:1]]
            for peer in (self.a, self.b):
                deadline = peer.link.next_deadline()
                if deadline is not None:
                    candidates.append(max(deadline, self.now))
            if app is not None:
                candidates.append(next_tick)
            self.now = min(candidates)
            if self.now >= until:
                return
            while self._queue and self._queue[0][0] <= self.now:
                _, _, src, data = heapq.heappop(self._queue)
                (self.b if src == "a" else self.a).deliver(data, self.now)
            for peer in (self.a, self.b):
                deadline = peer.link.next_deadline()
                if deadline is not None and deadline <= self.now:
                    peer.link.handle_timeout(self.now)
                    peer.pump()
            if app is not None and self.now >= next_tick:
                app(self.now)
                next_tick += tick
            self.flush()
        raise AssertionError("simulation did not advance")


def _pair(
    cipher: Cipher = Cipher.AES_256_GCM,
    a: Node | None = None,
    b: Node | None = None,
    a_kw: dict[str, Any] | None = None,
    b_kw: dict[str, Any] | None = None,
    **wire_kw: Any,
) -> Wire:
    a, b = a or alice(), b or bob()
    return Wire(
        Peer(a, b, cipher, seed=1, **(a_kw or {})),
        Peer(b, a, cipher, seed=2, **(b_kw or {})),
        **wire_kw,
    )


class Traffic:
    """A steady send loop in both directions; every datagram sealed must arrive."""

    def __init__(self, wire: Wire, start: float = NOW) -> None:
        self.wire = wire
        self.sent: dict[str, list[bytes]] = {"a": [], "b": []}
        self.start = start
        self.n = 0
        self.max_sessions = 0

    def __call__(self, now: float) -> None:
        if now < self.start:
            return
        self.n += 1
        self.max_sessions = max(
            self.max_sessions, len(self.wire.a.link.sessions), len(self.wire.b.link.sessions)
        )
        for name in ("a", "b"):
            payload = f"{name}{self.n}".encode()
            datagram = self.wire._peer(name).send(payload, now)
            if datagram is not None:
                self.sent[name].append(payload)
                self.wire.put(name, datagram)

    def check_all_delivered(self) -> None:
        self.wire.run(self.wire.now + 1)  # drain what is still on the wire
        assert self.wire.b.received == self.sent["a"]
        assert self.wire.a.received == self.sent["b"]


# --- Establishing ---------------------------------------------------------------------------


@pytest.mark.parametrize("cipher", list(Cipher), ids=lambda c: c.value)
def test_establish_and_carry_data(cipher: Cipher) -> None:
    wire = _pair(cipher)
    a, b = wire.a, wire.b
    assert a.link.state is LinkState.IDLE and a.link.next_deadline() is None
    a.link.connect(wire.now)
    assert a.link.state is LinkState.HANDSHAKING
    wire.flush()
    wire.run(NOW + 1)

    assert a.link.state is LinkState.ESTABLISHED
    assert b.link.state is LinkState.ESTABLISHED  # confirmed by the initiator's keepalive
    assert b.keepalives == 1
    assert a.link.last_handshake == pytest.approx(NOW + 0.02)
    assert b.link.last_handshake == pytest.approx(NOW + 0.03)
    assert a.link.peer is not None and a.link.peer.name == "bob"
    assert b.link.peer is not None and b.link.peer.name == "alice"
    sa, sb = a.link.current, b.link.current
    assert sa is not None and sb is not None
    assert (sa.local_index, sa.remote_index) == (sb.remote_index, sb.local_index)
    assert len(a.of(SessionEstablished)) == len(b.of(SessionEstablished)) == 1

    traffic = Traffic(wire)
    wire.run(NOW + 5, app=traffic)
    traffic.check_all_delivered()
    assert len(wire.b.received) > 50
    assert not a.dropped and not b.dropped


def test_connect_while_handshaking_is_a_no_op() -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    wire.a.link.connect(NOW + 1)
    assert len(wire.a.link.datagrams_to_send()) == 1


def test_ext_and_secure_decision_reach_the_session() -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def plain(peer: Any, ext: Any) -> bool:
        seen.append((peer.name, dict(ext)))
        return False

    wire = _pair(a_kw={"ext": {"policy": "groups"}, "decide_secure": plain}, b_kw={"ext": {"x": 1}})
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    assert seen == [("bob", {"x": 1})]
    assert wire.a.link.current is not None and not wire.a.link.current.secure
    assert wire.b.link.peer_ext["policy"] == "groups"


# --- Refusals -------------------------------------------------------------------------------


def test_address_mismatch_refused() -> None:
    # bob's link to carol expects 10.77.0.3; carol's certificate says 10.77.0.4.
    wire = _pair(a=carol(), b=bob(), b_kw={"expect_address": "10.77.0.3"})
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    (refused,) = wire.b.of(PeerRefused)
    assert "10.77.0.4" in refused.reason and "10.77.0.3" in refused.reason
    assert wire.sent("b", RESP) == []
    assert wire.b.link.state is LinkState.IDLE and not wire.b.indices
    wire.run(NOW + REKEY_ATTEMPT_TIME + 1)
    assert len(wire.a.of(HandshakeFailed)) == 1


def test_name_mismatch_refused_by_initiator() -> None:
    wire = _pair(a_kw={"expect_name": "robert"})
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    (refused,) = wire.a.of(PeerRefused)
    assert "'bob'" in refused.reason and "'robert'" in refused.reason
    assert wire.a.link.state is LinkState.IDLE
    assert not wire.a.indices  # the handshake index came back
    assert wire.a.link.next_deadline() is None


def test_expected_identity_accepted() -> None:
    wire = _pair(
        a_kw={"expect_name": "bob", "expect_address": "10.77.0.3"},
        b_kw={"expect_name": "alice", "expect_address": "10.77.0.2"},
    )
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    assert wire.a.link.state is wire.b.link.state is LinkState.ESTABLISHED


def test_initiation_replay_refused() -> None:
    wire = _pair()
    a, b = wire.a, wire.b
    a.link.connect(NOW)
    (first,) = a.link.datagrams_to_send()
    a.link.handle_timeout(NOW + REKEY_TIMEOUT + 1)  # a retransmission: a newer timestamp
    (second,) = a.link.datagrams_to_send()

    state = consume_initiation_untrusted(b.me.local, second, Cipher.AES_256_GCM, NOW + 7)
    b.link.receive_initiation(state, NOW + 7)
    b.pump()
    assert len(b.link.datagrams_to_send()) == 1
    # The same bytes again: valid Noise, but not a newer timestamp.
    again = consume_initiation_untrusted(b.me.local, second, Cipher.AES_256_GCM, NOW + 8)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        b.link.receive_initiation(again, NOW + 8)
    # An older initiation, delivered late.
    older = consume_initiation_untrusted(b.me.local, first, Cipher.AES_256_GCM, NOW + 8)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        b.link.receive_initiation(older, NOW + 8)
    assert b.link.datagrams_to_send() == []
    assert len(b.of(SessionEstablished)) == 1


def test_misrouted_initiation_is_a_local_error() -> None:
    wire = _pair()
    init, _ = create_initiation(carol().local, bob().public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    state = consume_initiation_untrusted(bob().local, init, Cipher.AES_256_GCM, NOW)
    with pytest.raises(LocalProtocolError):
        wire.b.link.receive_initiation(state, NOW)


def test_response_without_handshake_is_bad_packet() -> None:
    wire = _pair()
    with pytest.raises(BadPacket):
        wire.a.link.receive_response_untrusted(b"\xa2" + bytes(100), NOW)


# --- Loss and retransmission ----------------------------------------------------------------


def test_lost_initiation_retransmitted() -> None:
    initiations: list[bytes] = []

    def drop_first_initiation(src: str, data: bytes, now: float) -> bool:
        if data[0] == INIT:
            initiations.append(data)
            return len(initiations) == 1
        return False

    wire = _pair(drop=drop_first_initiation)
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 10)

    first, second = wire.sent("a", INIT)
    assert REKEY_TIMEOUT <= second - first <= REKEY_TIMEOUT + 0.333
    assert initiations[0][8:40] != initiations[1][8:40]  # a fresh ephemeral
    assert wire.a.link.state is wire.b.link.state is LinkState.ESTABLISHED
    assert wire.a.link.last_handshake == pytest.approx(second + 0.02)
    assert len(wire.a.indices) == 1  # the attempt kept one index; it became the session's


def test_lost_responses_until_handshake_failed() -> None:
    wire = _pair(drop=lambda src, data, now: data[0] == RESP)
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + REKEY_ATTEMPT_TIME + 10)

    (failed,) = wire.a.of(HandshakeFailed)
    assert "90" in failed.reason
    initiations = wire.sent("a", INIT)
    assert 17 <= len(initiations) <= 19
    assert all(
        REKEY_TIMEOUT <= t2 - t1 <= REKEY_TIMEOUT + 0.333
        for t1, t2 in itertools.pairwise(initiations)
    )
    assert initiations[-1] < NOW + REKEY_ATTEMPT_TIME
    assert wire.a.link.state is LinkState.IDLE and not wire.a.indices
    # The responder answered each one, keeping only its latest unconfirmed session...
    assert len(wire.sent("b", RESP)) == len(initiations)
    assert len(wire.b.indices) == 1
    # ...until it expires.
    wire.run(NOW + REKEY_ATTEMPT_TIME + REJECT_AFTER_TIME)
    assert not wire.b.indices and wire.b.link.next_deadline() is None
    assert wire.a.link.next_deadline() is None


def test_connect_after_failure_starts_again() -> None:
    wire = _pair(drop=lambda src, data, now: now < NOW + 100)
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 120)
    assert len(wire.a.of(HandshakeFailed)) == 1
    wire.a.link.connect(wire.now)
    wire.flush()
    wire.run(NOW + 121)
    assert wire.a.link.state is LinkState.ESTABLISHED


# --- Rekey, keepalive, expiry ---------------------------------------------------------------


@pytest.mark.parametrize("latency", [0.0, 0.03, 0.4])
def test_rekey_keeps_steady_traffic_lossless(latency: float) -> None:
    wire = _pair(latency=latency)
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 2)
    first = wire.a.link.current
    traffic = Traffic(wire)
    wire.run(NOW + 3 * REKEY_AFTER_TIME + 30, app=traffic)

    traffic.check_all_delivered()
    assert len(wire.b.received) > 7000
    assert not wire.a.dropped and not wire.b.dropped
    # The initiator rekeyed at REKEY_AFTER_TIME each time; nothing else started handshakes.
    initiations = wire.sent("a", INIT)
    assert len(initiations) == 4 and wire.sent("b", INIT) == []
    for k, t in enumerate(initiations[1:], start=1):
        assert t == pytest.approx(NOW + k * (REKEY_AFTER_TIME + latency * 2), abs=0.01)
    assert wire.a.link.current is not first
    assert not wire.a.of(HandshakeFailed)
    # Old sessions retired on time; never more than two live in the steady state.
    assert len(wire.a.of(SessionRetired)) == 2  # created at 0 and 120 s, expired at 180, 300
    assert traffic.max_sessions == 2
    # The responder sends on the new session once the initiator used it.
    assert wire.a.link.current is not None and wire.b.link.current is not None
    assert wire.b.link.current.remote_index == wire.a.link.current.local_index


def test_simultaneous_initiation_converges() -> None:
    wire = _pair(latency=0.02)
    wire.a.link.connect(NOW)
    wire.b.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    a, b = wire.a, wire.b
    assert a.link.state is b.link.state is LinkState.ESTABLISHED
    assert a.link.current is not None and b.link.current is not None
    # Each sends on the handshake it initiated; the other accepts it.
    assert a.link.current.local_index != b.link.current.remote_index
    assert {s.local_index for s in b.link.sessions} >= {a.link.current.remote_index}
    assert {s.local_index for s in a.link.sessions} >= {b.link.current.remote_index}

    traffic = Traffic(wire)
    wire.run(NOW + 3 * REKEY_AFTER_TIME + 30, app=traffic)
    traffic.check_all_delivered()
    assert len(a.received) > 7000 and len(b.received) > 7000
    assert not a.dropped and not b.dropped
    assert not a.of(HandshakeFailed) and not b.of(HandshakeFailed)
    assert traffic.max_sessions <= 4  # two per rekey while the previous pair lives


def test_passive_keepalive() -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    datagram = wire.a.send(b"hello", wire.now)
    assert datagram is not None
    wire.put("a", datagram)
    t_sent = wire.now
    wire.run(t_sent + KEEPALIVE_TIMEOUT + 1)
    assert wire.b.received == [b"hello"]
    # b had nothing to send: it answered with a keepalive after KEEPALIVE_TIMEOUT...
    keepalives = [t for t, s, k in wire.log if s == "b" and k == 0xA4]
    assert keepalives == [pytest.approx(t_sent + 0.01 + KEEPALIVE_TIMEOUT)]
    assert wire.a.keepalives == 1
    # ...so a, which heard back, does not start a new handshake.
    wire.run(t_sent + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 5)
    assert len(wire.sent("a", INIT)) == 1


def test_silent_peer_triggers_new_handshake() -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    wire.drop = lambda src, data, now: src == "b"  # b goes silent
    datagram = wire.a.send(b"anyone?", wire.now)
    assert datagram is not None
    assert wire.a.link.next_deadline() == pytest.approx(
        wire.now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
    )
    wire.put("a", datagram)
    t_sent = wire.now
    wire.run(t_sent + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 1)
    assert wire.sent("a", INIT)[-1] == pytest.approx(t_sent + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)


def test_note_calls_report_started_timers() -> None:
    wire = _pair()
    link = wire.a.link
    assert link.note_sent(NOW) is True
    assert link.note_sent(NOW + 1) is False
    assert link.note_received(NOW + 2) is True  # data: the keepalive timer starts
    assert link.note_received(NOW + 3) is False
    assert link.note_received(NOW + 4, data=False) is False
    assert link.last_sent == NOW + 1 and link.last_received == NOW + 4


def test_sessions_expire_when_initiator_vanishes() -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + 1)
    wire.drop = lambda src, data, now: src == "a"  # a vanishes
    wire.run(NOW + REJECT_AFTER_TIME + 1)
    assert wire.b.link.state is LinkState.IDLE
    assert not wire.b.indices and len(wire.b.of(SessionRetired)) == 1
    assert wire.b.link.next_deadline() is None


def test_close_frees_every_index() -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    wire.flush()
    wire.run(NOW + REKEY_AFTER_TIME + 1)  # one rekey: two sessions each
    wire.a.link.connect(wire.now)  # and a handshake in flight... (a no-op if one is)
    wire.a.link.close()
    wire.b.link.close()
    wire.a.pump()
    wire.b.pump()
    assert not wire.a.indices and not wire.b.indices
    assert wire.a.link.state is wire.b.link.state is LinkState.IDLE


# --- Garbage in -----------------------------------------------------------------------------


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), pending=st.booleans())
def test_receive_response_garbage_only_bad_packet(data: bytes, pending: bool) -> None:
    wire = _pair()
    if pending:
        wire.a.link.connect(NOW)
    try:
        wire.a.link.receive_response_untrusted(data, NOW)
    except BadPacket:
        pass
    assert wire.a.link.next_event() is None


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flips=st.lists(
        st.tuples(st.integers(min_value=0, max_value=1000), st.integers(1, 255)),
        min_size=1,
        max_size=3,
    ),
    remac=st.booleans(),
)
def test_mutated_response_only_bad_packet(flips: list[tuple[int, int]], remac: bool) -> None:
    wire = _pair()
    wire.a.link.connect(NOW)
    (init,) = wire.a.link.datagrams_to_send()
    state = consume_initiation_untrusted(bob().local, init, Cipher.AES_256_GCM, NOW)
    wire.b.link.receive_initiation(state, NOW)
    (resp,) = wire.b.link.datagrams_to_send()
    data = bytearray(resp)
    for at, xor in flips:
        data[at % len(data)] ^= xor
    if remac:
        body = bytes(data[:-MAC_SIZE])
        data = bytearray(body + hs._mac1(hs.mac1_key(alice().public_key), body))
    try:
        wire.a.link.receive_response_untrusted(bytes(data), NOW)
    except BadPacket:
        assert wire.a.link.state is LinkState.HANDSHAKING  # a forgery changes nothing
        wire.a.link.receive_response_untrusted(resp, NOW)  # the real one still works
    assert wire.a.link.state is LinkState.ESTABLISHED


def test_frequent_rekeys_are_capped() -> None:
    wire = _pair()
    for _ in range(3 * MAX_SESSIONS):
        wire.a.link.connect(wire.now)
        wire.flush()
        wire.run(wire.now + 1)
        assert len(wire.a.link.sessions) <= MAX_SESSIONS
        assert len(wire.b.link.sessions) <= MAX_SESSIONS
    assert len(wire.a.of(SessionEstablished)) == 3 * MAX_SESSIONS
    traffic = Traffic(wire)
    wire.run(wire.now + 5, app=traffic)
    traffic.check_all_delivered()


def test_bad_peer_key_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        Link(alice().local, b"short", allocate_index=lambda: 1)


def test_a_re_created_link_keeps_refusing_old_initiations() -> None:
    """The node seeds a new Link for a re-added peer with the newest timestamp it accepted,
    so an initiation recorded before cannot be replayed to it."""
    wire = _pair()
    a, b = wire.a, wire.b
    a.link.connect(NOW)
    (init,) = a.link.datagrams_to_send()
    state = consume_initiation_untrusted(b.me.local, init, Cipher.AES_256_GCM, NOW + 1)
    b.link.receive_initiation(state, NOW + 1)
    floor = b.link.last_initiation_ts
    assert floor > 0
    fresh = _pair(b_kw={"replay_floor": floor}).b  # the peer removed and added again
    again = consume_initiation_untrusted(fresh.me.local, init, Cipher.AES_256_GCM, NOW + 2)
    with pytest.raises(RemoteProtocolError, match="replayed"):
        fresh.link.receive_initiation(again, NOW + 2)


def test_a_stale_initiation_is_refused_even_by_a_new_link() -> None:
    wire = _pair()
    a, b = wire.a, wire.b
    a.link.connect(NOW)
    (init,) = a.link.datagrams_to_send()
    late = NOW + MAX_INITIATION_AGE + 1  # e.g. replayed after the receiver restarted
    state = consume_initiation_untrusted(b.me.local, init, Cipher.AES_256_GCM, late)
    with pytest.raises(RemoteProtocolError, match="stale"):
        b.link.receive_initiation(state, late)


def test_timers_on_a_monotonic_clock_with_the_wall_offset_for_certificates() -> None:
    """The node drives Links with monotonic `now` (small numbers) and tells them the offset
    to wall-clock time: certificates are checked, and initiations stamped, at now + offset."""
    wire = _pair()
    a, b = wire.a, wire.b
    mono = 10.0  # seconds since boot, say: certificates are not valid "at" 10.0
    for p in (a, b):
        p.link.wall_offset = NOW - mono
    a.link.connect(mono)
    (init,) = a.link.datagrams_to_send()
    state = consume_initiation_untrusted(b.me.local, init, Cipher.AES_256_GCM, NOW)
    assert abs(state.timestamp_ns / 1e9 - NOW) < 1  # stamped with wall time
    b.link.receive_initiation(state, mono)
    (resp,) = b.link.datagrams_to_send()
    a.link.receive_response_untrusted(resp, mono)  # certificate checked at wall time
    assert a.link.current is not None and a.link.current.created == mono


# --- CA rotation --------------------------------------------------------------------------


def _on(authority: Any, name: str, address: str, anchor: Any, private: bytes) -> Node:
    """A node issued by `authority` for the key `private`, trusting `anchor`."""
    bundle = node(name, address, authority=authority, private_key=private).bundle
    return Node(bundle, hs.LocalIdentity(private, bundle.cert_der, anchor))


def test_a_ca_bundle_interoperates_and_dropping_the_old_ca_refuses_its_nodes() -> None:
    old, new = ca(tag="old"), ca(tag="new")  # one overlay ("lab"), two CA keys
    both = TrustAnchor.bundle([old.anchor, new.anchor])
    a_key, b_key = (X25519PrivateKey.generate().private_bytes_raw() for _ in range(2))
    a = _on(new, "alice", "10.77.0.2", both, a_key)  # already on the new CA
    b = _on(old, "bob", "10.77.0.3", both, b_key)  # still on the old one
    wire = _pair(a=a, b=b)
    wire.a.link.connect(wire.now)
    wire.flush()
    wire.run(NOW + 1)
    assert wire.a.link.state is LinkState.ESTABLISHED and wire.b.link.state is LinkState.ESTABLISHED
    assert wire.a.link.recheck_peer(wire.now)  # still trusted: nothing changes
    assert wire.a.link.current is not None and not wire.a.of(PeerRefused)

    # alice drops the old CA (SIGHUP): bob's certificate is refused at once, not at expiry
    new_only = hs.LocalIdentity(a_key, a.bundle.cert_der, new.anchor)
    wire.a.link.reconfigure(local=new_only)
    assert not wire.a.link.recheck_peer(wire.now)
    wire.a.pump()
    (refused,) = wire.a.of(PeerRefused)
    assert "not signed by overlay CA 'lab'" in refused.reason
    assert wire.a.link.current is None and wire.a.link.sessions == ()
    # and bob's next handshake is refused too
    with pytest.raises(BadPacket, match="not signed"):
        wire.b.link.rekey(wire.now)
        (init,) = wire.b.link.datagrams_to_send()
        consume_initiation_untrusted(new_only, init, Cipher.AES_256_GCM, wire.now)
