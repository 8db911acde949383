"""Session: seal/open in pairs, the wire layout, refusals that must not move the window,
counter limits and timers, and fuzzing of the untrusted entry points."""

from __future__ import annotations

import ast
import contextlib
import pathlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket, LocalProtocolError
from ipop_trio.proto import session as session_module
from ipop_trio.proto.session import (
    PLAIN_MAX_JUMP,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    WINDOW_SIZE,
    Cipher,
    Refusal,
    Session,
    SessionRefused,
)
from ipop_trio.proto.wire import (
    DATA_HEADER,
    DATA_HEADER_SIZE,
    TAG_SIZE,
    Kind,
)

KEY_A = bytes(range(32))  # a -> b
KEY_B = bytes(range(100, 132))  # b -> a
INDEX_A = 0x11223344
INDEX_B = 0xA0B0C0D0
MODES = [(cipher, secure) for cipher in Cipher for secure in (True, False)]
MODE_IDS = [f"{c.value}-{'secure' if s else 'plain'}" for c, s in MODES]
AEADS: dict[Cipher, type[AESGCM] | type[ChaCha20Poly1305]] = {
    Cipher.AES_256_GCM: AESGCM,
    Cipher.CHACHA20_POLY1305: ChaCha20Poly1305,
}


def make_sender(cipher: Cipher = Cipher.AES_256_GCM, secure: bool = True) -> Session:
    return Session(
        send_key=KEY_A,
        recv_key=KEY_B,
        local_index=INDEX_A,
        remote_index=INDEX_B,
        cipher=cipher,
        secure=secure,
        created=1000.0,
    )


def make_receiver(cipher: Cipher = Cipher.AES_256_GCM, secure: bool = True) -> Session:
    return Session(
        send_key=KEY_B,
        recv_key=KEY_A,
        local_index=INDEX_B,
        remote_index=INDEX_A,
        cipher=cipher,
        secure=secure,
        created=1000.0,
    )


def pair(cipher: Cipher = Cipher.AES_256_GCM, secure: bool = True) -> tuple[Session, Session]:
    return make_sender(cipher, secure), make_receiver(cipher, secure)


def refusal(exc: pytest.ExceptionInfo[BadPacket]) -> Refusal:
    assert isinstance(exc.value, SessionRefused)
    return exc.value.reason


# --- purity ----------------------------------------------------------------------------------


def test_session_module_is_pure() -> None:
    tree = ast.parse(pathlib.Path(session_module.__file__).read_text())
    absolute: set[str] = set()
    relative: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                relative.add(node.module or "")
            else:
                absolute.add((node.module or "").split(".")[0])
    forbidden = {"os", "time", "socket", "trio", "select", "asyncio", "threading", "logging"}
    assert not absolute & forbidden
    assert absolute <= {"__future__", "collections", "enum", "hmac", "struct", "cryptography"}
    assert relative <= {"errors", "wire"}  # both pure themselves


# --- round trips and layout ------------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_round_trip(cipher: Cipher, secure: bool) -> None:
    a, b = pair(cipher, secure)
    payloads = [b"", b"x", bytes(range(256)) * 5 + b"tail", b"\xff" * 1400, b"z" * 65000]
    for counter, payload in enumerate(payloads):
        datagram = a.seal(payload)
        assert len(datagram) == len(payload) + a.overhead()
        assert a.overhead() == DATA_HEADER_SIZE + (TAG_SIZE if secure else 0)
        kind, index, sent_counter = DATA_HEADER.unpack_from(datagram)
        assert kind == (Kind.DATA_SECURE if secure else Kind.DATA_PLAIN)
        assert index == INDEX_B
        assert sent_counter == counter
        assert datagram[1:4] == b"\0\0\0"
        if secure and payload:
            assert payload not in datagram
        if not secure:
            assert datagram[DATA_HEADER_SIZE:] == payload
        assert b.open_untrusted(datagram) == payload
        assert b.recv_highest == counter
    assert a.send_counter == len(payloads)
    assert a.tx_bytes == b.rx_bytes == sum(map(len, payloads))
    assert b.rx_packets == len(payloads)
    assert b.refused == dict.fromkeys(Refusal, 0)
    # And the other direction, with the other key.
    back = b.seal(memoryview(b"reply"))
    assert a.open_untrusted(memoryview(back)) == b"reply"


@pytest.mark.parametrize("cipher", list(Cipher))
def test_secure_datagram_is_wireguard_style_aead(cipher: Cipher) -> None:
    """Independent construction: nonce = 4 zero bytes || counter u64 LE, AAD = header."""
    a = make_sender(cipher)
    a.seal(b"first")
    payload = b"second payload"
    datagram = a.seal(payload)
    header = bytes([0xA4, 0, 0, 0]) + INDEX_B.to_bytes(4, "little") + (1).to_bytes(8, "little")
    nonce = b"\0\0\0\0" + (1).to_bytes(8, "little")
    assert datagram == header + AEADS[cipher](KEY_A).encrypt(nonce, payload, header)


def test_ciphers_differ() -> None:
    aes = make_sender(Cipher.AES_256_GCM).seal(b"same")
    chacha = make_sender(Cipher.CHACHA20_POLY1305).seal(b"same")
    assert aes[:DATA_HEADER_SIZE] == chacha[:DATA_HEADER_SIZE]
    assert aes != chacha
    with pytest.raises(BadPacket):
        make_receiver(Cipher.CHACHA20_POLY1305).open_untrusted(aes)


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_seal_into_matches_seal_and_packs_a_gso_buffer(cipher: Cipher, secure: bool) -> None:
    by_seal = make_sender(cipher, secure)
    by_into = make_sender(cipher, secure)
    payloads = [b"a" * 1400, b"", b"b" * 77, b"c" * 1400]
    buf = bytearray(b"\xee" * 8000)
    offset = 5
    spans = []
    for payload in payloads:
        n = by_into.seal_into(buf, offset, memoryview(payload))
        assert n == len(payload) + by_into.overhead()
        assert bytes(buf[offset : offset + n]) == by_seal.seal(payload)
        spans.append((offset, n))
        offset += n
    assert buf[:5] == b"\xee" * 5
    assert buf[offset:] == b"\xee" * (len(buf) - offset)
    assert by_into.send_counter == by_seal.send_counter == len(payloads)
    assert by_into.tx_bytes == by_seal.tx_bytes

    # Open each datagram of the buffer both ways: same payloads.
    by_open, by_open_into = make_receiver(cipher, secure), make_receiver(cipher, secure)
    view = memoryview(buf)
    out = bytearray(2000)
    for (start, n), payload in zip(spans, payloads, strict=True):
        datagram = view[start : start + n]
        assert by_open.open_untrusted(datagram) == payload
        k = by_open_into.open_into_untrusted(datagram, memoryview(out))
        assert k == len(payload)
        assert out[:k] == payload
    assert by_open.recv_highest == by_open_into.recv_highest == len(payloads) - 1
    assert by_open.rx_bytes == by_open_into.rx_bytes


def test_seal_iov_is_all_or_nothing_at_the_counter_limit() -> None:
    tx, _ = pair()
    tx._send = REJECT_AFTER_MESSAGES - 2
    iov: list[bytes] = []
    sizes: list[int] = []
    with pytest.raises(LocalProtocolError):
        tx.seal_iov([b"x", b"y", b"z"], iov, sizes)
    assert tx.send_counter == REJECT_AFTER_MESSAGES - 2 and iov == [] and sizes == []
    tx.seal_iov([b"x", b"y"], iov, sizes)
    assert tx.send_counter == REJECT_AFTER_MESSAGES and len(iov) == 4


def test_seal_into_memoryview_out_and_exact_fit() -> None:
    a, b = pair()
    buf = bytearray(10 + 32 + 100)
    n = a.seal_into(memoryview(buf), 10, b"q" * 100)
    assert n == 132
    assert b.open_untrusted(bytes(buf[10:])) == b"q" * 100


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_seal_into_too_small_buffer_uses_no_counter(cipher: Cipher, secure: bool) -> None:
    a, b = pair(cipher, secure)
    buf = bytearray(100)
    with pytest.raises(LocalProtocolError):
        a.seal_into(buf, 50, b"p" * 60)
    assert a.send_counter == 0
    assert buf == bytearray(100)
    n = a.seal_into(buf, 0, b"p" * 60)
    assert b.open_untrusted(bytes(buf[:n])) == b"p" * 60


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_open_into_too_small_out_is_refused_without_moving_window(
    cipher: Cipher, secure: bool
) -> None:
    a, b = pair(cipher, secure)
    datagram = a.seal(b"m" * 100)
    with pytest.raises(BadPacket) as exc:
        b.open_into_untrusted(memoryview(datagram), bytearray(99))
    assert refusal(exc) is Refusal.TOO_LONG
    assert b.recv_highest == -1
    out = bytearray(100)
    assert b.open_into_untrusted(memoryview(datagram), out) == 100
    assert out == b"m" * 100


# --- refusals --------------------------------------------------------------------------------


def test_replayed_datagram_refused_and_counted() -> None:
    a, b = pair()
    datagram = a.seal(b"once")
    assert b.open_untrusted(datagram) == b"once"
    for _ in range(2):
        with pytest.raises(BadPacket) as exc:
            b.open_untrusted(datagram)
        assert refusal(exc) is Refusal.REPLAYED
    with pytest.raises(BadPacket):
        b.open_into_untrusted(memoryview(datagram), bytearray(100))
    assert b.refused[Refusal.REPLAYED] == 3
    assert b.rx_packets == 1


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_out_of_order_within_window_and_too_old(cipher: Cipher, secure: bool) -> None:
    a, b = pair(cipher, secure)
    datagrams = [a.seal(i.to_bytes(4, "little")) for i in range(WINDOW_SIZE + 2)]
    for i in (5, 3, 4, 0, 2, 1):
        assert b.open_untrusted(datagrams[i]) == i.to_bytes(4, "little")
    assert b.open_untrusted(datagrams[WINDOW_SIZE + 1]) == (WINDOW_SIZE + 1).to_bytes(4, "little")
    with pytest.raises(BadPacket) as exc:  # just outside: highest - WINDOW_SIZE
        b.open_untrusted(datagrams[1])
    assert refusal(exc) is Refusal.REPLAYED
    assert b.open_untrusted(datagrams[6]) == (6).to_bytes(4, "little")  # oldest inside
    assert b.open_untrusted(datagrams[WINDOW_SIZE]) == WINDOW_SIZE.to_bytes(4, "little")


def test_wrong_receiver_index_refused() -> None:
    a = make_sender()
    stranger = Session(
        send_key=KEY_B,
        recv_key=KEY_A,
        local_index=INDEX_B + 1,
        remote_index=INDEX_A,
        cipher=Cipher.AES_256_GCM,
        secure=True,
        created=0.0,
    )
    with pytest.raises(BadPacket) as exc:
        stranger.open_untrusted(a.seal(b"not for you"))
    assert refusal(exc) is Refusal.INDEX
    assert stranger.refused[Refusal.INDEX] == 1


@pytest.mark.parametrize("cipher", list(Cipher))
def test_plain_and_secure_do_not_mix(cipher: Cipher) -> None:
    plain_sender, secure_receiver = make_sender(cipher, False), make_receiver(cipher, True)
    secure_sender, plain_receiver = make_sender(cipher, True), make_receiver(cipher, False)
    # A plain datagram long enough to pass the length check of a secure session.
    with pytest.raises(BadPacket) as exc:
        secure_receiver.open_untrusted(plain_sender.seal(b"p" * 40))
    assert refusal(exc) is Refusal.TYPE
    with pytest.raises(BadPacket) as exc:
        plain_receiver.open_untrusted(secure_sender.seal(b"s" * 40))
    assert refusal(exc) is Refusal.TYPE
    # Relabelling a secure datagram as plain (or back) does not get it through either.
    forged = bytes([Kind.DATA_PLAIN]) + secure_sender.seal(b"s")[1:]
    with pytest.raises(BadPacket):
        secure_receiver.open_untrusted(forged)
    assert secure_receiver.recv_highest == plain_receiver.recv_highest == -1


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_nonzero_pad_and_short_datagrams_refused(cipher: Cipher, secure: bool) -> None:
    a, b = pair(cipher, secure)
    datagram = bytearray(a.seal(b"data"))
    datagram[2] = 1
    with pytest.raises(BadPacket) as exc:
        b.open_untrusted(bytes(datagram))
    assert refusal(exc) is Refusal.TYPE
    datagram[2] = 0
    good = bytes(datagram)
    for length in range(b.overhead()):
        with pytest.raises(BadPacket) as exc:
            b.open_untrusted(good[:length])
        assert refusal(exc) is Refusal.SHORT
    assert b.open_untrusted(good) == b"data"


@pytest.mark.parametrize("cipher", list(Cipher))
def test_every_single_bit_flip_is_refused_and_never_moves_the_window(cipher: Cipher) -> None:
    a, b = pair(cipher)
    payload = b"twenty bytes payload"
    datagram = a.seal(payload)
    out = bytearray(64)
    for position in range(len(datagram)):
        for bit in range(8):
            tampered = bytearray(datagram)
            tampered[position] ^= 1 << bit
            with pytest.raises(BadPacket):
                b.open_untrusted(bytes(tampered))
            with pytest.raises(BadPacket):
                b.open_into_untrusted(memoryview(tampered), out)
            assert b.recv_highest == -1  # counter-bit flips reach the tag check: no move
    assert b.rx_packets == 0
    assert b.refused[Refusal.BAD_TAG] > 0
    assert b.open_untrusted(datagram) == payload  # counter 0 still opens


@pytest.mark.parametrize("cipher", list(Cipher))
def test_forged_far_ahead_counter_does_not_slide_the_window(cipher: Cipher) -> None:
    a, b = pair(cipher)
    datagrams = [a.seal(bytes([i])) for i in range(3)]
    assert b.open_untrusted(datagrams[0]) == b"\x00"
    for forged_counter in (1, 3, WINDOW_SIZE * 10, REJECT_AFTER_MESSAGES - 1):
        forged = bytearray(datagrams[2])
        DATA_HEADER.pack_into(forged, 0, Kind.DATA_SECURE, INDEX_B, forged_counter)
        with pytest.raises(BadPacket) as exc:
            b.open_untrusted(bytes(forged))
        assert refusal(exc) is Refusal.BAD_TAG
        assert b.recv_highest == 0
    # Truncated tags and ciphertexts are refused the same way.
    for cut in (1, TAG_SIZE - 1, TAG_SIZE):
        with pytest.raises(BadPacket):
            b.open_untrusted(datagrams[2][:-cut])
    assert b.recv_highest == 0
    assert b.open_untrusted(datagrams[2]) == b"\x02"
    assert b.open_untrusted(datagrams[1]) == b"\x01"
    assert b.refused[Refusal.BAD_TAG] + b.refused[Refusal.SHORT] == 4 + 3


# --- counters, limits, timers ----------------------------------------------------------------


@pytest.mark.parametrize(("cipher", "secure"), MODES, ids=MODE_IDS)
def test_send_counter_stops_at_reject_limit(cipher: Cipher, secure: bool) -> None:
    a, b = pair(cipher, secure)
    a._send = REJECT_AFTER_MESSAGES - 2  # fast-forward: 2**64 seals would take a while
    before = a.seal(b"before")
    if secure:
        assert b.open_untrusted(before) == b"before"
    else:  # a plain receiver takes a far jump only from two datagrams in a row
        with pytest.raises(BadPacket):
            b.open_untrusted(before)
    assert not a.expired(1000.0)
    last = a.seal(b"last")
    assert DATA_HEADER.unpack_from(last)[2] == REJECT_AFTER_MESSAGES - 1
    assert b.open_untrusted(last) == b"last"  # the receiver accepts the last valid counter
    assert a.expired(1000.0)
    with pytest.raises(LocalProtocolError):
        a.seal(b"one too many")
    with pytest.raises(LocalProtocolError):
        a.seal_into(bytearray(100), 0, b"one too many")
    assert a.send_counter == REJECT_AFTER_MESSAGES


@pytest.mark.parametrize("cipher", list(Cipher))
def test_receiver_refuses_counter_at_or_past_the_limit(cipher: Cipher) -> None:
    b = make_receiver(cipher)
    aead = AEADS[cipher](KEY_A)
    for counter in (REJECT_AFTER_MESSAGES, 2**64 - 1):
        # Correctly authenticated by the key, but past the limit: refused before decrypting.
        header = DATA_HEADER.pack(Kind.DATA_SECURE, INDEX_B, counter)
        nonce = b"\0\0\0\0" + counter.to_bytes(8, "little")
        with pytest.raises(BadPacket) as exc:
            b.open_untrusted(header + aead.encrypt(nonce, b"late", header))
        assert refusal(exc) is Refusal.LIMIT
    assert b.recv_highest == -1


def test_should_rekey_and_expired() -> None:
    a = make_sender()  # created at 1000.0
    t0 = a.created
    assert not a.should_rekey(t0, initiator=True)
    assert not a.should_rekey(t0 + REKEY_AFTER_TIME - 0.001, initiator=True)
    assert a.should_rekey(t0 + REKEY_AFTER_TIME, initiator=True)
    assert not a.should_rekey(t0 + REKEY_AFTER_TIME, initiator=False)  # responder waits
    a._send = REKEY_AFTER_MESSAGES - 1
    assert not a.should_rekey(t0, initiator=False)
    a.seal(b"")
    assert a.should_rekey(t0, initiator=False)
    assert a.should_rekey(t0, initiator=True)
    assert not a.expired(t0 + REJECT_AFTER_TIME - 0.001)
    assert a.expired(t0 + REJECT_AFTER_TIME)


def test_constructor_validates_keys_and_indices() -> None:
    def build(**overrides: object) -> Session:
        args: dict[str, object] = {
            "send_key": KEY_A,
            "recv_key": KEY_B,
            "local_index": 1,
            "remote_index": 2,
            "cipher": Cipher.AES_256_GCM,
            "secure": True,
            "created": 0.0,
        }
        args.update(overrides)
        return Session(**args)  # type: ignore[arg-type]

    for bad in ({"send_key": b"short"}, {"recv_key": bytes(33)}, {"local_index": -1}):
        with pytest.raises(LocalProtocolError):
            build(**bad)
    with pytest.raises(LocalProtocolError):
        build(remote_index=2**32)
    build(local_index=0, remote_index=2**32 - 1)
    build(send_key=b"", recv_key=b"", secure=False)  # plain links use no keys


# --- fuzzing the trust boundary -------------------------------------------------------------


def _open_both_ways(session: Session, data: bytes, out_size: int) -> bytes | None:
    """Open `data` with both entry points, in turn (the second call sees the window the
    first left); only BadPacket may escape. Returns what open_untrusted returned."""
    result = None
    with contextlib.suppress(BadPacket):
        result = session.open_untrusted(data)
    with contextlib.suppress(BadPacket):
        session.open_into_untrusted(memoryview(data), bytearray(out_size))
    return result


_header_shaped = st.builds(
    lambda kind, pad, index, counter, body: (
        bytes([kind]) + pad + index.to_bytes(4, "little") + counter.to_bytes(8, "little") + body
    ),
    st.sampled_from([Kind.DATA_SECURE, Kind.DATA_PLAIN, 0, 0xA1, 0xFF]),
    st.sampled_from([b"\0\0\0", b"\0\0\1"]),
    st.sampled_from([INDEX_B, INDEX_A, 0, 2**32 - 1]),
    st.one_of(st.integers(0, 3), st.integers(0, 2**64 - 1), st.just(REJECT_AFTER_MESSAGES)),
    st.binary(max_size=80),
)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    data=st.one_of(st.binary(max_size=120), _header_shaped),
    out_size=st.integers(0, 130),
)
def test_random_bytes_raise_only_bad_packet(
    mode: tuple[Cipher, bool], data: bytes, out_size: int
) -> None:
    session = make_receiver(*mode)
    _open_both_ways(session, data, out_size)
    if mode[1]:
        # Nothing forged without the key gets through, so the window never moved.
        assert session.recv_highest == -1
        assert session.rx_packets == 0


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("extend"), st.integers(1, 40), st.integers(0, 255)),
    st.tuples(st.just("set_counter"), st.integers(0, 2**64 - 1), st.just(0)),
    st.tuples(st.just("set_byte0"), st.integers(0, 255), st.just(0)),
)


def _mutate(datagram: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(datagram)
    for op, x, y in mutations:
        if op == "flip" and data:
            data[x % len(data)] ^= y
        elif op == "truncate":
            del data[x % (len(data) + 1) :]
        elif op == "extend":
            data += bytes([y]) * x
        elif op == "set_counter" and len(data) >= DATA_HEADER_SIZE:
            data[8:16] = x.to_bytes(8, "little")
        elif op == "set_byte0" and data:
            data[0] = x
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    payload=st.binary(max_size=64),
    mutations=st.lists(_mutation, min_size=1, max_size=4),
    out_size=st.integers(0, 100),
)
def test_mutated_datagrams_raise_only_bad_packet(
    mode: tuple[Cipher, bool], payload: bytes, mutations: list[tuple[str, int, int]], out_size: int
) -> None:
    a, b = pair(*mode)
    a.seal(b"advance the counter")
    datagram = a.seal(payload)
    mutated = _mutate(datagram, mutations)
    opened = _open_both_ways(b, mutated, out_size)
    if mode[1] and mutated != datagram:
        # Secure links: any change is caught, and the window stays where it was.
        assert opened is None
        assert b.recv_highest == -1
        assert b.open_untrusted(datagram) == payload


@pytest.mark.parametrize("secure", [True, False])
def test_open_batch_matches_open_and_stops_at_another_session(secure: bool) -> None:
    tx, rx = pair(secure=secure)
    other_tx = Session(
        send_key=KEY_A,
        recv_key=KEY_B,
        local_index=INDEX_A,
        remote_index=INDEX_B + 1,
        cipher=Cipher.AES_256_GCM,
        secure=secure,
        created=1000.0,
    )
    ours = [tx.seal(bytes([i]) * (i + 1)) for i in range(5)]
    batch = [*ours[:3], ours[1], ours[3], other_tx.seal(b"not ours"), ours[4]]
    payloads: list[bytes] = []
    stop = rx.open_batch(batch, 0, payloads)
    assert stop == 5  # the datagram of another session ends the run
    assert payloads == [bytes([i]) * (i + 1) for i in range(4)]  # the replay was skipped
    assert rx.refused[Refusal.REPLAYED] == 1
    assert rx.open_batch(batch, 6, payloads) == 7
    assert payloads[-1] == bytes([4]) * 5


def test_open_batch_skips_forgeries_without_moving_the_window() -> None:
    tx, rx = pair()
    good = tx.seal(b"x" * 100)
    forged = bytearray(tx.seal(b"y" * 100))
    forged[-1] ^= 1
    payloads: list[bytes] = []
    assert rx.open_batch([bytes(forged), good], 0, payloads) == 2
    assert payloads == [b"x" * 100] and rx.refused[Refusal.BAD_TAG] == 1
    # the forged datagram's counter (1) is still open for the genuine datagram
    assert rx.recv_highest == 0


@pytest.mark.parametrize("secure", [True, False])
def test_seal_iov_matches_seal(secure: bool) -> None:
    tx, _ = pair(secure=secure)
    ref, _ = pair(secure=secure)
    payloads = [bytes([i]) * (100 + i) for i in range(5)]
    iov: list[bytes] = []
    sizes: list[int] = []
    tx.seal_iov(payloads, iov, sizes)
    datagrams = [iov[2 * i] + iov[2 * i + 1] for i in range(len(payloads))]
    assert datagrams == [ref.seal(p) for p in payloads]
    assert sizes == [len(d) for d in datagrams] and tx.send_counter == 5


@settings(max_examples=200, deadline=None)
@given(
    order=st.lists(st.integers(0, 39), max_size=80),
    forged=st.sets(st.integers(0, 79), max_size=10),
    secure=st.booleans(),
)
def test_open_batch_matches_open_one_by_one(
    order: list[int], forged: set[int], secure: bool
) -> None:
    """Any mix of in-order runs, gaps, reordering, duplicates and (secure) forgeries: the
    batch opens exactly what one-by-one opening does, and leaves the same window."""
    tx, batch_rx = pair(secure=secure)
    _, ref_rx = pair(secure=secure)
    sealed = [tx.seal(bytes([i]) * (20 + i)) for i in range(40)]
    batch: list[bytes] = []
    for pos, i in enumerate(order):
        d = bytearray(sealed[i])
        if secure and pos in forged:
            d[-1] ^= 1
        batch.append(bytes(d))
    expected = []
    for d in batch:
        try:
            expected.append(ref_rx.open_untrusted(d))
        except BadPacket:
            pass
    got: list[bytes] = []
    assert batch_rx.open_batch([memoryview(d) for d in batch], 0, got) == len(batch)
    assert got == expected
    assert batch_rx.recv_highest == ref_rx.recv_highest
    for counter in range(-1, 45):
        assert batch_rx._window.check(counter) == ref_rx._window.check(counter)


# --- plain sessions: bounded forward jumps (PLAIN_MAX_JUMP) ------------------------------------


def plain_datagram(counter: int, payload: bytes = b"forged", index: int = INDEX_B) -> bytes:
    """What anyone who has seen a plain link's receiver index can send: no tag to forge."""
    return DATA_HEADER.pack(Kind.DATA_PLAIN, index, counter) + payload


def test_one_forged_far_counter_does_not_blind_a_plain_link() -> None:
    """Regression: a forged counter near 2**64 used to become the window's highest, after
    which every genuine counter was "too old" until the next rekey."""
    tx, rx = pair(secure=False)
    assert rx.open_untrusted(tx.seal(b"0")) == b"0"
    with pytest.raises(BadPacket) as exc:
        rx.open_untrusted(plain_datagram(REJECT_AFTER_MESSAGES - 1))
    assert refusal(exc) is Refusal.JUMP
    assert rx.refused[Refusal.JUMP] == 1 and rx.recv_highest == 0
    for i in range(1, 50):
        assert rx.open_untrusted(tx.seal(bytes([i]))) == bytes([i])


def test_forward_jumps_up_to_the_bound_are_accepted() -> None:
    _, rx = pair(secure=False)
    assert rx.open_untrusted(plain_datagram(PLAIN_MAX_JUMP - 1)) == b"forged"
    assert rx.open_untrusted(plain_datagram(2 * PLAIN_MAX_JUMP - 1)) == b"forged"
    assert rx.refused[Refusal.JUMP] == 0 and rx.recv_highest == 2 * PLAIN_MAX_JUMP - 1


def test_a_sender_back_from_a_long_outage_loses_one_datagram() -> None:
    tx, rx = pair(secure=False)
    rx.open_untrusted(tx.seal(b"before"))
    tx._send += 10 * PLAIN_MAX_JUMP  # datagrams lost in a row
    with pytest.raises(BadPacket) as exc:
        rx.open_untrusted(tx.seal(b"first after"))
    assert refusal(exc) is Refusal.JUMP
    for i in range(20):
        assert rx.open_untrusted(tx.seal(bytes([i]))) == bytes([i])
    assert rx.recv_highest == tx.send_counter - 1


def test_a_window_moved_by_forgeries_is_won_back_by_the_sender() -> None:
    """Two forged datagrams that continue each other do restart the window (a plain link
    cannot tell them from a sender back from an outage); the sender's next two win it
    back, and from then on its datagrams flow and the forged line's are refused."""
    tx, rx = pair(secure=False)
    rx.open_untrusted(tx.seal(b"0"))
    far = 2**40
    with pytest.raises(BadPacket):
        rx.open_untrusted(plain_datagram(far))
    assert rx.open_untrusted(plain_datagram(far + 1)) == b"forged"
    assert rx.recv_highest == far + 1
    with pytest.raises(BadPacket) as exc:
        rx.open_untrusted(tx.seal(b"1"))
    assert refusal(exc) is Refusal.REPLAYED  # older than the window now
    assert rx.open_untrusted(tx.seal(b"2")) == b"2"
    assert rx.recv_highest == 2
    with pytest.raises(BadPacket):
        rx.open_untrusted(plain_datagram(far + 1))  # replayed: the forged line is gone
    assert rx.open_untrusted(tx.seal(b"3")) == b"3"


def test_secure_sessions_accept_any_authenticated_jump() -> None:
    tx, rx = pair(secure=True)
    tx._send = 2**40
    assert rx.open_untrusted(tx.seal(b"x")) == b"x"
    assert rx.refused[Refusal.JUMP] == 0


@settings(max_examples=200, deadline=None)
@given(
    steps=st.lists(
        st.one_of(
            st.integers(-WINDOW_SIZE - 10, 3 * PLAIN_MAX_JUMP),  # relative to the last
            st.integers(0, 2**64 - 1),  # anywhere
        ),
        max_size=40,
    )
)
# Found by hypothesis: a far counter taken by the full check did not raise the fast path's
# `top`, so a lower counter after it was taken as the new highest and lowered the window.
@example(steps=[65536, -1, 65537, -1])
def test_plain_open_batch_matches_open_one_by_one_on_far_counters(steps: list[int]) -> None:
    """The batch path's fast run and the one-by-one path make the same plain-link
    decisions on near, far, continuing and too-old counters."""
    _, batch_rx = pair(secure=False)
    _, ref_rx = pair(secure=False)
    counters: list[int] = []
    last = 0
    for step in steps:
        counter = step if step > 3 * PLAIN_MAX_JUMP else min(2**64 - 1, max(0, last + step))
        counters.append(counter)
        last = counter
    batch = [plain_datagram(c, c.to_bytes(8, "little")) for c in counters]
    expected = []
    for d in batch:
        with contextlib.suppress(BadPacket):
            expected.append(ref_rx.open_untrusted(d))
    got: list[bytes] = []
    assert batch_rx.open_batch(batch, 0, got) == len(batch)
    assert got == expected
    assert batch_rx.recv_highest == ref_rx.recv_highest
    assert batch_rx.refused == ref_rx.refused
