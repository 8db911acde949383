"""Offload core: TAP reads → inner payloads → TAP writes, in pairs (encode_outbound on one
side, a Reassembler on the other), with hand-built Ethernet/IPv4/IPv6/TCP packets and real
checksums computed here (RFC 1071) to check every rebuilt segment."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket
from ipop_trio.proto.offload import (
    DEFAULT_MAX_PAYLOAD,
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    GSO_UDP,
    GSO_UDP_L4,
    MAX_PIECES,
    PIECE_TRAILER,
    VNET_HDR,
    VNET_HDR_LEN,
    OffloadError,
    Reassembler,
    VirtioHeader,
    encode_outbound,
)
from ipop_trio.proto.wire import CSUM_META, INNER_CSUM, INNER_FRAME, INNER_PIECE, PIECE_META

SRC_MAC = bytes.fromhex("02aabbccdd01")
DST_MAC = bytes.fromhex("02aabbccdd02")
SRC4 = bytes((10, 77, 0, 2))
DST4 = bytes((10, 77, 0, 3))
SRC6 = bytes.fromhex("fd00000000000000000000000000aa02")
DST6 = bytes.fromhex("fd00000000000000000000000000aa03")
SEQ0 = 0xFFFFF000  # wraps within a super-frame
IP_ID0 = 0xFFF0  # wraps within a super-frame
ACK, PSH, FIN = 0x10, 0x08, 0x01
# gso_size for a 1400-byte TAP MTU with TCP timestamps (hdr_len 66 / 86): 1432-byte pieces
MSS = 1348
MSS6 = 1328
TIMESTAMPS = b"\x01\x01\x08\x0a" + bytes(range(8))  # NOP NOP TS: 12 bytes, doff 8


# --- checksums, done the slow obvious way ------------------------------------------------


def rfc1071(data: bytes) -> int:
    """Folded one's-complement sum of 16-bit big-endian words (not complemented)."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(v6: bool, src: bytes, dst: bytes, tcp_len: int) -> bytes:
    if v6:
        return src + dst + struct.pack("!I3xB", tcp_len, 6)
    return src + dst + struct.pack("!xBH", 6, tcp_len)


# --- packet builders -------------------------------------------------------------------


def tcp_header(seq: int, flags: int, options: bytes = b"", check: int = 0) -> bytes:
    doff = (20 + len(options)) // 4
    fixed = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 0x01020304, doff << 4, flags, 512, check, 0)
    return fixed + options


def build_read(
    data_len: int,
    *,
    v6: bool = False,
    gso_size: int | None = None,
    flags: int = ACK | PSH,
    tcp_options: bytes = TIMESTAMPS,
    ip_options: bytes = b"",
    vnet_hdr_len: int | None = None,
) -> bytes:
    """A TAP read as the kernel hands over a TSO super-frame: NEEDS_CSUM, the pseudo-header
    sum in the TCP checksum field, the payload a recognisable byte pattern."""
    data = bytes((i * 7 + 3) & 0xFF for i in range(data_len))
    tcp_len = 20 + len(tcp_options) + data_len
    if v6:
        src, dst = SRC6, DST6
        ip = struct.pack("!IHBB", 6 << 28, tcp_len & 0xFFFF, 6, 64) + src + dst
        ethertype = 0x86DD
    else:
        src, dst = SRC4, DST4
        ihl = (20 + len(ip_options)) // 4
        total = (ihl * 4 + tcp_len) & 0xFFFF  # wrong when too long: tests want that
        ip = struct.pack("!BBHHHBBH", 0x40 | ihl, 0, total, IP_ID0, 0x4000, 64, 6, 0)
        ip += src + dst + ip_options
        ip = ip[:10] + struct.pack("!H", 0xFFFF - rfc1071(ip)) + ip[12:]
    check = rfc1071(pseudo_header(v6, src, dst, tcp_len & 0xFFFF))
    frame = DST_MAC + SRC_MAC + struct.pack("!H", ethertype if v6 else 0x0800) + ip
    csum_start = len(frame)
    frame += tcp_header(SEQ0, flags, tcp_options, check) + data
    hdr_len = csum_start + 20 + len(tcp_options)
    vnet = VNET_HDR.pack(
        F_NEEDS_CSUM,
        GSO_TCPV6 if v6 else GSO_TCPV4,
        hdr_len if vnet_hdr_len is None else vnet_hdr_len,
        (MSS6 if v6 else MSS) if gso_size is None else gso_size,
        csum_start,
        16,
    )
    return vnet + frame


def small_frame(size: int = 100) -> bytes:
    return DST_MAC + SRC_MAC + b"\x08\x00" + bytes(i & 0xFF for i in range(size - 14))


def csum_frame(
    size: int = 200, *, v6: bool = False, proto: int = 17, ip_options: bytes = b"", frag: int = 0
) -> tuple[bytes, int, int]:
    """A frame as the kernel hands one over with NEEDS_CSUM (GSO_NONE): TCP or UDP (any
    `proto`) over IPv4 (`frag`: its flags/fragment word) or IPv6, padded to `size`; and the
    (csum_start, csum_offset) its headers give."""
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, 0, proto, 64) + SRC6 + DST6
    else:
        ihl = (20 + len(ip_options)) // 4
        ip = struct.pack("!BBHHHBBH", 0x40 | ihl, 0, 0, IP_ID0, frag, 64, proto, 0)
        ip += SRC4 + DST4 + ip_options
    head = DST_MAC + SRC_MAC + struct.pack("!H", 0x86DD if v6 else 0x0800) + ip
    frame = head + bytes(i & 0xFF for i in range(max(0, size - len(head))))
    return frame, len(head), 16 if proto == 6 else 6


def reassemble(payloads: Sequence[bytes | memoryview], r: Reassembler | None = None) -> list[bytes]:
    r = Reassembler() if r is None else r
    out: list[bytes] = []
    for p in payloads:
        r.push_untrusted(p, out)
    return out


# --- checks on a rebuilt segment --------------------------------------------------------


def kernel_split(write: bytes, gso_size: int) -> list[tuple[int, bytes]]:
    """What the receiving kernel makes of a TAP write: a GSO write is cut into segments
    (tcp_gso_segment: seq, IPv4 id/length/checksum, FIN/PSH on the last only, and the
    checksum field re-seeded for each segment's length); a plain write passes as is.
    Returns (piece index, segment write with a GSO_NONE NEEDS_CSUM header)."""
    vh = VirtioHeader.parse(write)
    frame = write[VNET_HDR_LEN:]
    cs = vh.csum_start
    hdr_len = cs + (frame[cs + 12] >> 4) * 4
    seq = struct.unpack_from("!I", frame, cs + 4)[0]
    if vh.gso_type == GSO_NONE:
        return [(((seq - SEQ0) & 0xFFFFFFFF) // gso_size, write)]
    v6 = frame[12:14] == b"\x86\xdd"
    payload = frame[hdr_len:]
    chunks = [payload[i : i + vh.gso_size] for i in range(0, len(payload), vh.gso_size)]
    out = []
    for j, chunk in enumerate(chunks):
        seg = bytearray(frame[:hdr_len] + chunk)
        tcp_len = len(seg) - cs
        if v6:
            struct.pack_into("!H", seg, 18, tcp_len)
            src, dst = bytes(seg[22:38]), bytes(seg[38:54])
        else:
            ident = struct.unpack_from("!H", seg, 18)[0]
            struct.pack_into("!HH", seg, 16, len(seg) - 14, (ident + j) & 0xFFFF)
            struct.pack_into("!H", seg, 24, 0)
            struct.pack_into("!H", seg, 24, 0xFFFF - rfc1071(bytes(seg[14:cs])))
            src, dst = bytes(seg[26:30]), bytes(seg[30:34])
        s = (seq + j * vh.gso_size) & 0xFFFFFFFF
        struct.pack_into("!I", seg, cs + 4, s)
        if j != len(chunks) - 1:
            seg[cs + 13] &= ~(FIN | PSH) & 0xFF
        struct.pack_into("!H", seg, cs + 16, rfc1071(pseudo_header(v6, src, dst, tcp_len)))
        head = VirtioHeader(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs, 16).pack()
        out.append((((s - SEQ0) & 0xFFFFFFFF) // vh.gso_size, head + bytes(seg)))
    return out


def segments(writes: list[bytes], original: bytes) -> list[tuple[int, bytes]]:
    gso_size = VirtioHeader.parse(original).gso_size
    return [seg for w in writes for seg in kernel_split(w, gso_size)]


def check_segment(write: bytes, original: bytes, index: int, count: int) -> None:
    """`write` must be piece `index` of the super-frame TAP read `original` as one valid
    segment, with a NEEDS_CSUM header the kernel can finish."""
    vh = VirtioHeader.parse(write)
    ovh = VirtioHeader.parse(original)
    gso_size = ovh.gso_size
    assert vh == VirtioHeader(F_NEEDS_CSUM, GSO_NONE, 0, 0, ovh.csum_start, 16)
    seg, orig = write[VNET_HDR_LEN:], original[VNET_HDR_LEN:]
    cs = vh.csum_start
    hdr_len = cs + (orig[cs + 12] >> 4) * 4
    chunk = orig[hdr_len + index * gso_size : hdr_len + (index + 1) * gso_size]
    assert seg[hdr_len:] == chunk
    assert seg[:14] == orig[:14]  # MACs and ethertype untouched
    v6 = orig[12:14] == b"\x86\xdd"
    tcp = bytearray(seg[cs:])
    if v6:
        assert struct.unpack_from("!H", seg, 18)[0] == len(tcp)
        assert seg[14:18] + seg[20:cs] == orig[14:18] + orig[20:cs]
        src, dst = seg[22:38], seg[38:54]
    else:
        ip = seg[14:cs]
        assert rfc1071(ip) == 0xFFFF, "IPv4 header checksum"
        total, ident = struct.unpack_from("!HH", ip, 2)
        assert total == len(seg) - 14
        assert ident == (IP_ID0 + index) & 0xFFFF
        assert ip[6:10] + ip[12:] == orig[20:24] + orig[26:cs]
        src, dst = ip[12:16], ip[16:20]
    seq = struct.unpack_from("!I", tcp, 4)[0]
    assert seq == (SEQ0 + index * gso_size) & 0xFFFFFFFF
    oflags = orig[cs + 13]
    expect = oflags if index == count - 1 else oflags & ~(FIN | PSH)
    assert tcp[13] == expect
    assert tcp[:4] + tcp[8:13] + tcp[14:16] + tcp[18 : hdr_len - cs] == (
        orig[cs : cs + 4]
        + orig[cs + 8 : cs + 13]
        + orig[cs + 14 : cs + 16]
        + orig[cs + 18 : hdr_len]
    )
    pseudo = pseudo_header(v6, src, dst, len(tcp))
    field = struct.unpack_from("!H", tcp, 16)[0]
    assert field == rfc1071(pseudo)
    # Finish it as the kernel does for CHECKSUM_PARTIAL: sum from csum_start to the end
    # (the field seeded with the pseudo-header sum), complement, store.
    struct.pack_into("!H", tcp, 16, 0xFFFF - rfc1071(bytes(tcp)))
    assert rfc1071(pseudo + bytes(tcp)) == 0xFFFF, "TCP checksum"


# --- VirtioHeader ----------------------------------------------------------------------


def test_virtio_header_round_trip() -> None:
    raw = VNET_HDR.pack(1, 4, 86, 1428, 54, 16)
    vh = VirtioHeader.parse(raw + b"frame")
    assert vh == VirtioHeader(1, GSO_TCPV6, 86, 1428, 54, 16)
    assert vh.pack() == raw
    with pytest.raises(OffloadError):
        VirtioHeader.parse(raw[:9])
    with pytest.raises(OffloadError):
        VirtioHeader(flags=256).pack()
    assert issubclass(OffloadError, BadPacket)


# --- whole frames ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["short-last", "exact", "one-byte", "one-piece-full", "two-pieces", "one-piece"]
)
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_super_frame_round_trip_is_byte_identical(case: str, v6: bool) -> None:
    mss = MSS6 if v6 else MSS
    sizes = {"short-last": 63_000, "exact": 45 * mss, "one-byte": 1, "one-piece-full": mss}
    data_len = sizes.get(case) or {"two-pieces": mss + 1, "one-piece": 100}[case]
    read = build_read(data_len, v6=v6)
    payloads = encode_outbound(read, 7)
    count = -(-data_len // mss)
    assert len(payloads) == count
    for i, p in enumerate(payloads):
        assert len(p) <= DEFAULT_MAX_PAYLOAD
        assert p[-1] == INNER_PIECE
        meta = PIECE_META.unpack_from(p, len(p) - PIECE_TRAILER)
        gso_type, cs = (GSO_TCPV6, 54) if v6 else (GSO_TCPV4, 34)
        assert meta == (7, i, count, cs + 32, mss, gso_type, cs, 16)
        assert p[: len(p) - PIECE_TRAILER].endswith(read[VNET_HDR_LEN : VNET_HDR_LEN + cs + 32])
    r = Reassembler()
    out = reassemble(payloads, r)
    assert out == [read]
    assert (r.frames_whole, r.frames_partial, r.segments_rebuilt, r.pieces_late) == (1, 0, 0, 0)
    assert r.pending == 0


def test_ip_options_and_no_tcp_options() -> None:
    read = build_read(5000, ip_options=b"\x01\x01\x01\x00", tcp_options=b"", gso_size=1300)
    assert reassemble(encode_outbound(read, 1)) == [read]
    # and a piece rebuilt from this frame is still valid
    payloads = encode_outbound(read, 1)
    r = Reassembler()
    out = reassemble(payloads[:1] + payloads[2:], r)
    r.flush(out)
    segs = segments(out, read)
    assert [i for i, _ in segs] == [0, 2, 3]
    for i, w in segs:
        check_segment(w, read, i, 4)


def test_untrusted_hdr_len_is_recomputed() -> None:
    # On the forward path the kernel's hdr_len can cover the whole first segment.
    read = build_read(10_000, vnet_hdr_len=66 + MSS)
    out = reassemble(encode_outbound(read, 1))
    assert out == [read[:2] + struct.pack("<H", 66) + read[4:]]


def test_reordered_pieces_still_make_one_frame() -> None:
    read = build_read(60_000, v6=True)
    payloads = encode_outbound(read, 3)
    random.Random(5).shuffle(payloads)
    assert reassemble(payloads) == [read]


def test_frame_id_is_modulo_2_32_and_memoryview_input() -> None:
    read = build_read(3000)
    payloads = encode_outbound(memoryview(read), 2**32 + 5)
    assert PIECE_META.unpack_from(payloads[0], len(payloads[0]) - PIECE_TRAILER)[0] == 5
    assert reassemble([memoryview(bytearray(p)) for p in payloads]) == [read]


def test_mutable_buffers_are_copied() -> None:
    read = build_read(4000)
    r = Reassembler()
    out: list[bytes] = []
    buf = bytearray(2000)
    for p in encode_outbound(read, 1):
        buf[: len(p)] = p
        r.push_untrusted(memoryview(buf)[: len(p)], out)
        buf[:] = bytes(len(buf))  # the caller reuses its buffer
    assert out == [read]


# --- gso NONE ----------------------------------------------------------------------------


def test_plain_frame_round_trip() -> None:
    frame = small_frame(60)
    read = bytes(VNET_HDR_LEN) + frame
    assert encode_outbound(read, 0) == [frame + bytes((INNER_FRAME,))]
    assert reassemble(encode_outbound(read, 0)) == [read]
    # DATA_VALID is dropped: the receiving kernel checks the (complete) checksum itself.
    valid = VNET_HDR.pack(F_DATA_VALID, GSO_NONE, 0, 0, 0, 0) + frame
    assert reassemble(encode_outbound(valid, 0)) == [read]


@pytest.mark.parametrize(
    ("v6", "proto", "ip_options"),
    [
        (False, 17, b""),
        (False, 6, b""),
        (False, 17, b"\x01\x01\x01\x00"),
        (True, 6, b""),
        (True, 17, b""),
    ],
)
def test_needs_csum_frame_round_trip(v6: bool, proto: int, ip_options: bytes) -> None:
    frame, cs, co = csum_frame(1400, v6=v6, proto=proto, ip_options=ip_options)
    read = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs, co) + frame
    (payload,) = encode_outbound(read, 0)
    assert payload == frame + CSUM_META.pack(cs, co) + bytes((INNER_CSUM,))
    assert reassemble([payload]) == [read]


def test_peer_chosen_csum_fields_are_refused() -> None:
    """Regression: a peer's NEEDS_CSUM offsets reached the kernel as sent, after the switch
    had checked the frame's source, so the kernel's checksum write could be aimed at the
    IPv4 source address (csum_start 26, csum_offset 0). Only the offsets the frame's own
    headers give are taken, from the peer and from our kernel alike."""
    frame, cs, co = csum_frame(200)
    for fields in [(26, 0), (14, 12), (cs, 16), (cs + 2, 4), (cs - 4, 10)]:
        payload = frame + CSUM_META.pack(*fields) + bytes((INNER_CSUM,))
        with pytest.raises(OffloadError, match="do not match"):
            reassemble([payload])
        with pytest.raises(OffloadError, match="do not match"):
            encode_outbound(VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, *fields) + frame, 0)
    assert reassemble([frame + CSUM_META.pack(cs, co) + bytes((INNER_CSUM,))])


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (small_frame(200), "not IPv4 or IPv6"),
        (csum_frame(200, proto=1)[0], "not TCP or UDP"),
        (csum_frame(200, frag=0x2000)[0], "fragment"),  # MF
        (csum_frame(200, frag=0x0010)[0], "fragment"),  # offset 128
        (csum_frame(40)[0][:30], "shorter than an IP header"),
        (csum_frame(40)[0], "beyond the frame"),  # UDP: 34 + 8 > 40
        (csum_frame(60, proto=6)[0][:50], "beyond the frame"),  # TCP: 34 + 20 > 50
    ],
    ids=["arp-like", "icmp", "mf", "offset", "short", "udp-cut", "tcp-cut"],
)
def test_needs_csum_needs_a_checksummable_frame(frame: bytes, why: str) -> None:
    payload = frame + CSUM_META.pack(34, 6) + bytes((INNER_CSUM,))
    with pytest.raises(OffloadError, match=why):
        reassemble([payload])


def test_budget_applies_to_whole_frames() -> None:
    frame = small_frame(1436)
    assert len(encode_outbound(bytes(10) + frame, 0)[0]) == 1437
    with pytest.raises(OffloadError):
        encode_outbound(bytes(10) + frame, 0, max_payload=1436)
    frame, cs, co = csum_frame(1436)
    csum = VNET_HDR.pack(F_NEEDS_CSUM, GSO_NONE, 0, 0, cs, co) + frame
    with pytest.raises(OffloadError, match="budget"):
        encode_outbound(csum, 0)  # 1436 + 5 > 1440


def test_keepalive_is_nothing() -> None:
    out: list[bytes] = []
    Reassembler().push_untrusted(b"", out)
    assert out == []


# --- loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("flags", [ACK | PSH, ACK | PSH | FIN], ids=["psh", "psh-fin"])
def test_lost_middle_piece_flushes_valid_segments(v6: bool, flags: int) -> None:
    read = build_read(63_000, v6=v6, flags=flags)
    payloads = encode_outbound(read, 9)
    count = len(payloads)
    lost = 20
    r = Reassembler()
    out = reassemble(payloads[:lost] + payloads[lost + 1 :], r)
    assert out == []
    assert r.pending == count - 1
    r.flush(out)
    assert r.pending == 0
    assert len(out) == 2  # the runs before and after the hole, each one TAP write
    segs = segments(out, read)
    assert [i for i, _ in segs] == [i for i in range(count) if i != lost]
    for i, w in segs:
        check_segment(w, read, i, count)
    assert (r.frames_whole, r.frames_partial, r.segments_rebuilt) == (0, 1, count - 1)
    r.flush(out)  # nothing left
    assert len(out) == 2


def test_lost_piece_then_next_frame_flushes_and_late_piece_goes_alone() -> None:
    read_a = build_read(20_000)
    read_b = build_read(30_000, v6=True)
    a = encode_outbound(read_a, 0xFFFFFFFF)  # the id wraps to 0 for b
    b = encode_outbound(read_b, 0)
    count_a = len(a)
    r = Reassembler()
    out = reassemble(a[:3] + a[4:], r)
    assert out == []
    out = reassemble(b[:1], r)  # a newer frame: a is flushed first
    segs = segments(out, read_a)
    assert [i for i, _ in segs] == [i for i in range(count_a) if i != 3]
    for i, w in segs:
        check_segment(w, read_a, i, count_a)
    out = reassemble([a[3]], r)  # late: a was flushed; b stays pending
    assert len(out) == 1
    check_segment(out[0], read_a, 3, count_a)
    assert r.pending == 1
    assert reassemble(b[1:], r) == [read_b]
    assert (r.frames_whole, r.frames_partial, r.pieces_late) == (1, 1, 1)
    assert r.segments_rebuilt == count_a


def test_late_piece_of_a_completed_frame_and_of_an_old_id() -> None:
    read = build_read(10_000)
    payloads = encode_outbound(read, 100)
    r = Reassembler()
    assert reassemble(payloads, r) == [read]
    out = reassemble([payloads[2]], r)  # same id, already completed (a replay, say)
    check_segment(out[0], read, 2, len(payloads))
    old = encode_outbound(read, 100 - 2**31 + 1)  # within 2**31 behind: old
    pending = encode_outbound(build_read(5000), 101)
    out = reassemble(pending[:1] + old[:1], r)
    assert len(out) == 1
    check_segment(out[0], read, 0, len(payloads))
    assert r.pending == 1
    assert r.pieces_late == 2
    newer = encode_outbound(read, 101 + 2**31 - 1)  # within 2**31 ahead: new
    out = reassemble(newer, r)
    assert len(out) == 2  # the flushed piece of 101, then the whole new frame
    assert out[1] == read


def test_flush_after_last_piece_lost_only() -> None:
    read = build_read(13_000, flags=ACK | PSH | FIN)
    payloads = encode_outbound(read, 1)
    r = Reassembler()
    out = reassemble(payloads[:-1], r)
    r.flush(out)
    count = len(payloads)
    assert len(out) == 1  # one run: every piece but the last
    segs = segments(out, read)
    assert [i for i, _ in segs] == list(range(count - 1))
    for i, w in segs:
        check_segment(w, read, i, count)  # PSH and FIN cleared on all of them
        assert w[VNET_HDR_LEN + 34 + 13] == ACK


# --- refusals: TAP reads -----------------------------------------------------------------


def with_vnet(read: bytes, **fields: int) -> bytes:
    vh = VirtioHeader.parse(read)
    values = {
        "flags": vh.flags,
        "gso_type": vh.gso_type,
        "hdr_len": vh.hdr_len,
        "gso_size": vh.gso_size,
        "csum_start": vh.csum_start,
        "csum_offset": vh.csum_offset,
    }
    values.update(fields)
    return VirtioHeader(**values).pack() + read[VNET_HDR_LEN:]


def patch(read: bytes, offset: int, value: bytes) -> bytes:
    at = VNET_HDR_LEN + offset
    return read[:at] + value + read[at + len(value) :]


V4 = build_read(20_000)
V6 = build_read(20_000, v6=True)
V4_TCP = 34  # csum_start of V4
V6_TCP = 54


@pytest.mark.parametrize(
    "read",
    [
        pytest.param(V4[:23], id="short"),
        pytest.param(with_vnet(V4, gso_type=GSO_TCPV4 | GSO_ECN), id="ecn"),
        pytest.param(with_vnet(V4, gso_type=GSO_UDP_L4), id="udp-l4"),
        pytest.param(with_vnet(V4, gso_type=GSO_UDP), id="ufo"),
        pytest.param(with_vnet(V4, gso_type=9), id="unknown-gso"),
        pytest.param(with_vnet(V4, flags=0), id="gso-without-needs-csum"),
        pytest.param(with_vnet(V4, csum_start=38), id="csum-start-not-tcp"),
        pytest.param(with_vnet(V4, csum_start=30), id="csum-start-inside-ip"),
        pytest.param(with_vnet(V4, csum_offset=6), id="csum-offset"),
        pytest.param(with_vnet(V4, gso_size=0), id="gso-size-0"),
        pytest.param(with_vnet(V4, gso_size=0xFFFF), id="gso-by-frags"),
        pytest.param(with_vnet(V4, gso_size=100), id="too-many-pieces"),
        pytest.param(with_vnet(V4, gso_type=GSO_TCPV6), id="v6-gso-on-v4"),
        pytest.param(with_vnet(V6, gso_type=GSO_TCPV4), id="v4-gso-on-v6"),
        pytest.param(patch(V4, V4_TCP + 12, b"\x40"), id="doff-4"),
        pytest.param(V4[: VNET_HDR_LEN + V4_TCP + 30], id="doff-beyond-frame"),
        pytest.param(V4[: VNET_HDR_LEN + V4_TCP + 10], id="tcp-beyond-frame"),
        pytest.param(V4[: VNET_HDR_LEN + V4_TCP + 32], id="no-payload"),
        pytest.param(patch(V4, 14, b"\x44"), id="ihl-4"),
        pytest.param(patch(V4, 14, b"\x46"), id="ihl-6-csum-start-mismatch"),
        pytest.param(patch(V4, 14, b"\x4f"), id="ihl-15"),
        pytest.param(patch(V4, 14, b"\x65"), id="ipv4-version-6"),
        pytest.param(patch(V4, 23, b"\x11"), id="ipv4-udp"),
        pytest.param(patch(V4, 12, b"\x81\x00"), id="vlan"),
        pytest.param(patch(V6, 20, b"\x00"), id="ipv6-hop-by-hop"),
        pytest.param(patch(V6, 20, b"\x11"), id="ipv6-udp"),
        pytest.param(patch(V6, 14, b"\x40"), id="ipv6-version-4"),
        pytest.param(with_vnet(V6, csum_start=62), id="ipv6-csum-start"),
        pytest.param(with_vnet(bytes(10) + small_frame(), flags=1, csum_start=13), id="cs<14"),
        pytest.param(
            with_vnet(bytes(10) + small_frame(), flags=1, csum_start=90, csum_offset=9),
            id="csum-field-beyond-frame",
        ),
        pytest.param(build_read(64_000, gso_size=1420), id="piece-over-budget"),
        pytest.param(build_read(65_600 - 66, tcp_options=TIMESTAMPS), id="longer-than-ip"),
    ],
)
def test_refused_tap_reads(read: bytes) -> None:
    with pytest.raises(OffloadError):
        encode_outbound(read, 1)


def test_piece_count_limit() -> None:
    data_len = MAX_PIECES * 400
    assert len(encode_outbound(build_read(data_len, gso_size=400), 1)) == MAX_PIECES
    with pytest.raises(OffloadError):
        encode_outbound(build_read(data_len + 1, gso_size=400), 1)


# --- refusals: inner payloads ------------------------------------------------------------


def set_meta(piece: bytes, **fields: int) -> bytes:
    names = ("frame_id", "index", "count", "hdr_len", "gso_size", "gso_type", "cs", "co")
    at = len(piece) - PIECE_TRAILER
    values = dict(zip(names, PIECE_META.unpack_from(piece, at), strict=True))
    values.update(fields)
    return piece[:at] + PIECE_META.pack(*values.values()) + piece[-1:]


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\x07", id="unknown-kind"),
        pytest.param(b"\x00" * 14, id="frame-too-short"),
        pytest.param(bytes(13) + CSUM_META.pack(0, 0) + b"\x01", id="csum-frame-too-short"),
        pytest.param(small_frame() + CSUM_META.pack(13, 6) + b"\x01", id="csum-start<14"),
        pytest.param(small_frame() + CSUM_META.pack(90, 9) + b"\x01", id="csum-beyond"),
        pytest.param(b"\x02" * 17, id="piece-too-short"),
        pytest.param(bytes(PIECE_TRAILER - 1) + b"\x02", id="piece-no-chunk"),
    ],
)
def test_refused_inner_payloads(payload: bytes) -> None:
    out: list[bytes] = []
    with pytest.raises(OffloadError):
        Reassembler().push_untrusted(payload, out)
    assert out == []


def _first_and_bad(read: bytes) -> tuple[list[bytes], list[bytes]]:
    good = encode_outbound(read, 5)
    p = good[1]
    chunk_len = len(p) - PIECE_TRAILER - 66
    bad = [
        set_meta(p, count=len(good) + 1),
        set_meta(p, index=len(good)),
        set_meta(p, gso_size=MSS + 1),
        set_meta(p, gso_type=GSO_TCPV6),
        set_meta(p, cs=38),
        set_meta(p, co=6),
        set_meta(p, hdr_len=70),
        p[: chunk_len + 6] + b"\xff" + p[chunk_len + 7 :],  # another source MAC
        p[:100] + p[101:],  # short chunk that is not the last
        good[0],  # duplicate
    ]
    return good, bad


def test_disagreeing_pieces_are_dropped_and_the_frame_survives() -> None:
    read = build_read(6 * MSS - 10)
    good, bad = _first_and_bad(read)
    r = Reassembler()
    out = reassemble(good[:1], r)
    for b in bad:
        with pytest.raises(OffloadError):
            r.push_untrusted(b, out)
        assert r.pending == 1
    assert out == []
    assert reassemble(good[1:], r) == [read]


def patch_piece_headers(piece: bytes, offset: int, value: bytes) -> bytes:
    hdr_len = PIECE_META.unpack_from(piece, len(piece) - PIECE_TRAILER)[3]
    at = len(piece) - PIECE_TRAILER - hdr_len + offset
    return piece[:at] + value + piece[at + len(value) :]


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda p: set_meta(p, gso_type=GSO_NONE), id="gso-none"),
        pytest.param(lambda p: set_meta(p, gso_type=GSO_UDP_L4), id="gso-udp-l4"),
        pytest.param(lambda p: set_meta(p, gso_type=GSO_TCPV4 | GSO_ECN), id="gso-ecn"),
        pytest.param(lambda p: set_meta(p, gso_type=GSO_TCPV6), id="gso-v6-on-v4"),
        pytest.param(lambda p: set_meta(p, cs=30), id="csum-start"),
        pytest.param(lambda p: set_meta(p, co=6), id="csum-offset"),
        pytest.param(lambda p: set_meta(p, gso_size=0), id="gso-size-0"),
        pytest.param(lambda p: set_meta(p, count=0), id="count-0"),
        pytest.param(lambda p: patch_piece_headers(p, 23, b"\x11"), id="ipv4-udp"),
        pytest.param(lambda p: patch_piece_headers(p, 14, b"\x46"), id="ihl-6"),
        pytest.param(lambda p: patch_piece_headers(p, 12, b"\x86\xdd"), id="ethertype"),
        pytest.param(lambda p: patch_piece_headers(p, 34 + 12, b"\x50"), id="doff-vs-hdr-len"),
    ],
)
def test_first_piece_with_bad_headers_is_refused(mutate: Callable[[bytes], bytes]) -> None:
    read = build_read(5 * MSS)
    good = encode_outbound(read, 5)
    r = Reassembler()
    out: list[bytes] = []
    with pytest.raises(OffloadError):
        r.push_untrusted(mutate(good[1]), out)
    assert out == [] and r.pending == 0
    assert reassemble(good, r) == [read]


def test_reset_forgets_frame_ids() -> None:
    read = build_read(4 * MSS)
    r = Reassembler()
    assert reassemble(encode_outbound(read, 1000), r) == [read]
    pending = encode_outbound(read, 1001)
    out = reassemble(pending[:1], r)
    r.reset(out)  # the peer restarted: its ids begin again
    assert len(out) == 1 and r.pending == 0
    assert reassemble(encode_outbound(read, 0), r) == [read]
    assert r.pieces_late == 0


def test_last_piece_longer_than_gso_size_is_refused() -> None:
    good = encode_outbound(build_read(3 * MSS - 10), 5)
    r = Reassembler()
    last = good[-1]
    with pytest.raises(OffloadError):
        r.push_untrusted(set_meta(last, gso_size=100), [])
    with pytest.raises(OffloadError):
        r.push_untrusted(set_meta(good[0], gso_size=MSS - 1), [])
    assert r.pending == 0


def test_piece_claiming_a_frame_longer_than_ip_is_refused() -> None:
    good = encode_outbound(build_read(3 * 1000, gso_size=1000), 5)
    with pytest.raises(OffloadError):
        Reassembler().push_untrusted(set_meta(good[0], count=67), [])
    with pytest.raises(OffloadError):
        Reassembler().push_untrusted(set_meta(good[0], count=129), [])


# --- fuzzing -----------------------------------------------------------------------------

_fuzz = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SEED_READS = [build_read(9 * MSS - 100), build_read(3 * MSS + 7, v6=True)]
_SEEDS = [p for fid, read in enumerate(_SEED_READS) for p in encode_outbound(read, fid)]
_SEEDS += [
    small_frame() + b"\x00",
    small_frame() + CSUM_META.pack(34, 16) + b"\x01",
]


def _mac_of(payload: bytes) -> bytes | None:
    """The source MAC a payload claims (frame start, or the header block of a piece)."""
    if not payload:
        return None
    if payload[-1] == INNER_PIECE and len(payload) >= PIECE_TRAILER:
        hdr_len = PIECE_META.unpack_from(payload, len(payload) - PIECE_TRAILER)[3]
        start = len(payload) - PIECE_TRAILER - hdr_len
        return payload[start + 6 : start + 12] if start > 0 else None
    return payload[6:12]


def _push_checked(r: Reassembler, payloads: list[bytes]) -> None:
    accepted: set[bytes | None] = set()
    for p in payloads:
        out: list[bytes] = []
        try:
            r.push_untrusted(p, out)
        except OffloadError:
            assert out == []
        else:
            accepted.add(_mac_of(p))
        assert r.pending <= MAX_PIECES
        for w in out:
            assert len(w) >= VNET_HDR_LEN + 14
            VirtioHeader.parse(w)
            assert w[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] in accepted
    out = []
    r.flush(out)
    assert r.pending == 0
    for w in out:
        assert w[VNET_HDR_LEN + 6 : VNET_HDR_LEN + 12] in accepted


@_fuzz
@given(st.lists(st.binary(max_size=1500), max_size=20))
def test_fuzz_random_payloads(payloads: list[bytes]) -> None:
    _push_checked(Reassembler(), payloads)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    p = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 3))
        if op == 0 and p:
            i = draw(st.integers(0, len(p) - 1))
            p[i] = draw(st.integers(0, 255))
        elif op == 1 and p:  # a byte of the trailer (meta, kind)
            i = draw(st.integers(max(0, len(p) - PIECE_TRAILER), len(p) - 1))
            p[i] = draw(st.integers(0, 255))
        elif op == 2:
            at = draw(st.integers(0, len(p)))
            del p[at : at + draw(st.integers(0, 8))]
        else:
            cut = draw(st.integers(0, len(p)))
            p = p[:cut] + bytes(draw(st.integers(0, 3))) + p[cut:]
    return bytes(p)


@_fuzz
@given(st.lists(_mutated(), max_size=30))
def test_fuzz_mutated_payloads(payloads: list[bytes]) -> None:
    _push_checked(Reassembler(), payloads)


@_fuzz
@given(
    st.sampled_from([*_SEED_READS, bytes(10) + small_frame()]),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.integers(0, 70_000),
)
def test_fuzz_tap_reads(read: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    b = bytearray(read[:cut])
    for at, value in edits:
        if at < len(b):
            b[at] = value
    try:
        payloads = encode_outbound(bytes(b), 3)
    except OffloadError:
        return
    for p in payloads:
        assert len(p) <= DEFAULT_MAX_PAYLOAD
    _push_checked(Reassembler(), payloads)
    (write,) = reassemble(payloads)  # whatever was accepted comes back as it was
    assert write[VNET_HDR_LEN:] == b[VNET_HDR_LEN:]


@_fuzz
@given(st.binary(max_size=3000), st.integers(0, 2**40))
def test_fuzz_random_reads(read: bytes, frame_id: int) -> None:
    try:
        encode_outbound(read, frame_id)
    except OffloadError:
        pass
