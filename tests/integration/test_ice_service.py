"""The node's ICE service over real loopback sockets: whatever arrives is routed or becomes a
counted drop (never an exception), host gathering, relays that are not ready, and two
services routing a real ICE exchange between two agents end to end (no namespaces).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.config import Endpoint, IceConfig, TurnServerConfig
from ipop_trio.control.ice import IceService
from ipop_trio.net.udp import UdpSocket
from ipop_trio.proto import stun
from ipop_trio.proto.ice import (
    MAX_REMOTE_CANDIDATES,
    Candidate,
    CandidateType,
    IceAgent,
    IceState,
    Nominated,
    host_candidate,
)
from ipop_trio.proto.stun import Addr, Class, Method
from ipop_trio.proto.turn import TurnClient, TurnState
from ipop_trio.stats import Stats

from ..unit.test_turn import FakeTurnServer

LOOPBACK = "127.0.0.1"
STRANGER = (LOOPBACK, 9)  # not a configured TURN server
TURN = Endpoint(LOOPBACK, 3478)  # configured, but nothing listens: tests never serve()
DROPS = frozenset(
    {"stun_malformed", "stun_no_agent", "channel_data_not_from_relay", "turn_refused"}
)


def service(config: IceConfig | None = None, advertise: tuple[Addr, ...] = ()) -> IceService:
    return IceService(
        UdpSocket(LOOPBACK, 0),
        Stats(),
        config or IceConfig(),
        tap_name="ipop-test",
        listen_host=LOOPBACK,
        advertise=advertise,
        rng=random.Random(7),
    )


@contextmanager
def sync_service(config: IceConfig | None = None) -> Iterator[IceService]:
    """A service for tests outside Trio (hypothesis): the socket is closed plainly."""
    svc = service(config)
    try:
        yield svc
    finally:
        svc.udp.sock.close()


def turn_config() -> IceConfig:
    return IceConfig(turn=(TurnServerConfig(TURN, "user", "secret"),))


def allocating(svc: IceService) -> TurnClient:
    """Give the configured relay a client that has sent its Allocate (as `serve` would)."""
    relay = svc.relays[TURN.sockaddr]
    client = relay.client = TurnClient(TURN.sockaddr, "user", "secret", rng=random.Random(1))
    client.allocate(time.monotonic())
    client.datagrams_to_send()  # nobody listens there
    return client


def binding_request(username: str, key: bytes, tid: bytes = b"\x01" * 12) -> bytes:
    msg = stun.Message(
        Method.BINDING,
        Class.REQUEST,
        tid,
        username=username,
        priority=1853824767,
        ice_controlling=42,
    )
    return stun.encode(msg, key=key)


# --- whatever arrives becomes a counted drop ----------------------------------------------

ice_bytes = st.builds(
    lambda first, rest: bytes([first]) + rest,
    st.one_of(st.integers(0, 3), st.integers(0x40, 0x4F)),
    st.binary(max_size=120),
)
# Well-formed STUN headers (the length matches) with random bodies reach the attribute parser.
stun_framed = st.builds(
    lambda mtype, tid, body: (
        mtype.to_bytes(2, "big")
        + (len(body) * 4).to_bytes(2, "big")
        + stun.MAGIC_COOKIE.to_bytes(4, "big")
        + tid
        + b"".join([body] * 4)
    ),
    st.integers(0, 0x03FF),  # the first byte is 0..3: what the data path calls STUN
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=30),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(ice_bytes, stun_framed), min_size=1, max_size=6))
def test_random_ice_datagrams_from_anywhere_are_counted_drops(datagrams: list[bytes]) -> None:
    with sync_service() as svc:
        for data in datagrams:
            before = sum(svc.stats.drops.values())
            assert svc.on_ice(memoryview(data), STRANGER) is None
            assert sum(svc.stats.drops.values()) == before + 1
        assert set(svc.stats.drops) <= DROPS


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(ice_bytes, stun_framed), min_size=1, max_size=6))
def test_random_datagrams_from_the_turn_server_are_refused(datagrams: list[bytes]) -> None:
    with sync_service(turn_config()) as svc:
        client = allocating(svc)
        for data in datagrams:
            before = sum(svc.stats.drops.values())
            assert svc.on_ice(memoryview(data), TURN.sockaddr) is None
            assert sum(svc.stats.drops.values()) == before + 1
        assert set(svc.stats.drops) <= {"stun_malformed", "turn_refused", "turn_early_data"}
        assert client.state is TurnState.ALLOCATING  # nothing moved it


def test_a_relayed_stun_payload_before_the_allocation_is_made_is_a_drop() -> None:
    with sync_service(turn_config()) as svc:
        allocating(svc)
        payload = binding_request("someone:else", b"k" * 22)
        indication = stun.Message(
            Method.DATA,
            Class.INDICATION,
            b"\x02" * 12,
            xor_peer_address=(("198.51.100.7", 4600),),
            data=payload,
        )
        data = stun.encode(indication, fingerprint=False)
        # Only the source address is needed to send it (spoofed): a drop, not an exception.
        assert svc.on_ice(memoryview(data), TURN.sockaddr) is None
        assert svc.stats.drops == {"turn_early_data": 1}


def test_channel_data_not_from_a_turn_server_is_dropped() -> None:
    with sync_service(turn_config()) as svc:
        allocating(svc)
        channel_data = b"\x40\x00\x00\x04abcd"
        assert svc.on_ice(memoryview(channel_data), STRANGER) is None
        # Same port on another address, and the server's address on another port.
        for addr in ((LOOPBACK, TURN.port + 1), ("127.0.0.2", TURN.port)):
            assert svc.on_ice(memoryview(channel_data), addr) is None
        assert svc.stats.drops == {"channel_data_not_from_relay": 3}


def test_a_check_for_no_agent_and_an_answer_to_nobody_are_dropped() -> None:
    with sync_service() as svc:
        request = binding_request("nobody:peer", b"p" * 22)
        assert stun.parse_untrusted(request).username == "nobody:peer"  # well-formed
        assert svc.on_ice(memoryview(request), STRANGER) is None
        answer = stun.encode(
            stun.Message(Method.BINDING, Class.SUCCESS, b"\x03" * 12, xor_mapped_address=STRANGER)
        )
        assert svc.on_ice(memoryview(answer), STRANGER) is None
        assert svc.stats.drops == {"stun_no_agent": 2}


def test_a_specific_listen_host_is_the_one_host_candidate() -> None:
    with sync_service() as svc:
        [cand] = svc.gather_hosts()
        assert cand.type is CandidateType.HOST
        assert cand == host_candidate((LOOPBACK, svc.udp.local[1]))  # the best preference
        assert cand.addr == (LOOPBACK, svc.udp.local[1]) and cand.base == cand.addr
        assert svc.local_candidates() == [cand]
        assert svc.offer_lines() == [cand.to_sdp()]


def test_advertised_addresses_are_server_reflexive_candidates_of_the_host() -> None:
    svc = service(advertise=(("198.51.100.20", 14600), ("2001:db8::20", 14600)))
    try:
        [host] = svc.gather_hosts()
        # The IPv6 address has no host candidate of its family to stand for: left out.
        [forwarded] = svc.srflx
        assert forwarded.type is CandidateType.SRFLX
        assert forwarded.addr == ("198.51.100.20", 14600) and forwarded.base == host.addr
        assert forwarded.related_address == LOOPBACK
        assert svc.local_candidates() == [host, forwarded]
        again = Candidate.from_sdp_untrusted(svc.offer_lines()[1])  # as a peer reads it
        assert again.addr == forwarded.addr and again.type is CandidateType.SRFLX
    finally:
        svc.udp.sock.close()


def test_a_relay_that_is_not_allocated_drops_every_data_datagram() -> None:
    with sync_service(turn_config()) as svc:
        idle = TurnClient(TURN.sockaddr, "user", "secret")
        iov = [b"head", b"payload-1", b"head", b"payload-22"]
        sizes = [len(iov[0]) + len(iov[1]), len(iov[2]) + len(iov[3])]
        assert svc.send_iov_via(idle, ("198.51.100.7", 4600), iov, sizes) == len(sizes)
        assert svc.send_iov_via(allocating(svc), ("198.51.100.7", 4600), iov, sizes) == 2
        assert not svc.send_via(idle, ("198.51.100.7", 4600), b"x")


# --- two services route a real ICE exchange -----------------------------------------------


class Peer:
    """Stands for a link task: counts the wake-ups the service gives it."""

    def __init__(self, agent: IceAgent) -> None:
        self.agent = agent
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


async def _readable(udps: list[UdpSocket], timeout: float) -> None:
    """Return when one of the sockets is readable or after `timeout`."""
    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:

            async def wait(udp: UdpSocket) -> None:
                await udp.wait_readable()
                nursery.cancel_scope.cancel()

            for udp in udps:
                nursery.start_soon(wait, udp)


async def test_two_services_route_checks_between_two_agents_until_both_nominate() -> None:
    svcs = [service(), service()]
    try:
        hosts = [svc.gather_hosts()[0] for svc in svcs]
        creds = [("AliceUf1", "a" * 22), ("BobUfrg1", "b" * 22)]
        agents = [
            IceAgent(
                controlling=i == 0,
                local_ufrag=creds[i][0],
                local_pwd=creds[i][1],
                rng=random.Random(i),
                nomination_delay=0.0,
            )
            for i in range(2)
        ]
        peers = [Peer(a) for a in agents]
        for i, (svc, agent) in enumerate(zip(svcs, agents, strict=True)):
            other = 1 - i
            agent.set_remote_credentials(*creds[other])
            agent.add_local_candidate(hosts[i])
            # As signalling carries it: an SDP line, no base.
            agent.add_remote_candidate(Candidate.from_sdp_untrusted(hosts[other].to_sdp()))
            agent.end_of_local_candidates()
            agent.end_of_remote_candidates()
            svc.register(agent, peers[i].wake)
        nominated: list[list[Nominated]] = [[], []]
        with trio.fail_after(10):
            while not all(nominated):
                now = time.monotonic()
                for i, (svc, agent) in enumerate(zip(svcs, agents, strict=True)):
                    agent.handle_timeout(now)
                    svc.flush_agent(agent)
                    while (ev := agent.next_event()) is not None:
                        if isinstance(ev, Nominated):
                            nominated[i].append(ev)
                for svc in svcs:
                    while (got := svc.udp.recv_once()) is not None:
                        views, addr = got
                        for view in views:
                            assert svc.on_ice(view, addr) is None
                deadlines = [d for a in agents if (d := a.next_deadline()) is not None]
                wait = min(deadlines, default=now + 0.05) - time.monotonic()
                await _readable([svc.udp for svc in svcs], max(0.0, min(wait, 0.05)))
        for i, agent in enumerate(agents):
            assert agent.state is IceState.COMPLETED
            pair = nominated[i][-1].pair
            assert pair.local_base == hosts[i].addr and pair.remote_addr == hosts[1 - i].addr
            assert agent.stats["rx_check"] > 0 and peers[i].wakes > 0
        # Every datagram found its agent: requests by USERNAME, answers by transaction id.
        assert svcs[0].stats.drops == {} and svcs[1].stats.drops == {}
    finally:
        for svc in svcs:
            svc.udp.close()


# --- a TURN server that restarts ----------------------------------------------------------


class RecordingUdp(UdpSocket):
    """A real loopback socket whose datagrams to the TURN server are kept for the test."""

    def __init__(self) -> None:
        super().__init__(LOOPBACK, 0)
        self.to_turn: list[bytes] = []
        self.sent_from: list[tuple[str, Addr]] = []

    def send_one(self, datagram: bytes, addr: Addr) -> bool:
        if addr == TURN.sockaddr:
            self.to_turn.append(datagram)
            return True
        return super().send_one(datagram, addr)

    def send_from(self, datagram: bytes, source: str, addr: Addr) -> bool:
        self.sent_from.append((source, addr))
        return True


def _serve_turn(svc: IceService, udp: RecordingUdp, server: FakeTurnServer, now: float) -> None:
    """Carry datagrams between the service and the fake TURN server until quiet."""
    for _ in range(50):
        out, udp.to_turn = udp.to_turn, []
        if not out:
            return
        for datagram in out:
            for reply in server.handle(datagram, now):
                assert svc.on_ice(memoryview(reply), TURN.sockaddr) is None
        svc._step(now)


def test_a_restarted_turn_server_is_noticed_and_the_relay_re_made() -> None:
    udp = RecordingUdp()
    svc = IceService(
        udp, Stats(), turn_config(), tap_name="ipop-test", listen_host=LOOPBACK,
        rng=random.Random(3),
    )  # fmt: skip
    server = FakeTurnServer(users={"user": "secret"})
    try:
        relay = svc.relays[TURN.sockaddr]
        now = time.monotonic()
        svc._step(now)
        _serve_turn(svc, udp, server, now)
        assert relay.state == "allocated" and relay.candidate is not None
        old = relay.candidate.addr
        assert svc.generation == 0

        # coturn restarts; consent is lost on a relayed pair: the service asks the server.
        server.restart()
        svc.suspect(old)
        assert svc.stats.counters()["turn_checks"] == 1
        _serve_turn(svc, udp, server, now)
        assert relay.state == "reallocating" and relay.candidate is None
        assert svc.status()["turn"][0]["state"] == "reallocating"
        assert svc.relay_for(old) is None
        # An agent's check from the lost relayed address is a counted drop, never a send
        # from a host socket that does not have that address.
        assert svc.send(old, ("198.51.100.7", 4600), b"check")
        assert svc.stats.drops["ice_relay_lost"] == 1 and udp.sent_from == []

        # Re-made after a short, jittered backoff (TURN_RETRY_MIN +- 25 %).
        retry_at = relay.retry_at
        assert retry_at is not None and now + 0.75 <= retry_at <= now + 1.25
        svc._step(retry_at)
        _serve_turn(svc, udp, server, retry_at)
        assert relay.state == "allocated" and relay.candidate is not None
        assert svc.generation == 1 and relay.lost == 1
        counters = svc.stats.counters()
        assert counters["turn_lost"] == 1 and counters["turn_reallocated"] == 1
    finally:
        udp.sock.close()


def test_relay_backoff_is_bounded_and_jittered() -> None:
    with sync_service(turn_config()) as svc:
        delays = [svc._backoff(n) for n in range(1, 40)]
        assert all(0.75 <= d <= 60.0 * 1.25 for d in delays)
        assert len({round(d, 6) for d in delays[-10:]}) == 10  # not one fixed value


def test_turn_permissions_are_the_live_agents_candidates_only() -> None:
    """Regression (issue 13, item 5): every address in any con_req became a permission
    refreshed forever (8,000 from 500 con_reqs). Now a relay keeps permissions for the live
    agents' remote candidates only: capped with each agent's, gone with the agent."""
    udp = RecordingUdp()
    svc = IceService(
        udp, Stats(), turn_config(), tap_name="ipop-test", listen_host=LOOPBACK,
        rng=random.Random(3),
    )  # fmt: skip
    server = FakeTurnServer(users={"user": "secret"})
    try:
        relay = svc.relays[TURN.sockaddr]
        now = time.monotonic()
        svc._step(now)
        _serve_turn(svc, udp, server, now)
        client = relay.client
        assert client is not None and client.state is TurnState.ALLOCATED
        agents = []
        for n in range(2):
            agent = IceAgent(controlling=True, local_ufrag=f"ufrag{n}", local_pwd="p" * 22)
            svc.register(agent, lambda: None)
            agents.append(agent)
        # 500 con_reqs of 16 fresh candidates each, all for the first agent.
        for req in range(500):
            for i in range(16):
                ip = f"10.{req // 250}.{req % 250}.{i + 1}"
                agents[0].add_remote_candidate(host_candidate((ip, 4600)))
            svc.permit()
        agents[1].add_remote_candidate(host_candidate(("192.0.2.9", 4600)))
        svc.permit()
        _serve_turn(svc, udp, server, now)
        wanted = {c.address for a in agents for c in a.remote_candidates}
        assert len(wanted) <= 2 * MAX_REMOTE_CANDIDATES
        assert client.permitted == wanted
        assert svc.status()["turn"][0]["permissions"] == len(wanted)
        assert set(server.permissions) == wanted  # nothing past an agent's cap was asked
        # The first agent goes (its link closed): only the second's address stays permitted,
        # and the dropped ones are not refreshed.
        svc.unregister("ufrag0")
        assert client.permitted == {"192.0.2.9"}
        asked = len(server.requests)
        later = now + 400.0
        svc._step(later)
        _serve_turn(svc, udp, server, later)
        refreshed = {
            m.xor_peer_address[0][0]
            for m in server.requests[asked:]
            if m.method is Method.CREATE_PERMISSION
        }
        assert refreshed == {"192.0.2.9"}
    finally:
        udp.sock.close()
