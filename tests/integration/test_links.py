"""LinkManager, assembled as a node assembles it, between two nodes on an in-memory underlay.

No root, no TAP, no sockets: each node has the real switch, session table, outbound and
inbound stages, ICE service and link manager; a seeded `Wire` carries datagrams between
their fake sockets (optionally losing some), and a fake TAP writer collects what would reach
the TAP. Trio's MockClock (autojump) runs the links' timers: a rekey two minutes in takes
milliseconds, and every wait is exact.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio

from ipop_trio import pki
from ipop_trio.config import Endpoint, IceConfig, PeerConfig
from ipop_trio.control.ice import IceService
from ipop_trio.control.links import Initiation, Learned, LinkManager, PeerRuntime, PeerSetup
from ipop_trio.datapath.inbound import Inbound, NativeInbound
from ipop_trio.datapath.outbound import NativeOutbound, Outbound
from ipop_trio.datapath.sessions import SessionTable
from ipop_trio.datapath.switch import VNET, Switch
from ipop_trio.proto import handshake
from ipop_trio.proto.handshake import LocalIdentity
from ipop_trio.proto.link import LinkState
from ipop_trio.proto.policy import SecurityPolicy
from ipop_trio.proto.session import REJECT_AFTER_TIME, REKEY_AFTER_TIME, Cipher
from ipop_trio.stats import Stats

Addr = tuple[str, int]
CA = pki.new_ca_bundle("lab", "10.77.0.0/24", now=time.time() - 60)


def issue(name: str, address: str) -> pki.NodeBundle:
    return pki.issue_node_bundle(CA, name, address, now=time.time() - 60)


ALPHA, BETA = issue("alpha", "10.77.0.1"), issue("beta", "10.77.0.2")
ADDRS = {"alpha": ("192.0.2.1", 4600), "beta": ("192.0.2.2", 4600), "mallory": ("192.0.2.3", 4600)}


class Wire:
    """The underlay: datagrams from one fake socket to another, each lost with `loss`."""

    def __init__(self, loss: float = 0.0, seed: int = 1) -> None:
        self.nodes: dict[Addr, Node] = {}
        self.loss = loss
        self.rng = random.Random(seed)
        self.sent = 0
        self.carried: list[bytes] = []  # every datagram put on the wire, lost or not

    def carry(self, src: Addr, dst: Addr, datagrams: list[bytes]) -> None:
        node = self.nodes.get(dst)
        for d in datagrams:
            self.sent += 1
            self.carried.append(d)
            if node is not None and self.rng.random() >= self.loss:
                node.arrive(src, d)


class FakeUdp:
    """What the link manager, the outbound stage and the ICE service use of a UdpSocket."""

    def __init__(self, wire: Wire, addr: Addr) -> None:
        self.wire = wire
        self.local = addr
        self.last_local: str | None = addr[0]
        self.too_big = 0  # datagrams refused as too big for the path: never, on this wire

    def send_one(self, datagram: bytes, addr: Addr) -> bool:
        self.wire.carry(self.local, addr, [bytes(datagram)])
        return True

    def send_from(self, datagram: bytes, source: str, addr: Addr) -> bool:
        return self.send_one(datagram, addr)

    def send_iov(self, iov: list[bytes], sizes: list[int], addr: Addr) -> int:
        datagrams = [iov[2 * i] + iov[2 * i + 1] for i in range(len(sizes))]
        self.wire.carry(self.local, addr, datagrams)
        return 0

    def send_runs(self, buf: bytearray, runs: list[tuple[int, int, int, int]], addr: Addr) -> int:
        datagrams = [
            bytes(buf[at : min(at + seg, off + length)])
            for off, length, seg, _count in runs
            for at in range(off, off + length, seg)
        ]
        self.wire.carry(self.local, addr, datagrams)
        return 0


@dataclass
class FakeWriter:
    """The TAP writer: keeps what the node would write to its TAP."""

    frames: list[bytes] = field(default_factory=list)
    arrived: trio.Event = field(default_factory=trio.Event)

    def submit(self, frames: list[bytes]) -> None:
        self.frames.extend(frames)
        self.arrived.set()
        self.arrived = trio.Event()


def peer_setup(bundle: pki.NodeBundle, endpoint: Addr | None) -> PeerSetup:
    config = PeerConfig(
        name=bundle.name,
        cert=None,
        public_key=bundle.public_key,
        endpoint=None if endpoint is None else Endpoint(*endpoint),
    )
    return PeerSetup(config, bundle.public_key, bundle.identity)


class Node:
    def __init__(
        self,
        wire: Wire,
        me: pki.NodeBundle,
        peers: list[PeerSetup],
        datapath: str,
        policy: SecurityPolicy = SecurityPolicy.ALWAYS,
    ) -> None:
        assert me.private_key is not None
        self.bundle = me
        self.addr = ADDRS[me.name]
        self.stats = Stats()
        self.udp = FakeUdp(wire, self.addr)
        self.switch = Switch(me.mac, self.stats)
        use_native = datapath == "native"
        self.sessions: SessionTable[PeerRuntime] = SessionTable(native=use_native)
        self.writer = FakeWriter()
        self.ice = IceService(
            self.udp,  # type: ignore[arg-type]
            self.stats,
            IceConfig(),
            tap_name="ipop-test",
            listen_host=self.addr[0],
        )
        self.outbound = (NativeOutbound if use_native else Outbound)(
            self.switch,
            self.udp,  # type: ignore[arg-type]
            self.stats,
            send_relayed=self.ice.send_iov_via,
        )
        self.local = LocalIdentity(me.private_key, me.cert_der, CA.anchor)
        self.links = LinkManager(
            local=self.local,
            cipher=Cipher.AES_256_GCM,
            policy=policy,
            groups=frozenset(),
            peers=peers,
            sessions=self.sessions,
            switch=self.switch,
            writer=self.writer,
            outbound=self.outbound,
            udp=self.udp,
            ice=self.ice,
            stats=self.stats,
            clock=trio.current_time,
        )
        self.inbound = (NativeInbound if use_native else Inbound)(
            self.switch,
            self.stats,
            self.sessions,
            on_handshake=self.links.on_handshake,
            on_ice=self.ice.on_ice,
        )
        wire.nodes[self.addr] = self

    def arrive(self, src: Addr, datagram: bytes) -> None:
        out: list[bytes] = []
        self.inbound.process([memoryview(datagram)], src, trio.current_time(), out)
        if out:
            self.writer.submit(out)

    def send_frame(self, to: pki.NodeBundle, marker: bytes) -> None:
        """One Ethernet frame from our TAP to `to`'s MAC (an IPv4 packet with `marker`)."""
        self.outbound.process([bytes(VNET) + frame(self.bundle, to, marker)], trio.current_time())

    def rt(self, peer: pki.NodeBundle) -> PeerRuntime:
        rt = self.links.get(peer.public_key)
        assert rt is not None
        return rt


def frame(src: pki.NodeBundle, dst: pki.NodeBundle, marker: bytes) -> bytes:
    ip = bytes([0x45, 0, 0, 20 + len(marker), 0, 0, 0, 0, 64, 17, 0, 0])
    return dst.mac + src.mac + b"\x08\x00" + ip + src.address.packed + dst.address.packed + marker


async def received(node: Node, marker: bytes, timeout: float = 30.0) -> None:
    """Wait (virtual time) until a frame carrying `marker` reached `node`'s TAP."""
    with trio.fail_after(timeout):
        while not any(f.endswith(marker) for f in node.writer.frames):
            await node.writer.arrived.wait()


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (virtual time) for a condition the links' own timers make true."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


def pair(
    wire: Wire, datapath: str, policy: SecurityPolicy = SecurityPolicy.ALWAYS
) -> tuple[Node, Node]:
    alpha = Node(wire, ALPHA, [peer_setup(BETA, ADDRS["beta"])], datapath, policy)
    beta = Node(wire, BETA, [peer_setup(ALPHA, ADDRS["alpha"])], datapath, policy)
    return alpha, beta


async def test_two_configured_peers_link_up_and_carry_staged_frames(
    autojump_clock: trio.testing.MockClock,
    datapath: str,
) -> None:
    alpha, beta = pair(Wire(), datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        alpha.send_frame(BETA, b"staged before the link")  # no session yet: staged, wakes
        await nursery.start(beta.links.serve)
        await received(beta, b"staged before the link")
        beta.send_frame(ALPHA, b"and back")
        await received(alpha, b"and back")
        for node, peer in ((alpha, BETA), (beta, ALPHA)):
            rt = node.rt(peer)
            assert rt.established and rt.learned is Learned.CONFIG
            assert not rt.port.staged  # the staged frame went out once the session existed
            # The table holds exactly the sessions and handshakes the Link still has.
            assert set(node.sessions.entries) <= set(node.sessions.held_by(rt))
            assert len(node.sessions) >= 1
        [status] = alpha.links.status()
        assert status["state"] == "established" and status["mode"] == "secure"
        assert status["learned"] == "config" and status["endpoint"] == "192.0.2.2:4600"
        nursery.cancel_scope.cancel()


async def test_rekeys_keep_traffic_flowing_and_retire_their_indices(
    autojump_clock: trio.testing.MockClock,
    datapath: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, "ipop_trio.links")
    alpha, beta = pair(Wire(loss=0.02, seed=7), datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established and beta.rt(ALPHA).established)
        first = alpha.rt(BETA).link.current
        most = 0
        start = trio.current_time()
        sent = 0
        # Two and a half session lifetimes of steady traffic both ways, with 2% loss.
        while trio.current_time() - start < 2.5 * REJECT_AFTER_TIME:
            sent += 1
            alpha.send_frame(BETA, b"a%05d" % sent)
            beta.send_frame(ALPHA, b"b%05d" % sent)
            most = max(most, len(alpha.sessions), len(beta.sessions))
            await trio.sleep(1.0)
        await trio.sleep(1.0)
        assert trio.current_time() - start > 2 * REKEY_AFTER_TIME
        assert alpha.rt(BETA).link.current is not first  # rekeyed
        # Indices come back: only the live sessions (and a handshake) ever hold one.
        assert most <= 7
        for node, tag in ((beta, b"a"), (alpha, b"b")):
            got = {f[-6:] for f in node.writer.frames}
            arrived = [i for i in range(1, sent + 1) if tag + b"%05d" % i in got]
            assert len(arrived) >= 0.9 * sent  # UDP loses 2%; rekeys lose nothing more
            assert arrived[-1] >= sent - 5  # and it still flows at the end
        nursery.cancel_scope.cancel()
    # The first session of each link is news (INFO); the rekeys every 2 minutes are DEBUG.
    sessions = [r for r in caplog.records if "established (secure)" in r.getMessage()]
    for peer in ("alpha", "beta"):
        levels = [r.levelno for r in sessions if r.getMessage().startswith(f"{peer}: session")]
        assert levels and levels[0] == logging.INFO, [r.getMessage() for r in caplog.records][:20]
        assert logging.INFO not in levels[1:], levels
        assert levels.count(logging.DEBUG) >= 2, levels


async def test_removing_a_peer_releases_its_indices_port_and_task(
    autojump_clock: trio.testing.MockClock,
    datapath: str,
) -> None:
    alpha, beta = pair(Wire(), datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established)
        rt = alpha.rt(BETA)
        assert len(alpha.sessions) > 0 and alpha.switch.has(rt.port)
        alpha.links.remove(BETA.public_key, "test")
        assert alpha.links.get(BETA.public_key) is None
        assert len(alpha.sessions) == 0 and alpha.sessions.entries == {}
        if datapath == "native":  # the native table forgot the peer and its paths too
            assert len(alpha.sessions.native) == 0 and alpha.sessions.ports == {}
            assert len(alpha.sessions.paths) == 0
        assert not alpha.switch.has(rt.port) and rt.scope.cancel_called
        # Beta's datagrams are now for no session of alpha's: counted drops, nothing written.
        before = len(alpha.writer.frames)
        beta.send_frame(ALPHA, b"to a removed peer")
        await trio.sleep(1.0)
        assert len(alpha.writer.frames) == before
        assert alpha.stats.drops.get("unknown_session", 0) >= 1
        nursery.cancel_scope.cancel()


async def test_an_initiation_from_a_member_is_admitted_through_the_controllers_hook(
    autojump_clock: trio.testing.MockClock,
    datapath: str,
) -> None:
    wire = Wire()
    alpha = Node(wire, ALPHA, [peer_setup(BETA, ADDRS["beta"])], datapath)
    beta = Node(wire, BETA, [], datapath)  # knows nobody: as a node that learns alpha a moment late
    asked: list[str] = []

    def admit(identity: object, addr: Addr) -> bool:
        asked.append(getattr(identity, "name", "?"))
        beta.links.add(identity, addr, initiate=False)  # type: ignore[arg-type]
        return True

    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        beta.links.admit_unknown = admit
        alpha.send_frame(BETA, b"hello late beta")
        await received(beta, b"hello late beta")
        assert asked == ["alpha"]
        assert beta.rt(ALPHA).learned is Learned.SIGNALLING
        assert beta.links.learned() == [beta.rt(ALPHA)]
        nursery.cancel_scope.cancel()


async def test_an_initiation_the_link_refuses_for_its_own_reasons_is_a_counted_drop(
    autojump_clock: trio.testing.MockClock,
    datapath: str,
) -> None:
    """A LocalProtocolError from the Link (here: an initiation consumed with another cipher)
    drops that message; the link task, its peer's link and the node go on."""
    alpha, beta = pair(Wire(), datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: beta.rt(ALPHA).established)
        data, _ = handshake.create_initiation(
            alpha.local, BETA.public_key, 77, Cipher.CHACHA20_POLY1305, {}, time.time()
        )
        state = handshake.consume_initiation_untrusted(
            beta.local, data, Cipher.CHACHA20_POLY1305, time.time()
        )
        beta.rt(ALPHA).inbox_send.send_nowait(Initiation(state, ADDRS["alpha"], None))
        await until(lambda: beta.stats.drops.get("handshake_internal_error") == 1)
        alpha.send_frame(BETA, b"still linked")
        await received(beta, b"still linked")
        assert beta.rt(ALPHA).link.state is LinkState.ESTABLISHED
        nursery.cancel_scope.cancel()


async def test_a_lossy_underlay_still_links_up(
    autojump_clock: trio.testing.MockClock, datapath: str
) -> None:
    alpha, beta = pair(Wire(loss=0.3, seed=3), datapath)  # handshakes are retransmitted
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established and beta.rt(ALPHA).established, 120)
        nursery.cancel_scope.cancel()


async def test_tightening_to_secure_sends_nothing_more_in_clear(
    autojump_clock: trio.testing.MockClock, datapath: str
) -> None:
    # No common group: the link comes up plain. Then alpha's reload says `always`.
    wire = Wire()
    alpha, beta = pair(wire, datapath, SecurityPolicy.GROUPS)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established)
        assert alpha.rt(BETA).link.current is not None
        assert not alpha.rt(BETA).link.current.secure
        alpha.send_frame(BETA, b"in clear, as configured")
        await received(beta, b"in clear, as configured")
        assert any(b"in clear, as configured" in d for d in wire.carried)  # it was plain
        assert alpha.links.reconfigure(alpha.local, SecurityPolicy.ALWAYS, frozenset()) == 1
        # From the reload on: staged until the secure session exists, then sent sealed.
        alpha.send_frame(BETA, b"after the reload")
        await received(beta, b"after the reload")
        current = alpha.rt(BETA).link.current
        assert current is not None and current.secure
        assert not any(b"after the reload" in d for d in wire.carried)
        nursery.cancel_scope.cancel()


async def test_a_revoked_peer_loses_its_link_at_once_and_is_refused_from_then_on(
    autojump_clock: trio.testing.MockClock, datapath: str
) -> None:
    alpha, beta = pair(Wire(), datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established and beta.rt(ALPHA).established)
        fp = pki.fingerprint(BETA.cert_der)
        assert alpha.links.set_revoked(frozenset({fp})) == ["beta"]
        rt = alpha.rt(BETA)
        assert not rt.established and rt.port.session is None  # at once, not at the next tick
        assert rt.refused == f"certificate revoked (sha256 {fp})"
        await until(lambda: len(alpha.sessions) == 0)  # its task retired every session
        # Beta does not know yet: its data is dropped, its handshakes (a rekey, a retry) are
        # refused and counted, for as long as the list names it.
        beta.send_frame(ALPHA, b"from a revoked peer")
        await trio.sleep(3 * REKEY_AFTER_TIME)
        assert not any(f.endswith(b"from a revoked peer") for f in alpha.writer.frames)
        assert not alpha.rt(BETA).established
        assert alpha.stats.drops.get("peer_revoked", 0) >= 3
        [status] = alpha.links.status()
        assert status["state"] != "established" and "certificate revoked" in status["refused"]
        # A reload that no longer names it: the link comes back without waiting out a backoff.
        alpha.links.set_revoked(frozenset())
        await until(lambda: alpha.rt(BETA).established, timeout=10)
        beta.send_frame(ALPHA, b"forgiven")
        await received(alpha, b"forgiven")
        nursery.cancel_scope.cancel()


async def test_a_peer_whose_address_another_linked_key_holds_is_refused(
    autojump_clock: trio.testing.MockClock, datapath: str
) -> None:
    """Mallory's certificate has beta's address (the CA issued it twice): while alpha's link to
    beta is up, alpha refuses mallory's handshakes, counted, and says why in its status."""
    mallory = issue("mallory", "10.77.0.2")
    wire = Wire()
    peers = [peer_setup(BETA, ADDRS["beta"]), peer_setup(mallory, ADDRS["mallory"])]
    alpha = Node(wire, ALPHA, peers, datapath)
    beta = Node(wire, BETA, [peer_setup(ALPHA, ADDRS["alpha"])], datapath)
    intruder = Node(wire, mallory, [peer_setup(ALPHA, ADDRS["alpha"])], datapath)
    async with trio.open_nursery() as nursery:
        await nursery.start(alpha.links.serve)
        await nursery.start(beta.links.serve)
        await until(lambda: alpha.rt(BETA).established)
        await nursery.start(intruder.links.serve)
        await until(lambda: alpha.stats.drops.get("peer_address_in_use", 0) >= 2)
        refused = alpha.rt(mallory)
        assert not refused.established and not intruder.rt(ALPHA).established
        assert refused.refused == "address 10.77.0.2 is held by beta (another key, linked)"
        by_name = {s["name"]: s for s in alpha.links.status()}
        assert by_name["mallory"]["refused"] == refused.refused
        assert by_name["beta"]["state"] == "established"  # the first holder keeps it
        beta.send_frame(ALPHA, b"still beta's")
        await received(alpha, b"still beta's")
        nursery.cancel_scope.cancel()
