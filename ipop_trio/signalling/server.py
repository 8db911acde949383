"""The signalling server (`ipop-trio signal`): admission, membership, con_req/con_resp relay.

Two layers, as h11 and its drivers:

  * `ServerCore` is the protocol, sans-IO: `open(peer, now, source=)` a connection, feed
    it every text message with `receive(conn, data, now)`, tell it `closed(conn)`; it queues
    `Send(conn, text)` and `Close(conn, code, reason)` actions (`actions()`). It keeps the
    overlays and their members, verifies certificates and possession proofs
    (proto/signalling.py), rate-limits each connection (a token bucket fed by `now`), and
    relays con_req / con_resp only between members of one overlay. It never sees a link
    key: it handles certificates (public) and addresses.
  * `serve_signalling` is the Trio driver: trio-websocket, one handler task per connection,
    each with a bounded outbox and a writer task.

Limits per client (`Limits`), and what happens when one is hit — always the offender is
disconnected, nobody else waits:

    message size     > MAX_CLIENT_MESSAGE: trio-websocket closes with 1009 while the frame
                     is still arriving (it never buffers more than the limit)
    message rate     token bucket (`rate`/s, `burst`): empty → close 1008 "rate limit"
    queued bytes     the outbox is bounded in messages and bytes; a message that does not
                     fit closes the connection ("too slow"): a client that stops reading
                     costs at most `max_queued_bytes` of memory and never blocks a sender
    send time        one WebSocket send taking longer than `send_timeout` closes it too
    admission time   TLS, the WebSocket opening, hello and auth must complete within
                     `auth_timeout` of the TCP accept
    idle time        a member silent for `idle_timeout` (clients ping every 15 s) is dropped

Limits per source and overall, checked when a TCP connection is accepted (before TLS or the
WebSocket opening, so a refused one costs no handshake: its socket is closed at once,
counted `refused_*`). A source is an IPv4 address (IPv4-mapped ones too) or an IPv6 /64:

    connections      `max_clients` in all (refused_full), `max_clients_per_source`
                     admitted or not from one source (refused_source)
    pre-auth         connections not yet admitted: `max_preauth` in all (refused_preauth),
                     `max_preauth_per_source` (refused_preauth_source); admission or the
                     socket's close gives the slot back
    admissions       per node key, a token bucket (`admit_rate`/s, `admit_burst`), checked
                     once the key is proven: each admission announces a join (and later a
                     leave) to every member. Over it → error "rate_limited", close 1013, no
                     announcement, counted refused_admit_rate; the client backs off. The
                     buckets (`max_admit_keys` at most) are forgotten once full again.

Admission refusals (an error to the client, then close 1008): a certificate no overlay CA
accepts (certificate_refused), a wrong proof (auth_failed), a certificate on the revocation
list (certificate_revoked: `--revoked`, reloaded on SIGHUP; a member whose certificate a
reload revokes is told so and dropped, its leave announced), and an overlay address or node
name that another key already holds in the overlay (address_in_use, name_in_use: the first
holder keeps it, as two nodes answering ARP for one address would make both unreachable).
The same key connecting again replaces its older connection.

Ordering: a connection's messages leave in the order the core queued them, and the core is
driven from one task at a time (Trio is single-threaded and the core never awaits), so every
member sees joins and leaves in the same order the server admitted and lost members.

This module must never forward a message between overlays, trust a "from" or "overlay" the
client wrote (they must equal what it proved at admission), or let one client's slowness
block another's messages.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from ..config import endpoint_text
from ..errors import BadPacket, CertificateRefused
from ..pki import fingerprint
from ..proto import signalling as sig
from ..proto.cert import Identity, TrustAnchor
from ..proto.ratelimit import TokenBucket

log = logging.getLogger("ipop_trio.signalling.server")

# WebSocket close codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN = 1013


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-client limits (tuning knobs; the defaults serve thousands of nodes)."""

    max_message: int = sig.MAX_CLIENT_MESSAGE
    rate: float = 20.0  # messages per second, sustained
    burst: float = 60.0  # messages allowed at once
    max_queued_messages: int = 1024
    max_queued_bytes: int = 1024 * 1024
    send_timeout: float = 10.0
    auth_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_clients: int = 100_000
    # Per source address (an IPv4 address; an IPv6 /64, what one subscriber is given):
    max_clients_per_source: int = 1024  # connections, admitted or not
    max_preauth: int = 1024  # connections not yet admitted, all sources together
    max_preauth_per_source: int = 16  # connections not yet admitted, per source
    # Admissions per node key (each one announces a join, and later a leave, to every member):
    admit_rate: float = 0.2  # per second, sustained (one every 5 s)
    admit_burst: float = 5.0  # admissions allowed at once
    max_admit_keys: int = 100_000  # keys whose admission bucket is remembered


# --- Sans-IO core ----------------------------------------------------------------------------


class ConnState(enum.Enum):
    HELLO = "hello"  # waiting for hello
    CHALLENGED = "challenged"  # waiting for auth
    MEMBER = "member"  # admitted to an overlay
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Send:
    conn: int
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    conn: int
    code: int
    reason: str


Action = Send | Close


@dataclass(slots=True, eq=False)
class Conn:
    id: int
    peer: str
    opened: float
    bucket: TokenBucket  # messages it may send (Limits.rate, Limits.burst)
    source: str = ""  # what the per-source limits count (`source_of`)
    counted: bool = False  # holds one of its source's connection slots
    preauth: bool = False  # holds a pre-authentication slot (overall and its source's)
    state: ConnState = ConnState.HELLO
    challenge: sig.PendingChallenge | None = None
    identity: Identity | None = None
    fingerprint: str = ""  # of the certificate in its hello (pki.fingerprint)
    member: sig.Member | None = None
    received: int = 0
    relayed: int = 0


def source_of(address: str) -> str:
    """What the per-source limits count for a peer address (no port): an IPv4 address (also
    when it arrives IPv4-mapped on a dual-stack socket), or an IPv6 address's /64 (one
    subscriber's network: a host has as many addresses in it as it likes). Anything that is
    not an IP address (a test's name, a Unix socket) is its own source."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _host_of(peer: str) -> str:
    """The address part of "host:port", "[v6]:port" or a bare address."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    if peer.count(":") == 1:
        return peer.rsplit(":", 1)[0]
    return peer


class AdmissionLimiter:
    """One `TokenBucket(rate, burst)` per node key, in bounded memory.

    A bucket that has filled up again says nothing a missing one would not (a new bucket
    starts full), so the least recently used buckets are forgotten once full; and beyond
    `max_keys` the least recently used goes regardless (only keys that proved possession of
    a certificate's key get here, so that takes as many certificates as the CA issued)."""

    def __init__(self, rate: float, burst: float, max_keys: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max(1, max_keys)
        self._buckets: OrderedDict[bytes, TokenBucket] = OrderedDict()

    def allow(self, key: bytes, now: float) -> bool:
        self._forget_full(now)
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
        ok = bucket.allow(now)
        self._buckets[key] = bucket  # most recently used last
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return ok

    def _forget_full(self, now: float) -> None:
        """Drop full buckets from the stale end (amortised O(1): each goes once)."""
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if bucket.tokens + max(0.0, now - bucket.last) * bucket.rate < bucket.burst:
                return
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(slots=True)
class Overlay:
    name: str
    anchor: TrustAnchor
    members: dict[bytes, Conn] = field(default_factory=dict)  # key → conn, in join order
    # who holds each overlay address and node name: the key of a member
    # (every address of a dual-stack certificate: `held` keeps which, by key)
    by_address: dict[str, bytes] = field(default_factory=dict)
    by_name: dict[str, bytes] = field(default_factory=dict)
    held: dict[bytes, tuple[str, ...]] = field(default_factory=dict)

    def index(self, member: sig.Member, addresses: tuple[str, ...]) -> None:
        for address in addresses:
            self.by_address[address] = member.key
        self.held[member.key] = addresses
        self.by_name[member.name] = member.key

    def unindex(self, member: sig.Member) -> None:
        for address in self.held.pop(member.key, (member.address,)):
            if self.by_address.get(address) == member.key:
                del self.by_address[address]
        if self.by_name.get(member.name) == member.key:
            del self.by_name[member.name]


def _by_overlay(anchors: Iterable[TrustAnchor]) -> dict[str, TrustAnchor]:
    """One anchor per overlay: two CAs naming one overlay are trusted together (a CA
    rotation); PkiError when they disagree on its network."""
    out: dict[str, TrustAnchor] = {}
    for anchor in anchors:
        known = out.get(anchor.name)
        out[anchor.name] = anchor if known is None else TrustAnchor.bundle([known, anchor])
    return out


def revoked_reason(fp: str) -> str:
    """What a client whose certificate is revoked is told (error certificate_revoked)."""
    return f"certificate sha256 {fp} is revoked; ask the overlay's operator for a new one"


class ServerCore:
    """The signalling protocol, fed messages and a clock; produces actions."""

    def __init__(
        self,
        anchors: Iterable[TrustAnchor],
        limits: Limits | None = None,
        *,
        revoked: Iterable[str] = (),
    ) -> None:
        self.limits = limits or Limits()
        self.revoked = frozenset(revoked)  # certificate fingerprints refused (pki.fingerprint)
        self.overlays: dict[str, Overlay] = {
            name: Overlay(name, anchor) for name, anchor in _by_overlay(anchors).items()
        }
        if not self.overlays:
            raise ValueError("the server needs at least one overlay CA")
        self.conns: dict[int, Conn] = {}
        self.per_source: dict[str, int] = {}  # source → connections it holds (`Conn.counted`)
        self.preauth = 0  # connections holding a pre-authentication slot
        self.preauth_per_source: dict[str, int] = {}
        lim = self.limits
        self.admissions = AdmissionLimiter(lim.admit_rate, lim.admit_burst, lim.max_admit_keys)
        self._next_id = 1
        self._actions: list[Action] = []
        self.counters: dict[str, int] = {}

    # -- driver API -------------------------------------------------------------------------

    def open(self, peer: str, now: float, *, source: str | None = None) -> int:
        """A transport connected from `peer` ("address:port"); returns its id.

        Refuses it (Close, counted) beyond max_clients, beyond max_clients_per_source
        connections from its source, or beyond max_preauth / max_preauth_per_source
        connections not yet admitted; a refused connection holds no slot. `source` is the
        peer's address (no port); by default taken from `peer`."""
        lim = self.limits
        src = source_of(_host_of(peer) if source is None else source)
        conn = Conn(self._next_id, peer, now, TokenBucket(lim.rate, lim.burst, now), src)
        self._next_id += 1
        self.conns[conn.id] = conn
        if len(self.conns) > lim.max_clients:
            self.count("refused_full")
            self._close(conn, CLOSE_TRY_AGAIN, "server full")
        elif self.per_source.get(src, 0) >= lim.max_clients_per_source:
            self.count("refused_source")
            self._close(conn, CLOSE_TRY_AGAIN, "too many connections from this address")
        elif self.preauth >= lim.max_preauth:
            self.count("refused_preauth")
            self._close(conn, CLOSE_TRY_AGAIN, "too many connections authenticating")
        elif self.preauth_per_source.get(src, 0) >= lim.max_preauth_per_source:
            self.count("refused_preauth_source")
            self._close(conn, CLOSE_TRY_AGAIN, "too many connections authenticating from here")
        else:
            conn.counted = conn.preauth = True
            self.per_source[src] = self.per_source.get(src, 0) + 1
            self.preauth += 1
            self.preauth_per_source[src] = self.preauth_per_source.get(src, 0) + 1
        return conn.id

    def actions(self) -> list[Action]:
        out, self._actions = self._actions, []
        return out

    def receive_timeout(self, conn_id: int, now: float) -> float:
        """Seconds the driver may wait for this connection's next message."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return 0.0
        if conn.state is ConnState.MEMBER:
            return self.limits.idle_timeout
        return max(0.0, conn.opened + self.limits.auth_timeout - now)

    def timed_out(self, conn_id: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is not None:
            admitted = conn.state is ConnState.MEMBER
            self._close(conn, CLOSE_POLICY, "idle" if admitted else "no auth in time")

    def closed(self, conn_id: int) -> None:
        """The transport is gone (either side closed it): forget the connection."""
        conn = self.conns.pop(conn_id, None)
        if conn is None:
            return
        self._leave(conn, "disconnected")
        conn.state = ConnState.CLOSED
        self._end_preauth(conn)
        if conn.counted:
            conn.counted = False
            _decrement(self.per_source, conn.source)

    def receive(self, conn_id: int, data: str | bytes, now: float) -> None:
        """One message from a client. Bad input closes that client; nothing raises."""
        conn = self.conns.get(conn_id)
        if conn is None or conn.state is ConnState.CLOSED:
            return
        if not conn.bucket.allow(now):
            self.count("closed_rate")
            self._close(conn, CLOSE_POLICY, "rate limit exceeded")
            return
        conn.received += 1
        try:
            msg = sig.decode_untrusted(data, max_size=self.limits.max_message)
        except BadPacket as exc:
            self.count("closed_bad_message")
            self._close(conn, CLOSE_PROTOCOL, f"bad message: {exc}"[:120])
            return
        if conn.state is ConnState.HELLO:
            self._on_hello(conn, msg, now)
        elif conn.state is ConnState.CHALLENGED:
            self._on_auth(conn, msg, now)
        else:
            self._on_member_message(conn, msg)

    def set_revoked(self, revoked: Iterable[str]) -> list[str]:
        """A new revocation list: every connection whose certificate it names (members, and
        those still proving their key) is told why and closed, a member's leave announced.
        Returns the names of the nodes dropped."""
        self.revoked = frozenset(revoked)
        dropped = []
        for conn in list(self.conns.values()):
            if conn.state is ConnState.CLOSED or conn.fingerprint not in self.revoked:
                continue
            assert conn.identity is not None  # a fingerprint comes with the identity
            self.count("closed_revoked")
            self._send(conn, sig.Error("certificate_revoked", revoked_reason(conn.fingerprint)))
            self._close(conn, CLOSE_POLICY, "certificate revoked")
            dropped.append(conn.identity.name)
        return dropped

    def set_anchors(self, anchors: Iterable[TrustAnchor], now: float) -> list[str]:
        """New overlay CAs (SIGHUP, the end of a CA rotation): every connection whose
        certificate they no longer accept (its CA removed, or its overlay no longer served)
        is told why and closed, a member's leave announced. Returns the names dropped."""
        new = _by_overlay(anchors)
        if not new:
            raise ValueError("the server needs at least one overlay CA")
        for name, anchor in new.items():
            if name in self.overlays:
                self.overlays[name].anchor = anchor
            else:
                self.overlays[name] = Overlay(name, anchor)
        dropped = []
        for conn in list(self.conns.values()):
            if conn.state is ConnState.CLOSED or conn.identity is None:
                continue
            trusted = new.get(conn.identity.overlay)
            try:
                if trusted is None:
                    raise CertificateRefused(f"overlay {conn.identity.overlay} is not served here")
                trusted.verify_untrusted(conn.identity.der, now)
            except CertificateRefused as exc:
                self.count("closed_ca_removed")
                self._send(conn, sig.Error("certificate_refused", str(exc)[: sig.MAX_REASON]))
                self._close(conn, CLOSE_POLICY, "certificate no longer trusted")
                dropped.append(conn.identity.name)
        for name in [n for n in self.overlays if n not in new]:
            del self.overlays[name]  # its members were all closed (and left) above
        return dropped

    def stats(self) -> dict[str, object]:
        return {
            "connections": len(self.conns),
            "preauth": self.preauth,
            "revoked": len(self.revoked),
            "overlays": {name: len(o.members) for name, o in self.overlays.items()},
            "counters": dict(self.counters),
        }

    # -- states ---------------------------------------------------------------------------

    def _on_hello(self, conn: Conn, msg: sig.Message, now: float) -> None:
        if not isinstance(msg, sig.Hello):
            self._close(conn, CLOSE_PROTOCOL, "expected hello")
            return
        if msg.version != sig.VERSION:
            self._close(conn, CLOSE_PROTOCOL, f"unsupported version {msg.version}")
            return
        identity, why = self._verify(msg.cert, now)
        if identity is None:
            self.count("refused_certificate")
            self._send(conn, sig.Error("certificate_refused", why[: sig.MAX_REASON]))
            self._close(conn, CLOSE_POLICY, "certificate refused")
            return
        fp = fingerprint(identity.der)
        if fp in self.revoked:
            self.count("refused_revoked")
            log.info("refused %s from %s: certificate revoked (%s)", identity.name, conn.peer, fp)
            self._send(conn, sig.Error("certificate_revoked", revoked_reason(fp)))
            self._close(conn, CLOSE_POLICY, "certificate revoked")
            return
        conn.identity = identity
        conn.fingerprint = fp
        conn.challenge = sig.PendingChallenge()
        conn.state = ConnState.CHALLENGED
        self._send(conn, conn.challenge.challenge)

    def _verify(self, cert: bytes, now: float) -> tuple[Identity | None, str]:
        """The certificate's overlay is the CA it chains to (tried in turn: a handful)."""
        reasons = []
        for overlay in self.overlays.values():
            try:
                return overlay.anchor.verify_untrusted(cert, now), ""
            except CertificateRefused as exc:
                reasons.append(str(exc))
        return None, "; ".join(reasons) if len(reasons) == 1 else "no overlay CA accepts it"

    def _on_auth(self, conn: Conn, msg: sig.Message, now: float) -> None:
        assert conn.identity is not None and conn.challenge is not None
        if not isinstance(msg, sig.Auth):
            self._close(conn, CLOSE_PROTOCOL, "expected auth")
            return
        ident = conn.identity
        ok = conn.challenge.verify(ident.public_key, ident.der, msg)
        conn.challenge = None
        if not ok:
            self.count("refused_proof")
            self._send(conn, sig.Error("auth_failed", "wrong answer to the challenge"))
            self._close(conn, CLOSE_POLICY, "auth failed")
            return
        overlay = self.overlays[ident.overlay]
        clash = _clash(overlay, ident)
        if clash is not None:
            code, why = clash
            self.count(_CLASH_COUNTERS[code])
            log.info(
                "refused %s (%s) from %s: %s", ident.name, ident.address_text(), conn.peer, why
            )
            self._send(conn, sig.Error(code, why[: sig.MAX_REASON]))
            self._close(conn, CLOSE_POLICY, code.replace("_", " "))
            return
        if not self.admissions.allow(ident.public_key, now):
            # Each admission announces a join to every member (and its end a leave): one key
            # connecting in a loop must not make the server write to everyone in a loop.
            self.count("refused_admit_rate")
            self._send(conn, sig.Error("rate_limited", "admitted too often: try again later"))
            self._close(conn, CLOSE_TRY_AGAIN, "admission rate limit")
            return
        member = sig.Member(ident.public_key, ident.name, str(ident.address))
        old = overlay.members.pop(ident.public_key, None)
        if old is not None:  # the node reconnected before we noticed its old connection die
            if old.member is not None:
                overlay.unindex(old.member)  # (a renewed certificate may name other ones)
            old.state = ConnState.CLOSED
            self._close(old, CLOSE_NORMAL, "replaced by a newer connection")
        others = tuple(c.member for c in overlay.members.values() if c.member is not None)
        conn.member = member
        conn.state = ConnState.MEMBER
        self._end_preauth(conn)
        overlay.members[ident.public_key] = conn
        overlay.index(member, tuple(str(a) for a in ident.addresses))
        self.count("admitted")
        log.info(
            "admitted %s (%s) to overlay %s from %s; %d members",
            ident.name,
            ident.address_text(),
            overlay.name,
            conn.peer,
            len(overlay.members),
        )
        self._send(conn, sig.Welcome(overlay.name, member, others))
        self._broadcast(overlay, sig.encode(sig.Join(member)), skip=conn)

    def _on_member_message(self, conn: Conn, msg: sig.Message) -> None:
        assert conn.identity is not None and conn.member is not None
        if isinstance(msg, sig.Ping):
            self._send(conn, sig.Pong(msg.seq))
            return
        if not isinstance(msg, sig.ConReq | sig.ConResp):
            self._close(conn, CLOSE_PROTOCOL, f"unexpected {type(msg).__name__.lower()}")
            return
        ident = conn.identity
        if msg.sender != ident.public_key or msg.overlay != ident.overlay or msg.cert != ident.der:
            # A client may only speak for itself, in its own overlay, with its own certificate.
            self.count("closed_spoofed")
            self._close(conn, CLOSE_POLICY, "from/overlay/cert differ from the admitted ones")
            return
        target = self.overlays[ident.overlay].members.get(msg.to)
        if target is None or target is conn:
            self.count("relay_no_peer")
            self._send(conn, sig.Error("unknown_peer", "no such member", msg.request_id))
            return
        conn.relayed += 1
        self.count("relayed_con_req" if isinstance(msg, sig.ConReq) else "relayed_con_resp")
        self._send(target, msg)

    # -- helpers ----------------------------------------------------------------------------

    def _leave(self, conn: Conn, why: str) -> None:
        if conn.state is not ConnState.MEMBER or conn.identity is None or conn.member is None:
            return
        overlay = self.overlays[conn.identity.overlay]
        if overlay.members.get(conn.member.key) is conn:
            del overlay.members[conn.member.key]
            overlay.unindex(conn.member)
            self._broadcast(overlay, sig.encode(sig.Leave(conn.member.key, conn.member.name)))
            log.info(
                "%s left overlay %s (%s); %d members",
                conn.member.name,
                overlay.name,
                why,
                len(overlay.members),
            )

    def _end_preauth(self, conn: Conn) -> None:
        """Give back its pre-authentication slot (admitted, or gone)."""
        if conn.preauth:
            conn.preauth = False
            self.preauth -= 1
            _decrement(self.preauth_per_source, conn.source)

    def _send(self, conn: Conn, msg: sig.Message) -> None:
        self._actions.append(Send(conn.id, sig.encode(msg)))

    def _broadcast(self, overlay: Overlay, text: str, skip: Conn | None = None) -> None:
        for c in overlay.members.values():
            if c is not skip:
                self._actions.append(Send(c.id, text))

    def _close(self, conn: Conn, code: int, reason: str) -> None:
        """Ask the driver to close; the member leaves at once (not when the socket is gone),
        so nothing more is relayed to or from it."""
        self._leave(conn, reason)
        conn.state = ConnState.CLOSED
        self._actions.append(Close(conn.id, code, reason))

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


_CLASH_COUNTERS = {"address_in_use": "refused_address_in_use", "name_in_use": "refused_name_in_use"}


def _clash(overlay: Overlay, ident: Identity) -> tuple[str, str] | None:
    """(error code, reason) when another key holds the newcomer's address or name."""
    for address in ident.addresses:
        key = overlay.by_address.get(str(address))
        if key is not None and key != ident.public_key:
            holder = overlay.members[key].member
            assert holder is not None
            return "address_in_use", (
                f"address {address} is held by member {holder.name} (another key) in overlay "
                f"{overlay.name}; the CA issued it twice: ask for a certificate with another "
                "address"
            )
    key = overlay.by_name.get(ident.name)
    if key is not None and key != ident.public_key:
        holder = overlay.members[key].member
        assert holder is not None
        return "name_in_use", (
            f"name {ident.name} is held by another key (the member at {holder.address}) in "
            f"overlay {overlay.name}; the CA issued it twice: ask for another name"
        )
    return None


def _decrement(counts: dict[str, int], key: str) -> None:
    n = counts[key] - 1
    if n:
        counts[key] = n
    else:
        del counts[key]  # no entry per address ever seen: only per address present


# --- Trio driver ---------------------------------------------------------------------------


class _Client:
    """One connection's driver state: its bounded outbox and the scope that ends it.

    Outbox policy when full (messages or bytes): the client is disconnected; senders never
    wait for it."""

    def __init__(self, conn_id: int, limits: Limits, peer: str) -> None:
        self.id = conn_id
        self.limits = limits
        self.peer = peer
        self.out_send, self.out_receive = trio.open_memory_channel[str](limits.max_queued_messages)
        self.queued_bytes = 0
        self.scope = trio.CancelScope()
        self.close_code = CLOSE_NORMAL
        self.close_reason: str | None = None

    def enqueue(self, text: str) -> bool:
        """Queue one message without waiting. Full (in messages or bytes) → False."""
        size = len(text)
        if self.queued_bytes + size > self.limits.max_queued_bytes:
            return False
        try:
            self.out_send.send_nowait(text)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        self.queued_bytes += size
        return True

    def close(self, code: int, reason: str, *, flush: bool) -> None:
        """End the connection: with `flush`, the writer first sends what is queued (an
        error message), for at most FLUSH_TIME; without, at once."""
        if self.close_reason is None:
            self.close_code, self.close_reason = code, reason
        self.out_send.close()
        grace = FLUSH_TIME if flush else 0.0
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace)


FLUSH_TIME = 1.0  # how long a closing connection may take to send its last messages


class SignallingServer:
    """Runs a `ServerCore` behind trio-websocket. `serve` is the service."""

    def __init__(
        self,
        anchors: Sequence[TrustAnchor],
        limits: Limits | None = None,
        *,
        clock: Callable[[], float] = time.time,
        revoked: Iterable[str] = (),
    ) -> None:
        self.core = ServerCore(anchors, limits, revoked=revoked)
        self.limits = self.core.limits
        self.clients: dict[int, _Client] = {}
        self.now = clock
        self.port: int | None = None

    async def serve(
        self,
        host: str | None,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen until cancelled; `started(port)` once accepting connections.

        Each connection runs in its own nursery behind `_connection`, which keeps whatever
        it raises (trio-websocket's reader task included) in that connection: with
        trio-websocket's own `serve_websocket`, an exception of one connection's reader task
        reached the server's nursery and stopped the server."""
        listeners: list[Any]  # trio.SocketListener or trio.SSLListener
        if ssl_context is None:
            listeners = await trio.open_tcp_listeners(port, host=host)
        else:
            listeners = await trio.open_ssl_over_tcp_listeners(
                port, ssl_context, host=host, https_compatible=True
            )
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            self.port = _port_of(listeners[0])
            log.info(
                "signalling server listening on %s:%d (%s), overlays: %s",
                host or "*",
                self.port,
                "wss" if ssl_context else "ws",
                ", ".join(sorted(self.core.overlays)),
            )
            task_status.started(self.port)

    def set_anchors(self, anchors: Iterable[TrustAnchor]) -> list[str]:
        """`ServerCore.set_anchors`, its errors and closes sent now; the names dropped."""
        dropped = self.core.set_anchors(anchors, self.now())
        self._dispatch()
        return dropped

    def set_revoked(self, revoked: Iterable[str]) -> list[str]:
        """`ServerCore.set_revoked`, its errors and closes sent now; the names dropped."""
        dropped = self.core.set_revoked(revoked)
        self._dispatch()
        return dropped

    def _dispatch(self) -> None:
        for action in self.core.actions():
            client = self.clients.get(action.conn)
            if client is None:
                continue
            if isinstance(action, Send):
                if not client.enqueue(action.text):
                    self.core.count("closed_slow")
                    client.close(CLOSE_POLICY, "too slow: send queue full", flush=False)
                    self.core.closed(client.id)  # leaves now; its leave goes to the others
                    self._dispatch()
            else:
                client.close(action.code, action.reason, flush=True)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        """One client connection, from the TCP accept to the socket's close. Whatever
        happens here stays here: the peer's bytes, trio-websocket and TLS may raise anything
        (LocalProtocolError, BrokenResourceError, ssl errors), and it ends this connection
        only, counted and logged.

        The core hears of the connection at once (before TLS and the WebSocket opening), so
        the pre-authentication limits count every socket a stranger holds, and a connection
        they refuse costs no handshake: its socket is closed straight away."""
        client: _Client | None = None
        try:
            peer, source = _peer_of(stream)
            conn_id = self.core.open(peer, self.now(), source=source)
            client = _Client(conn_id, self.limits, peer)
            self.clients[conn_id] = client
            self._dispatch()
            if client.close_reason is not None:
                log.debug("refused %s: %s", peer, client.close_reason)
                return
            async with trio.open_nursery() as nursery:
                # A client that never completes TLS or the WebSocket opening (a ws:// client
                # on a wss:// port) holds its socket no longer than admission may.
                timeout = self.core.receive_timeout(conn_id, self.now())
                with trio.move_on_after(timeout) as opening:
                    request = await wrap_server_stream(
                        nursery,
                        stream,
                        message_queue_size=1,
                        max_message_size=self.limits.max_message,
                    )
                if not opening.cancelled_caught:
                    await self._handle(request, client)
                nursery.cancel_scope.cancel()  # the library's reader task, if still running
        except Exception as exc:  # the one boundary a connection has: nothing passes it
            self.core.count("connection_errors")
            log.info("connection ended by an error: %s", _describe(exc))
        finally:
            if client is not None:  # (idempotent: `_handle` has done this if it ran)
                self.clients.pop(client.id, None)
                self.core.closed(client.id)
                self._dispatch()
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIME):
                await stream.aclose()

    async def _handle(self, request: WebSocketRequest, client: _Client) -> None:
        try:
            ws = await request.accept()
        except ConnectionClosed:
            return
        try:
            with client.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._writer, ws, client)
                    await self._reader(ws, client)
                    client.out_send.close()  # the peer closed: let the writer finish
        finally:
            # The member leaves (announced to the others) before the close handshake waits.
            self.clients.pop(client.id, None)
            self.core.closed(client.id)
            self._dispatch()
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIME):
                await ws.aclose(client.close_code, client.close_reason)
            if client.close_reason is not None:
                log.info("closed %s: %s", client.peer, client.close_reason)

    async def _reader(self, ws: WebSocketConnection, client: _Client) -> None:
        core = self.core
        while client.close_reason is None:
            with trio.move_on_after(core.receive_timeout(client.id, self.now())):
                try:
                    data = await ws.get_message()
                except ConnectionClosed as exc:
                    if exc.reason is not None and exc.reason.code == CLOSE_TOO_BIG:
                        core.count("closed_too_big")
                        client.close(CLOSE_TOO_BIG, "message too big", flush=False)
                    return
                core.receive(client.id, data, self.now())
                self._dispatch()
                continue
            core.timed_out(client.id)
            self._dispatch()

    async def _writer(self, ws: WebSocketConnection, client: _Client) -> None:
        try:
            async for text in client.out_receive:
                with trio.move_on_after(self.limits.send_timeout) as cs:
                    await ws.send_message(text)
                client.queued_bytes -= len(text)
                if cs.cancelled_caught:
                    self.core.count("closed_send_timeout")
                    client.close(CLOSE_POLICY, "too slow: send timed out", flush=False)
                    return
        except ConnectionClosed:
            pass
        client.scope.cancel()  # the outbox is closed and sent, or the socket broke


def _peer_of(stream: trio.abc.Stream) -> tuple[str, str]:
    """("address:port", address) of a (TLS-over-)TCP stream's peer; IPv6 in brackets."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if not isinstance(stream, trio.SocketStream):
        return repr(stream), repr(stream)
    name = stream.socket.getpeername()
    if not isinstance(name, tuple):  # AF_UNIX
        return str(name), str(name)
    host, port = str(name[0]), int(name[1])
    return endpoint_text(host, port), host


def _port_of(listener: trio.abc.Listener[trio.abc.Stream]) -> int:
    """The TCP port a (TLS-over-)TCP listener is bound to."""
    while isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    assert isinstance(listener, trio.SocketListener)
    return int(listener.socket.getsockname()[1])


def _describe(exc: BaseException) -> str:
    """One line for the log: an exception, or the leaves of an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"[:200]


def raise_fd_limit() -> int:
    """A server holds one descriptor per client: lift the soft limit to the hard one.
    Returns the limit now in force (0 if unknown)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return int(min(hard, 1 << 30))
    except (ImportError, ValueError, OSError):
        return 0


__all__ = [
    "Action",
    "Close",
    "ConnState",
    "Limits",
    "Send",
    "ServerCore",
    "SignallingServer",
    "raise_fd_limit",
]
