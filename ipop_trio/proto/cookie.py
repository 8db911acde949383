"""Handshakes under load: WireGuard's cookie mechanism (whitepaper §5.3, §5.4.7), sans-IO.

An initiation costs the responder two X25519 operations and a certificate check; a flood of
replayed or forged ones (mac1 needs only our public key) must not starve real peers. So:

  1. mac1 is checked on every initiation before it is queued (cheap: one HMAC).
  2. Not under load: the initiation is queued (a global token bucket bounds the work; when
     it runs dry, or the queue fills, the node is *under load* for UNDER_LOAD_TIME).
  3. Under load: an initiation whose mac2 is not valid for its source address gets a cookie
     reply instead of being processed, and is not queued. The cookie is
         tau = HMAC-SHA256(R, source IP || source port)[:16]
     where R is a random secret replaced every COOKIE_SECRET_LIFETIME (2 min). Only a
     sender that receives datagrams at its source address learns tau, so a valid mac2
     (keyed by tau, proto/handshake.py) proves the address, and under load the rate
     limit per source address means something: those initiations are queued,
     INIT_RATE_PER_SOURCE each.
  4. The initiator opens the reply, keeps the cookie for COOKIE_LIFETIME and puts mac2 on
     its next initiation: the regular retransmission (REKEY_TIMEOUT later), not one at
     once, so a cookie reply never makes anyone send more (proto/link.py).

Cookie reply (0xA3), 64 bytes, smaller than any initiation (no amplification):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  type 0xA3    |                 pad (zero)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 receiver_index (u32 le): the initiation's     |
    |                 sender_index                                  |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 nonce (24, random)                            |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 encrypted_cookie (16 + tag 16)                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

    encrypted_cookie = XChaCha20-Poly1305(key = SHA256(b"cookie--" || responder's static
                       public key), nonce, tau, associated data = the initiation's mac1)

The associated data binds the reply to the one initiation it answers: only whoever sent
that initiation (and so knows its mac1) can open it, and a reply cannot be replayed against
another. The key is fixed per responder and nonces are random, hence XChaCha20's 192-bit
nonce (WireGuard's choice): with ChaCha20-Poly1305's 96-bit nonce, random nonces under one
key collide after ~2^48 replies. `cryptography` offers only ChaCha20-Poly1305, so XChaCha20
is built as its specification (draft-irtf-cfrg-xchacha) defines it: subkey =
HChaCha20(key, nonce[:16]), then ChaCha20-Poly1305(subkey, 0^4 || nonce[16:]). HChaCha20 is
the ChaCha20 block function without the final addition of the input; one ChaCha20 keystream
block over the same 16 input words is that output plus the input, so subtracting the input
words gives it (tested against the draft's vector).

This module never reads a clock or touches a socket (time comes in as `now`; randomness
through the `random_bytes` it is given); `*_untrusted` functions raise only BadPacket.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import BadPacket
from .handshake import (
    INITIATION,
    INITIATION_MACS,
    MAC_SIZE,
    MAX_HANDSHAKE_SIZE,
    MIN_INITIATION_SIZE,
    initiation_mac1,
    mac2,
)
from .ratelimit import RateLimiter, TokenBucket
from .wire import Kind

# --- Protocol constants (wire format) -----------------------------------------------------

COOKIE_LABEL = b"cookie--"
COOKIE_REPLY = struct.Struct("<B3xI24s")  # type, pad, receiver_index, nonce
NONCE_SIZE = 24
COOKIE_SIZE = 16
TAG_SIZE = 16
COOKIE_REPLY_SIZE = COOKIE_REPLY.size + COOKIE_SIZE + TAG_SIZE  # 64
COOKIE_SECRET_LIFETIME = 120.0  # R is replaced this often (whitepaper §5.4.7)
COOKIE_LIFETIME = 120.0  # an initiator uses a cookie at most this long after receiving it
_PAD = b"\x00\x00\x00"
_SIGMA = struct.unpack("<4I", b"expand 32-byte k")
_WORDS16 = struct.Struct("<16I")
_WORDS8 = struct.Struct("<8I")
_PORT = struct.Struct("!H")

# --- Tuning knobs -------------------------------------------------------------------------

UNDER_LOAD_TIME = 1.0  # stay under load this long after the last sign of it (wireguard-go)
# Initiations processed for all sources together while not under load (what the handshake
# task may spend X25519 on); running out of them is a sign of load.
INIT_RATE_TOTAL, INIT_BURST_TOTAL = 200.0, 400.0
# Under load, for each proven source address (a legitimate peer sends one per 5 s at most,
# or a few when both ends restart).
INIT_RATE_PER_SOURCE, INIT_BURST_PER_SOURCE = 5.0, 10.0
MAX_SOURCES = 4096  # per-source buckets kept (the stalest go first)


# --- XChaCha20-Poly1305 -------------------------------------------------------------------


def hchacha20(key: bytes, nonce16: bytes) -> bytes:
    """HChaCha20 (draft-irtf-cfrg-xchacha §2.2): a 32-byte subkey from a key and 16 bytes."""
    if len(key) != 32 or len(nonce16) != 16:
        raise ValueError("HChaCha20 takes a 32-byte key and a 16-byte input")
    # cryptography's ChaCha20 nonce is the state's words 12..15 (counter || nonce), exactly
    # HChaCha20's input words.
    block = Cipher(algorithms.ChaCha20(key, nonce16), mode=None).encryptor().update(bytes(64))
    out = _WORDS16.unpack(block)
    state = (*_SIGMA, *_WORDS8.unpack(key), *struct.unpack("<4I", nonce16))
    z = [(out[i] - state[i]) & 0xFFFFFFFF for i in (0, 1, 2, 3, 12, 13, 14, 15)]
    return _WORDS8.pack(*z)


def xchacha20poly1305_seal(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    if len(nonce) != NONCE_SIZE:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    aead = ChaCha20Poly1305(hchacha20(key, nonce[:16]))
    return aead.encrypt(bytes(4) + nonce[16:], plaintext, ad)


def xchacha20poly1305_open(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """Raises `cryptography.exceptions.InvalidTag`."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("XChaCha20-Poly1305 takes a 24-byte nonce")
    aead = ChaCha20Poly1305(hchacha20(key, nonce[:16]))
    return aead.decrypt(bytes(4) + nonce[16:], ciphertext, ad)


def cookie_key(static_public: bytes) -> bytes:
    """The key cookie replies from the node owning `static_public` are sealed with."""
    return hashlib.sha256(COOKIE_LABEL + static_public).digest()


def _address_bytes(addr: tuple[str, int]) -> bytes:
    """The source address as tau covers it (the packed IP, the port)."""
    try:
        ip = ipaddress.ip_address(addr[0]).packed
    except ValueError:  # not an address the kernel gives; still one value per source
        ip = addr[0].encode("utf-8", "replace")
    return ip + _PORT.pack(addr[1] & 0xFFFF)


# --- The initiator's side -----------------------------------------------------------------


def cookie_reply_receiver_index_untrusted(data: bytes | memoryview) -> int:
    """The receiver index of a cookie reply (our initiation's sender index), to route it."""
    if len(data) != COOKIE_REPLY_SIZE:
        raise BadPacket("cookie reply of the wrong length")
    kind, index, _nonce = COOKIE_REPLY.unpack_from(data)
    if kind != Kind.COOKIE_REPLY or bytes(data[1:4]) != _PAD:
        raise BadPacket("not a cookie reply")
    receiver_index: int = index
    return receiver_index


def consume_cookie_reply_untrusted(
    data: bytes | memoryview, responder_static: bytes, sent_mac1: bytes
) -> bytes:
    """The cookie in a reply to the initiation whose mac1 was `sent_mac1`, sent to the node
    owning `responder_static`. Raises only BadPacket."""
    cookie_reply_receiver_index_untrusted(data)
    data = bytes(data)
    _kind, _index, nonce = COOKIE_REPLY.unpack_from(data)
    try:
        return xchacha20poly1305_open(
            cookie_key(responder_static), nonce, data[COOKIE_REPLY.size :], sent_mac1
        )
    except InvalidTag:
        raise BadPacket("cookie reply does not open (not for our initiation)") from None


# --- The responder's side -----------------------------------------------------------------


class Verdict(enum.Enum):
    """What to do with an initiation; the node counts each as handshake_<value>."""

    QUEUE = "queued"  # not under load: process it (the handshake task)
    QUEUE_PROVEN = "mac2_ok"  # under load, mac2 proves its source: process it
    COOKIE = "cookie_sent"  # under load, no valid mac2: answer with `reply`, drop it
    MAC1_BAD = "mac1_bad"  # not for us, malformed, or forged: drop
    RATE_LIMITED = "rate_limited"  # under load, its proven source sends too many: drop


@dataclass(frozen=True, slots=True)
class Admission:
    verdict: Verdict
    reply: bytes | None = None  # the cookie reply to send to the initiation's source


class CookieGuard:
    """The responder's half: decides per initiation, before it is queued, with the queue's
    current length, whether it is processed, answered with a cookie, or dropped.

    `admit_untrusted(data, source, now, queued)` is the one entry point; everything it
    returns is a counted outcome."""

    def __init__(
        self,
        local_public: bytes,
        mac1_key: bytes,
        *,
        queue_size: int,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self._mac1_key = mac1_key
        self._reply_key = cookie_key(local_public)
        self._random = random_bytes
        # wireguard-go counts a queue an eighth full as load.
        self.load_queue = max(1, queue_size // 8)
        self._secret = random_bytes(32)
        self._previous: bytes | None = None
        self._secret_at: float | None = None
        self._load_until = -1.0
        self._all = TokenBucket(INIT_RATE_TOTAL, INIT_BURST_TOTAL, 0.0)
        self._all_started = False
        self.per_source = RateLimiter(
            INIT_RATE_PER_SOURCE, INIT_BURST_PER_SOURCE, max_keys=MAX_SOURCES
        )

    def under_load(self, now: float) -> bool:
        return now < self._load_until

    def admit_untrusted(
        self, data: bytes | memoryview, source: tuple[str, int], now: float, queued: int
    ) -> Admission:
        if len(data) < MIN_INITIATION_SIZE or len(data) > MAX_HANDSHAKE_SIZE:
            return Admission(Verdict.MAC1_BAD)
        data = bytes(data)
        if data[0] != Kind.HANDSHAKE_INIT or data[1:4] != _PAD:
            return Admission(Verdict.MAC1_BAD)
        body = data[:-INITIATION_MACS]
        if not hmac.compare_digest(
            hmac.digest(self._mac1_key, body, "sha256")[:MAC_SIZE], initiation_mac1(data)
        ):
            return Admission(Verdict.MAC1_BAD)
        if not self._all_started:  # the bucket starts full at the first initiation
            self._all = TokenBucket(INIT_RATE_TOTAL, INIT_BURST_TOTAL, now)
            self._all_started = True
        if queued >= self.load_queue:
            self._load_until = now + UNDER_LOAD_TIME
        if not self.under_load(now):
            if self._all.allow(now):
                return Admission(Verdict.QUEUE)
            self._load_until = now + UNDER_LOAD_TIME  # more than the handshake task's budget
        else:
            self._all.allow(now)  # keeps the bucket empty while the flood lasts
        if not self._mac2_valid(data, source, now):
            return Admission(Verdict.COOKIE, self._reply(data, source, now))
        if not self.per_source.allow(source[0], now):
            return Admission(Verdict.RATE_LIMITED)
        return Admission(Verdict.QUEUE_PROVEN)

    def cookie(self, source: tuple[str, int], now: float) -> bytes:
        """tau for `source` under the current secret."""
        return self._tau(self._current_secret(now), source)

    def _tau(self, secret: bytes, source: tuple[str, int]) -> bytes:
        return hmac.digest(secret, _address_bytes(source), "sha256")[:COOKIE_SIZE]

    def _current_secret(self, now: float) -> bytes:
        at = self._secret_at
        if at is None:
            self._secret_at = now
        elif now - at >= COOKIE_SECRET_LIFETIME:
            # A cookie stays good until the secret after its own is replaced (2-4 min).
            self._previous = self._secret if now - at < 2 * COOKIE_SECRET_LIFETIME else None
            self._secret = self._random(32)
            self._secret_at = now
        return self._secret

    def _mac2_valid(self, data: bytes, source: tuple[str, int], now: float) -> bool:
        got = data[-MAC_SIZE:]
        before = data[:-MAC_SIZE]
        current = self._current_secret(now)
        for secret in (current, self._previous):
            if secret is not None and hmac.compare_digest(
                mac2(self._tau(secret, source), before), got
            ):
                return True
        return False

    def _reply(self, initiation: bytes, source: tuple[str, int], now: float) -> bytes:
        (_kind, sender_index, _e, _s) = INITIATION.unpack_from(initiation)
        nonce = self._random(NONCE_SIZE)
        sealed = xchacha20poly1305_seal(
            self._reply_key, nonce, self.cookie(source, now), initiation_mac1(initiation)
        )
        return COOKIE_REPLY.pack(Kind.COOKIE_REPLY, sender_index, nonce) + sealed


__all__ = [
    "COOKIE_LIFETIME",
    "COOKIE_REPLY_SIZE",
    "Admission",
    "CookieGuard",
    "Verdict",
    "consume_cookie_reply_untrusted",
    "cookie_key",
    "cookie_reply_receiver_index_untrusted",
    "hchacha20",
    "xchacha20poly1305_open",
    "xchacha20poly1305_seal",
]
