"""The TURN client (RFC 8656) against a fake sans-IO TURN server, ChannelData framing, and
fuzzing of the untrusted parsers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket, LocalProtocolError
from ipop_trio.proto import stun, turn
from ipop_trio.proto.stun import Addr, Class, Message, Method
from ipop_trio.proto.turn import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    ChannelBound,
    TurnClient,
    TurnEvent,
    TurnState,
    channel_data,
    parse_channel_data_untrusted,
)

SERVER: Addr = ("198.51.100.1", 3478)
CLIENT: Addr = ("203.0.113.5", 40000)  # as the server sees us
RELAYED: Addr = ("198.51.100.1", 50000)
PEER: Addr = ("203.0.113.9", 6000)
REALM = "example.org"


@dataclass
class FakeTurnServer:
    """Just enough RFC 8656 server to exercise the client: long-term auth with nonces, one
    allocation, permissions, channels, Send/Data indications and ChannelData."""

    users: dict[str, str] = field(default_factory=lambda: {"alice": "s3cret"})
    nonce: str = "nonce-1"
    lifetime: int = 600
    old_allocation: bool = False  # a leftover of an earlier run on our 5-tuple (437)
    stale_next: bool = False  # answer the next signed request with 438
    silent: bool = False  # drop everything
    forgot_code: int = 437  # what CreatePermission / ChannelBind get after `restart` (coturn: 400)
    requests: list[Message] = field(default_factory=list)
    allocated: bool = False
    permissions: dict[str, float] = field(default_factory=dict)
    channels: dict[int, Addr] = field(default_factory=dict)
    to_peers: list[tuple[Addr, bytes]] = field(default_factory=list)

    def handle(self, data: bytes, now: float) -> list[bytes]:
        if self.silent:
            return []
        if 0x40 <= data[0] <= 0x4F:
            number, payload = parse_channel_data_untrusted(data)
            self.to_peers.append((self.channels[number], payload))
            return []
        msg = stun.parse_untrusted(data)
        if msg.cls is Class.INDICATION:
            assert msg.method is Method.SEND
            peer = msg.xor_peer_address[0]
            if peer[0] in self.permissions and msg.data is not None:
                self.to_peers.append((peer, msg.data))
            return []
        self.requests.append(msg)
        if msg.username is None or not msg.has_integrity:
            return [self._error(msg, 401, realm=REALM, nonce=self.nonce)]
        key = stun.long_term_key(msg.username, REALM, self.users.get(msg.username, "?"))
        if not stun.verify_integrity(msg, key):
            return [self._error(msg, 401, realm=REALM, nonce=self.nonce)]
        if self.stale_next or msg.nonce != self.nonce:
            self.stale_next = False
            self.nonce += "x"
            return [self._error(msg, 438, realm=REALM, nonce=self.nonce)]
        ok = stun.success_response
        if msg.method is Method.ALLOCATE:
            if self.allocated or self.old_allocation:
                return [self._error(msg, 437, key=key)]
            assert msg.requested_transport == 17
            self.allocated = True
            reply = ok(
                msg, xor_relayed_address=RELAYED, xor_mapped_address=CLIENT, lifetime=self.lifetime
            )
        elif msg.method is Method.REFRESH:
            if not (self.allocated or self.old_allocation):
                return [self._error(msg, 437, key=key)]
            if msg.lifetime == 0:
                self.allocated = self.old_allocation = False
            reply = ok(msg, lifetime=msg.lifetime if msg.lifetime is not None else self.lifetime)
        elif msg.method in (Method.CREATE_PERMISSION, Method.CHANNEL_BIND) and not self.allocated:
            return [self._error(msg, self.forgot_code, key=key)]
        elif msg.method is Method.CREATE_PERMISSION:
            for peer in msg.xor_peer_address:
                self.permissions[peer[0]] = now + 300
            reply = ok(msg)
        elif msg.method is Method.CHANNEL_BIND:
            assert msg.channel_number is not None
            peer = msg.xor_peer_address[0]
            self.channels[msg.channel_number] = peer
            self.permissions[peer[0]] = now + 300
            reply = ok(msg)
        else:
            return [self._error(msg, 400, key=key)]
        return [stun.encode(reply, key=key)]

    def restart(self) -> None:
        """The server process restarted: it forgot every allocation, permission and channel."""
        self.allocated = False
        self.permissions.clear()
        self.channels.clear()

    def _error(self, msg: Message, code: int, *, key: bytes | None = None, **attrs: str) -> bytes:
        return stun.encode(stun.error_response(msg, code, "", **attrs), key=key)  # type: ignore[arg-type]

    def from_peer(self, peer: Addr, payload: bytes) -> bytes:
        for number, bound in self.channels.items():
            if bound == peer:
                return channel_data(number, payload, pad=False)
        msg = Message(
            Method.DATA, Class.INDICATION, b"\x09" * 12, xor_peer_address=(peer,), data=payload
        )
        return stun.encode(msg)

    def count(self, method: Method) -> int:
        return sum(1 for m in self.requests if m.method is method)


def new_client(**kw: object) -> TurnClient:
    return TurnClient(SERVER, "alice", "s3cret", rng=random.Random(5), **kw)  # type: ignore[arg-type]


def pump(client: TurnClient, server: FakeTurnServer, now: float) -> list[TurnEvent]:
    """Deliver datagrams both ways until quiet; return the client's events."""
    for _ in range(100):
        out = client.datagrams_to_send()
        if not out:
            break
        for datagram in out:
            for reply in server.handle(datagram, now):
                client.receive_untrusted(reply, now)
    events = []
    while (event := client.next_event()) is not None:
        events.append(event)
    return events


def advance(client: TurnClient, server: FakeTurnServer, until: float) -> list[TurnEvent]:
    events: list[TurnEvent] = []
    for _ in range(100_000):
        deadline = client.next_deadline()
        if deadline is None or deadline > until:
            return events
        client.handle_timeout(deadline)
        events += pump(client, server, deadline)
    raise AssertionError("a deadline that never moves")


def allocated(server: FakeTurnServer | None = None) -> tuple[TurnClient, FakeTurnServer]:
    server = server or FakeTurnServer()
    client = new_client()
    client.allocate(0.0)
    (event,) = pump(client, server, 0.0)
    assert isinstance(event, Allocated)
    return client, server


# --- Allocate, authentication, refresh ----------------------------------------------------


def test_allocate_with_long_term_credentials() -> None:
    server = FakeTurnServer()
    client = new_client()
    client.allocate(0.0)
    events = pump(client, server, 0.0)
    assert events == [Allocated(RELAYED, CLIENT, 600)]
    assert client.state is TurnState.ALLOCATED
    first, second = server.requests
    assert not first.has_integrity and first.username is None  # §7.1: first try unsigned
    assert second.username == "alice" and second.realm == REALM and second.nonce == "nonce-1"
    assert second.requested_transport == 17
    assert client.stats["rx_error_401"] == 1


def test_wrong_password_fails_after_one_signed_try() -> None:
    server = FakeTurnServer(users={"alice": "other"})
    client = new_client()
    client.allocate(0.0)
    (event,) = pump(client, server, 0.0)
    assert isinstance(event, AllocationFailed) and event.code == 401
    assert client.state is TurnState.FAILED and client.next_deadline() is None
    assert server.count(Method.ALLOCATE) == 2


def test_no_answer_fails_after_the_rfc_schedule() -> None:
    client = new_client()
    client.allocate(0.0)
    server = FakeTurnServer(silent=True)
    events = advance(client, server, 100.0)
    assert events == [AllocationFailed("timeout", None)]
    assert len(client.datagrams_to_send()) == 0


def test_refresh_before_expiry_with_a_stale_nonce_on_the_way() -> None:
    client, server = allocated()
    assert advance(client, server, 500.0) == []
    server.stale_next = True
    events = advance(client, server, 3000.0)
    assert events == []  # 438 → new nonce → retried, no loss
    assert client.state is TurnState.ALLOCATED
    # Lifetime 600 s, refreshed 60 s before it ends: at 540, 1080, ... 2700.
    assert server.count(Method.REFRESH) == 5 + 1  # one of them answered 438 first
    assert client.nonce == "nonce-1x"
    assert client.stats["rx_error_438"] == 1


def test_allocation_lost_when_the_server_goes_quiet() -> None:
    client, server = allocated()
    server.silent = True
    events = advance(client, server, 2000.0)
    assert len(events) == 1 and isinstance(events[0], AllocationLost)
    assert client.state is TurnState.FAILED


def test_server_going_quiet_fails_refreshes_without_spinning() -> None:
    client, server = allocated()
    client.create_permission(PEER[0], 1.0)
    client.bind_channel(("203.0.113.10", 7000), 1.0)
    pump(client, server, 1.0)
    server.silent = True
    events = advance(client, server, 2000.0)
    kinds = [type(e).__name__ for e in events]
    # The first permission refresh (at 240 s) goes unanswered: the allocation is lost then,
    # not 300 s later when the allocation's own refresh would have failed.
    assert kinds == ["AllocationLost"] and client.next_deadline() is None
    assert events[0].reason.endswith("no answer")  # type: ignore[union-attr]


# --- A restarted server: the allocation is lost, noticed from any of its signs --------------


@pytest.mark.parametrize("code", [437, 400])
@pytest.mark.parametrize("method", [Method.CREATE_PERMISSION, Method.CHANNEL_BIND])
def test_restarted_server_refusing_a_permission_or_channel_loses_the_allocation(
    method: Method, code: int
) -> None:
    client, server = allocated(FakeTurnServer(forgot_code=code))
    server.restart()
    if method is Method.CREATE_PERMISSION:
        client.create_permission(PEER[0], 5.0)
    else:
        client.bind_channel(PEER, 5.0)
    events = pump(client, server, 5.0)
    assert events == [AllocationLost(events[0].reason, code)]  # type: ignore[union-attr]
    assert client.state is TurnState.FAILED and client.next_deadline() is None
    assert client.stats["lost"] == 1


def test_check_after_a_restart_loses_the_allocation_at_once() -> None:
    client, server = allocated()
    server.restart()
    assert client.check(20.0)
    events = pump(client, server, 20.0)
    assert len(events) == 1 and isinstance(events[0], AllocationLost)
    assert events[0].code == 437 and "check" in events[0].reason
    assert client.state is TurnState.FAILED


def test_check_on_a_live_allocation_refreshes_it_and_is_rate_limited() -> None:
    client, server = allocated()
    assert client.check(20.0)
    assert pump(client, server, 20.0) == []
    assert client.state is TurnState.ALLOCATED
    assert not client.check(21.0)  # within CHECK_INTERVAL: not sent again
    assert client.datagrams_to_send() == []
    # The lifetime now runs from the check: the next scheduled refresh is at 20 + 540.
    assert client.next_deadline() == pytest.approx(20.0 + 540.0)
    assert client.check(20.0 + turn.CHECK_INTERVAL)


def test_check_unanswered_loses_the_allocation_within_five_seconds() -> None:
    client, server = allocated()
    server.silent = True
    assert client.check(100.0)
    events = advance(client, server, 106.0)
    assert len(events) == 1 and isinstance(events[0], AllocationLost)
    assert events[0].code is None
    assert server.count(Method.REFRESH) == 0  # silent: nothing recorded
    assert client.state is TurnState.FAILED


def test_refresh_answered_437_after_a_restart_loses_the_allocation() -> None:
    client, server = allocated()
    server.restart()
    events = advance(client, server, 600.0)
    assert len(events) == 1 and isinstance(events[0], AllocationLost)
    assert events[0].code == 437


def test_forbidden_permission_is_not_a_lost_allocation() -> None:
    client, server = allocated()
    client.create_permission("192.0.2.77", 1.0)
    (request,) = client.datagrams_to_send()
    msg = stun.parse_untrusted(request)
    key = stun.long_term_key("alice", REALM, "s3cret")
    reply = stun.encode(stun.error_response(msg, 403, "Forbidden"), key=key)
    client.receive_untrusted(reply, 1.0)
    (event,) = pump(client, server, 1.0)
    assert isinstance(event, turn.PermissionFailed)
    assert client.state is TurnState.ALLOCATED


def test_allocation_mismatch_clears_the_old_allocation_and_retries() -> None:
    server = FakeTurnServer(old_allocation=True)
    client = new_client()
    client.allocate(0.0)
    events = pump(client, server, 0.0)
    assert events == [Allocated(RELAYED, CLIENT, 600)]
    methods = [m.method for m in server.requests]
    assert methods == [Method.ALLOCATE, Method.ALLOCATE, Method.REFRESH, Method.ALLOCATE]
    assert server.requests[2].lifetime == 0


def test_close_releases_the_allocation() -> None:
    client, server = allocated()
    client.close(10.0)
    (release,) = client.datagrams_to_send()
    (reply,) = server.handle(release, 10.0)
    with pytest.raises(BadPacket):  # a closed client takes nothing more
        client.receive_untrusted(reply, 10.0)
    assert not server.allocated and server.requests[-1].lifetime == 0
    assert client.state is TurnState.CLOSED and client.next_deadline() is None


# --- Permissions, channels, data ------------------------------------------------------------


def test_permission_asked_early_is_sent_after_allocation_and_kept_fresh() -> None:
    server = FakeTurnServer()
    client = new_client()
    client.create_permission(PEER[0], 0.0)
    client.allocate(0.0)
    pump(client, server, 0.0)
    assert PEER[0] in server.permissions
    advance(client, server, 1000.0)
    assert server.count(Method.CREATE_PERMISSION) == 1 + 4  # at 0, 240, 480, 720, 960
    assert server.permissions[PEER[0]] > 1000.0


def test_send_indication_then_channel_data() -> None:
    client, server = allocated()
    client.create_permission(PEER[0], 1.0)
    pump(client, server, 1.0)
    # Before a channel: Send indication out, Data indication in.
    out = client.wrap(PEER, b"hello")
    assert stun.parse_untrusted(out).method is Method.SEND
    server.handle(out, 1.0)
    assert server.to_peers == [(PEER, b"hello")]
    assert client.receive_untrusted(server.from_peer(PEER, b"hi"), 1.0) == (PEER, b"hi")
    # Channel.
    number = client.bind_channel(PEER, 2.0)
    assert turn.CHANNEL_MIN <= number <= turn.CHANNEL_MAX
    assert client.wrap(PEER, b"x")[0] not in range(0x40, 0x50)  # not bound yet
    assert pump(client, server, 2.0) == [ChannelBound(PEER, number)]
    assert client.bind_channel(PEER, 2.0) == number  # idempotent
    out = client.wrap(PEER, b"hello")
    assert out[:4] == bytes.fromhex("4000 0005") and len(out) == 12  # padded to 4
    server.handle(out, 2.0)
    assert server.to_peers[-1] == (PEER, b"hello")
    back = server.from_peer(PEER, b"\x00\x01 data from peer")
    assert back[0] == 0x40
    assert client.receive_untrusted(back, 2.0) == (PEER, b"\x00\x01 data from peer")
    # Refreshed every ~9 minutes (the binding lasts 10).
    advance(client, server, 1200.0)
    assert server.count(Method.CHANNEL_BIND) == 3  # at 2, 542, 1082


def test_responses_must_be_authentic() -> None:
    client, server = allocated()
    client.create_permission(PEER[0], 1.0)
    (request,) = client.datagrams_to_send()
    msg = stun.parse_untrusted(request)
    forged = stun.encode(stun.success_response(msg), key=b"not the key")
    with pytest.raises(BadPacket, match="INTEGRITY"):
        client.receive_untrusted(forged, 1.0)
    unsigned = stun.encode(stun.success_response(msg))
    with pytest.raises(BadPacket, match="unsigned"):
        client.receive_untrusted(unsigned, 1.0)
    stray = stun.encode(stun.success_response(Message(Method.REFRESH, Class.REQUEST, b"\x07" * 12)))
    with pytest.raises(BadPacket):
        client.receive_untrusted(stray, 1.0)
    with pytest.raises(BadPacket):  # ChannelData on a channel never bound
        client.receive_untrusted(channel_data(0x4123, b"x"), 1.0)
    # The real answer still goes through.
    for reply in server.handle(request, 1.0):
        assert client.receive_untrusted(reply, 1.0) is None
    assert client.stats["rx_permission"] == 1


# --- ChannelData framing --------------------------------------------------------------------


@pytest.mark.parametrize("size", range(9))
def test_channel_data_round_trip_and_padding(size: int) -> None:
    payload = bytes(range(size))
    framed = channel_data(0x4ABC, payload)
    assert len(framed) % 4 == 0 and len(framed) == 4 + size + (-size & 3)
    assert parse_channel_data_untrusted(framed) == (0x4ABC, payload)
    unpadded = channel_data(0x4ABC, payload, pad=False)
    assert len(unpadded) == 4 + size
    assert parse_channel_data_untrusted(unpadded) == (0x4ABC, payload)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x40\x00\x00",
        b"\x40\x00\x00\x05abcd",  # shorter than claimed (§12.6)
        b"\x40\x00\x00\x01abcde",  # more than 3 bytes of padding
        b"\x3f\xff\x00\x00",  # below 0x4000
        b"\x50\x00\x00\x00",  # above 0x4FFF
    ],
)
def test_channel_data_refuses(data: bytes) -> None:
    with pytest.raises(BadPacket):
        parse_channel_data_untrusted(data)


def test_channel_data_refuses_our_own_mistakes() -> None:
    with pytest.raises(LocalProtocolError):
        channel_data(0x3FFF, b"")
    with pytest.raises(LocalProtocolError):
        channel_data(0x4000, b"\x00" * 65536)


@settings(max_examples=300)
@given(st.binary(max_size=120))
def test_untrusted_parsers_fuzz(data: bytes) -> None:
    client, _ = _FUZZ
    for parse in (client.unwrap_untrusted, lambda d: client.receive_untrusted(d, 5.0)):
        try:
            parse(data)
        except BadPacket:
            pass
    try:
        parse_channel_data_untrusted(data)
    except BadPacket:
        pass


def _fuzz_client() -> tuple[TurnClient, FakeTurnServer]:
    client, server = allocated()
    client.bind_channel(PEER, 1.0)
    pump(client, server, 1.0)
    return client, server


_FUZZ = _fuzz_client()


def test_retained_permissions_only_are_refreshed() -> None:
    """retain_permissions: the others stop being refreshed, an answer already in flight
    for one does not bring it back, and a bound channel's peer keeps its permission."""
    client, server = allocated()
    other, channel_peer = ("192.0.2.78", 9), ("192.0.2.79", 9)
    client.create_permission(PEER[0], 1.0)
    client.create_permission(other[0], 1.0)
    client.bind_channel(channel_peer, 1.0)
    in_flight = client.datagrams_to_send()
    client.retain_permissions({PEER[0]})
    for datagram in in_flight:
        for reply in server.handle(datagram, 1.0):
            client.receive_untrusted(reply, 1.0)
    assert client.permitted == {PEER[0], channel_peer[0]}
    asked = len(server.requests)
    advance(client, server, 1000.0)
    refreshed = {
        m.xor_peer_address[0][0]
        for m in server.requests[asked:]
        if m.method in (Method.CREATE_PERMISSION, Method.CHANNEL_BIND)
    }
    assert refreshed == {PEER[0], channel_peer[0]}
