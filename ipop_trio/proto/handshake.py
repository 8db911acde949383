"""Link handshake: Noise IK over X25519 (cryptography), carrying node certificates.

One round trip turns two node keys into a pair of session keys (docs/architecture.md,
"Identity and selective security"):

    Noise_IK_25519_AESGCM_SHA256      (the default: hardware AES)
    Noise_IK_25519_ChaChaPoly_SHA256  (selectable per overlay)

      <- s                                       the initiator knows the responder's key
      ...
      -> e, es, s, ss    initiation  0xA1        carries the initiator's certificate
      <- e, ee, se       response    0xA2        carries the responder's certificate

Noise spec rev 34: §5.1 CipherState, §5.2 SymmetricState, §5.3 HandshakeState, §4.3 HKDF
with HMAC-SHA256, §12.3 / §12.4 nonces (AESGCM: 4 zero bytes + 64-bit big-endian counter,
ChaChaPoly: 4 zero bytes + 64-bit little-endian counter). Prologue: b"ipop-trio v1" + the
overlay CA's name, so a handshake never crosses overlays.

Initiation (0xA1), the Noise message is `ephemeral .. encrypted_payload`:

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  type 0xA1    |                 pad (zero)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 sender_index (u32, little endian)             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 ephemeral (32)                                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 encrypted_static (32 + tag 16)                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 encrypted_payload (payload + tag 16)          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 mac1 (16)                                     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 mac2 (16): zero, or keyed by a cookie         |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

Response (0xA2):

    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  type 0xA2    |                 pad (zero)                    |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 sender_index (u32, little endian)             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 receiver_index (u32, little endian)           |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 ephemeral (32)                                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 encrypted_payload (payload + tag 16)          |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                 mac1 (16)                                     |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

    mac1 = HMAC-SHA256(SHA256(b"mac1----" || receiver's static public key),
                       every byte before mac1)[:16]
    (WireGuard's cheap filter, whitepaper §5.4.4, with HMAC-SHA256 for keyed BLAKE2s: it is
    checked before any Diffie-Hellman, so a sender must at least know our public key.)
    mac2 = HMAC-SHA256(cookie, every byte before mac2)[:16] when the initiator holds a
    cookie from the responder less than COOKIE_LIFETIME old, else 16 zero bytes. A
    responder under load answers an initiation without a valid mac2 with a cookie reply
    (0xA3) instead of processing it (proto/cookie.py): mac2 proves the initiator receives
    datagrams at its source address. Responses carry no mac2: they are accepted only for an
    index of a pending initiation, so a flood of them costs a table lookup each.

Payload (inside the Noise encryption, both messages):

    cert_len (u16 le) | certificate (DER) | ext_len (u16 le) | ext (UTF-8 JSON object)

    ext carries {"ts": <wall clock, ns>} in an initiation (the responder's link refuses a ts
    not above the last one it accepted: replay protection, as WireGuard's TAI64N stamp) and
    whatever the link layer adds (selective security: "policy", "groups").

Each side verifies the other's certificate against the overlay CA and requires its public
key to be the Noise static key the handshake proved possession of.

This module never: reads a clock or touches a socket, file or event loop (`now_wall` comes
in; a test scans the imports); raises anything but `BadPacket` (or its subclasses
`RemoteProtocolError`, `CertificateRefused`) from an `*_untrusted` function.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..errors import (
    BadPacket,
    CertificateRefused,
    LocalProtocolError,
    PkiError,
    RemoteProtocolError,
)
from .cert import Identity, TrustAnchor
from .session import Cipher, hkdf2
from .wire import Kind

# --- Protocol constants -------------------------------------------------------------------

PROLOGUE_PREFIX = b"ipop-trio v1"
PROTOCOL_NAMES: Mapping[Cipher, bytes] = {
    Cipher.AES_256_GCM: b"Noise_IK_25519_AESGCM_SHA256",
    Cipher.CHACHA20_POLY1305: b"Noise_IK_25519_ChaChaPoly_SHA256",
}
MAC1_LABEL = b"mac1----"

KEY_SIZE = 32  # X25519 keys, SHA-256 output (Noise DHLEN = HASHLEN = 32)
TAG_SIZE = 16
MAC_SIZE = 16

# type(1) pad(3) sender_index(4) ephemeral(32) encrypted_static(48)
INITIATION = struct.Struct("<B3xI32s48s")
# type(1) pad(3) sender_index(4) receiver_index(4) ephemeral(32)
RESPONSE = struct.Struct("<B3xII32s")
U16 = struct.Struct("<H")
_PAD = b"\x00\x00\x00"  # must be zero (room for a version later)

# The smallest payload is two empty length fields; the Noise encryption adds a tag.
MIN_PAYLOAD = 2 * U16.size
INITIATION_MACS = 2 * MAC_SIZE  # mac1, mac2
MIN_INITIATION_SIZE = INITIATION.size + MIN_PAYLOAD + TAG_SIZE + INITIATION_MACS
MIN_RESPONSE_SIZE = RESPONSE.size + MIN_PAYLOAD + TAG_SIZE + MAC_SIZE
MAX_CERT_SIZE = 4096  # a node certificate is ~400 bytes
MAX_EXT_SIZE = 2048
MAX_HANDSHAKE_SIZE = (
    INITIATION.size + 2 * U16.size + MAX_CERT_SIZE + MAX_EXT_SIZE + TAG_SIZE + INITIATION_MACS
)
NO_MAC2 = bytes(MAC_SIZE)

TIMESTAMP_KEY = "ts"


# --- Noise: CipherState, SymmetricState (spec §5.1, §5.2) ---------------------------------


_NONCE_AESGCM = struct.Struct(">4xQ")  # §12.3: big-endian counter
_NONCE_CHACHA = struct.Struct("<4xQ")  # §12.4: little-endian counter


class CipherState:
    """Noise §5.1: a key (k) and a nonce counter (n)."""

    __slots__ = ("_aead", "_nonce", "n")

    def __init__(self, cipher: Cipher, key: bytes) -> None:
        if cipher is Cipher.AES_256_GCM:
            self._aead: AESGCM | ChaCha20Poly1305 = AESGCM(key)
            self._nonce = _NONCE_AESGCM
        else:
            self._aead = ChaCha20Poly1305(key)
            self._nonce = _NONCE_CHACHA
        self.n = 0

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        out = self._aead.encrypt(self._nonce.pack(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Raises `cryptography.exceptions.InvalidTag`; n moves only on success."""
        out = self._aead.decrypt(self._nonce.pack(self.n), ciphertext, ad)
        self.n += 1
        return out


class SymmetricState:
    """Noise §5.2: chaining key, handshake hash and the current CipherState.

    Every handshake message is processed on a `copy()`, so a forged message leaves the
    pending handshake as it was."""

    __slots__ = ("cipher", "ck", "cs", "h")

    def __init__(self, cipher: Cipher, protocol_name: bytes | None = None) -> None:
        name = PROTOCOL_NAMES[cipher] if protocol_name is None else protocol_name
        h = (
            name.ljust(KEY_SIZE, b"\x00")
            if len(name) <= KEY_SIZE
            else hashlib.sha256(name).digest()
        )
        self.cipher = cipher
        self.ck = h
        self.h = h
        self.cs: CipherState | None = None

    def copy(self) -> SymmetricState:
        other = SymmetricState.__new__(SymmetricState)
        other.cipher = self.cipher
        other.ck = self.ck
        other.h = self.h
        other.cs = None
        if self.cs is not None:
            other.cs = CipherState.__new__(CipherState)
            other.cs._aead = self.cs._aead
            other.cs._nonce = self.cs._nonce
            other.cs.n = self.cs.n
        return other

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, key = hkdf2(self.ck, ikm)
        self.cs = CipherState(self.cipher, key)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        if self.cs is None:
            out = plaintext
        else:
            out = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(out)
        return out

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        if self.cs is None:
            out = ciphertext
        else:
            out = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return out

    def split(self) -> tuple[bytes, bytes]:
        """(initiator → responder key, responder → initiator key). The node never calls
        this: a session is made from the chaining key (`Keys.chaining_key`), so on the
        native path the transport keys exist only inside the extension."""
        return hkdf2(self.ck, b"")


def _public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """Raises ValueError for a malformed or low-order public key (all-zero output)."""
    return private.exchange(X25519PublicKey.from_public_bytes(public))


# --- Noise IK message processing (§7.5 pattern IK, §5.3 WriteMessage / ReadMessage) -------


def ik_start(cipher: Cipher, prologue: bytes, responder_static: bytes) -> SymmetricState:
    """Initialize(): protocol name, prologue, then the pre-message `<- s`."""
    sym = SymmetricState(cipher)
    sym.mix_hash(prologue)
    sym.mix_hash(responder_static)
    return sym


def ik_write_initiation(
    sym: SymmetricState,
    e: X25519PrivateKey,
    s: X25519PrivateKey,
    rs: bytes,
    payload: bytes,
) -> tuple[bytes, bytes, bytes]:
    """-> e, es, s, ss; returns (ephemeral, encrypted_static, encrypted_payload)."""
    e_pub = _public(e)
    sym.mix_hash(e_pub)
    sym.mix_key(_dh(e, rs))
    encrypted_static = sym.encrypt_and_hash(_public(s))
    sym.mix_key(_dh(s, rs))
    return e_pub, encrypted_static, sym.encrypt_and_hash(payload)


def ik_read_initiation(
    sym: SymmetricState,
    s: X25519PrivateKey,
    re: bytes,
    encrypted_static: bytes,
    encrypted_payload: bytes,
) -> tuple[bytes, bytes]:
    """Responder side of `ik_write_initiation`; returns (initiator static, payload).

    Raises ValueError / InvalidTag (the caller translates)."""
    sym.mix_hash(re)
    sym.mix_key(_dh(s, re))
    rs = sym.decrypt_and_hash(encrypted_static)
    sym.mix_key(_dh(s, rs))
    return rs, sym.decrypt_and_hash(encrypted_payload)


def ik_write_response(
    sym: SymmetricState, e: X25519PrivateKey, re: bytes, rs: bytes, payload: bytes
) -> tuple[bytes, bytes]:
    """<- e, ee, se; returns (ephemeral, encrypted_payload)."""
    e_pub = _public(e)
    sym.mix_hash(e_pub)
    sym.mix_key(_dh(e, re))
    sym.mix_key(_dh(e, rs))
    return e_pub, sym.encrypt_and_hash(payload)


def ik_read_response(
    sym: SymmetricState,
    e: X25519PrivateKey,
    s: X25519PrivateKey,
    re: bytes,
    encrypted_payload: bytes,
) -> bytes:
    """Initiator side of `ik_write_response`; returns the payload."""
    sym.mix_hash(re)
    sym.mix_key(_dh(e, re))
    sym.mix_key(_dh(s, re))
    return sym.decrypt_and_hash(encrypted_payload)


# --- Identities and states ----------------------------------------------------------------


def prologue_for(anchor: TrustAnchor) -> bytes:
    return PROLOGUE_PREFIX + anchor.name.encode()


def mac1_key(static_public: bytes) -> bytes:
    return hashlib.sha256(MAC1_LABEL + static_public).digest()


def _mac1(key: bytes, message: bytes | memoryview) -> bytes:
    return hmac.digest(key, message, "sha256")[:MAC_SIZE]


def mac2(cookie: bytes, message_before_mac2: bytes | memoryview) -> bytes:
    """mac2 of an initiation: keyed by the responder's cookie (proto/cookie.py)."""
    return hmac.digest(cookie, message_before_mac2, "sha256")[:MAC_SIZE]


def initiation_mac1(data: bytes | memoryview) -> bytes:
    """The mac1 field of an initiation (a cookie reply's associated data)."""
    return bytes(data[-INITIATION_MACS:-MAC_SIZE])


@dataclass(frozen=True, slots=True)
class LocalIdentity:
    """This node's link key and certificate, and the CA it trusts.

    `public_key` is derived once. `check(now)` verifies, at startup, that the certificate
    is valid under `anchor` and certifies this key (operator input: raises `PkiError`)."""

    static_private: bytes = field(repr=False)  # raw 32-byte X25519
    cert_der: bytes = field(repr=False)
    anchor: TrustAnchor
    public_key: bytes = field(init=False)
    _private: X25519PrivateKey = field(init=False, repr=False, compare=False)
    _mac1_key: bytes = field(init=False, repr=False, compare=False)
    _prologue: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.static_private) != KEY_SIZE:
            raise LocalProtocolError(f"static private key must be {KEY_SIZE} raw bytes")
        private = X25519PrivateKey.from_private_bytes(bytes(self.static_private))
        public = _public(private)
        object.__setattr__(self, "_private", private)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "_mac1_key", mac1_key(public))
        object.__setattr__(self, "_prologue", prologue_for(self.anchor))

    def check(self, now: float) -> Identity:
        """Our own certificate as peers will see it; PkiError if they would refuse it."""
        try:
            identity = self.anchor.verify_untrusted(self.cert_der, now)
        except CertificateRefused as exc:
            raise PkiError(f"own certificate refused: {exc}") from exc
        if identity.public_key != self.public_key:
            raise PkiError("own certificate does not certify this node's link key")
        return identity


@dataclass(frozen=True, slots=True)
class InitiatorState:
    """A sent initiation waiting for its response (one per attempt; never reused)."""

    local: LocalIdentity
    peer_static: bytes
    sender_index: int
    cipher: Cipher
    timestamp_ns: int
    _sym: SymmetricState = field(repr=False, compare=False)
    _e: X25519PrivateKey = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ResponderState:
    """A verified initiation: who sent it (certificate checked against the CA and the
    handshake key), their index and extension fields. Feed it to `create_response`."""

    local: LocalIdentity
    cipher: Cipher
    peer: Identity
    peer_index: int
    ext: Mapping[str, Any]
    _sym: SymmetricState = field(repr=False, compare=False)
    _re: bytes = field(repr=False, compare=False)

    @property
    def peer_static(self) -> bytes:
        return self.peer.public_key

    @property
    def timestamp_ns(self) -> int:
        ts: int = self.ext[TIMESTAMP_KEY]
        return ts


@dataclass(frozen=True, slots=True)
class Keys:
    """The result of a handshake: the final chaining key (Noise's Split() derives the
    transport keys from it, inside the session object), which end we were, and who is at
    the other end."""

    chaining_key: bytes = field(repr=False)
    initiator: bool
    local_index: int
    remote_index: int
    peer: Identity
    ext: Mapping[str, Any]


# --- Payload codec ------------------------------------------------------------------------


def _check_index(index: int) -> None:
    if not 0 <= index < 2**32:
        raise LocalProtocolError(f"index {index} does not fit in a u32")


def encode_payload(cert_der: bytes, ext: Mapping[str, Any]) -> bytes:
    ext_bytes = json.dumps(dict(ext), separators=(",", ":"), allow_nan=False).encode()
    if len(cert_der) > MAX_CERT_SIZE:
        raise LocalProtocolError(f"certificate larger than {MAX_CERT_SIZE} bytes")
    if len(ext_bytes) > MAX_EXT_SIZE:
        raise LocalProtocolError(f"handshake extension larger than {MAX_EXT_SIZE} bytes")
    return U16.pack(len(cert_der)) + cert_der + U16.pack(len(ext_bytes)) + ext_bytes


def _refuse_constant(name: str) -> None:
    raise ValueError(f"JSON constant {name} refused")


def decode_payload_untrusted(payload: bytes) -> tuple[bytes, dict[str, Any]]:
    """(certificate DER, ext) of a decrypted payload, or RemoteProtocolError."""
    if len(payload) < MIN_PAYLOAD:
        raise RemoteProtocolError("handshake payload too short")
    (cert_len,) = U16.unpack_from(payload, 0)
    ext_at = U16.size + cert_len
    if cert_len > MAX_CERT_SIZE or ext_at + U16.size > len(payload):
        raise RemoteProtocolError("handshake payload: bad certificate length")
    (ext_len,) = U16.unpack_from(payload, ext_at)
    if ext_len > MAX_EXT_SIZE or ext_at + U16.size + ext_len != len(payload):
        raise RemoteProtocolError("handshake payload: bad extension length")
    cert_der = payload[U16.size : ext_at]
    ext_bytes = payload[ext_at + U16.size :]
    if not ext_bytes:
        return cert_der, {}
    try:
        ext = json.loads(ext_bytes.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise RemoteProtocolError(f"handshake extension is not JSON: {exc}") from None
    if not isinstance(ext, dict):
        raise RemoteProtocolError("handshake extension is not a JSON object")
    return cert_der, ext


def _verify_peer_untrusted(
    anchor: TrustAnchor, cert_der: bytes, static: bytes, now_wall: float
) -> Identity:
    identity = anchor.verify_untrusted(cert_der, now_wall)
    if not hmac.compare_digest(identity.public_key, static):
        raise CertificateRefused("certificate does not match handshake key")
    return identity


# --- The four steps -----------------------------------------------------------------------


def create_initiation(
    local: LocalIdentity,
    peer_static_public: bytes,
    sender_index: int,
    cipher: Cipher,
    ext: Mapping[str, Any],
    now_wall: float,
    *,
    timestamp_ns: int | None = None,
    cookie: bytes | None = None,
    _ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, InitiatorState]:
    """An initiation datagram to the node owning `peer_static_public`, and the state that
    reads its response. `ext` gains {"ts": timestamp_ns}, by default `now_wall` in ns;
    callers that send several initiations keep it strictly increasing. `cookie`, from the
    peer's last cookie reply while fresh, keys mac2 (else mac2 is zero)."""
    _check_index(sender_index)
    if len(peer_static_public) != KEY_SIZE:
        raise LocalProtocolError(f"peer static key must be {KEY_SIZE} raw bytes")
    ts = int(now_wall * 1e9) if timestamp_ns is None else timestamp_ns
    full_ext = {**ext, TIMESTAMP_KEY: ts}
    payload = encode_payload(local.cert_der, full_ext)
    e = X25519PrivateKey.generate() if _ephemeral is None else _ephemeral
    sym = ik_start(cipher, local._prologue, peer_static_public)
    try:
        e_pub, enc_static, enc_payload = ik_write_initiation(
            sym, e, local._private, peer_static_public, payload
        )
    except ValueError as exc:  # the configured peer key is a low-order point
        raise LocalProtocolError(f"unusable peer static key: {exc}") from exc
    body = INITIATION.pack(Kind.HANDSHAKE_INIT, sender_index, e_pub, enc_static) + enc_payload
    body += _mac1(mac1_key(peer_static_public), body)
    message = body + (NO_MAC2 if cookie is None else mac2(cookie, body))
    state = InitiatorState(
        local=local,
        peer_static=bytes(peer_static_public),
        sender_index=sender_index,
        cipher=cipher,
        timestamp_ns=ts,
        _sym=sym,
        _e=e,
    )
    return message, state


def _check_mac1_untrusted(key: bytes, data: bytes, end: int) -> None:
    """mac1 is the MAC_SIZE bytes before `end` (negative: counted from the end)."""
    stop = len(data) + end
    if not hmac.compare_digest(_mac1(key, data[: stop - MAC_SIZE]), data[stop - MAC_SIZE : stop]):
        raise BadPacket("handshake mac1 does not verify")


def check_initiation_mac1_untrusted(local: LocalIdentity, data: bytes | memoryview) -> None:
    """The cheap first check of an initiation (no DH): right size, right type, mac1 keyed by
    our static public key. Raises only BadPacket. Lets the node refuse junk before it spends
    any queue slot, rate-limit budget or X25519 work on it."""
    data = bytes(data)
    if len(data) < MIN_INITIATION_SIZE or len(data) > MAX_HANDSHAKE_SIZE:
        raise BadPacket("handshake initiation of impossible length")
    if data[0] != Kind.HANDSHAKE_INIT or data[1:4] != _PAD:
        raise BadPacket("not a handshake initiation")
    _check_mac1_untrusted(local._mac1_key, data, -MAC_SIZE)


def check_response_mac1_untrusted(local: LocalIdentity, data: bytes | memoryview) -> None:
    """The same cheap check for a response to one of our initiations."""
    data = bytes(data)
    if len(data) < MIN_RESPONSE_SIZE or len(data) > MAX_HANDSHAKE_SIZE:
        raise BadPacket("handshake response of impossible length")
    if data[0] != Kind.HANDSHAKE_RESP or data[1:4] != _PAD:
        raise BadPacket("not a handshake response")
    _check_mac1_untrusted(local._mac1_key, data, 0)


def consume_initiation_untrusted(
    local: LocalIdentity, data: bytes | memoryview, cipher: Cipher, now_wall: float
) -> ResponderState:
    """Verify an initiation sent to us: mac1, then the Noise message, then the sender's
    certificate (against our CA, and against the static key it proved). The node finds
    the peer's link by `state.peer_static`. Raises only BadPacket (and subclasses)."""
    data = bytes(data)
    if len(data) < MIN_INITIATION_SIZE or len(data) > MAX_HANDSHAKE_SIZE:
        raise BadPacket("handshake initiation of impossible length")
    kind, peer_index, re, enc_static = INITIATION.unpack_from(data)
    if kind != Kind.HANDSHAKE_INIT or data[1:4] != _PAD:
        raise BadPacket("not a handshake initiation")
    _check_mac1_untrusted(local._mac1_key, data, -MAC_SIZE)  # mac2 is the caller's (cookie.py)
    sym = ik_start(cipher, local._prologue, local.public_key)
    try:
        rs, payload = ik_read_initiation(
            sym, local._private, re, enc_static, data[INITIATION.size : -INITIATION_MACS]
        )
    except (ValueError, InvalidTag):
        raise BadPacket("handshake initiation does not decrypt") from None
    cert_der, ext = decode_payload_untrusted(payload)
    ts = ext.get(TIMESTAMP_KEY)
    if type(ts) is not int or ts < 0:
        raise RemoteProtocolError("handshake initiation without a valid timestamp")
    peer = _verify_peer_untrusted(local.anchor, cert_der, rs, now_wall)
    return ResponderState(
        local=local, cipher=cipher, peer=peer, peer_index=peer_index, ext=ext, _sym=sym, _re=re
    )


def create_response(
    state: ResponderState,
    sender_index: int,
    ext: Mapping[str, Any],
    *,
    _ephemeral: X25519PrivateKey | None = None,
) -> tuple[bytes, Keys]:
    """The response to a verified initiation, and the responder's session keys."""
    _check_index(sender_index)
    local = state.local
    payload = encode_payload(local.cert_der, ext)
    e = X25519PrivateKey.generate() if _ephemeral is None else _ephemeral
    sym = state._sym.copy()
    try:
        e_pub, enc_payload = ik_write_response(sym, e, state._re, state.peer_static, payload)
    except ValueError as exc:  # consume_initiation_untrusted already did these DHs
        raise LocalProtocolError(f"response DH failed: {exc}") from exc
    body = RESPONSE.pack(Kind.HANDSHAKE_RESP, sender_index, state.peer_index, e_pub) + enc_payload
    message = body + _mac1(mac1_key(state.peer_static), body)
    keys = Keys(
        chaining_key=sym.ck,
        initiator=False,
        local_index=sender_index,
        remote_index=state.peer_index,
        peer=state.peer,
        ext=state.ext,
    )
    return message, keys


def response_receiver_index_untrusted(data: bytes | memoryview) -> int:
    """The receiver index of a response (the initiator's sender index), so the node can
    route it to the link that sent the initiation. Checks only the length and type."""
    if len(data) < MIN_RESPONSE_SIZE:
        raise BadPacket("handshake response too short")
    kind, _sender, receiver, _e = RESPONSE.unpack_from(data)
    if kind != Kind.HANDSHAKE_RESP:
        raise BadPacket("not a handshake response")
    receiver_index: int = receiver
    return receiver_index


def consume_response_untrusted(
    state: InitiatorState, data: bytes | memoryview, now_wall: float
) -> Keys:
    """Verify the response to `state`'s initiation: mac1, receiver index, the Noise message,
    then the responder's certificate. `state` is not changed (a forged response leaves the
    handshake pending). Raises only BadPacket (and subclasses)."""
    data = bytes(data)
    if len(data) < MIN_RESPONSE_SIZE or len(data) > MAX_HANDSHAKE_SIZE:
        raise BadPacket("handshake response of impossible length")
    kind, peer_index, receiver_index, re = RESPONSE.unpack_from(data)
    if kind != Kind.HANDSHAKE_RESP or data[1:4] != _PAD:
        raise BadPacket("not a handshake response")
    local = state.local
    _check_mac1_untrusted(local._mac1_key, data, 0)
    if receiver_index != state.sender_index:
        raise BadPacket("handshake response for another initiation")
    sym = state._sym.copy()
    try:
        payload = ik_read_response(
            sym, state._e, local._private, re, data[RESPONSE.size : -MAC_SIZE]
        )
    except (ValueError, InvalidTag):
        raise BadPacket("handshake response does not decrypt") from None
    cert_der, ext = decode_payload_untrusted(payload)
    peer = _verify_peer_untrusted(local.anchor, cert_der, state.peer_static, now_wall)
    return Keys(
        chaining_key=sym.ck,
        initiator=True,
        local_index=state.sender_index,
        remote_index=peer_index,
        peer=peer,
        ext=ext,
    )
