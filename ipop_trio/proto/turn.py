"""TURN client (RFC 8656) as a sans-IO state machine: one allocation on one TURN server.

The node sends everything in `datagrams_to_send()` to `client.server` from its one UDP
socket, and feeds every datagram that comes from the server to `receive_untrusted`, which
returns `(peer, payload)` for relayed data (ChannelData or a Data indication) and None for
the client's own control traffic. Relayed payloads are whatever the peer sent: ICE checks
(feed them to the ICE agent with the relayed address as local base) or link datagrams.
`wrap(peer, payload)` makes the datagram that carries a payload to a peer.

What it does, by RFC 8656 section:
  7     Allocate, with long-term credentials (RFC 8489 §9.2): the first request goes without
        them; a 401 brings REALM and NONCE and the request is sent again signed; a 438
        (stale nonce) brings a new NONCE and the request is sent again. A 437 (allocation
        mismatch: an allocation of an earlier run on the same 5-tuple) is cleared with a
        Refresh of lifetime 0, then Allocate is tried once more.
  8     Refresh, REFRESH_MARGIN before the lifetime ends; Refresh with lifetime 0 on close.
        `check(now)` sends one now, on a short timer, when the caller suspects the server
        forgot us (consent lost on a relayed pair).
  9     CreatePermission per peer IP, refreshed every PERMISSION_REFRESH (permissions last
        300 s).
  11    ChannelBind (numbers 0x4000..0x4FFF), refreshed every CHANNEL_REFRESH (bindings last
        600 s); a binding also installs and refreshes its peer's permission.
  10    Send and Data indications carry payloads until a channel is bound.
  12    ChannelData afterwards: a 4-byte header instead of a 36-byte (IPv4) indication.

A lost allocation (a TURN server that restarted forgets every allocation) is noticed from
any of its signs, not only from a failed scheduled Refresh: a 437 (Allocation Mismatch) or
400 to a Refresh, CreatePermission or ChannelBind, or no answer to one of them. The client
then reports `AllocationLost` and stops; the caller makes a new client (a new allocation,
a new relayed address) with backoff.

ChannelData (§12.4), padded to a multiple of 4 bytes (optional over UDP, §12.5; the
receiver takes the length from the header and accepts either):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Channel Number        |            Length             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    /                       Application Data                        /
    /                                                               /
    |                                                               |
    |                               +-------------------------------+
    |                               |  padding (0..3 bytes)         |
    +-------------------------------+-------------------------------+

The first byte of a ChannelData message is 0x40..0x4F, which is how `wire.DEMUX` tells it
from STUN (0..3) and from our own datagrams (RFC 7983 ranges).

This module must never read a clock, touch a socket or an event loop (a test scans the
imports), or raise anything but `BadPacket` from an `*_untrusted` function.
"""

from __future__ import annotations

import collections
import enum
import random
import struct
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from ..errors import BadPacket, LocalProtocolError
from . import stun
from .stun import Addr, Class, Message, Method, StunTransaction

# --- Protocol constants (RFC 8656) --------------------------------------------------------

CHANNEL_HEADER = struct.Struct("!HH")  # channel number, length of the application data
CHANNEL_HEADER_SIZE = CHANNEL_HEADER.size  # 4
CHANNEL_MIN = 0x4000  # §12: 0x4000 through 0x4FFF
CHANNEL_MAX = 0x4FFF
DEFAULT_LIFETIME = 600  # §7.2: the default allocation lifetime, seconds
PERMISSION_LIFETIME = 300.0  # §9
CHANNEL_LIFETIME = 600.0  # §11

# --- Tuning knobs -------------------------------------------------------------------------

REFRESH_MARGIN = 60.0  # refresh the allocation this long before it ends (§8: "1 minute")
PERMISSION_REFRESH = PERMISSION_LIFETIME - 60.0  # 4 min: well inside the 5 min lifetime
CHANNEL_REFRESH = CHANNEL_LIFETIME - 60.0  # 9 min: inside the 10 min lifetime
MAX_AUTH_RETRIES = 3  # 401 / 438 round trips one request may take
# `check`: a Refresh on a short timer (0, .5, 1.5, 3.5 s; no answer by 5 s: lost), at most
# once per CHECK_INTERVAL however often the caller asks.
CHECK_RC, CHECK_RM = 4, 3
CHECK_INTERVAL = 5.0
# Errors to a request on an allocation that mean the server does not have it (any more):
# 437 is RFC 8656's answer; coturn answers CreatePermission / ChannelBind for an allocation
# it forgot with 400.
LOST_CODES = frozenset({stun.BAD_REQUEST, stun.ALLOCATION_MISMATCH})
PAD_CHANNEL_DATA = True


class TurnState(enum.Enum):
    IDLE = "idle"  # `allocate` not called yet
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    FAILED = "failed"  # the allocation could not be made, or was lost: make a new client
    CLOSED = "closed"


# --- Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocated:
    """The relay exists: `relayed` is the relay candidate's address, `mapped` our address
    as the server sees it (a server-reflexive candidate for free)."""

    relayed: Addr
    mapped: Addr | None
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """Allocate failed (`code` is the STUN error, None for a timeout)."""

    reason: str
    code: int | None = None


@dataclass(frozen=True, slots=True)
class AllocationLost:
    """An allocation we had is gone (the server said so with a 437 / 400, did not answer,
    or the lifetime ran out). Relayed pairs are dead; `code` is the STUN error, if any."""

    reason: str
    code: int | None = None


@dataclass(frozen=True, slots=True)
class PermissionFailed:
    peer_ip: str
    reason: str


@dataclass(frozen=True, slots=True)
class ChannelBound:
    """`wrap(peer, ...)` now makes ChannelData."""

    peer: Addr
    channel: int


@dataclass(frozen=True, slots=True)
class ChannelBindFailed:
    peer: Addr
    reason: str


TurnEvent = (
    Allocated
    | AllocationFailed
    | AllocationLost
    | PermissionFailed
    | ChannelBound
    | ChannelBindFailed
)


class _Kind(enum.Enum):
    ALLOCATE = "allocate"
    REFRESH = "refresh"
    CLEAR = "clear"  # Refresh lifetime 0 after a 437, before a new Allocate
    PERMISSION = "permission"
    CHANNEL = "channel"
    CHECK = "check"  # a Refresh sent because the caller suspects a loss, on a short timer


@dataclass(eq=False, slots=True)
class _Request:
    kind: _Kind
    msg: Message  # unsigned: credentials are added each time it is (re)signed
    tx: StunTransaction
    signed: bool
    peer: Addr | None = None
    auth_retries: int = 0


@dataclass(eq=False, slots=True)
class _Permission:
    active: bool = False
    pending: bool = False
    refresh_at: float | None = None


@dataclass(eq=False, slots=True)
class _Channel:
    number: int
    bound: bool = False
    pending: bool = False
    refresh_at: float | None = None


# --- ChannelData (pure functions) ---------------------------------------------------------


def channel_data(channel: int, payload: bytes, *, pad: bool = PAD_CHANNEL_DATA) -> bytes:
    """One ChannelData message (§12.4)."""
    framed, _ = channel_data_iov(channel, [payload, b""], [len(payload)], pad=pad)
    return b"".join(framed)


def channel_data_iov(
    channel: int, iov: list[bytes], sizes: list[int], *, pad: bool = PAD_CHANNEL_DATA
) -> tuple[list[bytes], list[int]]:
    """ChannelData messages (§12.4) around datagrams given as a scatter-gather list of two
    parts each (`iov[2i]`, `iov[2i+1]`, together `sizes[i]` bytes), without joining them:
    the 4-byte header goes in front of the first part, the padding after the second.
    Returns the framed list (two parts each again) and the framed sizes."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise LocalProtocolError(f"channel number {channel:#x} out of range")
    framed: list[bytes] = []
    framed_sizes: list[int] = []
    header = CHANNEL_HEADER.pack
    for i, size in enumerate(sizes):
        if size > 0xFFFF:
            raise LocalProtocolError("ChannelData payload longer than 65535 bytes")
        padding = -size & 3 if pad else 0
        framed.append(header(channel, size) + iov[2 * i])
        tail = iov[2 * i + 1]
        framed.append(tail + bytes(padding) if padding else tail)
        framed_sizes.append(CHANNEL_HEADER_SIZE + size + padding)
    return framed, framed_sizes


def parse_channel_data_untrusted(datagram: bytes | memoryview) -> tuple[int, bytes]:
    """(channel number, application data) of a ChannelData datagram, or BadPacket (§12.6:
    a datagram shorter than the claimed length is discarded; at most 3 padding bytes)."""
    if len(datagram) < CHANNEL_HEADER_SIZE:
        raise BadPacket("ChannelData shorter than its header")
    channel, length = CHANNEL_HEADER.unpack_from(datagram)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise BadPacket(f"channel number {channel:#x} out of range")
    extra = len(datagram) - CHANNEL_HEADER_SIZE - length
    if not 0 <= extra <= 3:
        raise BadPacket("ChannelData length does not match the datagram")
    return channel, bytes(datagram[CHANNEL_HEADER_SIZE : CHANNEL_HEADER_SIZE + length])


# --- The client ---------------------------------------------------------------------------


class TurnClient:
    """One allocation on `server` with long-term credentials, sans-IO.

    `allocate(now)` starts; then the usual loop: `receive_untrusted(datagram, now)` for each
    datagram from the server, `handle_timeout(now)` at `next_deadline()`, send
    `datagrams_to_send()` to `server`, drain `next_event()`."""

    def __init__(
        self,
        server: Addr,
        username: str,
        password: str,
        *,
        rng: random.Random | None = None,
        lifetime: int = DEFAULT_LIFETIME,
        software: str | None = None,
        rto: float = stun.RTO,
        rc: int = stun.RC,
        rm: int = stun.RM,
    ) -> None:
        self.server = server
        self.username = username
        self._password = password
        stun.saslprep(password)  # refuse a password that can never make a key, now
        self._rng = rng or random.SystemRandom()
        self.lifetime = lifetime
        self.software = software
        self._timer = (rto, rc, rm)
        self.state = TurnState.IDLE
        self.realm: str | None = None
        self.nonce: str | None = None
        self._key: bytes | None = None
        self.relayed: Addr | None = None
        self.mapped: Addr | None = None
        self._expires_at: float | None = None
        self._refresh_at: float | None = None
        self._cleared = False
        self._checked_at: float | None = None
        self._requests: dict[bytes, _Request] = {}
        self._permissions: dict[str, _Permission] = {}
        self._channels: dict[Addr, _Channel] = {}
        self._channel_peers: dict[int, Addr] = {}
        self._next_channel = CHANNEL_MIN
        self._out: list[bytes] = []
        self._events: collections.deque[TurnEvent] = collections.deque()
        self.stats: collections.Counter[str] = collections.Counter()

    # --- Commands -------------------------------------------------------------------------

    def allocate(self, now: float) -> None:
        if self.state is not TurnState.IDLE:
            raise LocalProtocolError(f"allocate in state {self.state.value}")
        self.state = TurnState.ALLOCATING
        self._send_allocate(now)

    def create_permission(self, peer_ip: str, now: float) -> None:
        """Let `peer_ip` send to the relay (§9); kept fresh until `close`. Call it for every
        remote candidate the ICE agent will check through this relay."""
        perm = self._permissions.setdefault(peer_ip, _Permission())
        if self.state is TurnState.ALLOCATED and not (perm.active or perm.pending):
            self._send_permission(peer_ip, now)

    def retain_permissions(self, ips: Collection[str]) -> None:
        """Keep permissions only for the peer addresses in `ips`, and those of bound
        channels: the rest are no longer refreshed and lapse on the server within its
        permission lifetime (TURN has no delete, §9). Call it with what live ICE agents may
        still check, so the set is bounded by them and not by every address members ever
        sent. Channels stay: one is bound only for a pair a link chose (§11), and a path in
        use may outlive the agent that found it (an ICE restart)."""
        channel_ips = {peer[0] for peer in self._channels}
        for ip in [ip for ip in self._permissions if ip not in ips and ip not in channel_ips]:
            del self._permissions[ip]

    @property
    def permitted(self) -> frozenset[str]:
        """Peer IPs this client keeps a permission for (asked for, pending or active)."""
        return frozenset(self._permissions)

    def bind_channel(self, peer: Addr, now: float) -> int:
        """Bind a channel to `peer` (§11) and return its number; `wrap` uses it once bound
        (`ChannelBound`). Idempotent per peer."""
        chan = self._channels.get(peer)
        if chan is None:
            if self._next_channel > CHANNEL_MAX:
                raise LocalProtocolError("no channel numbers left")
            chan = _Channel(self._next_channel)
            self._next_channel += 1
            self._channels[peer] = chan
            self._channel_peers[chan.number] = peer
            self._permissions.setdefault(peer[0], _Permission())
        if self.state is TurnState.ALLOCATED and not (chan.bound or chan.pending):
            self._send_channel_bind(peer, chan, now)
        return chan.number

    def check(self, now: float) -> bool:
        """Ask the server now whether it still has the allocation (a Refresh on a short
        timer): call it when relayed traffic stopped (consent lost on a relayed pair). An
        answer extends the lifetime; a 437 / 400 or silence ends in `AllocationLost`. At
        most one per CHECK_INTERVAL and none while a Refresh is in flight; True if sent."""
        if self.state is not TurnState.ALLOCATED or self._key is None:
            return False
        if self._checked_at is not None and now - self._checked_at < CHECK_INTERVAL:
            return False
        if any(r.kind in _REFRESHES for r in self._requests.values()):
            return False
        self._checked_at = now
        msg = Message(
            Method.REFRESH,
            Class.REQUEST,
            self._tid(),
            software=self.software,
            lifetime=self.lifetime,
        )
        self._transmit(_Request(_Kind.CHECK, msg, self._new_tx(msg, now, _Kind.CHECK), True))
        return True

    def close(self, now: float) -> None:
        """Release the allocation (Refresh with lifetime 0, §8; sent once, not retried)."""
        if self.state is TurnState.ALLOCATED and self._key is not None:
            msg = Message(Method.REFRESH, Class.REQUEST, self._tid(), lifetime=0)
            self._out.append(self._sign(msg))
        self.state = TurnState.CLOSED
        self._requests.clear()

    # --- Data -----------------------------------------------------------------------------

    def wrap(self, peer: Addr, payload: bytes) -> bytes:
        """The datagram (to `server`) that relays `payload` to `peer`: ChannelData if a
        channel is bound, else a Send indication (§10.1; needs a permission for the IP)."""
        chan = self._channels.get(peer)
        if chan is not None and chan.bound:
            return channel_data(chan.number, payload)
        msg = Message(
            Method.SEND, Class.INDICATION, self._tid(), xor_peer_address=(peer,), data=payload
        )
        return stun.encode(msg, fingerprint=False)

    def bound_channel(self, peer: Addr) -> int | None:
        """The channel number bound to `peer`, or None (then `wrap` makes Send indications).
        The data path frames ChannelData itself with it (no copy of the payload)."""
        chan = self._channels.get(peer)
        return chan.number if chan is not None and chan.bound else None

    def unwrap_untrusted(self, datagram: bytes | memoryview) -> tuple[Addr, bytes]:
        """(peer, payload) of relayed data from the server: ChannelData on a bound channel
        (§12.6) or a Data indication (§10.4). Anything else is BadPacket."""
        if not datagram:
            raise BadPacket("empty datagram")
        first = datagram[0]
        if 0x40 <= first <= 0x4F:
            number, payload = parse_channel_data_untrusted(datagram)
            peer = self._channel_peers.get(number)
            chan = self._channels.get(peer) if peer is not None else None
            if peer is None or chan is None or not chan.bound:
                raise BadPacket(f"ChannelData on unbound channel {number:#x}")
            return peer, payload
        msg = stun.parse_untrusted(datagram)
        return self._data_indication(msg)

    def receive_untrusted(
        self, datagram: bytes | memoryview, now: float
    ) -> tuple[Addr, bytes] | None:
        """A datagram from the server: relayed data → (peer, payload); a response to one
        of our requests → None (state moves on, events may follow). Raises BadPacket for
        anything malformed, unexpected or unauthenticated."""
        if self.state is TurnState.CLOSED:
            raise BadPacket("TURN client closed")
        if datagram and 0x40 <= datagram[0] <= 0x4F:
            return self.unwrap_untrusted(datagram)
        msg = stun.parse_untrusted(datagram)
        if msg.cls is Class.INDICATION:
            return self._data_indication(msg)
        if msg.cls is Class.REQUEST:
            raise BadPacket("a request from the TURN server")
        request = self._requests.get(msg.transaction_id)
        if request is None:
            raise BadPacket("response to no pending request")
        if msg.method is not request.msg.method:
            raise BadPacket("response method does not match the request")
        if request.signed and self._key is not None:
            # RFC 8489 §9.2.5: success responses to signed requests must verify; error
            # responses are checked when they carry MESSAGE-INTEGRITY (401/438 do not).
            if msg.has_integrity and not stun.verify_integrity(msg, self._key):
                raise BadPacket("MESSAGE-INTEGRITY does not verify")
            if msg.cls is Class.SUCCESS and not msg.has_integrity:
                raise BadPacket("unsigned success response to a signed request")
        del self._requests[msg.transaction_id]
        request.tx.complete()
        if msg.cls is Class.ERROR:
            self._on_error(request, msg, now)
        else:
            self._on_success(request, msg, now)
        return None

    def _data_indication(self, msg: Message) -> tuple[Addr, bytes]:
        if msg.method is not Method.DATA or msg.cls is not Class.INDICATION:
            raise BadPacket("not a Data indication")
        if not msg.xor_peer_address or msg.data is None:
            raise BadPacket("Data indication without XOR-PEER-ADDRESS or DATA")
        return msg.xor_peer_address[0], msg.data

    # --- Sans-IO interface ----------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Datagrams for `server`; the list is handed over."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        if self.state in (TurnState.FAILED, TurnState.CLOSED, TurnState.IDLE):
            return None
        times = [d for r in self._requests.values() if (d := r.tx.next_deadline()) is not None]
        if self.state is TurnState.ALLOCATED:
            assert self._refresh_at is not None and self._expires_at is not None
            if not any(r.kind in _REFRESHES for r in self._requests.values()):
                times.append(self._refresh_at)
            times.append(self._expires_at)
            # A refresh in flight has its own transaction deadline.
            times += [
                p.refresh_at
                for p in self._permissions.values()
                if p.refresh_at is not None and not p.pending
            ]
            times += [
                c.refresh_at
                for c in self._channels.values()
                if c.refresh_at is not None and not c.pending
            ]
        return min(times, default=None)

    def handle_timeout(self, now: float) -> None:
        if self.state in (TurnState.FAILED, TurnState.CLOSED, TurnState.IDLE):
            return
        for tid, request in list(self._requests.items()):
            if request.tx.handle_timeout(now):
                self._out.append(request.tx.request)
            elif request.tx.done:
                del self._requests[tid]
                self._on_failure(request, "timeout", None, now)
                if self.state is TurnState.FAILED:
                    return  # lost: every other request went with it
        if self.state is not TurnState.ALLOCATED:
            return
        assert self._refresh_at is not None and self._expires_at is not None
        if now >= self._expires_at:
            self._lose("allocation expired")
            return
        if now >= self._refresh_at and not any(
            r.kind in _REFRESHES for r in self._requests.values()
        ):
            self._send(Method.REFRESH, _Kind.REFRESH, now, lifetime=self.lifetime)
        for ip, perm in self._permissions.items():
            if perm.refresh_at is not None and now >= perm.refresh_at and not perm.pending:
                self._send_permission(ip, now)
        for peer, chan in self._channels.items():
            if chan.refresh_at is not None and now >= chan.refresh_at and not chan.pending:
                self._send_channel_bind(peer, chan, now)

    # --- Requests -------------------------------------------------------------------------

    def _tid(self) -> bytes:
        return stun.new_transaction_id(self._rng)

    def _sign(self, msg: Message) -> bytes:
        """Long-term credentials (RFC 8489 §9.2.4) once the server told us REALM and NONCE."""
        if self._key is None:
            return stun.encode(msg, fingerprint=True)
        signed = replace(msg, username=self.username, realm=self.realm, nonce=self.nonce)
        return stun.encode(signed, key=self._key, fingerprint=True)

    def _send(
        self, method: Method, kind: _Kind, now: float, *, peer: Addr | None = None, **attrs: Any
    ) -> None:
        msg = Message(method, Class.REQUEST, self._tid(), software=self.software, **attrs)
        self._transmit(
            _Request(kind, msg, self._new_tx(msg, now, kind), self._key is not None, peer)
        )

    def _new_tx(self, msg: Message, now: float, kind: _Kind) -> StunTransaction:
        rto, rc, rm = self._timer
        if kind is _Kind.CHECK:
            rc, rm = CHECK_RC, CHECK_RM
        return StunTransaction(msg.transaction_id, self._sign(msg), now, rto=rto, rc=rc, rm=rm)

    def _transmit(self, request: _Request) -> None:
        self._requests[request.msg.transaction_id] = request
        self._out.append(request.tx.request)
        self.stats[f"tx_{request.kind.value}"] += 1

    def _retry(self, request: _Request, now: float) -> None:
        """The same request as a new transaction, signed with the current realm / nonce."""
        msg = replace(request.msg, transaction_id=self._tid())
        retry = _Request(
            request.kind,
            msg,
            self._new_tx(msg, now, request.kind),
            True,
            request.peer,
            request.auth_retries + 1,
        )
        self._transmit(retry)

    def _send_allocate(self, now: float) -> None:
        self._send(
            Method.ALLOCATE,
            _Kind.ALLOCATE,
            now,
            requested_transport=stun.PROTO_UDP,
            lifetime=self.lifetime,
        )

    def _send_permission(self, ip: str, now: float) -> None:
        self._permissions[ip].pending = True
        self._send(
            Method.CREATE_PERMISSION,
            _Kind.PERMISSION,
            now,
            peer=(ip, 0),
            xor_peer_address=((ip, 0),),
        )

    def _send_channel_bind(self, peer: Addr, chan: _Channel, now: float) -> None:
        chan.pending = True
        self._send(
            Method.CHANNEL_BIND,
            _Kind.CHANNEL,
            now,
            peer=peer,
            channel_number=chan.number,
            xor_peer_address=(peer,),
        )

    # --- Responses ------------------------------------------------------------------------

    def _on_error(self, request: _Request, msg: Message, now: float) -> None:
        code = msg.error_code.code if msg.error_code is not None else 0
        self.stats[f"rx_error_{code}"] += 1
        if request.kind is _Kind.CLEAR and code not in (stun.UNAUTHORIZED, stun.STALE_NONCE):
            self._send_allocate(now)  # 437 here: the old allocation is gone already
            return
        if code in (stun.UNAUTHORIZED, stun.STALE_NONCE):
            # RFC 8489 §9.2.5: 401 → sign with the REALM / NONCE given (once: a 401 to a
            # signed request means the credentials are wrong); 438 → the new NONCE.
            if msg.realm is None or msg.nonce is None:
                self._on_failure(request, f"{code} without REALM/NONCE", code, now)
                return
            if request.auth_retries >= MAX_AUTH_RETRIES or (
                code == stun.UNAUTHORIZED and request.signed and msg.realm == self.realm
            ):
                self._on_failure(request, "unauthorized (bad credentials?)", code, now)
                return
            if msg.realm != self.realm or self._key is None:
                self.realm = msg.realm
                self._key = stun.long_term_key(self.username, msg.realm, self._password)
            self.nonce = msg.nonce
            self._retry(request, now)
            return
        if (
            code == stun.ALLOCATION_MISMATCH
            and request.kind is _Kind.ALLOCATE
            and not self._cleared
            and self._key is not None
        ):
            # §7.2 / §8: an old allocation holds our 5-tuple; delete it, then retry.
            self._cleared = True
            self._send(Method.REFRESH, _Kind.CLEAR, now, lifetime=0)
            return
        reason = msg.error_code.reason if msg.error_code is not None else ""
        if (
            code in LOST_CODES
            and request.kind in _ON_ALLOCATION
            and self.state is TurnState.ALLOCATED
        ):
            self._lose(f"{request.kind.value}: error {code} {reason}".strip(), code)
            return
        self._on_failure(request, f"error {code} {reason}".strip(), code, now)

    def _on_success(self, request: _Request, msg: Message, now: float) -> None:
        self.stats[f"rx_{request.kind.value}"] += 1
        if request.kind is _Kind.ALLOCATE:
            if msg.xor_relayed_address is None or msg.lifetime is None:
                self._on_failure(request, "Allocate success without relayed address", None, now)
                return
            self.relayed = msg.xor_relayed_address
            self.mapped = msg.xor_mapped_address
            self.state = TurnState.ALLOCATED
            self._set_lifetime(msg.lifetime, now)
            self._events.append(Allocated(self.relayed, self.mapped, msg.lifetime))
            # Permissions and channels asked for before the allocation existed (a channel
            # binding installs its peer's permission itself).
            bound_ips = {peer[0] for peer in self._channels}
            for ip in self._permissions:
                if ip not in bound_ips:
                    self._send_permission(ip, now)
            for peer, chan in self._channels.items():
                self._send_channel_bind(peer, chan, now)
        elif request.kind in (_Kind.REFRESH, _Kind.CHECK):
            self._set_lifetime(msg.lifetime if msg.lifetime is not None else self.lifetime, now)
        elif request.kind is _Kind.CLEAR:
            self._send_allocate(now)
        elif request.kind is _Kind.PERMISSION:
            assert request.peer is not None
            self._permission_ok(request.peer[0], now)
        elif request.kind is _Kind.CHANNEL:
            assert request.peer is not None
            chan = self._channels[request.peer]
            chan.pending = False
            first = not chan.bound
            chan.bound = True
            chan.refresh_at = now + CHANNEL_REFRESH
            self._permission_ok(request.peer[0], now)  # §11: a binding refreshes it too
            if first:
                self._events.append(ChannelBound(request.peer, chan.number))

    def _permission_ok(self, ip: str, now: float) -> None:
        perm = self._permissions.get(ip)
        if perm is None:
            return  # given up (retain_permissions) while the request was in flight
        perm.active = True
        perm.pending = False
        perm.refresh_at = now + PERMISSION_REFRESH

    def _set_lifetime(self, lifetime: int, now: float) -> None:
        self._expires_at = now + lifetime
        margin = REFRESH_MARGIN if lifetime > 2 * REFRESH_MARGIN else lifetime / 2
        self._refresh_at = now + lifetime - margin

    def _on_failure(self, request: _Request, reason: str, code: int | None, now: float) -> None:
        kind = request.kind
        if kind in (_Kind.ALLOCATE, _Kind.CLEAR):
            if self.state is TurnState.ALLOCATING:
                self.state = TurnState.FAILED
                self._requests.clear()
                self._events.append(AllocationFailed(reason, code))
        elif kind in (_Kind.REFRESH, _Kind.CHECK):
            self._lose(f"{kind.value} failed: {reason}", code)
        elif code is None and self.state is TurnState.ALLOCATED:
            # No answer to a CreatePermission / ChannelBind: the server is gone, and with it
            # (if it comes back) our allocation.
            self._lose(f"{kind.value}: no answer")
        elif kind is _Kind.PERMISSION:
            assert request.peer is not None
            ip = request.peer[0]
            self._permissions.pop(ip, None)
            self._events.append(PermissionFailed(ip, reason))
        elif kind is _Kind.CHANNEL:
            assert request.peer is not None
            # Fall back to Send indications; a new bind takes a new number (§11: a number
            # is not reused for another peer soon after).
            chan = self._channels.pop(request.peer)
            del self._channel_peers[chan.number]
            self._events.append(ChannelBindFailed(request.peer, reason))

    def _lose(self, reason: str, code: int | None = None) -> None:
        self.state = TurnState.FAILED
        self._requests.clear()
        self.stats["lost"] += 1
        self._events.append(AllocationLost(reason, code))


_REFRESHES = frozenset({_Kind.REFRESH, _Kind.CHECK})
# Requests about an existing allocation: a 437 / 400 to one of them means it is gone.
_ON_ALLOCATION = frozenset({_Kind.REFRESH, _Kind.CHECK, _Kind.PERMISSION, _Kind.CHANNEL})
