"""The inbound data path never writes an unauthenticated frame, whatever arrives.

Drives the real `Inbound` stage with a real session pair (no TAP, no sockets): random bytes,
mutated valid datagrams and replays become counted drops, and only frames sealed by the peer's
session, carrying the peer's own MAC, come out. Every test runs on both implementations
(`datapath`: the Python reference and the native core); the peer's session is Python's.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.datapath.inbound import Inbound, NativeInbound
from ipop_trio.datapath.sessions import SessionEntry, SessionTable
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


def entry(inbound: Inbound) -> SessionEntry:
    (only,) = inbound.sessions.entries.values()
    return only


def make(
    datapath: str, secure: bool = True
) -> tuple[Inbound, Session, Stats, list[tuple[bytes, tuple]]]:
    use_native = datapath == "native"
    stats = Stats()
    switch = Switch(OWN_MAC, stats)
    port = PeerPort("peer", PEER_MAC, PEER_IP)
    port.endpoint = ADDR
    switch.add(port)
    sessions: SessionTable[str] = SessionTable(native=use_native)
    index = sessions.allocate("peer")
    ours = sessions.make_session(
        send_key=K1,
        recv_key=K2,
        local_index=index,
        remote_index=9,
        cipher=Cipher.AES_256_GCM,
        secure=secure,
        created=0.0,
    )
    theirs = Session(
        send_key=K2,
        recv_key=K1,
        local_index=9,
        remote_index=index,
        cipher=Cipher.AES_256_GCM,
        secure=secure,
        created=0.0,
    )
    handshakes: list[tuple[bytes, tuple]] = []
    sessions.add(index, SessionEntry(ours, port, None))
    inbound = (NativeInbound if use_native else Inbound)(
        switch,
        stats,
        sessions,
        on_handshake=lambda d, a, via: handshakes.append((d, a)),
    )
    return inbound, theirs, stats, handshakes


def test_sealed_frames_pass_and_replays_do_not(datapath: str) -> None:
    inbound, theirs, stats, _ = make(datapath)
    d = theirs.seal(frame() + bytes([INNER_FRAME]))
    out: list[bytes] = []
    inbound.process([memoryview(d), memoryview(d)], ADDR, 1.0, out)
    assert out == [ZERO_VNET + frame()]
    assert stats.drops == {"bad_datagram": 1}


def test_spoofed_inner_source_is_dropped(datapath: str) -> None:
    inbound, theirs, stats, _ = make(datapath)
    bad = frame()[:6] + bytes.fromhex("02cccccccccc") + frame()[12:]
    out: list[bytes] = []
    inbound.process([memoryview(theirs.seal(bad + bytes([INNER_FRAME])))], ADDR, 1.0, out)
    assert out == [] and stats.drops == {"spoofed_source": 1}


def test_plain_link_accepts_only_the_current_path(datapath: str) -> None:
    inbound, theirs, stats, _ = make(datapath, secure=False)
    d = theirs.seal(frame() + bytes([INNER_FRAME]))
    out: list[bytes] = []
    inbound.process([memoryview(d)], ("10.199.0.66", 4600), 1.0, out)
    assert out == [] and stats.drops == {"plain_wrong_path": 1}
    inbound.process([memoryview(d)], ADDR, 1.0, out)
    assert out == [ZERO_VNET + frame()]


@settings(max_examples=400)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_random_datagrams_never_reach_the_tap(datapath: str, datagrams: list[bytes]) -> None:
    inbound, _theirs, _stats, _ = make(datapath)
    out: list[bytes] = []
    inbound.process([memoryview(d) for d in datagrams], ADDR, 1.0, out)
    assert out == []


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=200), st.integers(min_value=1, max_value=255))
def test_any_single_byte_change_of_a_valid_datagram_is_refused(
    datapath: str, pos: int, flip: int
) -> None:
    inbound, theirs, _stats, _ = make(datapath)
    d = bytearray(theirs.seal(frame(b"x" * 100) + bytes([INNER_FRAME])))
    pos %= len(d)
    d[pos] ^= flip
    out: list[bytes] = []
    inbound.process([memoryview(bytes(d))], ADDR, 1.0, out)
    assert out == []


class FakeRelay:
    """Stands for a TURN client: `on_ice` hands back what it 'unwrapped'."""


def test_relayed_datagrams_are_processed_with_their_relay_as_path(datapath: str) -> None:
    inbound, theirs, stats, _ = make(datapath, secure=False)
    relay = FakeRelay()
    d = theirs.seal(frame() + bytes([INNER_FRAME]))
    seen: list[tuple[bytes, tuple]] = []

    def on_ice(data: memoryview, addr: tuple):
        seen.append((bytes(data), addr))
        return relay, ADDR, d  # "ChannelData from the TURN server carried d from ADDR"

    inbound.on_ice = on_ice
    port = entry(inbound).port
    channel_data = b"\x40\x00" + len(d).to_bytes(2, "big") + d
    out: list[bytes] = []
    # The plain link's path is ADDR directly: the same address through a relay is another
    # path, and a plain link accepts only its own.
    inbound.process([memoryview(channel_data)], ("10.199.255.9", 3478), 1.0, out)
    assert seen and out == [] and stats.drops == {"plain_wrong_path": 1}
    port.relay = relay
    inbound.process([memoryview(channel_data)], ("10.199.255.9", 3478), 1.0, out)
    assert out == [ZERO_VNET + frame()]
    # ... and then the direct path is not its path any more.
    inbound.process([memoryview(d)], ADDR, 1.0, out)
    assert len(out) == 1 and stats.drops == {"plain_wrong_path": 2}


def test_a_relay_inside_a_relay_is_not_unwrapped(datapath: str) -> None:
    inbound, _theirs, stats, _ = make(datapath)
    calls = []

    def on_ice(data: memoryview, addr: tuple):
        calls.append(addr)
        return FakeRelay(), ADDR, b"\x40\x00\x00\x04abcd"  # ChannelData again

    inbound.on_ice = on_ice
    out: list[bytes] = []
    inbound.process([memoryview(b"\x40\x00\x00\x04abcd")], ("10.199.255.9", 3478), 1.0, out)
    assert out == [] and len(calls) == 1
    assert stats.drops == {"relayed_stun_in_data_path": 1}


def test_relayed_datagrams_of_one_receive_call_are_opened_per_peer_run(datapath: str) -> None:
    inbound, theirs, stats, _ = make(datapath, secure=False)
    relay = FakeRelay()
    entry(inbound).port.relay = relay
    sealed = [theirs.seal(frame(m) + bytes([INNER_FRAME])) for m in (b"one", b"two", b"six")]
    # The third comes from another peer address through the same relay: not this link's path.
    peers = [ADDR, ADDR, ("10.199.0.66", 4600)]
    it = iter(zip(peers, sealed, strict=True))

    def on_ice(data: memoryview, addr: tuple):
        peer, d = next(it)
        return relay, peer, d

    inbound.on_ice = on_ice
    opens_before = inbound.stats["open"].batches
    out: list[bytes] = []
    channel_data = [memoryview(b"\x40\x00\x00\x00")] * 3
    inbound.process(channel_data, ("10.199.255.9", 3478), 1.0, out)
    assert out == [ZERO_VNET + frame(b"one"), ZERO_VNET + frame(b"two")]
    assert stats.drops == {"plain_wrong_path": 1}
    # One batch for the receive call, then one per (relay, peer) run: 2, not 3 datagrams.
    assert inbound.stats["open"].batches - opens_before == 3
