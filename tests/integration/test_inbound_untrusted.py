"""The inbound data path never writes an unauthenticated frame, whatever arrives.

Drives the real `Inbound` stage with a real session pair (no TAP, no sockets): random bytes,
mutated valid datagrams and replays become counted drops, and only frames sealed by the peer's
session, carrying the peer's own MAC, come out.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.datapath.inbound import Inbound, SessionEntry
from ipop_trio.datapath.switch import ZERO_VNET, PeerPort, Switch
from ipop_trio.proto.session import Cipher, Session
from ipop_trio.proto.wire import INNER_FRAME
from ipop_trio.stats import Stats

OWN_MAC = bytes.fromhex("02aaaaaaaaaa")
PEER_MAC = bytes.fromhex("02bbbbbbbbbb")
PEER_IP = bytes([10, 77, 0, 2])
ADDR = ("10.199.0.2", 4600)
K1, K2 = os.urandom(32), os.urandom(32)


def frame(marker: bytes = b"hello") -> bytes:
    ip = bytes([0x45, 0, 0, 20 + len(marker), 0, 0, 0, 0, 64, 17, 0, 0])
    return OWN_MAC + PEER_MAC + b"\x08\x00" + ip + PEER_IP + bytes([10, 77, 0, 1]) + marker


def make(secure: bool = True) -> tuple[Inbound, Session, Stats, list[tuple[bytes, tuple]]]:
    stats = Stats()
    switch = Switch(OWN_MAC, stats)
    port = PeerPort("peer", PEER_MAC, PEER_IP)
    port.endpoint = ADDR
    switch.add(port)
    ours = Session(
        send_key=K1,
        recv_key=K2,
        local_index=7,
        remote_index=9,
        cipher=Cipher.AES_256_GCM,
        secure=secure,
        created=0.0,
    )
    theirs = Session(
        send_key=K2,
        recv_key=K1,
        local_index=9,
        remote_index=7,
        cipher=Cipher.AES_256_GCM,
        secure=secure,
        created=0.0,
    )
    handshakes: list[tuple[bytes, tuple]] = []
    inbound = Inbound(
        switch,
        stats,
        {7: SessionEntry(ours, port, None)},  # type: ignore[arg-type]
        lambda d, a: handshakes.append((d, a)),
    )
    return inbound, theirs, stats, handshakes


def test_sealed_frames_pass_and_replays_do_not() -> None:
    inbound, theirs, stats, _ = make()
    d = theirs.seal(frame() + bytes([INNER_FRAME]))
    out: list[bytes] = []
    inbound.process([memoryview(d), memoryview(d)], ADDR, 1.0, out)
    assert out == [ZERO_VNET + frame()]
    assert stats.drops == {"bad_datagram": 1}


def test_spoofed_inner_source_is_dropped() -> None:
    inbound, theirs, stats, _ = make()
    bad = frame()[:6] + bytes.fromhex("02cccccccccc") + frame()[12:]
    out: list[bytes] = []
    inbound.process([memoryview(theirs.seal(bad + bytes([INNER_FRAME])))], ADDR, 1.0, out)
    assert out == [] and stats.drops == {"spoofed_source": 1}


def test_plain_link_accepts_only_the_current_path() -> None:
    inbound, theirs, stats, _ = make(secure=False)
    d = theirs.seal(frame() + bytes([INNER_FRAME]))
    out: list[bytes] = []
    inbound.process([memoryview(d)], ("10.199.0.66", 4600), 1.0, out)
    assert out == [] and stats.drops == {"plain_wrong_path": 1}
    inbound.process([memoryview(d)], ADDR, 1.0, out)
    assert out == [ZERO_VNET + frame()]


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_datagrams_never_reach_the_tap(datagrams: list[bytes]) -> None:
    inbound, _theirs, _stats, _ = make()
    out: list[bytes] = []
    inbound.process([memoryview(d) for d in datagrams], ADDR, 1.0, out)
    assert out == []


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_of_a_valid_datagram_is_refused(pos: int, flip: int) -> None:
    inbound, theirs, _stats, _ = make()
    d = bytearray(theirs.seal(frame(b"x" * 100) + bytes([INNER_FRAME])))
    pos %= len(d)
    d[pos] ^= flip
    out: list[bytes] = []
    inbound.process([memoryview(bytes(d))], ADDR, 1.0, out)
    assert out == []
