"""STUN messages (RFC 8489, which obsoletes RFC 5389) and a pure retransmission timer.

What ICE (`ice.py`) and the TURN client (`turn.py`) put on the wire: Binding requests,
responses and indications; the TURN methods; the attributes both need; short-term
(ICE) and long-term (TURN) MESSAGE-INTEGRITY; FINGERPRINT. `StunTransaction` is the
client-transaction retransmission timer of RFC 8489 §6.2.1 as an object fed `now`.

A compact table-driven codec of our own rather than `aioice.stun`: importing `aioice.stun`
runs `aioice/__init__.py`, which imports asyncio, socket, ssl, threading, dnspython and
ifaddr (about 230 modules), and its parser lets struct.error, UnicodeDecodeError and
ValueError escape and accepts a wrong magic cookie. A sans-IO core that may raise only
`BadPacket` would have to wrap all of that, so the table below is smaller than the wrapper.

This module must never read a clock, touch a socket or an event loop (a test scans the
imports), or raise anything but `BadPacket` from an `*_untrusted` function.

Message (RFC 8489 §5):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |0 0|     STUN Message Type     |         Message Length        |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                   Magic Cookie (0x2112A442)                   |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                                                               |
    |                     Transaction ID (96 bits)                  |
    |                                                               |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |  attributes (Message Length bytes, a multiple of 4)  ...      |

    Message Type: method bits M11..M0 interleaved with class bits C1 C0:

      0                 1
      2  3  4 5 6 7 8 9 0 1 2 3 4 5
     +--+--+-+-+-+-+-+-+-+-+-+-+-+-+
     |M |M |M|M|M|C|M|M|M|C|M|M|M|M|
     |11|10|9|8|7|1|6|5|4|0|3|2|1|0|
     +--+--+-+-+-+-+-+-+-+-+-+-+-+-+

Attribute (§14), value padded to a multiple of 4 (padding content is ignored):

     0                   1                   2                   3
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |         Type                  |            Length             |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                         Value (variable)                ....
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

(XOR-)MAPPED-ADDRESS (§14.1, §14.2); X-Port = port ^ (cookie >> 16), X-Address = address
^ cookie (IPv4) or ^ (cookie || transaction id) (IPv6):

    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |0 0 0 0 0 0 0 0|    Family     |         X-Port                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                X-Address (32 bits or 128 bits)                |
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+

ERROR-CODE (§14.8): 21 reserved bits, Class (3 bits, 3..6), Number (8 bits, 0..99),
then a UTF-8 reason phrase.

MESSAGE-INTEGRITY (§14.5) is HMAC-SHA1 over the message up to (excluding) the attribute,
with the header length adjusted to end just after it; only FINGERPRINT may follow it.
FINGERPRINT (§14.7) is CRC-32 of the message up to it, xor 0x5354554E, and comes last.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import hmac
import ipaddress
import random
import stringprep
import struct
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadPacket, LocalProtocolError

Addr = tuple[str, int]  # (IP address as text, port)

# --- Constants (RFC 8489 §5, §14, §18; RFC 8656 §18; RFC 8445 §16) -----------------------

MAGIC_COOKIE = 0x2112A442
HEADER = struct.Struct("!HHI12s")  # type, length, cookie, transaction id
HEADER_SIZE = HEADER.size  # 20
ATTR_HEADER = struct.Struct("!HH")  # type, length
TRANSACTION_ID_SIZE = 12
MI_SIZE = 20  # HMAC-SHA1
FINGERPRINT_XOR = 0x5354554E
_FAMILY_PORT = struct.Struct("!xBH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_ERROR = struct.Struct("!HBB")
FAMILY_IPV4 = 0x01
FAMILY_IPV6 = 0x02
PROTO_UDP = 17  # REQUESTED-TRANSPORT value for UDP (RFC 8656 §18.9)


class Class(enum.IntEnum):
    """Message class (RFC 8489 §5): the C1 C0 bits."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class Method(enum.IntEnum):
    """Methods this codec knows (RFC 8489 §18.2, RFC 8656 §17)."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009


class Attr(enum.IntEnum):
    """Attribute types (RFC 8489 §18.3, RFC 8656 §18, RFC 8445 §16.1)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_TRANSPORT = 0x0019
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    SOFTWARE = 0x8022
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A


# Error codes used here (RFC 8489 §14.8, RFC 8656 §19, RFC 8445 §16.2).
BAD_REQUEST = 400
UNAUTHORIZED = 401
UNKNOWN_ATTRIBUTE = 420
ALLOCATION_MISMATCH = 437
STALE_NONCE = 438
ROLE_CONFLICT = 487


def message_type(method: int, cls: Class) -> int:
    """Interleave method and class bits into the 14-bit message type (§5)."""
    return (
        ((method & 0xF80) << 2)
        | ((method & 0x070) << 1)
        | (method & 0x00F)
        | ((cls & 0b10) << 7)
        | ((cls & 0b01) << 4)
    )


def split_message_type(value: int) -> tuple[int, Class]:
    """The inverse of `message_type`: (method, class)."""
    method = ((value & 0x3E00) >> 2) | ((value & 0x00E0) >> 1) | (value & 0x000F)
    cls = Class(((value & 0x0100) >> 7) | ((value & 0x0010) >> 4))
    return method, cls


@dataclass(frozen=True, slots=True)
class ErrorCode:
    code: int  # 300..699
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """One STUN message. Attributes are fields; None / () / False means absent.

    `parse_untrusted` also fills the trailing, non-compared fields: `raw` (the datagram),
    `integrity_offset` (where MESSAGE-INTEGRITY starts, -1 if absent; `verify_integrity`
    needs it), `fingerprint` (present and correct) and `unknown_required` (comprehension-
    required attribute types this codec does not know: a request with any gets a 420)."""

    method: Method
    cls: Class
    transaction_id: bytes
    mapped_address: Addr | None = None
    xor_mapped_address: Addr | None = None
    username: str | None = None
    error_code: ErrorCode | None = None
    unknown_attributes: tuple[int, ...] = ()
    channel_number: int | None = None
    lifetime: int | None = None
    xor_peer_address: tuple[Addr, ...] = ()
    data: bytes | None = None
    realm: str | None = None
    nonce: str | None = None
    xor_relayed_address: Addr | None = None
    requested_transport: int | None = None
    priority: int | None = None
    use_candidate: bool = False
    software: str | None = None
    ice_controlled: int | None = None
    ice_controlling: int | None = None
    raw: bytes = field(default=b"", compare=False, repr=False)
    integrity_offset: int = field(default=-1, compare=False, repr=False)
    fingerprint: bool = field(default=False, compare=False, repr=False)
    unknown_required: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @property
    def has_integrity(self) -> bool:
        return self.integrity_offset >= 0


def new_transaction_id(rng: random.Random) -> bytes:
    """96 random bits (§5: "uniformly and randomly chosen"; pass a SystemRandom in
    production, a seeded Random in tests)."""
    return rng.getrandbits(96).to_bytes(TRANSACTION_ID_SIZE, "big")


# --- Attribute value codecs ----------------------------------------------------------------


def _pack_address(addr: Addr, tid: bytes, xor: bool) -> bytes:
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError as exc:
        raise LocalProtocolError(f"not an IP address: {addr[0]!r}") from exc
    port = addr[1]
    family = FAMILY_IPV4 if ip.version == 4 else FAMILY_IPV6
    packed = ip.packed
    if xor:
        port ^= MAGIC_COOKIE >> 16
        pad = _U32.pack(MAGIC_COOKIE) + tid
        packed = bytes(a ^ b for a, b in zip(packed, pad, strict=False))
    return _FAMILY_PORT.pack(family, port) + packed


def _unpack_address(value: bytes, tid: bytes, xor: bool) -> Addr:
    if len(value) < 4:
        raise BadPacket("address attribute too short")
    family, port = _FAMILY_PORT.unpack_from(value)
    packed = value[4:]
    if (family, len(packed)) not in ((FAMILY_IPV4, 4), (FAMILY_IPV6, 16)):
        raise BadPacket(f"bad address family {family} / length {len(value)}")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        pad = _U32.pack(MAGIC_COOKIE) + tid
        packed = bytes(a ^ b for a, b in zip(packed, pad, strict=False))
    return str(ipaddress.ip_address(packed)), port


def _pack_text(value: str, limit: int) -> bytes:
    data = value.encode("utf-8")
    if len(data) > limit:
        raise LocalProtocolError(f"text attribute longer than {limit} bytes")
    return data


def _unpack_text(value: bytes, limit: int) -> str:
    if len(value) > limit:
        raise BadPacket(f"text attribute longer than {limit} bytes")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadPacket("text attribute is not UTF-8") from exc


def _unpack_fixed(st: struct.Struct, value: bytes) -> int:
    if len(value) != st.size:
        raise BadPacket(f"attribute of length {len(value)}, expected {st.size}")
    result: int = st.unpack(value)[0]
    return result


def _pack_error(value: ErrorCode, tid: bytes) -> bytes:
    if not 300 <= value.code <= 699:
        raise LocalProtocolError(f"error code {value.code} out of range")
    return _ERROR.pack(0, value.code // 100, value.code % 100) + _pack_text(value.reason, 763)


def _unpack_error(value: bytes, tid: bytes) -> ErrorCode:
    if len(value) < 4:
        raise BadPacket("ERROR-CODE too short")
    _, klass, number = _ERROR.unpack_from(value)
    klass &= 0x07
    if not 3 <= klass <= 6 or number > 99:
        raise BadPacket(f"ERROR-CODE {klass}/{number} out of range")
    return ErrorCode(klass * 100 + number, _unpack_text(value[4:], 763))


def _pack_unknown(value: tuple[int, ...], tid: bytes) -> bytes:
    return b"".join(_U16.pack(t) for t in value)


def _unpack_unknown(value: bytes, tid: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise BadPacket("UNKNOWN-ATTRIBUTES of odd length")
    return tuple(_U16.unpack_from(value, i)[0] for i in range(0, len(value), 2))


def _pack_channel(value: int, tid: bytes) -> bytes:
    return _U16.pack(value) + b"\x00\x00"  # RFC 8656 §18.1: number, then RFFU


def _unpack_channel(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise BadPacket("CHANNEL-NUMBER of bad length")
    result: int = _U16.unpack_from(value)[0]
    return result


def _pack_transport(value: int, tid: bytes) -> bytes:
    return bytes((value, 0, 0, 0))  # RFC 8656 §18.9: protocol, then RFFU


def _unpack_transport(value: bytes, tid: bytes) -> int:
    if len(value) != 4:
        raise BadPacket("REQUESTED-TRANSPORT of bad length")
    return value[0]


def _pack_flag(value: bool, tid: bytes) -> bytes:
    return b""


def _unpack_flag(value: bytes, tid: bytes) -> bool:
    if value:
        raise BadPacket("flag attribute with a value")
    return True


@dataclass(frozen=True, slots=True)
class _Spec:
    type: Attr
    name: str  # the Message field
    pack: Callable[[Any, bytes], bytes]
    unpack: Callable[[bytes, bytes], Any]
    repeated: bool = False  # a tuple field: every occurrence is kept


def _addr_spec(t: Attr, name: str, xor: bool, repeated: bool = False) -> _Spec:
    return _Spec(
        t,
        name,
        lambda v, tid: _pack_address(v, tid, xor),
        lambda v, tid: _unpack_address(v, tid, xor),
        repeated,
    )


def _text_spec(t: Attr, name: str, limit: int) -> _Spec:
    return _Spec(
        t, name, lambda v, tid: _pack_text(v, limit), lambda v, tid: _unpack_text(v, limit)
    )


def _int_spec(t: Attr, name: str, st: struct.Struct) -> _Spec:
    return _Spec(t, name, lambda v, tid: st.pack(v), lambda v, tid: _unpack_fixed(st, v))


# The table. Encoding follows this order (so SOFTWARE first, USERNAME / NONCE / REALM last,
# as in the RFC 5769 samples); MESSAGE-INTEGRITY and FINGERPRINT are appended by `encode`.
ATTRIBUTES: tuple[_Spec, ...] = (
    _text_spec(Attr.SOFTWARE, "software", 763),
    _Spec(Attr.ERROR_CODE, "error_code", _pack_error, _unpack_error),
    _Spec(Attr.UNKNOWN_ATTRIBUTES, "unknown_attributes", _pack_unknown, _unpack_unknown),
    _addr_spec(Attr.MAPPED_ADDRESS, "mapped_address", xor=False),
    _addr_spec(Attr.XOR_RELAYED_ADDRESS, "xor_relayed_address", xor=True),
    _addr_spec(Attr.XOR_MAPPED_ADDRESS, "xor_mapped_address", xor=True),
    _Spec(Attr.REQUESTED_TRANSPORT, "requested_transport", _pack_transport, _unpack_transport),
    _int_spec(Attr.LIFETIME, "lifetime", _U32),
    _Spec(Attr.CHANNEL_NUMBER, "channel_number", _pack_channel, _unpack_channel),
    _addr_spec(Attr.XOR_PEER_ADDRESS, "xor_peer_address", xor=True, repeated=True),
    _Spec(Attr.DATA, "data", lambda v, tid: bytes(v), lambda v, tid: bytes(v)),
    _int_spec(Attr.PRIORITY, "priority", _U32),
    _int_spec(Attr.ICE_CONTROLLED, "ice_controlled", _U64),
    _int_spec(Attr.ICE_CONTROLLING, "ice_controlling", _U64),
    _Spec(Attr.USE_CANDIDATE, "use_candidate", _pack_flag, _unpack_flag),
    _text_spec(Attr.USERNAME, "username", 513),
    _text_spec(Attr.NONCE, "nonce", 763),
    _text_spec(Attr.REALM, "realm", 763),
)
_BY_TYPE: dict[int, _Spec] = {s.type: s for s in ATTRIBUTES}


def _padding(length: int) -> int:
    return -length & 3


# --- Encoding ---------------------------------------------------------------------------


def encode(msg: Message, *, key: bytes | None = None, fingerprint: bool = True) -> bytes:
    """The bytes of `msg`, with MESSAGE-INTEGRITY under `key` if given (§14.5) and
    FINGERPRINT (§14.7) unless `fingerprint=False`. Raises LocalProtocolError for values
    that cannot be encoded (our bug, not the network's)."""
    if len(msg.transaction_id) != TRANSACTION_ID_SIZE:
        raise LocalProtocolError("transaction id must be 12 bytes")
    parts: list[bytes] = []
    for spec in ATTRIBUTES:
        value = getattr(msg, spec.name)
        if value is None or value is False or value == ():
            continue
        for item in value if spec.repeated else (value,):
            body = spec.pack(item, msg.transaction_id)
            if len(body) > 0xFFFF:
                raise LocalProtocolError(f"{spec.type.name} too long")
            parts.append(ATTR_HEADER.pack(spec.type, len(body)))
            parts.append(body)
            parts.append(b"\x00" * _padding(len(body)))
    body = b"".join(parts)
    mtype = message_type(msg.method, msg.cls)
    if key is not None:
        # The length covers MESSAGE-INTEGRITY itself while the HMAC is computed (§14.5).
        head = HEADER.pack(mtype, len(body) + 4 + MI_SIZE, MAGIC_COOKIE, msg.transaction_id)
        mac = hmac.new(key, head + body, hashlib.sha1).digest()
        body += ATTR_HEADER.pack(Attr.MESSAGE_INTEGRITY, MI_SIZE) + mac
    if fingerprint:
        head = HEADER.pack(mtype, len(body) + 8, MAGIC_COOKIE, msg.transaction_id)
        crc = binascii.crc32(head + body) ^ FINGERPRINT_XOR
        body += ATTR_HEADER.pack(Attr.FINGERPRINT, 4) + _U32.pack(crc)
    if len(body) > 0xFFFF:
        raise LocalProtocolError("STUN message too long")
    return HEADER.pack(mtype, len(body), MAGIC_COOKIE, msg.transaction_id) + body


# --- Parsing -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    method: int  # may be a method this codec does not know
    cls: Class
    transaction_id: bytes


def header_untrusted(data: bytes | memoryview) -> Header:
    """Cheap routing peek (method, class, transaction id) without parsing attributes."""
    if len(data) < HEADER_SIZE:
        raise BadPacket("STUN message shorter than its header")
    mtype, length, cookie, tid = HEADER.unpack_from(data)
    if mtype & 0xC000 or cookie != MAGIC_COOKIE:
        raise BadPacket("not a STUN message (type bits or magic cookie)")
    if length & 3 or len(data) != HEADER_SIZE + length:
        raise BadPacket("STUN length does not match the datagram")
    method, cls = split_message_type(mtype)
    return Header(method, cls, bytes(tid))


def parse_untrusted(data: bytes | memoryview) -> Message:
    """Parse one STUN message from a datagram, or raise BadPacket.

    Checks: header (§5, §6.3), every attribute's length and value, FINGERPRINT if present
    (must be last, must match). MESSAGE-INTEGRITY is located, not verified: the key may
    depend on the message (USERNAME, REALM), so call `verify_integrity` next. Attributes
    after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (§14.5); of an attribute
    that repeats only the first counts (§14), except XOR-PEER-ADDRESS (RFC 8656 §9.1)."""
    raw = bytes(data)
    hdr = header_untrusted(raw)
    try:
        method = Method(hdr.method)
    except ValueError:
        raise BadPacket(f"unknown STUN method {hdr.method:#x}") from None
    tid = hdr.transaction_id
    values: dict[str, Any] = {}
    repeated: dict[str, list[Any]] = {}
    unknown: list[int] = []
    integrity_offset = -1
    fingerprint = False
    pos = HEADER_SIZE
    end = len(raw)
    while pos < end:
        if fingerprint:
            raise BadPacket("attribute after FINGERPRINT")
        if end - pos < 4:
            raise BadPacket("truncated attribute header")
        atype, alen = ATTR_HEADER.unpack_from(raw, pos)
        start = pos + 4
        stop = start + alen
        if stop + _padding(alen) > end:
            raise BadPacket("attribute runs past the message")
        value = raw[start:stop]
        if atype == Attr.FINGERPRINT:
            if alen != 4:
                raise BadPacket("FINGERPRINT of bad length")
            # The header length already ends after FINGERPRINT, since it must be last.
            if _U32.unpack(value)[0] != binascii.crc32(raw[:pos]) ^ FINGERPRINT_XOR:
                raise BadPacket("FINGERPRINT does not match")
            fingerprint = True
        elif integrity_offset >= 0:
            pass  # §14.5: everything after MESSAGE-INTEGRITY but FINGERPRINT is ignored
        elif atype == Attr.MESSAGE_INTEGRITY:
            if alen != MI_SIZE:
                raise BadPacket("MESSAGE-INTEGRITY of bad length")
            integrity_offset = pos
        elif (spec := _BY_TYPE.get(atype)) is not None:
            item = spec.unpack(value, tid)
            if spec.repeated:
                repeated.setdefault(spec.name, []).append(item)
            elif spec.name not in values:
                values[spec.name] = item
        elif atype < 0x8000:
            unknown.append(atype)  # comprehension-required (§14)
        pos = stop + _padding(alen)
    for name, items in repeated.items():
        values[name] = tuple(items)
    return Message(
        method,
        hdr.cls,
        tid,
        **values,
        raw=raw,
        integrity_offset=integrity_offset,
        fingerprint=fingerprint,
        unknown_required=tuple(unknown),
    )


def verify_integrity(msg: Message, key: bytes) -> bool:
    """True if `msg` (from `parse_untrusted`) carries a MESSAGE-INTEGRITY valid under `key`."""
    off = msg.integrity_offset
    if off < 0:
        return False
    raw = msg.raw
    head = raw[:2] + _U16.pack(off + 4 + MI_SIZE - HEADER_SIZE) + raw[4:HEADER_SIZE]
    mac = hmac.new(key, head + raw[HEADER_SIZE:off], hashlib.sha1).digest()
    return hmac.compare_digest(mac, raw[off + 4 : off + 4 + MI_SIZE])


# --- Credentials -------------------------------------------------------------------------


def short_term_key(password: str) -> bytes:
    """Short-term credential key (§9.1.1): the password itself. ICE passwords are ASCII
    ice-chars (RFC 8445 §5.3), which OpaqueString leaves unchanged."""
    return password.encode("utf-8")


def saslprep(text: str) -> str:
    """SASLprep (RFC 4013): map, NFKC-normalise, refuse prohibited and bad bidi text.

    RFC 8489 §9.2.2 keeps the RFC 5389 key `MD5(username ":" realm ":" SASLprep(password))`
    for TURN's long-term credentials; RFC 5769 §2.4's sample exercises the mapping."""
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    norm = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_a1,
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    for c in norm:
        if any(test(c) for test in prohibited):
            raise LocalProtocolError(f"SASLprep: prohibited character U+{ord(c):04X}")
    if any(stringprep.in_table_d1(c) for c in norm) and (
        any(stringprep.in_table_d2(c) for c in norm)
        or not (stringprep.in_table_d1(norm[0]) and stringprep.in_table_d1(norm[-1]))
    ):
        raise LocalProtocolError("SASLprep: bad bidirectional text")
    return norm


def long_term_key(username: str, realm: str, password: str) -> bytes:
    """Long-term credential key (RFC 8489 §9.2.2, MD5 variant)."""
    text = f"{username}:{realm}:{saslprep(password)}".encode()
    return hashlib.md5(text, usedforsecurity=False).digest()


# --- Builders ----------------------------------------------------------------------------


def success_response(request: Message, **attrs: Any) -> Message:
    """A success response to `request` (same method and transaction id)."""
    return Message(request.method, Class.SUCCESS, request.transaction_id, **attrs)


def error_response(request: Message, code: int, reason: str = "", **attrs: Any) -> Message:
    """An error response to `request` carrying ERROR-CODE `code`."""
    return Message(
        request.method,
        Class.ERROR,
        request.transaction_id,
        error_code=ErrorCode(code, reason),
        **attrs,
    )


# --- Client transactions (RFC 8489 §6.2.1) -------------------------------------------------

RTO = 0.5  # initial retransmission timeout, seconds (§6.2.1: "SHOULD be ... 500 ms")
RC = 7  # transmissions in all, the first included
RM = 16  # after the last transmission, wait Rm * RTO for a response


class TransactionState(enum.Enum):
    PENDING = "pending"
    DONE = "done"  # a response arrived (`complete`)
    TIMED_OUT = "timed_out"


class StunTransaction:
    """The retransmission timer of one request, fed `now` (RFC 8489 §6.2.1).

    The caller sends `request` once when it makes the transaction, then calls
    `handle_timeout(now)` at `next_deadline()`: True means "send `request` again now".
    With the defaults the request goes out at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s and
    the transaction times out at 39.5 s. RTO doubles each time, scheduled from the previous
    deadline, so late timer calls do not stretch the schedule.

    `cancel()` stops retransmissions but keeps waiting for a response until the final
    timeout (RFC 8445 §7.3.1.4 "cancellation" of an in-progress check)."""

    __slots__ = (
        "_deadline",
        "_final",
        "_interval",
        "_rc",
        "request",
        "sent_at",
        "state",
        "transaction_id",
        "transmissions",
    )

    def __init__(
        self,
        transaction_id: bytes,
        request: bytes,
        now: float,
        *,
        rto: float = RTO,
        rc: int = RC,
        rm: int = RM,
    ) -> None:
        if rc < 1 or rto <= 0:
            raise LocalProtocolError("a transaction needs rc >= 1 and rto > 0")
        self.transaction_id = transaction_id
        self.request = request
        self.sent_at = now
        self.state = TransactionState.PENDING
        self.transmissions = 1
        self._rc = rc
        self._interval = rto
        # The moment the transaction gives up: after the last of rc transmissions, Rm * RTO.
        self._final = now + rto * (2 ** (rc - 1) - 1) + rm * rto
        self._deadline = now + rto if rc > 1 else self._final

    @property
    def retransmitted(self) -> bool:
        """True once a retransmission went out (Karn: its RTT is ambiguous)."""
        return self.transmissions > 1

    @property
    def done(self) -> bool:
        return self.state is not TransactionState.PENDING

    def next_deadline(self) -> float | None:
        return self._deadline if self.state is TransactionState.PENDING else None

    def handle_timeout(self, now: float) -> bool:
        """Advance the timer; True when `request` must be sent again now."""
        if self.state is not TransactionState.PENDING or now < self._deadline:
            return False
        if self._deadline >= self._final:
            self.state = TransactionState.TIMED_OUT
            return False
        self.transmissions += 1
        if self.transmissions >= self._rc:
            self._deadline = self._final
        else:
            self._interval *= 2
            self._deadline += self._interval
        return True

    def cancel(self) -> None:
        """No more retransmissions; a response is still accepted until the final timeout."""
        if self.state is TransactionState.PENDING:
            self._deadline = self._final

    def complete(self) -> None:
        """A response arrived: stop the timer."""
        self.state = TransactionState.DONE
