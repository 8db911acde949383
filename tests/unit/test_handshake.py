"""Noise IK handshake: test vectors, pairs end to end, refusals, and garbage in."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import (
    BadPacket,
    CertificateRefused,
    LocalProtocolError,
    PkiError,
    RemoteProtocolError,
)
from ipop_trio.proto import handshake as hs
from ipop_trio.proto.handshake import (
    INITIATION,
    MAC_SIZE,
    RESPONSE,
    CipherState,
    InitiatorState,
    LocalIdentity,
    ResponderState,
    consume_initiation_untrusted,
    consume_response_untrusted,
    create_initiation,
    create_response,
    decode_payload_untrusted,
    response_receiver_index_untrusted,
)
from ipop_trio.proto.session import Cipher, Session

from ._lab_identities import NOW, Node, alice, bob, ca, node

CIPHERS = list(Cipher)
DAY = 86400.0


def _pair(
    initiator: Node, responder: Node, cipher: Cipher, now: float = NOW
) -> tuple[bytes, InitiatorState, ResponderState, bytes, hs.Keys, hs.Keys]:
    init, istate = create_initiation(
        initiator.local, responder.public_key, 11, cipher, {"policy": "always"}, now
    )
    rstate = consume_initiation_untrusted(responder.local, init, cipher, now)
    resp, rkeys = create_response(rstate, 22, {"policy": "groups"})
    ikeys = consume_response_untrusted(istate, resp, now)
    return init, istate, rstate, resp, ikeys, rkeys


def _session(keys: hs.Keys, cipher: Cipher) -> Session:
    return Session(
        chaining_key=keys.chaining_key,
        initiator=keys.initiator,
        local_index=keys.local_index,
        remote_index=keys.remote_index,
        cipher=cipher,
        secure=True,
        created=NOW,
    )


def _remac(message: bytes, receiver_public: bytes) -> bytes:
    """Recompute mac1, as anyone who knows the receiver's public key can (an initiation
    keeps its mac2 field after it)."""
    if message[:1] == b"\xa1" and len(message) >= 2 * MAC_SIZE:
        body, mac2 = message[: -2 * MAC_SIZE], message[-MAC_SIZE:]
        return body + hs._mac1(hs.mac1_key(receiver_public), body) + mac2
    body = message[:-MAC_SIZE]
    return body + hs._mac1(hs.mac1_key(receiver_public), body)


# --- Noise test vector --------------------------------------------------------------------

# cacophony (github.com/haskell-cryptography/cacophony, vectors/cacophony.txt),
# "Noise_IK_25519_ChaChaPoly_SHA256". Messages 3..6 are transport messages, alternating
# initiator → responder and back.
VECTOR = {
    "prologue": "4a6f686e2047616c74",
    "init_static": "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1",
    "init_ephemeral": "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a",
    "init_remote_static": "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62",
    "resp_static": "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893",
    "resp_ephemeral": "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b",
    "handshake_hash": "0b0f68fb0c27e03ce9b97565995ed4838cc0581b762ef72b062f6a546419fad7",
    "messages": [
        (
            "4c756477696720766f6e204d69736573",
            "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c7944718da798efbcd9152852"
            "0204f904b9bd6c7413dccdc214d951e15253e39987f18146e8cd0873654207148333479d4d16c289f029"
            "4b29960a72f48e0b7bba2e89083169825e59642148d492020664ccf7",
        ),
        (
            "4d757272617920526f746862617264",
            "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f1448088435361e70b2ed446e6c9ec"
            "387d1d6b3b840f194e373979d241b203c4acafccf5",
        ),
        ("462e20412e20486179656b", "050e9f3c8fac16b68dbce8f8c4bfbf6617c897f9ada4aa29aa19c8"),
        ("4361726c204d656e676572", "344233a6cabb7141d80f3da2fedc311d9646bbb0f505afe403a667"),
        (
            "4a65616e2d426170746973746520536179",
            "62cdeeb172ad7ade7aa7d9e069da5790f12331bfa00177787a1d0810c67dc3b2b4",
        ),
        (
            "457567656e2042f6686d20766f6e2042617765726b",
            "029bead1b40992327044d409d9a1f3ad8f36c3c452775d557e18bbeb2e8dfcead32d514024",
        ),
    ],
}


def _key(name: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(str(VECTOR[name])))


def test_noise_ik_chachapoly_vector() -> None:
    cipher = Cipher.CHACHA20_POLY1305
    prologue = bytes.fromhex(str(VECTOR["prologue"]))
    rs = bytes.fromhex(str(VECTOR["init_remote_static"]))
    assert _key("resp_static").public_key().public_bytes_raw() == rs
    messages = [(bytes.fromhex(p), bytes.fromhex(c)) for p, c in VECTOR["messages"]]

    # Message 1, both sides.
    isym = hs.ik_start(cipher, prologue, rs)
    e, enc_s, enc_p = hs.ik_write_initiation(
        isym, _key("init_ephemeral"), _key("init_static"), rs, messages[0][0]
    )
    assert e + enc_s + enc_p == messages[0][1]
    rsym = hs.ik_start(cipher, prologue, rs)
    initiator_static, payload = hs.ik_read_initiation(rsym, _key("resp_static"), e, enc_s, enc_p)
    assert initiator_static == _key("init_static").public_key().public_bytes_raw()
    assert payload == messages[0][0]

    # Message 2, both sides.
    re = e
    e2, enc_p2 = hs.ik_write_response(
        rsym, _key("resp_ephemeral"), re, initiator_static, messages[1][0]
    )
    assert e2 + enc_p2 == messages[1][1]
    assert (
        hs.ik_read_response(isym, _key("init_ephemeral"), _key("init_static"), e2, enc_p2)
        == (messages[1][0])
    )
    assert isym.h == rsym.h == bytes.fromhex(str(VECTOR["handshake_hash"]))

    # Transport: Split() keys and the little-endian ChaChaPoly nonce.
    i_to_r, r_to_i = isym.split()
    assert (i_to_r, r_to_i) == rsym.split()
    send = {0: CipherState(cipher, i_to_r), 1: CipherState(cipher, r_to_i)}
    for turn, (plain, wire) in enumerate(messages[2:]):
        assert send[turn % 2].encrypt_with_ad(b"", plain) == wire


@pytest.mark.parametrize(
    ("cipher", "aead", "order"),
    [(Cipher.AES_256_GCM, AESGCM, "big"), (Cipher.CHACHA20_POLY1305, ChaCha20Poly1305, "little")],
)
def test_cipherstate_nonce_encoding(cipher: Cipher, aead: type, order: str) -> None:
    # Noise §12.3 (AESGCM: big-endian counter) and §12.4 (ChaChaPoly: little-endian).
    key = bytes(range(32))
    cs = CipherState(cipher, key)
    cs.n = 0x0102030405
    nonce = b"\x00" * 4 + (0x0102030405).to_bytes(8, order)  # type: ignore[arg-type]
    assert cs.encrypt_with_ad(b"ad", b"hello") == aead(key).encrypt(nonce, b"hello", b"ad")
    assert cs.n == 0x0102030406


def test_protocol_names() -> None:
    assert hs.PROTOCOL_NAMES[Cipher.AES_256_GCM] == b"Noise_IK_25519_AESGCM_SHA256"
    assert hs.PROTOCOL_NAMES[Cipher.CHACHA20_POLY1305] == b"Noise_IK_25519_ChaChaPoly_SHA256"
    assert hs.prologue_for(ca().anchor) == b"ipop-trio v1lab"


# --- Pairs end to end ---------------------------------------------------------------------


@pytest.mark.parametrize("cipher", CIPHERS, ids=lambda c: c.value)
def test_pair_end_to_end(cipher: Cipher) -> None:
    a, b = alice(), bob()
    init, _, rstate, resp, ikeys, rkeys = _pair(a, b, cipher)

    assert init[0] == 0xA1 and resp[0] == 0xA2
    assert struct.unpack_from("<I", init, 4) == (11,)
    assert response_receiver_index_untrusted(resp) == 11
    assert rstate.peer_index == 11
    assert rstate.peer.name == "alice" and rstate.peer_static == a.public_key
    assert rstate.ext["policy"] == "always" and rstate.timestamp_ns == int(NOW * 1e9)
    assert ikeys.peer.name == "bob" and str(ikeys.peer.address) == "10.77.0.3"
    assert ikeys.ext == {"policy": "groups"}
    assert rkeys.peer == rstate.peer
    assert (ikeys.local_index, ikeys.remote_index) == (11, 22)
    assert (rkeys.local_index, rkeys.remote_index) == (22, 11)
    assert ikeys.chaining_key == rkeys.chaining_key
    assert ikeys.initiator and not rkeys.initiator
    # Split() (Noise §5.2): two different keys, one each way
    to_responder, to_initiator = hs.hkdf2(ikeys.chaining_key, b"")
    assert to_responder != to_initiator

    initiator, responder = _session(ikeys, cipher), _session(rkeys, cipher)
    assert responder.open_untrusted(initiator.seal(b"to bob")) == b"to bob"
    assert initiator.open_untrusted(responder.seal(b"to alice")) == b"to alice"


def test_fresh_ephemeral_every_initiation() -> None:
    a, b = alice(), bob()
    one, _ = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    two, _ = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    assert one[8:40] != two[8:40]


def test_explicit_timestamp() -> None:
    a, b = alice(), bob()
    init, state = create_initiation(
        a.local, b.public_key, 1, Cipher.AES_256_GCM, {"ts": 5}, NOW, timestamp_ns=77
    )
    assert state.timestamp_ns == 77
    rstate = consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)
    assert rstate.timestamp_ns == 77


def test_local_identity_check() -> None:
    a = alice()
    assert a.local.check(NOW).name == "alice"
    assert "static_private" not in repr(a.local)
    with pytest.raises(PkiError, match="expired"):
        a.local.check(NOW + 400 * DAY)
    foreign = LocalIdentity(
        X25519PrivateKey.generate().private_bytes_raw(), a.bundle.cert_der, ca().anchor
    )
    with pytest.raises(PkiError, match="link key"):
        foreign.check(NOW)
    with pytest.raises(LocalProtocolError):
        LocalIdentity(b"short", a.bundle.cert_der, ca().anchor)


# --- Refusals -----------------------------------------------------------------------------


def test_wrong_ca_refused() -> None:
    # Same overlay name, another CA key: the handshake decrypts, the certificate does not verify.
    b = bob()
    impostor = node("alice", "10.77.0.2", authority=ca(tag="other"))
    init, _ = create_initiation(impostor.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(CertificateRefused, match="signature"):
        consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)


def test_wrong_ca_refused_in_response() -> None:
    a = alice()
    impostor = node("bob", "10.77.0.3", authority=ca(tag="other"))
    # The impostor answers with its own certificate (its overlay name matches, its key is
    # the one alice dialled): alice must refuse it.
    init, istate = create_initiation(a.local, impostor.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    trusting = LocalIdentity(impostor.local.static_private, impostor.bundle.cert_der, ca().anchor)
    rstate = consume_initiation_untrusted(trusting, init, Cipher.AES_256_GCM, NOW)
    resp, _ = create_response(rstate, 2, {})
    with pytest.raises(CertificateRefused, match="signature"):
        consume_response_untrusted(istate, resp, NOW)


def test_other_overlay_never_decrypts() -> None:
    # The prologue binds the overlay name: a node of another overlay cannot even talk.
    b = bob()
    stranger = node("alice", "10.88.0.2", authority=ca("elsewhere", "10.88.0.0/24"))
    init, _ = create_initiation(stranger.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(BadPacket, match="decrypt"):
        consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)


def test_expired_certificate_refused() -> None:
    b = bob()
    short = node("dave", "10.77.0.9", days=1)
    later = NOW + 2 * DAY
    init, _ = create_initiation(short.local, b.public_key, 1, Cipher.AES_256_GCM, {}, later)
    with pytest.raises(CertificateRefused, match="expired"):
        consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, later)

    # And as responder: alice refuses dave's response.
    a = alice()
    init, istate = create_initiation(a.local, short.public_key, 1, Cipher.AES_256_GCM, {}, later)
    rstate = consume_initiation_untrusted(short.local, init, Cipher.AES_256_GCM, later)
    resp, _ = create_response(rstate, 2, {})
    with pytest.raises(CertificateRefused, match="expired"):
        consume_response_untrusted(istate, resp, later)


def test_certificate_for_another_key_refused() -> None:
    b = bob()
    mallory = node("mallory", "10.77.0.5", certify_key=alice().public_key)
    init, _ = create_initiation(mallory.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(CertificateRefused, match="certificate does not match handshake key"):
        consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)


def test_wrong_cipher_refused() -> None:
    a, b = alice(), bob()
    init, _ = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(BadPacket):
        consume_initiation_untrusted(b.local, init, Cipher.CHACHA20_POLY1305, NOW)


def test_initiation_for_someone_else_fails_mac1() -> None:
    a, b = alice(), bob()
    init, _ = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(BadPacket, match="mac1"):
        consume_initiation_untrusted(a.local, init, Cipher.AES_256_GCM, NOW)


def test_invalid_timestamp_refused() -> None:
    a, b = alice(), bob()
    init, _ = create_initiation(
        a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW, timestamp_ns=-1
    )
    with pytest.raises(RemoteProtocolError, match="timestamp"):
        consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)


def test_response_to_another_initiation_refused() -> None:
    a, b = alice(), bob()
    _, _, _, resp, _, _ = _pair(a, b, Cipher.AES_256_GCM)
    _, other = create_initiation(a.local, b.public_key, 11, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(BadPacket, match="decrypt"):  # same index, other ephemeral
        consume_response_untrusted(other, resp, NOW)
    _, other_index = create_initiation(a.local, b.public_key, 12, Cipher.AES_256_GCM, {}, NOW)
    with pytest.raises(BadPacket, match="another initiation"):
        consume_response_untrusted(other_index, resp, NOW)


def test_forged_response_leaves_state_usable() -> None:
    a, b = alice(), bob()
    init, istate = create_initiation(a.local, b.public_key, 3, Cipher.AES_256_GCM, {}, NOW)
    rstate = consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)
    resp, rkeys = create_response(rstate, 4, {})
    forged = bytearray(resp)
    forged[60] ^= 1
    with pytest.raises(BadPacket):
        consume_response_untrusted(istate, _remac(bytes(forged), a.public_key), NOW)
    assert consume_response_untrusted(istate, resp, NOW).chaining_key == rkeys.chaining_key


# Regions of each message: (name, start, end) with negative ends counted from the end.
INIT_REGIONS = [
    ("type", 0, 1),
    ("pad", 1, 4),
    ("sender_index", 4, 8),
    ("ephemeral", 8, 40),
    ("static", 40, 88),
    ("payload", 88, -2 * MAC_SIZE),
    ("mac1", -2 * MAC_SIZE, -MAC_SIZE),
]
RESP_REGIONS = [
    ("type", 0, 1),
    ("pad", 1, 4),
    ("sender_index", 4, 8),
    ("receiver_index", 8, 12),
    ("ephemeral", 12, 44),
    ("payload", 44, -MAC_SIZE),
    ("mac1", -MAC_SIZE, None),
]


def _flip(message: bytes, start: int, end: int | None) -> bytes:
    data = bytearray(message)
    stop = len(data) if end is None else end % len(data)
    data[(start + stop) // 2] ^= 0x40
    return bytes(data)


def test_regions_match_structs() -> None:
    assert INITIATION.size == INIT_REGIONS[-2][1] == 88
    assert RESPONSE.size == RESP_REGIONS[-2][1] == 44


@pytest.mark.parametrize("remac", [False, True], ids=["as-is", "mac1-recomputed"])
@pytest.mark.parametrize(("region", "start", "end"), INIT_REGIONS, ids=lambda r: str(r))
def test_tampered_initiation_refused(region: str, start: int, end: int | None, remac: bool) -> None:
    a, b = alice(), bob()
    init, _ = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    tampered = _flip(init, start, end)
    if remac and region != "mac1":
        tampered = _remac(tampered, b.public_key)
    if remac and region == "sender_index":
        # The index is not authenticated by Noise (as in WireGuard): only mac1 covers it.
        assert consume_initiation_untrusted(b.local, tampered, Cipher.AES_256_GCM, NOW)
        return
    with pytest.raises(BadPacket):
        consume_initiation_untrusted(b.local, tampered, Cipher.AES_256_GCM, NOW)


@pytest.mark.parametrize("remac", [False, True], ids=["as-is", "mac1-recomputed"])
@pytest.mark.parametrize(("region", "start", "end"), RESP_REGIONS, ids=lambda r: str(r))
def test_tampered_response_refused(region: str, start: int, end: int | None, remac: bool) -> None:
    a, b = alice(), bob()
    init, istate = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    rstate = consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)
    resp, _ = create_response(rstate, 2, {})
    tampered = _flip(resp, start, end)
    if remac and region != "mac1":
        tampered = _remac(tampered, a.public_key)
    if remac and region == "sender_index":
        assert consume_response_untrusted(istate, tampered, NOW)
        return
    with pytest.raises(BadPacket):
        consume_response_untrusted(istate, tampered, NOW)


def test_truncated_messages_refused() -> None:
    a, b = alice(), bob()
    init, istate = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    for n in (0, 1, 8, 87, 88, 120, len(init) - 1):
        with pytest.raises(BadPacket):
            consume_initiation_untrusted(b.local, init[:n], Cipher.AES_256_GCM, NOW)
    rstate = consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)
    resp, _ = create_response(rstate, 2, {})
    for n in (0, 1, 11, 44, 79, len(resp) - 1):
        with pytest.raises(BadPacket):
            consume_response_untrusted(istate, resp[:n], NOW)
    for n in (0, 1, 11, hs.MIN_RESPONSE_SIZE - 1):
        with pytest.raises(BadPacket):
            response_receiver_index_untrusted(resp[:n])


def test_payload_codec() -> None:
    payload = hs.encode_payload(b"cert", {"ts": 1, "groups": ["eng"]})
    assert decode_payload_untrusted(payload) == (b"cert", {"ts": 1, "groups": ["eng"]})
    assert decode_payload_untrusted(b"\x00\x00\x00\x00") == (b"", {})
    for bad in (
        b"",
        b"\x05\x00abc",
        b"\x00\x00\x02\x00[]",
        b"\x00\x00\x03\x00NaN",
        b"\x00\x00\x02\x00\xff\xfe",
        b"\x00\x00\x01\x00{}",
        b"\x00\x00\x02\x00{}x",
    ):
        with pytest.raises(RemoteProtocolError):
            decode_payload_untrusted(bad)
    with pytest.raises(LocalProtocolError):
        hs.encode_payload(b"c", {"big": "x" * hs.MAX_EXT_SIZE})


def test_peek_receiver_index() -> None:
    with pytest.raises(BadPacket):
        response_receiver_index_untrusted(b"\xa1" + b"\x00" * 100)
    assert (
        response_receiver_index_untrusted(hs.RESPONSE.pack(0xA2, 1, 2, b"e" * 32) + bytes(40)) == 2
    )


# --- Garbage in: only BadPacket out (hypothesis) ------------------------------------------


def _only_bad_packet(call: Callable[..., object], *args: Any) -> None:
    """Call; accepting the input or raising BadPacket are fine, anything else fails."""
    try:
        call(*args)
    except BadPacket:
        pass


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _initiation_with_payload(sender: Node, receiver: Node, payload: bytes) -> bytes:
    """A well-formed, correctly encrypted initiation carrying any payload bytes: what an
    attacker with its own key pair can send (IK lets anyone initiate)."""
    sym = hs.ik_start(Cipher.AES_256_GCM, hs.prologue_for(ca().anchor), receiver.public_key)
    e, enc_s, enc_p = hs.ik_write_initiation(
        sym,
        X25519PrivateKey.generate(),
        sender.local._private,
        receiver.public_key,
        payload,
    )
    body = INITIATION.pack(0xA1, 9, e, enc_s) + enc_p
    return _remac(body + bytes(2 * MAC_SIZE), receiver.public_key)


def _response_with_payload(state: ResponderState, payload: bytes) -> bytes:
    sym = state._sym.copy()
    e, enc_p = hs.ik_write_response(
        sym, X25519PrivateKey.generate(), state._re, state.peer_static, payload
    )
    body = RESPONSE.pack(0xA2, 4, state.peer_index, e) + enc_p
    return _remac(body + bytes(MAC_SIZE), state.peer_static)


_payloads = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda cert, ext: struct.pack("<H", len(cert)) + cert + struct.pack("<H", len(ext)) + ext,
        st.one_of(st.binary(max_size=500), st.just(bob().bundle.cert_der)),
        st.one_of(
            st.binary(max_size=100),
            st.just(b'{"ts": 1}'),
            st.just(b'{"ts": true}'),
            st.just(b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["),
        ),
    ),
)


@_SETTINGS
@given(data=st.binary(max_size=700), remac=st.booleans(), first=st.sampled_from([0xA1, 0xA2, 0]))
def test_random_bytes_only_bad_packet(data: bytes, remac: bool, first: int) -> None:
    a, b = alice(), bob()
    if first and data:
        data = bytes([first]) + b"\x00\x00\x00" + data[4:]
    _, istate = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)

    def maybe_remac(receiver: bytes) -> bytes:
        return _remac(data, receiver) if remac and len(data) >= MAC_SIZE else data

    for cipher in CIPHERS:
        _only_bad_packet(
            consume_initiation_untrusted, b.local, maybe_remac(b.public_key), cipher, NOW
        )
    _only_bad_packet(consume_response_untrusted, istate, maybe_remac(a.public_key), NOW)
    _only_bad_packet(response_receiver_index_untrusted, data)
    _only_bad_packet(decode_payload_untrusted, data)


_mutations = st.lists(
    st.tuples(st.integers(min_value=0, max_value=2000), st.integers(min_value=1, max_value=255)),
    min_size=1,
    max_size=4,
)


def _mutate(message: bytes, flips: list[tuple[int, int]], cut: int, tail: bytes) -> bytes:
    data = bytearray(message)
    for at, xor in flips:
        data[at % len(data)] ^= xor
    if cut:
        del data[-(cut % len(data)) :]
    return bytes(data) + tail


@_SETTINGS
@given(
    flips=_mutations,
    cut=st.integers(min_value=0, max_value=300),
    tail=st.binary(max_size=8),
    remac=st.booleans(),
)
def test_mutated_messages_only_bad_packet(
    flips: list[tuple[int, int]], cut: int, tail: bytes, remac: bool
) -> None:
    a, b = alice(), bob()
    init, istate = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    rstate = consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW)
    resp, _ = create_response(rstate, 2, {})
    bad_init = _mutate(init, flips, cut, tail)
    bad_resp = _mutate(resp, flips, cut, tail)
    if remac:
        bad_init = _remac(bad_init, b.public_key) if len(bad_init) >= MAC_SIZE else bad_init
        bad_resp = _remac(bad_resp, a.public_key) if len(bad_resp) >= MAC_SIZE else bad_resp
    _only_bad_packet(consume_initiation_untrusted, b.local, bad_init, Cipher.AES_256_GCM, NOW)
    _only_bad_packet(consume_response_untrusted, istate, bad_resp, NOW)
    _only_bad_packet(response_receiver_index_untrusted, bad_resp)


@_SETTINGS
@given(payload=_payloads)
def test_authenticated_garbage_payload_only_bad_packet(payload: bytes) -> None:
    # Past mac1 and the AEAD: the payload codec and the certificate parser get the garbage.
    a, b = alice(), bob()
    init = _initiation_with_payload(a, b, payload)
    _only_bad_packet(consume_initiation_untrusted, b.local, init, Cipher.AES_256_GCM, NOW)

    good, istate = create_initiation(a.local, b.public_key, 1, Cipher.AES_256_GCM, {}, NOW)
    rstate = consume_initiation_untrusted(b.local, good, Cipher.AES_256_GCM, NOW)
    resp = _response_with_payload(rstate, payload)
    _only_bad_packet(consume_response_untrusted, istate, resp, NOW)
