"""The per-peer link machine: handshake, sessions, rekey and keepalive timers (sans-IO).

One `Link` per configured peer. It runs the handshakes of `handshake.py` as initiator and
answers the peer's, keeps the peer's sessions the way WireGuard keeps keypairs, and runs
WireGuard's timers (whitepaper §6) off the `now` it is given. It never reads a clock or
touches a socket: the node feeds it handshake messages and wall-clock time, sends what
`datagrams_to_send()` returns, acts on `next_event()`, and calls `handle_timeout(now)` at
`next_deadline()`.

Sessions: WireGuard's keypairs (wireguard-go device/noise-protocol.go), but no session is
dropped early; each lives until REJECT_AFTER_TIME:

    current    the session we send on: the newest confirmed one (None until a handshake
               completes).
    next       (responder only) the session made by answering an initiation. The responder
               may not send on it until it knows the initiator has the keys too, so it is
               confirmed when the first datagram opens on it (`confirm`), and then becomes
               current if it is newer. The initiator sends a keepalive as soon as its
               handshake completes, so that is one RTT. A newer answered initiation replaces
               an unconfirmed `next` (the initiator can only complete its latest attempt).
    older      confirmed sessions that are no longer current: still accepted until they
               expire, so datagrams in flight across a rekey are never lost (WireGuard keeps
               only one `previous` and drops sessions the peer may still be sending on when
               both ends rekey at once). At most MAX_SESSIONS live, the oldest goes first.

Every live session accepts datagrams. When both ends initiate at once, each completes the
handshake it started and sends on that session; the other end accepts it (as an older or
`next` session), so the link works both ways at once without a tie-break.

Timers, all evaluated in `handle_timeout` (the data path only stores times, `note_*`):

    handshake retransmit   REKEY_TIMEOUT + up to 333 ms jitter, a fresh initiation (new
                           ephemeral, new timestamp) each time; give up after
                           REKEY_ATTEMPT_TIME → HandshakeFailed. A cookie reply from a
                           responder under load (proto/cookie.py) is kept for
                           COOKIE_LIFETIME and keys mac2 of the following initiations; it
                           does not make the next one go sooner (WireGuard's rule).
    rekey                  the current session says `should_rekey` (we initiated it and it
                           is REKEY_AFTER_TIME old, or REKEY_AFTER_MESSAGES were sent).
                           Idle links rekey too: which links exist is the controller's call.
    expiry                 REJECT_AFTER_TIME → SessionRetired(local_index).
    passive keepalive      data received, nothing sent for KEEPALIVE_TIMEOUT → keepalive.
    dead peer              data sent, nothing received for KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
                           → new handshake.

Indices: every index the link takes from `allocate_index` (one per initiation attempt, one
per answered initiation) comes back exactly once in a `SessionRetired`, whether it became a
session or not, so the node's index table never leaks.

This module never reads a clock, touches a socket or an event loop (a test scans imports).
"""

from __future__ import annotations

import collections
import enum
import ipaddress
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import BadPacket, CertificateRefused, LocalProtocolError, RemoteProtocolError
from .cert import Identity
from .cookie import COOKIE_LIFETIME, consume_cookie_reply_untrusted
from .handshake import (
    InitiatorState,
    Keys,
    LocalIdentity,
    ResponderState,
    consume_response_untrusted,
    create_initiation,
    create_response,
    initiation_mac1,
)
from .session import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    Cipher,
    Session,
)

# Tuning: WireGuard's retransmit jitter (REKEY_TIMEOUT_JITTER_MAX_MS).
REKEY_TIMEOUT_JITTER = 0.333
# Live sessions per link. Steady state holds 2 (one rekey per REKEY_AFTER_TIME, each living
# REJECT_AFTER_TIME), 4 when both ends rekey at once; the cap bounds a peer that rekeys often.
MAX_SESSIONS = 6


# An initiation whose timestamp is older than this (wall clock, seconds) is refused: a replay
# recorded earlier cannot be used after the receiver restarted or re-added the peer. It is
# generous, since the two clocks only need to agree to within certificate tolerances.
MAX_INITIATION_AGE = 600.0


class LinkState(enum.Enum):
    IDLE = "idle"  # no session to send on, no handshake in flight
    HANDSHAKING = "handshaking"  # no session to send on, an initiation is in flight
    ESTABLISHED = "established"  # a current session (a rekey may be in flight)


# --- Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """A new session exists: register `session.local_index` for inbound datagrams.

    As responder it is the `next` session: it accepts at once but is sent on (becomes
    `Link.current`) only after `confirm`."""

    session: Session
    peer: Identity
    ext: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SessionRetired:
    """`local_index` is free: drop it from the index table (session or handshake)."""

    local_index: int


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """No response for REKEY_ATTEMPT_TIME: the handshake attempt is abandoned."""

    reason: str


@dataclass(frozen=True, slots=True)
class PeerRefused:
    """The peer authenticated but is not who the configuration expects (or its certificate
    was refused): its sessions are dropped and the link is IDLE."""

    reason: str


LinkEvent = SessionEstablished | SessionRetired | HandshakeFailed | PeerRefused


@dataclass(slots=True)
class _Keypair:
    session: Session
    initiator: bool


def _always_secure(peer: Identity, ext: Mapping[str, Any]) -> bool:
    return True


class Link:
    """The link to one peer, known by its static key `peer_static` (raw 32-byte X25519).

    `expect_address` / `expect_name`, when given, must match the peer's certificate.
    `ext` is sent in every handshake message we write (the initiation adds "ts").
    `decide_secure(peer, peer_ext)` chooses secure (AEAD) or plain sessions; default secure.
    `check_peer(peer)`, when given, may refuse an authenticated peer for the node's own
    reasons (a revoked certificate, an address another key holds): a reason, or None.
    `rng` drives the retransmit jitter (tests seed it).
    """

    def __init__(
        self,
        local: LocalIdentity,
        peer_static: bytes,
        *,
        allocate_index: Callable[[], int],
        cipher: Cipher = Cipher.AES_256_GCM,
        expect_address: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None = None,
        expect_name: str | None = None,
        ext: Mapping[str, Any] | None = None,
        decide_secure: Callable[[Identity, Mapping[str, Any]], bool] | None = None,
        rng: random.Random | None = None,
        replay_floor: int = -1,
        make_session: Callable[..., Session] = Session,
        check_peer: Callable[[Identity], str | None] | None = None,
    ) -> None:
        if len(peer_static) != 32:
            raise LocalProtocolError("peer static key must be 32 raw bytes")
        self.local = local
        self.peer_static = bytes(peer_static)
        self.cipher = cipher
        self.expect_address = (
            None if expect_address is None else ipaddress.ip_address(expect_address)
        )
        self.expect_name = expect_name
        self._allocate = allocate_index
        self._ext: Mapping[str, Any] = dict(ext or {})
        self._decide_secure = decide_secure or _always_secure
        self._check_more = check_peer
        self._rng = rng or random.Random()
        # Session's keyword constructor: proto/session.py's, or the native core's twin
        self._new_session = make_session

        self._out: list[bytes] = []
        self._events: collections.deque[LinkEvent] = collections.deque()

        # Handshake as initiator.
        self._pending: InitiatorState | None = None
        self._handshake_index: int | None = None
        self._attempt_started = 0.0
        self._retransmit_at = 0.0
        self._last_ts_sent = 0  # our initiation timestamps, strictly increasing
        self._sent_mac1: bytes | None = None  # of the initiation in flight (cookie replies)
        self._cookie: bytes | None = None  # the peer's last cookie, and when it came
        self._cookie_at = 0.0
        # Handshake as responder: replay protection.
        # `now` in every call is the timers' clock (monotonic in the node); adding this gives
        # wall-clock time, for certificate validity and initiation timestamps only. The node
        # refreshes it before each call, so a wall-clock step never stretches a timer.
        self.wall_offset = 0.0
        # The newest initiation timestamp accepted from this peer; the node keeps it across
        # Link objects (`replay_floor`), so re-adding a peer does not reopen old initiations.
        self._last_ts_accepted = replay_floor

        self._current: _Keypair | None = None
        self._next: _Keypair | None = None  # the unconfirmed responder session
        self._older: list[_Keypair] = []  # confirmed, not current, oldest first

        self.peer: Identity | None = None  # the peer's certificate, from the last handshake
        self.peer_ext: Mapping[str, Any] = {}
        self.last_handshake: float | None = None
        self.last_sent: float | None = None
        self.last_received: float | None = None
        # WireGuard's keepalive and new-handshake timers, as "since" times (None: stopped).
        self._unreplied_since: float | None = None  # first data received since we last sent
        self._unanswered_since: float | None = None  # first data sent since we last received

    # --- status -------------------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        if self._current is not None:
            return LinkState.ESTABLISHED
        if self._pending is not None:
            return LinkState.HANDSHAKING
        return LinkState.IDLE

    @property
    def current(self) -> Session | None:
        """The session to send on, or None."""
        kp = self._current
        return None if kp is None else kp.session

    @property
    def sessions(self) -> tuple[Session, ...]:
        """Every live session (older, current, next): all accept datagrams."""
        return tuple(kp.session for kp in self._live())

    @property
    def last_initiation_ts(self) -> int:
        """The newest initiation timestamp accepted from the peer (-1: none)."""
        return self._last_ts_accepted

    @property
    def handshaking(self) -> bool:
        return self._pending is not None

    # --- sans-IO interface ----------------------------------------------------------------

    def datagrams_to_send(self) -> list[bytes]:
        """Handshake messages and keepalives to send to the peer (drained)."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> LinkEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When `handle_timeout` must run next. May move earlier after `receive_*`,
        `connect`, `confirm`, or a `note_*` call that returned True."""
        deadlines: list[float] = []
        if self._pending is not None:
            deadlines.append(min(self._retransmit_at, self._attempt_started + REKEY_ATTEMPT_TIME))
        for kp in self._live():
            deadlines.append(kp.session.created + REJECT_AFTER_TIME)
        cur = self._current
        if cur is not None and cur.initiator and self._pending is None:
            deadlines.append(cur.session.created + REKEY_AFTER_TIME)
        if self._unreplied_since is not None:
            deadlines.append(self._unreplied_since + KEEPALIVE_TIMEOUT)
        if self._unanswered_since is not None:
            deadlines.append(self._unanswered_since + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT)
        return min(deadlines) if deadlines else None

    def handle_timeout(self, now: float) -> None:
        """Run every timer due at `now` (calling it early or often is harmless)."""
        if self._pending is not None:
            if now >= self._attempt_started + REKEY_ATTEMPT_TIME:
                self._abandon_handshake()
                self._events.append(
                    HandshakeFailed(f"no handshake response after {REKEY_ATTEMPT_TIME:g} s")
                )
            elif now >= self._retransmit_at:
                self._send_initiation(now)

        self._expire(now)

        cur = self._current
        if (
            cur is not None
            and self._pending is None
            and cur.session.should_rekey(now, cur.initiator)
        ):
            self._start_handshake(now)

        if self._unreplied_since is not None and now >= self._unreplied_since + KEEPALIVE_TIMEOUT:
            self._send_keepalive(now)
        if (
            self._unanswered_since is not None
            and now >= self._unanswered_since + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT
        ):
            self._unanswered_since = None
            if self._pending is None:
                self._start_handshake(now)

    # --- the node's calls -------------------------------------------------------------------

    def connect(self, now: float) -> None:
        """Start a handshake as initiator now, unless one is already in flight (then its
        retransmissions go on). Used to bring the link up, to retry after HandshakeFailed or
        PeerRefused (the controller's backoff decides when), and by the data path when it
        has something to send and `current` is None."""
        if self._pending is None:
            self._start_handshake(now)

    def reconfigure(
        self,
        *,
        local: LocalIdentity | None = None,
        ext: Mapping[str, Any] | None = None,
        decide_secure: Callable[[Identity, Mapping[str, Any]], bool] | None = None,
    ) -> None:
        """A new certificate, new extension fields (policy, groups) or a new rule for the
        session mode (SIGHUP): the next handshake uses them; `rekey` applies them now."""
        if local is not None:
            self.local = local
        if ext is not None:
            self._ext = dict(ext)
        if decide_secure is not None:
            self._decide_secure = decide_secure

    def refuse(self, reason: str) -> None:
        """The node no longer accepts this peer (its certificate was revoked): drop the
        pending handshake and every session now, with a PeerRefused event."""
        self._refuse(reason)

    def recheck_peer(self, now: float) -> bool:
        """Verify the peer's certificate again, under `local.anchor` as it is now (a re-read
        CA bundle, SIGHUP). A peer it no longer accepts is refused at once (PeerRefused: its
        sessions are dropped), not when they expire. True when the peer is still accepted
        (or none is known yet)."""
        peer = self.peer
        if peer is None:
            return True
        try:
            self.local.anchor.verify_untrusted(peer.der, now + self.wall_offset)
        except CertificateRefused as exc:
            self._refuse(f"peer certificate refused: {exc}")
            return False
        return True

    def rekey(self, now: float) -> None:
        """Start a fresh handshake now even while established (the link's mode or our
        certificate changed). The current sessions carry traffic until it completes; a
        handshake already in flight is abandoned, since it carries the old settings."""
        if self._pending is not None:
            self._abandon_handshake()
        self._start_handshake(now)

    def receive_initiation(self, state: ResponderState, now: float) -> None:
        """Answer an initiation the node verified (`consume_initiation_untrusted`) and
        routed here by `state.peer_static`.

        Raises RemoteProtocolError for a replay (timestamp not above the last accepted
        one): a counted drop. A peer that authenticated but whose certificate is not what
        the configuration expects gives a PeerRefused event instead."""
        if state.peer_static != self.peer_static:
            raise LocalProtocolError("initiation routed to the wrong link")
        if state.cipher is not self.cipher:
            raise LocalProtocolError("initiation consumed with another cipher than the link's")
        ts = state.timestamp_ns
        if ts < (now + self.wall_offset - MAX_INITIATION_AGE) * 1e9:
            raise RemoteProtocolError("stale handshake initiation (older than its time limit)")
        if ts <= self._last_ts_accepted:
            raise RemoteProtocolError("replayed handshake initiation (timestamp not newer)")
        self._last_ts_accepted = ts
        self._unanswered_since = None  # an authenticated message from the peer
        refusal = self._check_peer(state.peer)
        if refusal is not None:
            self._refuse(refusal)
            return
        index = self._allocate()
        message, keys = create_response(state, index, self._ext)
        kp = _Keypair(self._make_session(keys, now), initiator=False)
        if self._next is not None:  # never confirmed, and now it never will be
            self._retire(self._next)
        self._next = kp
        self._enforce_cap()
        self._out.append(message)
        self._established(kp, keys)

    def receive_response_untrusted(self, data: bytes | memoryview, now: float) -> None:
        """The response to our pending initiation (routed by
        `response_receiver_index_untrusted`). Raises only BadPacket: no handshake pending,
        wrong index, forged or garbled. An authenticated peer whose certificate the CA or
        the configuration refuses gives a PeerRefused event instead."""
        pending = self._pending
        if pending is None:
            raise BadPacket("handshake response but no handshake pending")
        try:
            keys = consume_response_untrusted(pending, data, now + self.wall_offset)
        except CertificateRefused as exc:
            # Only the holder of the peer's static key can produce a response that
            # decrypts, so this is the peer's certificate, not a forgery.
            self._refuse(f"peer certificate refused: {exc}")
            return
        refusal = self._check_peer(keys.peer)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._pending = None
        self._handshake_index = None  # now the session's local index
        self._unanswered_since = None
        kp = _Keypair(self._make_session(keys, now), initiator=True)
        if self._current is not None:
            self._older.append(self._current)
        self._current = kp
        self._enforce_cap()
        self.last_handshake = now
        self._established(kp, keys)
        # Confirms the session to the responder at once (it may not send on it before).
        self._send_keepalive(now)

    def receive_cookie_reply_untrusted(self, data: bytes | memoryview, now: float) -> None:
        """A cookie reply (the peer is under load) to our pending initiation: keep the
        cookie; the next retransmission carries mac2. Raises only BadPacket (no handshake
        pending, another initiation's reply, forged)."""
        index = self._handshake_index
        if self._pending is None or index is None or self._sent_mac1 is None:
            raise BadPacket("cookie reply but no handshake pending")
        data = bytes(data)
        if len(data) < 8 or int.from_bytes(data[4:8], "little") != index:
            raise BadPacket("cookie reply for another initiation")
        self._cookie = consume_cookie_reply_untrusted(data, self.peer_static, self._sent_mac1)
        self._cookie_at = now
        self._sent_mac1 = None  # one cookie per initiation: a replayed reply is refused

    @property
    def has_cookie(self) -> bool:
        """A cookie from the peer is held (for status and tests)."""
        return self._cookie is not None

    def confirm(self, local_index: int, now: float) -> bool:
        """A datagram opened on the session `local_index`: if it is the responder's `next`
        session, confirm it (True), making it current if it is the newest. Cheap otherwise."""
        nxt = self._next
        if nxt is None or nxt.session.local_index != local_index:
            return False
        self._next = None
        cur = self._current
        if cur is None or nxt.session.created >= cur.session.created:
            if cur is not None:
                self._older.append(cur)
            self._current = nxt
        else:  # both ends initiated: we keep sending on the session we initiated
            self._older.append(nxt)
            self._older.sort(key=lambda kp: kp.session.created)
        self.last_handshake = now
        return True

    def note_sent(self, now: float) -> bool:
        """The data path sent data on `current` (once per batch). True when a timer
        started, i.e. `next_deadline()` may now be earlier."""
        self.last_sent = now
        self._unreplied_since = None
        if self._unanswered_since is None:
            self._unanswered_since = now
            return True
        return False

    def note_received(self, now: float, data: bool = True) -> bool:
        """The data path opened datagrams from the peer (once per batch); `data=False`
        when the batch held only keepalives. True when a timer started."""
        self.last_received = now
        self._unanswered_since = None
        if data and self._unreplied_since is None:
            self._unreplied_since = now
            return True
        return False

    def close(self) -> None:
        """Drop the pending handshake and every session (SessionRetired for each index)."""
        self._abandon_handshake()
        self._retire_all()

    # --- internals ------------------------------------------------------------------------

    def _start_handshake(self, now: float) -> None:
        self._attempt_started = now
        self._send_initiation(now)

    def _send_initiation(self, now: float) -> None:
        if self._handshake_index is None:
            self._handshake_index = self._allocate()
        # Strictly increasing even when the wall clock stalls or steps back.
        wall = now + self.wall_offset
        ts = max(int(wall * 1e9), self._last_ts_sent + 1)
        self._last_ts_sent = ts
        if self._cookie is not None and now - self._cookie_at >= COOKIE_LIFETIME:
            self._cookie = None
        message, state = create_initiation(
            self.local,
            self.peer_static,
            self._handshake_index,
            self.cipher,
            self._ext,
            wall,
            timestamp_ns=ts,
            cookie=self._cookie,
        )
        self._pending = state
        self._sent_mac1 = initiation_mac1(message)
        self._out.append(message)
        self._retransmit_at = now + REKEY_TIMEOUT + self._rng.uniform(0.0, REKEY_TIMEOUT_JITTER)

    def _abandon_handshake(self) -> None:
        self._pending = None
        if self._handshake_index is not None:
            self._events.append(SessionRetired(self._handshake_index))
            self._handshake_index = None

    def _send_keepalive(self, now: float) -> None:
        self._unreplied_since = None
        cur = self._current
        if cur is not None:
            self._out.append(cur.session.seal(b""))

    def _make_session(self, keys: Keys, now: float) -> Session:
        return self._new_session(
            chaining_key=keys.chaining_key,
            initiator=keys.initiator,
            local_index=keys.local_index,
            remote_index=keys.remote_index,
            cipher=self.cipher,
            secure=self._decide_secure(keys.peer, keys.ext),
            created=now,
        )

    def _established(self, kp: _Keypair, keys: Keys) -> None:
        self.peer = keys.peer
        self.peer_ext = keys.ext
        self._events.append(SessionEstablished(kp.session, keys.peer, keys.ext))

    def _check_peer(self, peer: Identity) -> str | None:
        if peer.public_key != self.peer_static:
            return "peer certificate is for another key"
        if self.expect_address is not None and peer.address != self.expect_address:
            return (
                f"peer {peer.name!r} certificate says address {peer.address}, "
                f"configuration expects {self.expect_address}"
            )
        if self.expect_name is not None and peer.name != self.expect_name:
            return (
                f"peer certificate names {peer.name!r}, configuration expects {self.expect_name!r}"
            )
        return None if self._check_more is None else self._check_more(peer)

    def _refuse(self, reason: str) -> None:
        self._abandon_handshake()
        self._retire_all()
        self._events.append(PeerRefused(reason))

    def _retire(self, kp: _Keypair) -> None:
        self._events.append(SessionRetired(kp.session.local_index))

    def _live(self) -> list[_Keypair]:
        live = list(self._older)
        if self._current is not None:
            live.append(self._current)
        if self._next is not None:
            live.append(self._next)
        return live

    def _expire(self, now: float) -> None:
        for kp in [kp for kp in self._older if kp.session.expired(now)]:
            self._older.remove(kp)
            self._retire(kp)
        if self._next is not None and self._next.session.expired(now):
            self._retire(self._next)
            self._next = None
        cur = self._current
        if cur is not None and cur.session.expired(now):
            self._retire(cur)
            # Only a session retired by its message count leaves a live older one behind.
            self._current = self._older.pop() if self._older else None

    def _enforce_cap(self) -> None:
        while self._older and len(self._live()) > MAX_SESSIONS:
            self._retire(self._older.pop(0))

    def _retire_all(self) -> None:
        for kp in self._live():
            self._retire(kp)
        self._older.clear()
        self._current = self._next = None
