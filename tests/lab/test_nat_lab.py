"""The lab's NAT routers and coturn behave as built.

Topology of the `world` fixture (all in namespaces; "public" = the internet switch):

    a (192.168.1.2) -- eim NAT --+                       +-- turn (coturn, 3 UDP ports)
                                 +-- internet switch ----+
    b (192.168.2.2) -- sym NAT --+   10.199.255.0/24     +-- peer

Probes run in this process through sockets made inside the hosts' namespaces
(`Host.udp_socket`): no helper processes, every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import random
import select
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import pytest

from ipop_trio.errors import BadPacket
from ipop_trio.lab.nat import (
    BLOCK_TABLE,
    TURN_RELAY_PORTS,
    NatRouter,
    Placement,
    TurnServer,
    add_host_behind,
    add_nat,
    add_nat_pair,
    add_turn,
    block,
    nat_ruleset,
    probe_mappings,
    stun_binding,
    unblock,
)
from ipop_trio.lab.netns import Host, Lab
from ipop_trio.proto import turn as turnproto
from ipop_trio.proto.stun import Addr

from .conftest import processes_mentioning
from .test_lab import alive, leftovers

pytestmark = pytest.mark.lab

USERS = {"lab": "s3cret-pass"}
REALM = "ipop"
DEADLINE = 10.0
RESEND = 0.1  # a peer repeats a datagram this often until the other side sees it


@dataclass(frozen=True)
class World:
    lab: Lab
    turn: TurnServer
    peer: Host
    eim: NatRouter
    sym: NatRouter
    a: Host  # behind eim
    b: Host  # behind sym


@pytest.fixture
def world() -> Iterator[World]:
    with Lab() as lab:
        internet = lab.add_switch("inet")
        server = lab.add_host("turn")
        lab.attach(server, internet)
        peer = lab.add_host("peer")
        lab.attach(peer, internet)
        eim = add_nat(lab, "eimnat", internet, mapping="eim")
        sym = add_nat(lab, "symnat", internet, mapping="symmetric")
        a = add_host_behind(lab, eim, "a")
        b = add_host_behind(lab, sym, "b")
        turn = add_turn(lab, server, users=USERS, realm=REALM, aux_ports=(3479, 3480))
        yield World(lab, turn, peer, eim, sym, a, b)


def recv_until(
    sock: socket.socket,
    want: Callable[[bytes, Addr], bool],
    *,
    resend: Callable[[], object] | None = None,
    timeout: float = DEADLINE,
) -> tuple[bytes, Addr]:
    """The first datagram on `sock` that `want`s; `resend()` every RESEND s meanwhile."""
    deadline = time.monotonic() + timeout
    next_send = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= deadline:
            pytest.fail(f"no wanted datagram within {timeout}s")
        if resend is not None and now >= next_send:
            resend()
            next_send = now + RESEND
        wait = min(deadline, next_send if resend else deadline) - now
        if select.select([sock], [], [], max(0.0, wait))[0]:
            data, source = sock.recvfrom(65536)
            if want(data, (source[0], source[1])):
                return data, (source[0], source[1])


# ---------------------------------------------------------------------------------------------
# Mapping behaviour


def test_rulesets_are_what_the_names_say() -> None:
    assert "masquerade\n" in nat_ruleset("eim", "out0")
    assert "masquerade fully-random" in nat_ruleset("symmetric", "out0")


def test_eim_nat_maps_endpoint_independently_and_preserves_the_port(world: World) -> None:
    port, mapped = probe_mappings(world.a, world.turn.endpoints)
    assert len(mapped) == 3
    assert all(m == mapped[0] for m in mapped), f"EIM NAT mapped per destination: {mapped}"
    assert mapped[0] == (world.eim.public_address, port)


def test_symmetric_nat_maps_per_destination(world: World) -> None:
    e0, e1, e2 = world.turn.endpoints
    _, mapped = probe_mappings(world.b, [e0, e1, e2, e0])
    assert all(ip == world.sym.public_address for ip, _ in mapped)
    ports = [p for _, p in mapped[:3]]
    # Three fully random ports: all equal by chance with probability ~ 1 / 64512^2.
    assert len(set(ports)) > 1, f"symmetric NAT reused one port for every destination: {ports}"
    assert mapped[3] == mapped[0], "the same destination again must reuse its mapping"


def test_nat_filters_unsolicited_and_admits_replies(world: World) -> None:
    """Address- and port-dependent filtering: the peer's first datagram, sent before `a`
    opened the mapping towards it, is dropped; after `a` sends, the peer gets through."""
    with world.a.udp_socket() as a_sock, world.peer.udp_socket() as p_sock:
        mapped = stun_binding(a_sock, world.turn.server)
        peer_addr = (world.peer.address, p_sock.getsockname()[1])
        p_sock.sendto(b"unsolicited", mapped)
        # Wait until the peer sees a's datagram: the hole is open now.
        recv_until(
            p_sock, lambda d, _s: d == b"hello", resend=lambda: a_sock.sendto(b"hello", peer_addr)
        )
        p_sock.sendto(b"reply", mapped)
        data, _ = recv_until(a_sock, lambda _d, s: s == peer_addr)
        assert data == b"reply", "the unsolicited datagram got through the NAT"


def punch(x: socket.socket, y: socket.socket, x_mapped: Addr, y_mapped: Addr) -> None:
    """x and y, each knowing only the other's mapped address, open a path both ways; each
    sees the other's datagrams come from exactly that mapped address. x speaks first: its
    datagram opens x's NAT towards y and is dropped by y's NAT (which has no mapping towards
    x yet); y's answers then get in, and y's NAT is open for x's."""
    x.sendto(b"x-open", y_mapped)
    _, source = recv_until(
        x, lambda d, _s: d == b"y-punch", resend=lambda: y.sendto(b"y-punch", x_mapped)
    )
    assert source == y_mapped, "y's NAT changed y's mapping towards x"
    _, source = recv_until(
        y, lambda d, _s: d == b"x-punch", resend=lambda: x.sendto(b"x-punch", y_mapped)
    )
    assert source == x_mapped, "x's NAT changed x's mapping towards y"


def test_hole_punching_between_two_eim_nats(world: World) -> None:
    """The path ICE predicts as direct srflx: both sides learn their mapping from STUN, then
    send to each other's; the first datagram into the not-yet-opened NAT is dropped without
    stealing the mapping (the router's input drop), so the punch then works both ways."""
    other = add_nat(world.lab, "eimnat2", world.eim.internet, mapping="eim")
    c = add_host_behind(world.lab, other, "c")
    with world.a.udp_socket() as a_sock, c.udp_socket() as c_sock:
        a_mapped = stun_binding(a_sock, world.turn.server)
        c_mapped = stun_binding(c_sock, world.turn.server)
        punch(a_sock, c_sock, a_mapped, c_mapped)


# ---------------------------------------------------------------------------------------------
# The NAT cases of the ICE lab tests (add_nat_pair) and blocking a path


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (None, None),
        ("eim", "eim"),
        ("symmetric", "eim"),
        ("symmetric", "symmetric"),
        ("eim", "same"),
    ],
)
def test_nat_pair_builds_each_case(a: Placement, b: Placement | Literal["same"]) -> None:
    with Lab() as lab:
        pair = add_nat_pair(lab, a, b)
        for host, nat in ((pair.a, pair.a_nat), (pair.b, pair.b_nat)):
            port, mapped = probe_mappings(host, pair.turn.endpoints[:2])
            if nat is None:
                assert mapped == [(host.address, port)] * 2
            else:
                assert [ip for ip, _ in mapped] == [nat.public_address] * 2
                if nat.mapping == "eim":
                    assert mapped == [(nat.public_address, port)] * 2
        if b == "same":
            assert pair.a_nat is pair.b_nat and len(pair.routers) == 1
            with pair.a.udp_socket() as x, pair.b.udp_socket() as y:
                # Behind one NAT the hosts reach each other on the LAN (host candidates).
                punch(
                    x, y, (pair.a.address, x.getsockname()[1]), (pair.b.address, y.getsockname()[1])
                )


def blocked_packets(host: Host) -> int:
    out = host.check(["nft", "-j", "list", "table", "ip", BLOCK_TABLE])
    return sum(
        item["rule"]["expr"][1]["counter"]["packets"]
        for item in json.loads(out)["nftables"]
        if "rule" in item
    )


def test_block_a_direct_path_and_unblock_it() -> None:
    with Lab() as lab:
        pair = add_nat_pair(lab, "eim", "eim")
        assert pair.a_nat is not None and pair.b_nat is not None
        router = pair.a_nat.host
        with pair.a.udp_socket() as x, pair.b.udp_socket() as y:
            x_mapped = stun_binding(x, pair.turn.server)
            y_mapped = stun_binding(y, pair.turn.server)
            punch(x, y, x_mapped, y_mapped)
            block(router, pair.b_nat.public_address)
            deadline = time.monotonic() + DEADLINE
            while blocked_packets(router) == 0:  # the direct path is dropped ...
                assert time.monotonic() < deadline, "nothing was blocked"
                x.sendto(b"blocked", y_mapped)
                time.sleep(RESEND)  # pacing the probe, not synchronisation
            assert stun_binding(x, pair.turn.server) == x_mapped  # ... the server is not
            unblock(router)
            punch(x, y, x_mapped, y_mapped)  # same mappings as before the block


# ---------------------------------------------------------------------------------------------
# TURN through coturn with the sans-IO client


@dataclass
class TurnLoop:
    """A blocking driver for `TurnClient`: one socket, select, deadlines."""

    client: turnproto.TurnClient
    sock: socket.socket
    peer_sock: socket.socket
    events: list[turnproto.TurnEvent] = field(default_factory=list)
    relayed: list[tuple[Addr, bytes, int]] = field(default_factory=list)  # peer, data, 1st byte
    at_peer: list[tuple[Addr, bytes]] = field(default_factory=list)

    def flush(self) -> None:
        for datagram in self.client.datagrams_to_send():
            self.sock.sendto(datagram, self.client.server)
        while (event := self.client.next_event()) is not None:
            self.events.append(event)

    def run_until(
        self,
        done: Callable[[], bool],
        *,
        peer_send: tuple[bytes, Addr] | None = None,
        timeout: float = DEADLINE,
    ) -> None:
        deadline = time.monotonic() + timeout
        next_peer_send = time.monotonic()
        while True:
            self.flush()
            if done():
                return
            now = time.monotonic()
            if now >= deadline:
                pytest.fail(f"TURN loop timed out; events {self.events}, stats {self.client.stats}")
            if peer_send is not None and now >= next_peer_send:
                self.peer_sock.sendto(*peer_send)
                next_peer_send = now + RESEND
            wake = [deadline, next_peer_send if peer_send else deadline]
            if (due := self.client.next_deadline()) is not None:
                wake.append(due)
            ready, _, _ = select.select(
                [self.sock, self.peer_sock], [], [], max(0.0, min(wake) - now)
            )
            now = time.monotonic()
            if self.sock in ready:
                data, source = self.sock.recvfrom(65536)
                if (source[0], source[1]) == self.client.server:
                    try:
                        got = self.client.receive_untrusted(data, now)
                    except BadPacket:
                        got = None
                    if got is not None:
                        self.relayed.append((got[0], got[1], data[0]))
            if self.peer_sock in ready:
                data, source = self.peer_sock.recvfrom(65536)
                self.at_peer.append(((source[0], source[1]), data))
            if due is not None and now >= due:
                self.client.handle_timeout(now)


def test_turn_relay_from_behind_a_symmetric_nat(world: World) -> None:
    client = turnproto.TurnClient(world.turn.server, "lab", USERS["lab"], rng=random.Random(4))
    with world.b.udp_socket() as sock, world.peer.udp_socket() as peer_sock:
        loop = TurnLoop(client, sock, peer_sock)
        peer = (world.peer.address, peer_sock.getsockname()[1])

        client.allocate(time.monotonic())
        loop.run_until(lambda: bool(loop.events))
        allocated = loop.events[0]
        assert isinstance(allocated, turnproto.Allocated), loop.events
        relayed = allocated.relayed
        assert relayed[0] == world.turn.address
        assert TURN_RELAY_PORTS[0] <= relayed[1] <= TURN_RELAY_PORTS[1]
        assert allocated.mapped is not None and allocated.mapped[0] == world.sym.public_address

        # Permission, then Data indications in and a Send indication out.
        client.create_permission(peer[0], time.monotonic())
        loop.run_until(lambda: bool(loop.relayed), peer_send=(b"via-indication", relayed))
        source, data, first = loop.relayed[-1]
        assert (source, data) == (peer, b"via-indication")
        assert first < 0x40, "expected a STUN Data indication"
        sock.sendto(client.wrap(peer, b"back-indication"), client.server)
        loop.run_until(lambda: any(d == b"back-indication" for _, d in loop.at_peer))
        assert (relayed, b"back-indication") in loop.at_peer

        # A channel, then ChannelData both ways.
        channel = client.bind_channel(peer, time.monotonic())
        loop.run_until(lambda: any(isinstance(e, turnproto.ChannelBound) for e in loop.events))
        loop.relayed.clear()
        loop.run_until(
            lambda: any(d == b"via-channel" for _, d, _f in loop.relayed),
            peer_send=(b"via-channel", relayed),
        )
        source, data, first = next(r for r in loop.relayed if r[1] == b"via-channel")
        assert source == peer and 0x40 <= first <= 0x4F
        datagram = client.wrap(peer, b"back-channel")
        assert int.from_bytes(datagram[:2], "big") == channel
        sock.sendto(datagram, client.server)
        loop.run_until(lambda: (relayed, b"back-channel") in loop.at_peer)

        failures = [
            e
            for e in loop.events
            if not isinstance(e, turnproto.Allocated | turnproto.ChannelBound)
        ]
        assert failures == []
        client.close(time.monotonic())
        loop.flush()


def test_turn_refuses_a_wrong_password(world: World) -> None:
    client = turnproto.TurnClient(world.turn.server, "lab", "wrong", rng=random.Random(5))
    with world.a.udp_socket() as sock, world.peer.udp_socket() as peer_sock:
        loop = TurnLoop(client, sock, peer_sock)
        client.allocate(time.monotonic())
        loop.run_until(lambda: bool(loop.events))
    assert loop.events == [turnproto.AllocationFailed("unauthorized (bad credentials?)", 401)]


# ---------------------------------------------------------------------------------------------
# Teardown


def test_teardown_leaves_no_namespace_and_no_turnserver() -> None:
    with Lab() as lab:
        internet = lab.add_switch("inet")
        server = lab.add_host("turn")
        lab.attach(server, internet)
        router = add_nat(lab, "nat", internet, mapping="symmetric")
        add_host_behind(lab, router, "a")
        turn = add_turn(lab, server, users=USERS)
        assert turn.proc is not None
        pid, config = turn.proc.pid, turn.config
        assert processes_mentioning(str(config))
        assert leftovers(lab.id)
    assert not leftovers(lab.id)
    assert not alive(pid)
    assert processes_mentioning(str(config)) == []
    assert not lab.workdir.exists()
