"""The STUN codec against the RFC 5769 test vectors, round trips, fuzzing, and the pure
RFC 8489 §6.2.1 retransmission timer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket, LocalProtocolError
from ipop_trio.proto import stun
from ipop_trio.proto.stun import (
    Class,
    ErrorCode,
    Message,
    Method,
    StunTransaction,
    TransactionState,
)


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(line.split("#")[0] for line in text.splitlines()))


# RFC 5769 §2.1 Sample Request (typed in from the RFC; padding bytes are 0x20 there).
SAMPLE_REQUEST = _hex("""
    00 01 00 58   # Request type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # Transaction ID
    bc 34 d6 86
    fa 87 df ae
    80 22 00 10   # SOFTWARE attribute header
    53 54 55 4e   # "STUN test client"
    20 74 65 73
    74 20 63 6c
    69 65 6e 74
    00 24 00 04   # PRIORITY attribute header
    6e 00 01 ff   # ICE priority value
    80 29 00 08   # ICE-CONTROLLED attribute header
    93 2f f9 b1   # pseudo-random tie breaker
    51 26 3b 36
    00 06 00 09   # USERNAME attribute header
    65 76 74 6a   # "evtj:h6vY" and 3 bytes of padding
    3a 68 36 76
    59 20 20 20
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    9a ea a7 0c   # HMAC-SHA1
    bf d8 cb 56
    78 1e f2 b5
    b2 d3 f2 49
    c1 b5 71 a2
    80 28 00 04   # FINGERPRINT attribute header
    e5 7a 3b cf   # CRC32 fingerprint
""")

# RFC 5769 §2.2 Sample IPv4 Response.
SAMPLE_IPV4_RESPONSE = _hex("""
    01 01 00 3c   # Response type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # Transaction ID
    bc 34 d6 86
    fa 87 df ae
    80 22 00 0b   # SOFTWARE attribute header
    74 65 73 74   # "test vector" and 1 byte of padding
    20 76 65 63
    74 6f 72 20
    00 20 00 08   # XOR-MAPPED-ADDRESS attribute header
    00 01 a1 47   # family (IPv4) and xor'd port
    e1 12 a6 43   # xor'd IPv4 address
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    2b 91 f5 99
    fd 9e 90 c3
    8c 74 89 f9
    2a f9 ba 53
    f0 6b e7 d7
    80 28 00 04   # FINGERPRINT attribute header
    c0 7d 4c 96
""")

# RFC 5769 §2.3 Sample IPv6 Response.
SAMPLE_IPV6_RESPONSE = _hex("""
    01 01 00 48   # Response type and message length
    21 12 a4 42   # Magic cookie
    b7 e7 a7 01   # Transaction ID
    bc 34 d6 86
    fa 87 df ae
    80 22 00 0b   # SOFTWARE attribute header
    74 65 73 74   # "test vector" and 1 byte of padding
    20 76 65 63
    74 6f 72 20
    00 20 00 14   # XOR-MAPPED-ADDRESS attribute header
    00 02 a1 47   # family (IPv6) and xor'd port
    01 13 a9 fa   # xor'd IPv6 address
    a5 d3 f1 79
    bc 25 f4 b5
    be d2 b9 d9
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    a3 82 95 4e
    4b e6 7b f1
    17 84 c9 7c
    82 92 c2 75
    bf e3 ed 41
    80 28 00 04   # FINGERPRINT attribute header
    c8 fb 0b 4c
""")

# RFC 5769 §2.4 Sample Request with Long-Term Authentication (no FINGERPRINT).
SAMPLE_LONG_TERM_REQUEST = _hex("""
    00 01 00 60   # Request type and message length
    21 12 a4 42   # Magic cookie
    78 ad 34 33   # Transaction ID
    c6 ad 72 c0
    29 da 41 2e
    00 06 00 12   # USERNAME attribute header
    e3 83 9e e3   # U+30DE U+30C8 U+30EA U+30C3 U+30AF U+30B9 (18 bytes) + 2 padding
    83 88 e3 83
    aa e3 83 83
    e3 82 af e3
    82 b9 00 00
    00 15 00 1c   # NONCE attribute header
    66 2f 2f 34   # "f//499k954d6OL34oL9FSTvy64sA"
    39 39 6b 39
    35 34 64 36
    4f 4c 33 34
    6f 4c 39 46
    53 54 76 79
    36 34 73 41
    00 14 00 0b   # REALM attribute header
    65 78 61 6d   # "example.org" and 1 byte of padding
    70 6c 65 2e
    6f 72 67 00
    00 08 00 14   # MESSAGE-INTEGRITY attribute header
    f6 70 24 65
    6d d6 4a 3e
    02 b8 e0 71
    2e 85 c9 a2
    8c a8 96 66
""")

SHORT_TERM_PASSWORD = "VOkJxbRl1RmTxUk/WvJxBt"
TID_5769 = bytes.fromhex("b7e7a701bc34d686fa87dfae")


# --- RFC 5769 -------------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    msg = stun.parse_untrusted(SAMPLE_REQUEST)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.REQUEST, TID_5769)
    assert msg.software == "STUN test client"
    assert msg.priority == 0x6E0001FF
    assert msg.ice_controlled == 0x932FF9B151263B36
    assert msg.ice_controlling is None and not msg.use_candidate
    assert msg.username == "evtj:h6vY"
    assert msg.fingerprint
    assert stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD))
    assert not stun.verify_integrity(msg, stun.short_term_key("wrong"))


def test_rfc5769_sample_ipv4_response() -> None:
    msg = stun.parse_untrusted(SAMPLE_IPV4_RESPONSE)
    assert (msg.method, msg.cls, msg.transaction_id) == (Method.BINDING, Class.SUCCESS, TID_5769)
    assert msg.software == "test vector"
    assert msg.xor_mapped_address == ("192.0.2.1", 32853)
    assert msg.fingerprint
    assert stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD))


def test_rfc5769_sample_ipv6_response() -> None:
    msg = stun.parse_untrusted(SAMPLE_IPV6_RESPONSE)
    assert msg.cls is Class.SUCCESS and msg.software == "test vector"
    assert msg.xor_mapped_address == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD))


def test_rfc5769_long_term_request() -> None:
    msg = stun.parse_untrusted(SAMPLE_LONG_TERM_REQUEST)
    assert msg.transaction_id == bytes.fromhex("78ad3433c6ad72c029da412e")
    assert msg.username == "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"
    assert msg.nonce == "f//499k954d6OL34oL9FSTvy64sA"
    assert msg.realm == "example.org"
    assert not msg.fingerprint
    password = "The\u00adM\u00aatr\u2168"  # SASLprep → "TheMatrIX"
    assert stun.saslprep(password) == "TheMatrIX"
    key = stun.long_term_key(msg.username, msg.realm, password)
    assert stun.verify_integrity(msg, key)
    # This vector pads with zeros, so our encoder reproduces it byte for byte.
    assert stun.encode(msg, key=key, fingerprint=False) == SAMPLE_LONG_TERM_REQUEST


def test_rfc5769_messages_reencode_and_verify() -> None:
    """Re-encoded with zero padding the bytes differ from the vectors (they pad with 0x20),
    but the fields, integrity and fingerprint must survive."""
    key = stun.short_term_key(SHORT_TERM_PASSWORD)
    for vector in (SAMPLE_REQUEST, SAMPLE_IPV4_RESPONSE, SAMPLE_IPV6_RESPONSE):
        msg = stun.parse_untrusted(vector)
        again = stun.parse_untrusted(stun.encode(msg, key=key))
        assert again == msg
        assert again.fingerprint and stun.verify_integrity(again, key)


def test_tampering_is_detected() -> None:
    data = bytearray(SAMPLE_REQUEST)
    data[30] ^= 1  # inside SOFTWARE
    with pytest.raises(BadPacket, match="FINGERPRINT"):
        stun.parse_untrusted(bytes(data))
    # Without FINGERPRINT (cut off, length fixed) the HMAC still catches it.
    cut = bytearray(data[:-8])
    cut[2:4] = (len(cut) - 20).to_bytes(2, "big")
    msg = stun.parse_untrusted(bytes(cut))
    assert not stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD))


# --- Codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "cls", "value"),
    [
        (Method.BINDING, Class.REQUEST, 0x0001),
        (Method.BINDING, Class.INDICATION, 0x0011),
        (Method.BINDING, Class.SUCCESS, 0x0101),
        (Method.BINDING, Class.ERROR, 0x0111),
        (Method.ALLOCATE, Class.REQUEST, 0x0003),
        (Method.ALLOCATE, Class.ERROR, 0x0113),
        (Method.REFRESH, Class.SUCCESS, 0x0104),
        (Method.SEND, Class.INDICATION, 0x0016),
        (Method.DATA, Class.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, Class.SUCCESS, 0x0108),
        (Method.CHANNEL_BIND, Class.SUCCESS, 0x0109),
    ],
)
def test_message_type_bits(method: Method, cls: Class, value: int) -> None:
    assert stun.message_type(method, cls) == value
    assert stun.split_message_type(value) == (method, cls)


def test_every_attribute_round_trips() -> None:
    tid = bytes(range(12))
    msg = Message(
        Method.ALLOCATE,
        Class.ERROR,
        tid,
        mapped_address=("192.0.2.7", 1),
        xor_mapped_address=("2001:db8::1", 65535),
        username="user",
        error_code=ErrorCode(438, "Stale Nonce"),
        unknown_attributes=(0x7777, 0x0001),
        channel_number=0x4001,
        lifetime=600,
        xor_peer_address=(("192.0.2.1", 0), ("2001:db8::2", 9)),
        data=b"\x00\x01payload",
        realm="example.org",
        nonce="n0nce",
        xor_relayed_address=("198.51.100.1", 50000),
        requested_transport=17,
        priority=0x6E0001FF,
        use_candidate=True,
        software="ipop-trio",
        ice_controlled=2**64 - 1,
        ice_controlling=0,
    )
    key = b"k" * 16
    data = stun.encode(msg, key=key)
    assert len(data) % 4 == 0
    back = stun.parse_untrusted(data)
    assert back == msg
    assert back.fingerprint and stun.verify_integrity(back, key)
    assert stun.header_untrusted(data) == stun.Header(Method.ALLOCATE, Class.ERROR, tid)


def test_attributes_after_integrity_are_ignored_and_fingerprint_is_last() -> None:
    msg = Message(Method.BINDING, Class.REQUEST, b"\x05" * 12, username="a:b")
    body = stun.encode(msg, key=b"key", fingerprint=False)[stun.HEADER_SIZE :]
    extra = stun.ATTR_HEADER.pack(stun.Attr.PRIORITY, 4) + b"\x00\x00\x00\x07"

    def framed(b: bytes) -> bytes:
        return stun.HEADER.pack(0x0001, len(b), stun.MAGIC_COOKIE, msg.transaction_id) + b

    parsed = stun.parse_untrusted(framed(body + extra))
    assert parsed.priority is None and stun.verify_integrity(parsed, b"key")
    with_fp = stun.encode(msg, key=b"key")
    with pytest.raises(BadPacket):  # FINGERPRINT must be last (and covers the length)
        stun.parse_untrusted(framed(with_fp[stun.HEADER_SIZE :] + extra))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 11,  # short header
        b"\x00\x01\x00\x00\x21\x12\xa4\x43" + b"\x00" * 12,  # cookie
        b"\xc0\x01\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12,  # top bits
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12,  # length > datagram
        b"\x00\x01\x00\x02\x21\x12\xa4\x42" + b"\x00" * 14,  # length not a multiple of 4
        b"\x0f\xff\x00\x00\x21\x12\xa4\x42" + b"\x00" * 12,  # unknown method
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x24\x00\x00",  # PRIORITY len 0
        b"\x00\x01\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x06\x00\x04\xff\xfe\xfd\xfc",
        b"\x00\x01\x00\x04\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x06\x00\x08",  # overrun
        b"\x00\x01\x00\x0c\x21\x12\xa4\x42"
        + b"\x00" * 12
        + b"\x00\x20\x00\x08\x00\x03"
        + b"\x00" * 6,
        b"\x01\x11\x00\x08\x21\x12\xa4\x42" + b"\x00" * 12 + b"\x00\x09\x00\x04\x00\x00\x07\x00",
    ],
)
def test_parse_refuses(data: bytes) -> None:
    with pytest.raises(BadPacket):
        stun.parse_untrusted(data)


def test_unknown_attributes_are_reported_by_kind() -> None:
    body = stun.ATTR_HEADER.pack(0x7777, 0) + stun.ATTR_HEADER.pack(0xC001, 0)
    data = stun.HEADER.pack(0x0001, len(body), stun.MAGIC_COOKIE, b"\x01" * 12) + body
    msg = stun.parse_untrusted(data)
    assert msg.unknown_required == (0x7777,)  # 0xC001 is comprehension-optional


def test_encode_refuses_our_own_mistakes() -> None:
    with pytest.raises(LocalProtocolError):
        stun.encode(Message(Method.BINDING, Class.REQUEST, b"short"))
    with pytest.raises(LocalProtocolError):
        stun.encode(Message(Method.BINDING, Class.ERROR, b"\x00" * 12, error_code=ErrorCode(200)))
    with pytest.raises(LocalProtocolError):
        stun.encode(Message(Method.BINDING, Class.SUCCESS, b"\x00" * 12, mapped_address=("x", 1)))
    with pytest.raises(LocalProtocolError):
        stun.saslprep("pass\u0007word")  # a control character is prohibited (RFC 4013 §2.3)


@given(st.binary(max_size=300))
def test_parse_untrusted_fuzz(data: bytes) -> None:
    try:
        msg = stun.parse_untrusted(data)
    except BadPacket:
        return
    stun.verify_integrity(msg, b"key")


@given(st.sampled_from([SAMPLE_REQUEST, SAMPLE_IPV6_RESPONSE]), st.data())
def test_parse_untrusted_fuzz_mutations(vector: bytes, data: st.DataObject) -> None:
    buf = bytearray(vector)
    for _ in range(data.draw(st.integers(1, 4))):
        buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    for candidate in (bytes(buf), bytes(buf[:cut])):
        try:
            msg = stun.parse_untrusted(candidate)
        except BadPacket:
            continue
        stun.verify_integrity(msg, stun.short_term_key(SHORT_TERM_PASSWORD))


# --- The retransmission timer (RFC 8489 §6.2.1) ----------------------------------------------


def _drive(tx: StunTransaction) -> list[float]:
    sends = []
    while (deadline := tx.next_deadline()) is not None:
        if tx.handle_timeout(deadline):
            sends.append(deadline)
    return sends


def test_transaction_schedule_defaults() -> None:
    tx = StunTransaction(b"\x00" * 12, b"req", 100.0)
    assert _drive(tx) == [100.5, 101.5, 103.5, 107.5, 115.5, 131.5]
    assert tx.state is TransactionState.TIMED_OUT and tx.transmissions == 7
    assert tx.next_deadline() is None


def test_transaction_late_timer_does_not_stretch_the_schedule() -> None:
    tx = StunTransaction(b"\x00" * 12, b"req", 0.0)
    assert tx.handle_timeout(0.7)  # late by 0.2 s
    assert tx.next_deadline() == pytest.approx(1.5)
    assert not tx.handle_timeout(1.0)  # early: nothing


def test_transaction_complete_and_cancel() -> None:
    tx = StunTransaction(b"\x00" * 12, b"req", 0.0)
    assert tx.handle_timeout(0.5) and tx.retransmitted
    tx.complete()
    assert tx.done and tx.next_deadline() is None and not tx.handle_timeout(100.0)
    tx = StunTransaction(b"\x00" * 12, b"req", 0.0, rto=0.1, rc=3, rm=4)
    tx.cancel()  # RFC 8445 §7.3.1.4: no retransmissions, but wait for the final timeout
    assert tx.next_deadline() == pytest.approx(0.1 * 3 + 0.4)
    assert _drive(tx) == [] and tx.state is TransactionState.TIMED_OUT
