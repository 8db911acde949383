"""The native core against the pure-Python specification, on the same inputs.

Sessions: the same keys and counters seal byte-identical datagrams, each opens the other's,
and both make the same decision, for the same reason, on garbage, truncations, replays,
reorders, forgeries and wrong indices. Outbound: one TAP batch gives the same datagrams and
GSO runs as encode_outbound + seal_iov + udp._runs. Inbound: the same receive calls through
datapath/inbound.py's `Inbound.process` and through `SessionTable.open_batch` (with
the per-batch bookkeeping the data path will do) give the same TAP writes, drops and
counters, with pieces lost, duplicated, reordered and corrupted.

Skipped when the extension is not built, unless IPOP_TRIO_REQUIRE_NATIVE=1 (CI), where a
missing extension fails the run instead.
"""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.datapath import native

if not native.AVAILABLE:
    if os.environ.get("IPOP_TRIO_REQUIRE_NATIVE") == "1":
        pytest.fail(f"IPOP_TRIO_REQUIRE_NATIVE=1 but {native.WHY}", pytrace=False)
    pytest.skip(f"native core unavailable: {native.WHY}", allow_module_level=True)

from ipop_trio import _native  # type: ignore[attr-defined]
from ipop_trio.datapath.inbound import Inbound
from ipop_trio.datapath.sessions import SessionEntry, SessionTable
from ipop_trio.datapath.switch import PeerPort, Switch
from ipop_trio.errors import BadPacket, LocalProtocolError
from ipop_trio.net import udp
from ipop_trio.proto import offload, session, wire
from ipop_trio.proto.session import REJECT_AFTER_MESSAGES, Cipher, Session
from ipop_trio.stats import Stats

from .test_offload import (
    ACK,
    FIN,
    PSH,
    SRC_MAC,
    TIMESTAMPS,
    build_read,
    csum_frame,
    small_frame,
)

_many = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
KEY_A, KEY_B = bytes(range(32)), bytes(range(100, 132))


def test_constants_agree() -> None:
    assert _native.DATA_HEADER_SIZE == wire.DATA_HEADER_SIZE
    assert _native.TAG_SIZE == wire.TAG_SIZE
    assert _native.REJECT_AFTER_MESSAGES == session.REJECT_AFTER_MESSAGES
    assert _native.WINDOW_SIZE == session.WINDOW_SIZE
    assert _native.PLAIN_MAX_JUMP == session.PLAIN_MAX_JUMP
    assert _native.MAX_PIECES == offload.MAX_PIECES
    assert _native.DEFAULT_MAX_PAYLOAD == offload.DEFAULT_MAX_PAYLOAD
    assert _native.UDP_MAX_SEGMENTS == udp.UDP_MAX_SEGMENTS
    assert _native.GSO_MAX_BYTES == udp.GSO_MAX_BYTES
    assert _native.VNET_HDR_LEN == offload.VNET_HDR_LEN
    assert issubclass(native.Refused, BadPacket)


def pair(cls: type, cipher: Cipher, secure: bool, local: int = 7, remote: int = 9) -> tuple:
    """(sender, receiver) of one link direction, built by `cls`."""
    tx = cls(
        send_key=KEY_A,
        recv_key=KEY_B,
        local_index=remote,
        remote_index=local,
        cipher=cipher,
        secure=secure,
        created=0.0,
    )
    rx = cls(
        send_key=KEY_B,
        recv_key=KEY_A,
        local_index=local,
        remote_index=remote,
        cipher=cipher,
        secure=secure,
        created=0.0,
    )
    return tx, rx


def outcome(s: object, d: bytes) -> tuple[str, object]:
    try:
        return ("open", s.open_untrusted(d))  # type: ignore[attr-defined]
    except BadPacket as exc:
        reason = exc.reason.value if isinstance(exc, session.SessionRefused) else exc.args[0]
        return ("refused", reason)


def counters(s: object) -> tuple:
    refused = {str(k): v for k, v in s.refused.items()}  # type: ignore[attr-defined]
    names = ("send_counter", "recv_highest", "tx_bytes", "rx_bytes", "rx_packets")
    return (*(getattr(s, n) for n in names), refused)


# --- sessions ------------------------------------------------------------------------------


@_many
@given(
    cipher=st.sampled_from(list(Cipher)),
    secure=st.booleans(),
    keys=st.tuples(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)),
    indices=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    payloads=st.lists(st.binary(max_size=1500), max_size=8),
)
def test_seal_is_byte_identical_and_each_opens_the_other(
    cipher: Cipher,
    secure: bool,
    keys: tuple[bytes, bytes],
    indices: tuple[int, int],
    payloads: list[bytes],
) -> None:
    args = {"cipher": cipher, "secure": secure, "created": 0.0}
    py_tx = Session(
        send_key=keys[0], recv_key=keys[1], local_index=indices[0], remote_index=indices[1], **args
    )
    nt_tx = native.Session(
        send_key=keys[0], recv_key=keys[1], local_index=indices[0], remote_index=indices[1], **args
    )
    py_rx = Session(
        send_key=keys[1], recv_key=keys[0], local_index=indices[1], remote_index=indices[0], **args
    )
    nt_rx = native.Session(
        send_key=keys[1], recv_key=keys[0], local_index=indices[1], remote_index=indices[0], **args
    )
    for p in payloads:
        d = py_tx.seal(p)
        assert nt_tx.seal(p) == d
        assert nt_rx.open_untrusted(d) == p
        assert py_rx.open_untrusted(d) == p
    assert counters(py_tx) == counters(nt_tx)
    assert counters(py_rx) == counters(nt_rx)
    assert nt_tx.overhead() == py_tx.overhead()


def _mutate(d: bytes, op: int, at: int, value: int) -> bytes:
    b = bytearray(d)
    if op == 0 and b:  # flip a bit anywhere
        b[at % len(b)] ^= 1 << (value % 8)
    elif op == 1:  # truncate
        b = b[: at % (len(b) + 1)]
    elif op == 2 and len(b) >= 8:  # another receiver index
        b[4 + at % 4] ^= value or 1
    elif op == 3 and len(b) >= 16:  # a counter: far ahead (and continuing), at the limit, ...
        c = [
            REJECT_AFTER_MESSAGES,
            REJECT_AFTER_MESSAGES - 1,
            2**64 - 1,
            10**12,
            value,
            10**12 + value,  # two of these continue each other: a plain window restarts
            session.PLAIN_MAX_JUMP + value,  # about one plain jump ahead
        ][at % 7]
        b[8:16] = c.to_bytes(8, "little")
    elif op == 4 and b:  # the type byte or a pad byte
        b[at % 4] = value
    return bytes(b)


_op = st.one_of(
    st.tuples(st.just("seal"), st.binary(max_size=300)),
    st.tuples(st.just("replay"), st.integers(0, 50)),
    st.tuples(
        st.just("mutate"),
        st.tuples(st.integers(0, 50), st.integers(0, 4), st.integers(0, 2000), st.integers(0, 255)),
    ),
    st.tuples(st.just("garbage"), st.binary(max_size=80)),
)


@_many
@given(cipher=st.sampled_from(list(Cipher)), secure=st.booleans(), ops=st.lists(_op, max_size=40))
def test_open_decisions_and_reasons_agree(cipher: Cipher, secure: bool, ops: list) -> None:
    tx, py_rx = pair(Session, cipher, secure)
    _, nt_rx = pair(native.Session, cipher, secure)
    sent: list[bytes] = [tx.seal(b"first")]
    for kind, arg in ops:
        if kind == "seal":
            sent.append(tx.seal(arg))
            d = sent[-1]
        elif kind == "replay":  # replays and reorders: any datagram sent so far
            d = sent[arg % len(sent)]
        elif kind == "mutate":
            i, op, at, value = arg
            d = _mutate(sent[i % len(sent)], op, at, value)
        else:
            d = arg
        assert outcome(nt_rx, d) == outcome(py_rx, d), (kind, d.hex())
    assert counters(nt_rx) == counters(py_rx)


def test_memoryview_and_bytearray_inputs() -> None:
    tx, _ = pair(Session, Cipher.AES_256_GCM, True)
    _, rx = pair(native.Session, Cipher.AES_256_GCM, True)
    d = tx.seal(b"view")
    assert rx.open_untrusted(memoryview(bytearray(d))) == b"view"


@_many
@given(
    cipher=st.sampled_from(list(Cipher)),
    secure=st.booleans(),
    chaining_key=st.binary(min_size=32, max_size=32),
    payloads=st.lists(st.binary(max_size=1500), min_size=1, max_size=4),
)
def test_sessions_from_a_chaining_key_match_and_each_end_opens_the_other(
    cipher: Cipher, secure: bool, chaining_key: bytes, payloads: list[bytes]
) -> None:
    """Noise's Split() in the extension gives the keys proto/session.py derives: the same
    datagrams from the same chaining key, and the two ends (initiator, responder) agree."""
    args = {"cipher": cipher, "secure": secure, "created": 0.0, "chaining_key": chaining_key}
    ends = {
        cls: (
            cls(initiator=True, local_index=1, remote_index=2, **args),
            cls(initiator=False, local_index=2, remote_index=1, **args),
        )
        for cls in (Session, native.Session)
    }
    (py_i, py_r), (nt_i, nt_r) = ends[Session], ends[native.Session]
    for p in payloads:
        d = py_i.seal(p)
        assert nt_i.seal(p) == d
        assert nt_r.open_untrusted(d) == p
        back = nt_r.seal(p)
        assert py_r.seal(p) == back
        assert py_i.open_untrusted(back) == p
    # Fixed keys from the same Split() seal the same datagrams.
    to_responder, to_initiator = session.hkdf2(chaining_key, b"")
    by_keys = native.Session(
        send_key=to_responder,
        recv_key=to_initiator,
        local_index=1,
        remote_index=2,
        cipher=cipher,
        secure=secure,
        created=0.0,
    )
    for p in payloads:
        by_keys.seal(p)
    assert by_keys.seal(b"x") == nt_i.seal(b"x")


def test_a_session_takes_exactly_one_form_of_keys() -> None:
    base = {"local_index": 1, "remote_index": 2, "cipher": Cipher.AES_256_GCM, "created": 0.0}
    for cls in (Session, native.Session):
        with pytest.raises(LocalProtocolError):
            cls(chaining_key=bytes(31), initiator=True, secure=True, **base)
        for wrong in (
            {},
            {"chaining_key": bytes(32)},
            {"send_key": bytes(32)},
            {"chaining_key": bytes(32), "initiator": True, "send_key": bytes(32)},
            {"initiator": True, "send_key": bytes(32), "recv_key": bytes(32)},
        ):
            with pytest.raises(TypeError):
                cls(secure=True, **base, **wrong)


def test_constructor_refusals_match() -> None:
    for cls in (Session, native.Session):
        with pytest.raises(LocalProtocolError):
            cls(
                send_key=bytes(31),
                recv_key=bytes(32),
                local_index=1,
                remote_index=2,
                cipher=Cipher.AES_256_GCM,
                secure=True,
                created=0.0,
            )
        with pytest.raises(LocalProtocolError):
            cls(
                send_key=b"",
                recv_key=b"",
                local_index=2**32,
                remote_index=2,
                cipher=Cipher.AES_256_GCM,
                secure=False,
                created=0.0,
            )


def test_timers_match() -> None:
    py_s, _ = pair(Session, Cipher.CHACHA20_POLY1305, True)
    nt_s, _ = pair(native.Session, Cipher.CHACHA20_POLY1305, True)
    for now in (0.0, 119.9, 120.0, 164.9, 165.0, 179.9, 180.0):
        for initiator in (False, True):
            assert py_s.should_rekey(now, initiator) == nt_s.should_rekey(now, initiator)
        assert py_s.expired(now) == nt_s.expired(now)


# --- TAP reads -------------------------------------------------------------------------------


@st.composite
def tap_reads(draw: st.DrawFn, max_reads: int = 4) -> list[bytes]:
    """Valid TSO super-frames (IPv4/IPv6, options, FIN), small frames, and a few broken."""
    reads = []
    for _ in range(draw(st.integers(1, max_reads))):
        kind = draw(st.integers(0, 9))
        if kind <= 5:
            v6 = draw(st.booleans())
            tcp_options = draw(st.sampled_from([TIMESTAMPS, b""]))
            gso = draw(st.integers(200, 1330))
            data_len = draw(st.integers(1, min(63_000, 128 * gso)))
            reads.append(
                build_read(
                    data_len,
                    v6=v6,
                    gso_size=gso,
                    flags=draw(st.sampled_from([ACK | PSH, ACK | PSH | FIN, ACK])),
                    tcp_options=tcp_options,
                    ip_options=b"" if v6 else draw(st.sampled_from([b"", b"\x01\x01\x01\x00"])),
                )
            )
        elif kind <= 6:
            reads.append(bytes(10) + small_frame(draw(st.integers(14, 1440))))
        elif kind <= 7:  # NEEDS_CSUM: TCP/UDP/other over IPv4/IPv6, the right fields or not
            frame, cs, co = csum_frame(
                draw(st.integers(14, 1440)),
                v6=draw(st.booleans()),
                proto=draw(st.sampled_from([6, 17, 1])),
                frag=draw(st.sampled_from([0, 0x4000, 0x2000, 1])),
            )
            if draw(st.booleans()):
                cs, co = draw(st.integers(0, 80)), draw(st.integers(0, 30))
            reads.append(offload.VNET_HDR.pack(1, 0, 0, 0, cs, co) + frame)
        else:  # a read the encoder refuses, or a random one
            read = bytearray(build_read(draw(st.integers(1, 5000))))
            for _ in range(draw(st.integers(1, 3))):
                read[draw(st.integers(0, 60))] = draw(st.integers(0, 255))
            reads.append(bytes(read))
    return reads


def python_outbound(s: Session, reads: list[bytes], frame_id: int) -> tuple:
    """datapath/outbound.py's encode + seal, and udp._runs, as offsets into one buffer."""
    payloads: list[bytes] = []
    bad = 0
    for read in reads:
        try:
            payloads.extend(offload.encode_outbound(read, frame_id))
        except offload.OffloadError:
            bad += 1
        frame_id = (frame_id + 1) & 0xFFFFFFFF
    iov: list[bytes] = []
    sizes: list[int] = []
    s.seal_iov(payloads, iov, sizes)
    runs, offset = [], 0
    for _start, count, seg, total in udp._runs(sizes):
        runs.append((offset, total, seg, count))
        offset += total
    return b"".join(iov), runs, frame_id, bad, len(sizes)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    reads=tap_reads(),
    frame_id=st.integers(0, 2**32 - 1),
    cipher=st.sampled_from(list(Cipher)),
    secure=st.booleans(),
)
def test_outbound_batch_is_byte_identical(
    reads: list[bytes], frame_id: int, cipher: Cipher, secure: bool
) -> None:
    py_s, _ = pair(Session, cipher, secure)
    nt_s, _ = pair(native.Session, cipher, secure)
    out = bytearray(b"stale")
    for _ in range(2):  # the caller's buffer is reused
        data, runs, next_id, bad, count = python_outbound(py_s, reads, frame_id)
        got = nt_s.seal_tap_batch(reads, frame_id, out)
        assert bytes(out) == data
        assert got.runs == runs
        assert (got.frame_id, got.bad_tap_frame, got.datagrams, got.nbytes) == (
            next_id,
            bad,
            count,
            len(data),
        )
        assert got.frame_bytes == sum(map(len, reads)) - 10 * len(reads)
        assert counters(nt_s) == counters(py_s)
        frame_id = next_id


def test_outbound_into_a_buffer_with_a_live_view_is_refused() -> None:
    # Counter exhaustion is a cargo test (the counter cannot be set from Python).
    s, _ = pair(native.Session, Cipher.AES_256_GCM, True)
    out = bytearray()
    assert s.seal_tap_batch([build_read(3000)], 0, out).datagrams == 3
    view = memoryview(out)
    with pytest.raises(BufferError):  # a resize with an export alive
        s.seal_tap_batch([build_read(6000)], 1, out)
    view.release()
    assert s.seal_tap_batch([bytes(10) + small_frame()], 1, out).datagrams == 1


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(reads=tap_reads(max_reads=2), frame_id=st.integers(0, 2**40))
def test_encode_outbound_matches(reads: list[bytes], frame_id: int) -> None:
    for read in reads:
        try:
            expected = offload.encode_outbound(read, frame_id)
        except offload.OffloadError:
            with pytest.raises(native.Refused):
                native.encode_outbound(read, frame_id)
        else:
            assert native.encode_outbound(read, frame_id) == expected


# --- reassembly ----------------------------------------------------------------------------


def push_all(r: object, payloads: list[bytes]) -> list[object]:
    """Each push's writes, or 'refused'; then the flush."""
    results: list[object] = []
    for p in payloads:
        out: list[bytes] = []
        try:
            r.push_untrusted(p, out)  # type: ignore[attr-defined]
        except BadPacket:
            results.append(("refused", out))
        else:
            results.append(out)
    out = []
    r.flush(out)  # type: ignore[attr-defined]
    results.append(("flush", out))
    return results


def _shuffle_and_lose(payloads: list[bytes], rnd: random.Random) -> list[bytes]:
    kept = [p for p in payloads if rnd.random() > 0.1]
    if rnd.random() < 0.5:
        rnd.shuffle(kept)
    if kept and rnd.random() < 0.3:
        kept.insert(rnd.randrange(len(kept)), rnd.choice(kept))  # a duplicate
    if kept and rnd.random() < 0.3:
        i = rnd.randrange(len(kept))
        b = bytearray(kept[i])
        b[rnd.randrange(len(b))] ^= 1 << rnd.randrange(8)
        kept[i] = bytes(b)
    return kept


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(reads=tap_reads(), seed=st.integers(0, 2**32), frame_id=st.integers(0, 2**32 - 1))
def test_reassembly_matches_with_loss_reorder_and_corruption(
    reads: list[bytes], seed: int, frame_id: int
) -> None:
    rnd = random.Random(seed)
    payloads: list[bytes] = []
    for i, read in enumerate(reads):
        try:
            payloads += offload.encode_outbound(read, frame_id + i - (rnd.random() < 0.1) * 3)
        except offload.OffloadError:
            payloads.append(read[10:])  # refused read: push its bytes as garbage instead
    payloads = _shuffle_and_lose(payloads, rnd)
    py_r, nt_r = offload.Reassembler(), native.Reassembler()
    assert push_all(nt_r, payloads) == push_all(py_r, payloads)
    names = ("frames_whole", "frames_partial", "segments_rebuilt", "pieces_late", "pending")
    assert [getattr(nt_r, n) for n in names] == [getattr(py_r, n) for n in names]
    py_out: list[bytes] = []
    nt_out: list[bytes] = []
    py_r.reset(py_out)
    nt_r.reset(nt_out)
    assert nt_out == py_out


@_many
@given(
    size=st.integers(0, 300),
    v6=st.booleans(),
    proto=st.sampled_from([6, 17, 1, 58]),
    frag=st.sampled_from([0, 0x4000, 0x2000, 0x0001]),
    fields=st.one_of(st.none(), st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1))),
)
def test_needs_csum_fields_decisions_match(
    size: int, v6: bool, proto: int, frag: int, fields: tuple[int, int] | None
) -> None:
    """A peer's NEEDS_CSUM frame (right offsets, or any): both take or refuse it alike."""
    frame, cs, co = csum_frame(size, v6=v6, proto=proto, frag=frag)
    frame = frame[:size]
    payload = frame + offload.CSUM_META.pack(*(fields or (cs, co))) + bytes((offload.INNER_CSUM,))
    assert push_all(native.Reassembler(), [payload]) == push_all(offload.Reassembler(), [payload])


@_many
@given(payloads=st.lists(st.binary(max_size=1500), max_size=20))
def test_reassembly_of_random_bytes_matches(payloads: list[bytes]) -> None:
    assert push_all(native.Reassembler(), payloads) == push_all(offload.Reassembler(), payloads)


# --- inbound batches -----------------------------------------------------------------------

OWN_MAC = bytes.fromhex("02aabbccdd02")
ADDR = ("192.0.2.1", 4600)
PATH = 1  # the path token of ADDR without a relay


class OpenSwitch(Switch):
    """Accepts every TAP write, so the writes themselves are compared."""

    def accept_inbound(self, port: PeerPort, frame: bytes, now: float) -> bool:
        return True


def gro_calls(datagrams: list[bytes], rnd: random.Random) -> list[tuple[bytes, int]]:
    """Receive calls as the kernel's GRO makes them: runs of equal sizes, the last one maybe
    shorter, as (buffer, segment size); single datagrams with segment 0."""
    calls, i = [], 0
    while i < len(datagrams):
        seg = len(datagrams[i])
        j = i + 1
        limit = rnd.choice([1, 4, 64])
        while j < len(datagrams) and j - i < limit and len(datagrams[j]) == seg:
            j += 1
        if j < len(datagrams) and j - i < limit and 0 < len(datagrams[j]) < seg:
            j += 1
        calls.append((b"".join(datagrams[i:j]), seg if j - i > 1 else 0))
        i = j
    return calls


def recv_views(buf: bytes, seg: int) -> list[memoryview]:
    """net/udp.py's recv_once cut."""
    view, n = memoryview(buf), len(buf)
    if seg <= 0 or seg >= n:
        return [view[:n]]
    return [view[i : min(i + seg, n)] for i in range(0, n, seg)]


class Side:
    """One receiving node: the Python Inbound, or the native table driven as the data path
    will drive it."""

    def __init__(self, sessions: list, secure_path: bool) -> None:
        self.stats = Stats()
        self.switch = OpenSwitch(OWN_MAC, self.stats)
        self.port = PeerPort("peer", SRC_MAC, None)
        self.port.endpoint = ADDR if secure_path else ("198.51.100.7", 1)
        self.switch.add(self.port)
        self.handshakes: list[bytes] = []
        self.sessions: SessionTable[str] = SessionTable()
        for s in sessions:
            # the sessions chose their own indices: entered as the link tasks would
            self.sessions.entries[s.local_index] = SessionEntry(s, self.port, None)
        self.inbound = Inbound(
            self.switch,
            self.stats,
            self.sessions,
            on_handshake=lambda d, a, v: self.handshakes.append(d),
        )
        self.table = native.SessionTable()
        for s in sessions:
            if isinstance(s, native.Session):
                self.table.insert(s, 0)
        self.table.set_paths(0, [PATH] if secure_path else [])

    def python(self, buf: bytes, seg: int) -> list[bytes]:
        out: list[bytes] = []
        self.inbound.process(recv_views(buf, seg), ADDR, 1.0, out)
        return out

    def native(self, buf: bytes, seg: int) -> list[bytes]:
        got = self.table.open_batch(buf, seg, PATH)
        for name, n in got.drops:
            self.stats.drop(name, n)
        view = memoryview(buf)
        for off, n in got.others:
            self.inbound._not_data(view[off : off + n], ADDR, None)
        for _index, _peer, opened, refused, bad_inner, _data, _nbytes in got.sessions:
            self.port.drops += refused + bad_inner
            self.port.last_received = 1.0 if opened else self.port.last_received
        out: list[bytes] = []
        writes = [frame for frame, _slot in got.writes]
        self.inbound._accept(self.port, writes, out, 1.0)
        return out

    def flush(self, use_native: bool) -> list[bytes]:
        out: list[bytes] = []
        if use_native:
            writes = [frame for frame, _peer in self.table.flush_pending()]
            self.inbound._accept(self.port, writes, out, 1.0)
        else:
            self.inbound.flush_pending(out, 1.0)
        return out

    def reset(self, use_native: bool) -> list[bytes]:
        out: list[bytes] = []
        if use_native:
            writes = [frame for frame, _peer in self.table.reset_peer(0)]
        else:
            writes = []
            self.port.reassembler.reset(writes)
        self.inbound._accept(self.port, writes, out, 1.0)
        return out

    def counters(self, use_native: bool) -> dict:
        if use_native:
            return dict(self.table.reassembly_counters())
        return self.inbound.reassembly_counters()


_NOT_DATA = [
    b"\x00\x01\x00\x00" + bytes(16),
    b"\xa1" + bytes(40),
    b"\x40" + bytes(10),
    b"\x99junk",
    b"",
    b"\xa4\x00\x00\x00short",
]


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    reads=tap_reads(),
    seed=st.integers(0, 2**32),
    cipher=st.sampled_from(list(Cipher)),
    secure=st.booleans(),
    on_path=st.booleans(),
)
def test_inbound_batches_match(
    reads: list[bytes], seed: int, cipher: Cipher, secure: bool, on_path: bool
) -> None:
    rnd = random.Random(seed)
    # Two sessions of one peer (a rekey overlap) sharing its reassembler, and the sender's.
    tx_old, py_old = pair(Session, cipher, secure, local=7, remote=9)
    tx_new, py_new = pair(Session, cipher, secure, local=8, remote=10)
    _, nt_old = pair(native.Session, cipher, secure, local=7, remote=9)
    _, nt_new = pair(native.Session, cipher, secure, local=8, remote=10)
    py_side = Side([py_old, py_new], on_path)
    nt_side = Side([nt_old, nt_new], on_path)
    datagrams: list[bytes] = []
    for i, read in enumerate(reads):
        tx = tx_new if rnd.random() < 0.5 else tx_old
        try:
            payloads = offload.encode_outbound(read, 1000 + i)
        except offload.OffloadError:
            payloads = [read[10:]]  # a peer may send anything inside a valid datagram
        if rnd.random() < 0.2:
            payloads.append(b"")  # keepalive
        datagrams += [tx.seal(p) for p in payloads]
    datagrams = _shuffle_and_lose(datagrams, rnd)
    for _ in range(rnd.randrange(4)):
        extra = rnd.choice([*_NOT_DATA, *datagrams[:3], bytes(40)])
        if extra[:1] == b"\xa4" or rnd.random() < 0.3:
            extra = extra[:4] + rnd.choice([b"\x07\x00\x00\x00", b"\x63\x00\x00\x00"]) + extra[8:]
        datagrams.insert(rnd.randrange(len(datagrams) + 1), extra)
    calls = gro_calls(datagrams, rnd)
    events = []
    for buf, seg in calls:
        events.append(("call", buf, seg))
        if rnd.random() < 0.15:
            events.append(("flush", b"", 0))
        if rnd.random() < 0.05:
            events.append(("reset", b"", 0))
    events.append(("flush", b"", 0))
    written: list[bytes] = []
    for what, buf, seg in events:
        if what == "call":
            py_got, nt_got = py_side.python(buf, seg), nt_side.native(buf, seg)
        elif what == "flush":
            py_got, nt_got = py_side.flush(False), nt_side.flush(True)
        else:
            py_got, nt_got = py_side.reset(False), nt_side.reset(True)
        assert nt_got == py_got, what
        written.extend(py_got)
    assert nt_side.stats.drops == py_side.stats.drops
    assert nt_side.handshakes == py_side.handshakes
    assert nt_side.port.drops == py_side.port.drops
    assert nt_side.counters(True) == py_side.counters(False)
    assert counters(nt_old) == counters(py_old)
    assert counters(nt_new) == counters(py_new)


def test_inbound_results_name_sessions_and_others() -> None:
    tx, _ = pair(Session, Cipher.AES_256_GCM, True)
    _, rx = pair(native.Session, Cipher.AES_256_GCM, True)
    table = native.SessionTable()
    table.insert(rx, 5)
    read = build_read(5000)
    payloads = offload.encode_outbound(read, 1)
    datagrams = [tx.seal(p) for p in payloads[:-1]]  # the last piece is still on its way
    buf = b"".join(datagrams) + b"\x00\x01junk"
    got = table.open_batch(buf, len(datagrams[0]), PATH)
    assert got.datagrams == len(datagrams) + 1
    assert got.others == [(len(buf) - 6, 6)]
    assert got.writes == [] and got.pending and table.pending(5) == len(payloads) - 1
    (index, peer, opened, refused, bad, data, nbytes) = got.sessions[0]
    assert (index, peer, opened, refused, bad, data) == (7, 5, len(datagrams), 0, 0, True)
    assert nbytes == sum(map(len, payloads[:-1]))
    got = table.open_batch(tx.seal(payloads[-1]), 0, PATH)
    assert got.writes == [(read, 0)]
    assert not got.pending
    assert table.reassembly_counters(5)["frames_whole"] == 1
    assert len(table) == 1 and 7 in table
    assert table.remove_peer(5) == [] and len(table) == 0
