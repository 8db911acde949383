"""The ICE agent (RFC 8445) in pairs over a simulated network, plus its pure helpers.

No sockets, no sleeps: `_simnet.SimNet` steps a float clock from deadline to deadline and
drops, duplicates and reorders datagrams from a seeded RNG.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket
from ipop_trio.proto import stun
from ipop_trio.proto.ice import (
    CONSENT_TIMEOUT,
    BetterPairValid,
    Candidate,
    CandidateType,
    ConsentLost,
    Failed,
    GatherFailed,
    IceAgent,
    IceEvent,
    IceState,
    Nominated,
    PairState,
    PairValid,
    RoleChanged,
    SrflxFound,
    SrflxGatherer,
    candidate_priority,
    candidates_to_sdp,
    host_candidate,
    new_credentials,
    pair_priority,
    relay_candidate,
    srflx_candidate,
)
from ipop_trio.proto.stun import Addr, Class, Message, Method

from ._simnet import Nat, SimNet

STUN_SERVER: Addr = ("198.51.100.1", 3478)


# --- Harness ------------------------------------------------------------------------------


class IcePeer:
    """A node that runs one agent (and optionally a srflx gatherer) on its host addresses."""

    def __init__(self, name: str, hosts: list[Addr], *, controlling: bool, seed: int, **kw: Any):
        self.name = name
        self.rng = random.Random(seed)
        ufrag, pwd = new_credentials(self.rng)
        self.agent = IceAgent(
            controlling=controlling, local_ufrag=ufrag, local_pwd=pwd, rng=self.rng, **kw
        )
        self.hosts = hosts
        self.host_candidates = [host_candidate(h, 65535 - i) for i, h in enumerate(hosts)]
        for cand in self.host_candidates:
            self.agent.add_local_candidate(cand)
        self.gatherer: SrflxGatherer | None = None
        self.srflx: list[Candidate] = []
        self.events: list[IceEvent] = []
        self.auto_failover = False

    # SimNode
    def addresses(self) -> list[str]:
        return [h[0] for h in self.hosts]

    def deliver(self, data: bytes, local: Addr, remote: Addr, now: float) -> None:
        if self.gatherer is not None and self.gatherer.owns(
            stun.header_untrusted(data).transaction_id
        ):
            self.gatherer.receive_untrusted(data, local, remote, now)
        else:
            self.agent.receive(data, local, remote, now)
        self._drain(now)

    def outgoing(self) -> list[tuple[Addr, Addr, bytes]]:
        out = self.agent.datagrams_to_send()
        if self.gatherer is not None:
            out += self.gatherer.datagrams_to_send()
        return out

    def next_deadline(self) -> float | None:
        times = [self.agent.next_deadline()]
        if self.gatherer is not None:
            times.append(self.gatherer.next_deadline())
        return min((t for t in times if t is not None), default=None)

    def handle_timeout(self, now: float) -> None:
        self.agent.handle_timeout(now)
        if self.gatherer is not None:
            self.gatherer.handle_timeout(now)
        self._drain(now)

    def _drain(self, now: float) -> None:
        while (event := self.agent.next_event()) is not None:
            self.events.append(event)
            if self.auto_failover and isinstance(event, ConsentLost) and event.selected:
                best = self.agent.best_valid_pair()
                if best is not None:
                    self.agent.select(best, now)
            if self.auto_failover and isinstance(event, BetterPairValid):
                self.agent.select(event.pair, now)
        if self.gatherer is not None:
            while (g := self.gatherer.next_event()) is not None:
                if isinstance(g, SrflxFound):
                    self.srflx.append(g.candidate)
                    self.agent.add_local_candidate(g.candidate)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class StunServer:
    """Answers Binding requests with the source address (RFC 8489 §7.3)."""

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self._out: list[tuple[Addr, Addr, bytes]] = []

    def addresses(self) -> list[str]:
        return [self.addr[0]]

    def deliver(self, data: bytes, local: Addr, remote: Addr, now: float) -> None:
        msg = stun.parse_untrusted(data)
        response = stun.success_response(msg, xor_mapped_address=remote)
        self._out.append((local, remote, stun.encode(response)))

    def outgoing(self) -> list[tuple[Addr, Addr, bytes]]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        return None

    def handle_timeout(self, now: float) -> None:
        pass


def introduce(a: IcePeer, b: IcePeer) -> None:
    """What signalling does: credentials and candidates each way (through SDP text)."""
    for src, dst in ((a, b), (b, a)):
        dst.agent.set_remote_credentials(src.agent.local_ufrag, src.agent.local_pwd)
        for line in candidates_to_sdp(src.agent.local_candidates):
            dst.agent.add_remote_candidate(Candidate.from_sdp_untrusted(line))
        dst.agent.end_of_remote_candidates()
        src.agent.end_of_local_candidates()


def both_nominated(a: IcePeer, b: IcePeer) -> bool:
    return a.agent.selected_pair is not None and b.agent.selected_pair is not None


def same_path(a: IcePeer, b: IcePeer) -> bool:
    """Each side's selected pair is the other's, as seen through any NAT."""
    pa, pb = a.agent.selected_pair, b.agent.selected_pair
    assert pa is not None and pb is not None and pa.mapped and pb.mapped
    return pa.mapped.addr == pb.remote.addr and pb.mapped.addr == pa.remote.addr


def pair_up(seed: int = 1, **net_kw: Any) -> tuple[SimNet, IcePeer, IcePeer]:
    net = SimNet(seed, **net_kw)
    a = IcePeer("a", [("192.0.2.1", 5000)], controlling=True, seed=seed * 2)
    b = IcePeer("b", [("192.0.2.2", 6000)], controlling=False, seed=seed * 2 + 1)
    net.add(a)
    net.add(b)
    introduce(a, b)
    return net, a, b


# --- Priorities and the check list (RFC 8445 §5.1.2, §6.1.2) -------------------------------


def test_candidate_priority_formula() -> None:
    # §5.1.2.1 with the §5.1.2.2 type preferences, one component, local preference 65535.
    assert candidate_priority(CandidateType.HOST) == (126 << 24) + (65535 << 8) + 255
    assert candidate_priority(CandidateType.HOST) == 2130706431
    assert candidate_priority(CandidateType.SRFLX) == 1694498815
    assert candidate_priority(CandidateType.PRFLX) == 1862270975
    assert candidate_priority(CandidateType.RELAY) == 16777215
    # The PRIORITY of RFC 5769's sample request is a prflx priority, local preference 1.
    assert candidate_priority(CandidateType.PRFLX, 1) == 0x6E0001FF
    order = [CandidateType.HOST, CandidateType.PRFLX, CandidateType.SRFLX, CandidateType.RELAY]
    prios = [candidate_priority(t, 0) for t in order]
    assert prios == sorted(prios, reverse=True)  # the type dominates any local preference
    assert candidate_priority(CandidateType.RELAY, 65535) < candidate_priority(
        CandidateType.SRFLX, 0
    )


def test_pair_priority_formula() -> None:
    g, d = 2130706431, 1694498815
    assert pair_priority(g, d) == 2**32 * d + 2 * g + 1
    assert pair_priority(d, g) == 2**32 * d + 2 * g
    assert pair_priority(g, g) == 2**32 * g + 2 * g
    # Both agents compute the same number for the same pair: the controlling agent's
    # candidate is G on either side.
    a_local, b_local = 1000, 2000
    controlling_view = pair_priority(a_local, b_local)  # a controls
    controlled_view = pair_priority(a_local, b_local)  # b: G is still a's candidate
    assert controlling_view == controlled_view
    # Pair ordering: host/host > host/srflx > srflx/srflx > anything with a relay.
    host = candidate_priority(CandidateType.HOST)
    srflx = candidate_priority(CandidateType.SRFLX)
    relay = candidate_priority(CandidateType.RELAY)
    ranked = [
        pair_priority(host, host),
        pair_priority(host, srflx),
        pair_priority(srflx, srflx),
        pair_priority(host, relay),
        pair_priority(relay, relay),
    ]
    assert ranked == sorted(ranked, reverse=True)


def test_check_list_forms_prunes_and_orders() -> None:
    agent = IceAgent(controlling=True, local_ufrag="aaaa", local_pwd="p" * 22)
    host = host_candidate(("192.0.2.1", 5000))
    agent.add_local_candidate(host)
    agent.add_local_candidate(srflx_candidate(("203.0.113.1", 40000), host, STUN_SERVER))
    agent.add_local_candidate(
        relay_candidate(("198.51.100.9", 50000), STUN_SERVER, ("203.0.113.1", 40000))
    )
    agent.add_local_candidate(host_candidate(("2001:db8::1", 5000), 65534))
    peer_host = host_candidate(("192.0.2.2", 6000))
    remotes = [
        peer_host,
        srflx_candidate(("203.0.113.2", 41000), peer_host, STUN_SERVER),
        relay_candidate(("198.51.100.9", 50001), STUN_SERVER, ("203.0.113.2", 41000)),
    ]
    for cand in remotes:
        agent.add_remote_candidate(Candidate.from_sdp_untrusted(cand.to_sdp()))
    # §6.1.2.4: the srflx local candidate is pruned into its base (the host pairs); IPv6
    # never pairs with IPv4 (§6.1.2.2): 2 locals (host, relay) x 3 remotes.
    assert len(agent.pairs) == 6
    assert {p.local.type for p in agent.pairs} == {CandidateType.HOST, CandidateType.RELAY}
    prios = [p.priority for p in agent.pairs]
    assert prios == sorted(prios, reverse=True)
    assert agent.pairs[0].local is host and agent.pairs[0].remote.addr == peer_host.addr
    assert agent.pairs[-1].local.type is CandidateType.RELAY
    assert agent.pairs[-1].remote.type is CandidateType.RELAY
    # §6.1.2.6: one Waiting pair per foundation, every foundation distinct here.
    assert all(p.state is PairState.WAITING for p in agent.pairs)
    # A second remote on the same foundation as an existing pair starts Frozen.
    agent.add_remote_candidate(
        Candidate(
            peer_host.foundation, peer_host.priority - 1, "192.0.2.3", 6000, CandidateType.HOST
        )
    )
    assert any(p.state is PairState.FROZEN for p in agent.pairs)


def test_candidate_sdp_round_trip() -> None:
    host = host_candidate(("192.0.2.1", 5000))
    for cand in (
        host,
        srflx_candidate(("203.0.113.1", 40000), host, STUN_SERVER),
        relay_candidate(("198.51.100.9", 50000), STUN_SERVER, ("203.0.113.1", 40000)),
        host_candidate(("2001:db8::1", 7000)),
    ):
        back = Candidate.from_sdp_untrusted(cand.to_sdp())
        assert (back.foundation, back.priority, back.addr, back.type) == (
            cand.foundation,
            cand.priority,
            cand.addr,
            cand.type,
        )
        assert back.related_address == cand.related_address
        assert back.base is None  # the base never travels


@pytest.mark.parametrize(
    "line",
    [
        "",
        "1 1 udp 1 192.0.2.1 5000 typ",
        "1 1 tcp 1 192.0.2.1 5000 typ host",
        "1 2 udp 1 192.0.2.1 5000 typ host",
        "1 1 udp 1 192.0.2.300 5000 typ host",
        "1 1 udp 1 192.0.2.1 0 typ host",
        "1 1 udp 1 192.0.2.1 5000 typ bogus",
        "1 1 udp 1 192.0.2.1 5000 typ srflx raddr x rport 1",
        "1 1 udp 1 192.0.2.1 5000 typ srflx raddr",
        "f!o 1 udp 1 192.0.2.1 5000 typ host",
    ],
)
def test_candidate_sdp_refuses_bad_lines(line: str) -> None:
    with pytest.raises(BadPacket):
        Candidate.from_sdp_untrusted(line)


@given(st.text(max_size=200))
def test_candidate_sdp_fuzz(text: str) -> None:
    try:
        Candidate.from_sdp_untrusted(text)
    except BadPacket:
        pass


# --- Agents in pairs ----------------------------------------------------------------------


def test_pair_reaches_nomination_on_a_clean_network() -> None:
    net, a, b = pair_up()
    assert net.run(5.0, lambda: both_nominated(a, b))
    assert same_path(a, b)
    assert a.agent.state is b.agent.state is IceState.COMPLETED
    assert a.of(PairValid) and a.of(Nominated) and b.of(Nominated)
    pair = a.agent.selected_pair
    assert (
        pair is not None
        and pair.path_type is CandidateType.HOST
        and pair.rtt == pytest.approx(0.02)
    )
    assert net.now < 0.2  # one Ta and one round trip or two, no waiting on timers
    assert a.agent.controlling and not b.agent.controlling


@pytest.mark.parametrize("seed", range(8))
def test_pair_reaches_nomination_through_a_lossy_network(seed: int) -> None:
    net, a, b = pair_up(seed, loss=0.3, dup=0.2, reorder=0.3, delay=0.02, jitter=0.03)
    # Two host addresses on one side, so there is a choice to agree on.
    extra = host_candidate(("192.0.2.11", 5001), 65000)
    a.hosts.append(extra.addr)
    net._owner[extra.addr[0]] = a
    a.agent.add_local_candidate(extra)
    b.agent.add_remote_candidate(Candidate.from_sdp_untrusted(extra.to_sdp()))
    assert net.run(60.0, lambda: both_nominated(a, b) and same_path(a, b))
    assert len(a.of(Nominated)) == 1
    assert net.dropped > 0
    # Duplicates and reordering never produce a second, different nomination.
    net.run(net.now + 20.0)
    assert same_path(a, b)
    assert not a.of(Failed) and not b.of(Failed)


@pytest.mark.parametrize("both_controlling", [True, False])
def test_role_conflict_is_resolved(both_controlling: bool) -> None:
    net = SimNet(3, loss=0.1)
    a = IcePeer("a", [("192.0.2.1", 5000)], controlling=both_controlling, seed=10)
    b = IcePeer("b", [("192.0.2.2", 6000)], controlling=both_controlling, seed=11)
    net.add(a)
    net.add(b)
    introduce(a, b)
    assert net.run(30.0, lambda: both_nominated(a, b))
    assert a.agent.controlling != b.agent.controlling
    assert same_path(a, b)
    switched = a if a.of(RoleChanged) else b
    assert switched.of(RoleChanged)
    # §7.3.1.1: the larger tie-breaker keeps (or takes) the controlling role.
    winner = a if a.agent.tie_breaker >= b.agent.tie_breaker else b
    assert winner.agent.controlling


def test_checks_before_the_peer_knows_our_credentials() -> None:
    """The controlled side learns of the peer late (its con_resp is slow): the first checks
    arrive first, are answered, and become peer-reflexive candidates and triggered checks."""
    net = SimNet(4)
    a = IcePeer("a", [("192.0.2.1", 5000)], controlling=True, seed=20)
    b = IcePeer("b", [("192.0.2.2", 6000)], controlling=False, seed=21)
    net.add(a)
    net.add(b)
    a.agent.set_remote_credentials(b.agent.local_ufrag, b.agent.local_pwd)
    for line in candidates_to_sdp(b.agent.local_candidates):
        a.agent.add_remote_candidate(Candidate.from_sdp_untrusted(line))
    net.run(0.5)
    assert b.agent.remote_candidates and b.agent.remote_candidates[0].type is CandidateType.PRFLX
    assert a.agent.valid_pairs()  # b answered without knowing a's password
    b.agent.set_remote_credentials(a.agent.local_ufrag, a.agent.local_pwd)
    for line in candidates_to_sdp(a.agent.local_candidates):
        b.agent.add_remote_candidate(Candidate.from_sdp_untrusted(line))
    assert b.agent.remote_candidates[0].type is CandidateType.HOST  # signalling corrects it
    assert net.run(10.0, lambda: both_nominated(a, b))
    assert same_path(a, b)


def test_nat_endpoint_independent_both_sides_gives_srflx_path() -> None:
    net = SimNet(5, delay=0.01)
    net.add_nat(Nat("203.0.113.1", "10.1."))
    net.add_nat(Nat("203.0.113.2", "10.2."))
    net.add(StunServer(STUN_SERVER))
    a = IcePeer("a", [("10.1.0.2", 5000)], controlling=True, seed=30)
    b = IcePeer("b", [("10.2.0.2", 6000)], controlling=False, seed=31)
    for peer in (a, b):
        peer.gatherer = SrflxGatherer(rng=peer.rng)
        peer.gatherer.add(peer.host_candidates[0], STUN_SERVER, 0.0)
        net.add(peer)
    assert net.run(2.0, lambda: bool(a.srflx and b.srflx))
    assert a.srflx[0].addr == ("203.0.113.1", 5000)  # port preserving
    introduce(a, b)
    assert net.run(60.0, lambda: both_nominated(a, b))
    assert same_path(a, b)
    pair = a.agent.selected_pair
    assert pair is not None and pair.path_type is CandidateType.SRFLX
    assert pair.remote.addr == ("203.0.113.2", 6000)


def test_symmetric_nat_against_full_cone_learns_peer_reflexive() -> None:
    net = SimNet(6, delay=0.01)
    net.add_nat(Nat("203.0.113.1", "10.1.", symmetric=True))
    net.add_nat(Nat("203.0.113.2", "10.2.", filtering=False))
    net.add(StunServer(STUN_SERVER))
    a = IcePeer("a", [("10.1.0.2", 5000)], controlling=True, seed=40)
    b = IcePeer("b", [("10.2.0.2", 6000)], controlling=False, seed=41)
    for peer in (a, b):
        peer.gatherer = SrflxGatherer(rng=peer.rng)
        peer.gatherer.add(peer.host_candidates[0], STUN_SERVER, 0.0)
        net.add(peer)
    assert net.run(2.0, lambda: bool(a.srflx and b.srflx))
    introduce(a, b)
    assert net.run(60.0, lambda: both_nominated(a, b))
    assert same_path(a, b)
    pb = b.agent.selected_pair
    pa = a.agent.selected_pair
    assert pb is not None and pb.remote.type is CandidateType.PRFLX  # §7.3.1.3
    assert pa is not None and pa.mapped is not None and pa.mapped.type is CandidateType.PRFLX
    assert pa.path_type is CandidateType.PRFLX


def test_both_symmetric_without_relay_fails() -> None:
    net = SimNet(7, delay=0.01)
    net.add_nat(Nat("203.0.113.1", "10.1.", symmetric=True))
    net.add_nat(Nat("203.0.113.2", "10.2.", symmetric=True))
    net.add(StunServer(STUN_SERVER))
    a = IcePeer("a", [("10.1.0.2", 5000)], controlling=True, seed=50)
    b = IcePeer("b", [("10.2.0.2", 6000)], controlling=False, seed=51)
    for peer in (a, b):
        peer.gatherer = SrflxGatherer(rng=peer.rng)
        peer.gatherer.add(peer.host_candidates[0], STUN_SERVER, 0.0)
        net.add(peer)
    assert net.run(2.0, lambda: bool(a.srflx and b.srflx))
    introduce(a, b)
    assert net.run(120.0, lambda: bool(a.of(Failed) and b.of(Failed)))
    assert a.agent.state is IceState.FAILED and a.agent.next_deadline() is None
    assert not a.of(Nominated)


def test_path_dying_before_nomination_fails_cleanly() -> None:
    net, a, b = pair_up(13)
    assert net.run(1.0, lambda: bool(a.of(PairValid)))
    net.block("192.0.2.1", "192.0.2.2")  # the nomination check will never be answered
    # A late candidate that leads nowhere keeps a pair in progress past that failure.
    a.agent.add_remote_candidate(host_candidate(("192.0.2.200", 7000)))
    # SimNet raises if an agent keeps asking for a deadline it has already passed.
    assert net.run(200.0, lambda: bool(a.of(Failed) and b.of(Failed)))
    assert a.agent.next_deadline() is None and b.agent.next_deadline() is None
    assert not a.of(Nominated)


# --- Consent, failover, path upgrade (RFC 7675; the select hook) ---------------------------


def test_consent_keeps_a_live_path_and_detects_a_dead_one() -> None:
    net, a, b = pair_up(8, loss=0.1)
    assert net.run(10.0, lambda: both_nominated(a, b))
    start = net.now
    net.run(start + 120.0)
    assert not a.of(ConsentLost) and not b.of(ConsentLost)
    assert a.agent.stats["tx_consent"] >= 120 / 6  # every 4..6 s
    net.block("192.0.2.1", "192.0.2.2")
    cut = net.now
    assert net.run(cut + 60.0, lambda: bool(a.of(ConsentLost) and b.of(ConsentLost)))
    lost = a.of(ConsentLost)[0]
    assert lost.selected and a.agent.selected_pair is None
    assert CONSENT_TIMEOUT - 6.0 <= net.now - cut <= CONSENT_TIMEOUT + 0.5


def test_failover_to_the_next_pair_and_back_when_the_better_path_returns() -> None:
    net = SimNet(9, loss=0.05)
    # a has two addresses; the first (higher local preference) is the better path.
    a = IcePeer("a", [("192.0.2.1", 5000), ("192.0.2.9", 5000)], controlling=True, seed=60,
                consent_timeout=10.0, recheck_interval=5.0)  # fmt: skip
    b = IcePeer("b", [("192.0.2.2", 6000)], controlling=False, seed=61,
                consent_timeout=10.0, recheck_interval=5.0)  # fmt: skip
    for peer in (a, b):
        peer.auto_failover = True
        net.add(peer)
    introduce(a, b)
    assert net.run(10.0, lambda: both_nominated(a, b) and len(a.agent.valid_pairs()) == 2)
    best = a.agent.selected_pair
    assert best is not None and best.local.addr == ("192.0.2.1", 5000)
    net.block("192.0.2.1", "192.0.2.2")
    assert net.run(
        net.now + 30.0,
        lambda: (
            a.agent.selected_pair is not None
            and a.agent.selected_pair.local.addr == ("192.0.2.9", 5000)
            and b.agent.selected_pair is not None
            and b.agent.selected_pair.remote.addr == ("192.0.2.9", 5000)
        ),
    )
    assert any(e.selected for e in a.of(ConsentLost))
    net.unblock("192.0.2.1", "192.0.2.2")
    assert net.run(
        net.now + 30.0,
        lambda: (
            a.agent.selected_pair is best
            and b.agent.selected_pair is not None
            and b.agent.selected_pair.remote.addr == ("192.0.2.1", 5000)
        ),
    )
    assert a.of(BetterPairValid)
    assert same_path(a, b)


# --- The trust boundary --------------------------------------------------------------------


def _agent_with_peer() -> tuple[IceAgent, IcePeer]:
    net, a, b = pair_up(12)
    assert net.run(5.0, lambda: both_nominated(a, b))
    return b.agent, a


def test_malformed_and_unauthenticated_stun_is_counted_and_ignored() -> None:
    agent, peer = _agent_with_peer()
    base = agent.local_candidates[0].addr
    src = peer.agent.local_candidates[0].addr
    now = 10.0
    stats_before = agent.stats.copy()
    tid = b"\x01" * 12
    good_user = f"{agent.local_ufrag}:{peer.agent.local_ufrag}"
    key = stun.short_term_key(agent.local_pwd)

    def request(**kw: Any) -> Message:
        fields: dict[str, Any] = {"priority": 1, "ice_controlling": 1}
        fields.update(kw)
        return Message(Method.BINDING, Class.REQUEST, tid, **fields)

    junk = [
        b"",
        b"\x00",
        b"\x00\x01\x00\x00" + b"\x00" * 16,  # wrong magic cookie
        stun.encode(request(username=good_user)),  # no MESSAGE-INTEGRITY
        stun.encode(request(), key=key),  # no USERNAME
        stun.encode(request(username=good_user), key=b"wrong password"),
        stun.encode(request(username=f"nobody:{peer.agent.local_ufrag}"), key=key),
        stun.encode(request(username=f"{agent.local_ufrag}:stranger"), key=key),
        stun.encode(stun.success_response(request(), xor_mapped_address=src)),  # stray
        stun.encode(Message(Method.ALLOCATE, Class.REQUEST, tid)),
    ]
    for data in junk:
        agent.receive(data, base, src, now)
    agent.receive(stun.encode(request(username=good_user), key=key), ("9.9.9.9", 1), src, now)
    assert agent.datagrams_to_send() == []
    assert agent.next_event() is None
    diff = agent.stats - stats_before
    assert diff["rx"] == len(junk) + 1
    assert diff["drop_malformed"] == 3
    assert diff["drop_unauthenticated"] == 2
    assert diff["drop_bad_integrity"] == 1
    assert diff["drop_bad_username"] == 2
    assert diff["drop_stray_response"] == 1
    assert diff["drop_method"] == 1
    assert diff["drop_unknown_base"] == 1


def test_authenticated_request_with_unknown_required_attribute_gets_420() -> None:
    agent, peer = _agent_with_peer()
    base = agent.local_candidates[0].addr
    src = peer.agent.local_candidates[0].addr
    msg = Message(
        Method.BINDING,
        Class.REQUEST,
        b"\x02" * 12,
        username=f"{agent.local_ufrag}:{peer.agent.local_ufrag}",
        priority=1,
    )
    # Append an unknown comprehension-required attribute (0x7777), then sign by hand
    # (MESSAGE-INTEGRITY over what precedes it, header length adjusted).
    body = stun.encode(msg, fingerprint=False)[stun.HEADER_SIZE :]
    body += stun.ATTR_HEADER.pack(0x7777, 4) + b"abcd"
    key = stun.short_term_key(agent.local_pwd)
    mac_head = stun.HEADER.pack(0x0001, len(body) + 24, stun.MAGIC_COOKIE, msg.transaction_id)
    mac = hmac.new(key, mac_head + body, hashlib.sha1).digest()
    body += stun.ATTR_HEADER.pack(stun.Attr.MESSAGE_INTEGRITY, 20) + mac
    raw = stun.HEADER.pack(0x0001, len(body), stun.MAGIC_COOKIE, msg.transaction_id) + body
    agent.receive(raw, base, src, 20.0)
    (out,) = agent.datagrams_to_send()
    reply = stun.parse_untrusted(out[2])
    assert reply.cls is Class.ERROR and reply.error_code is not None
    assert reply.error_code.code == 420 and reply.unknown_attributes == (0x7777,)
    assert stun.verify_integrity(reply, key)


_FUZZ_AGENT: dict[str, Any] = {}


def _fuzz_target() -> tuple[IceAgent, IcePeer, bytes]:
    if not _FUZZ_AGENT:
        agent, peer = _agent_with_peer()
        msg = Message(
            Method.BINDING,
            Class.REQUEST,
            b"\x03" * 12,
            username=f"{agent.local_ufrag}:{peer.agent.local_ufrag}",
            priority=123,
            ice_controlling=5,
            use_candidate=True,
        )
        valid = stun.encode(msg, key=stun.short_term_key(agent.local_pwd))
        _FUZZ_AGENT.update(agent=agent, peer=peer, valid=valid)
    return _FUZZ_AGENT["agent"], _FUZZ_AGENT["peer"], _FUZZ_AGENT["valid"]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200), st.integers(0, 400), st.integers(0, 255), st.booleans())
def test_agent_receive_never_raises(junk: bytes, pos: int, byte: int, mutate: bool) -> None:
    agent, peer, valid = _fuzz_target()
    base = agent.local_candidates[0].addr
    src = peer.agent.local_candidates[0].addr
    data = junk
    if mutate:
        buf = bytearray(valid)
        buf[pos % len(buf)] = byte
        data = bytes(buf)
    agent.receive(data, base, src, 30.0)
    agent.receive(data, base, ("192.0.2.77", 9), 30.0)
    agent.handle_timeout(30.0)
    agent.datagrams_to_send()
    while agent.next_event() is not None:
        pass


# --- The gatherer ---------------------------------------------------------------------------


def test_gatherer_finds_srflx_and_times_out_per_rfc_schedule() -> None:
    host = host_candidate(("10.1.0.2", 5000))
    g = SrflxGatherer(rng=random.Random(1))
    g.add(host, STUN_SERVER, 0.0)
    g.add(host, ("198.51.100.2", 3478), 0.0)
    out = g.datagrams_to_send()
    assert [(b, s) for b, s, _ in out] == [
        (host.addr, STUN_SERVER),
        (host.addr, ("198.51.100.2", 3478)),
    ]
    request = stun.parse_untrusted(out[0][2])
    reply = stun.encode(stun.success_response(request, xor_mapped_address=("203.0.113.1", 40000)))
    with pytest.raises(BadPacket):
        g.receive_untrusted(reply, host.addr, ("198.51.100.66", 3478), 0.05)  # wrong server
    g.receive_untrusted(reply, host.addr, STUN_SERVER, 0.05)
    found = g.next_event()
    assert isinstance(found, SrflxFound)
    assert found.candidate.addr == ("203.0.113.1", 40000)
    assert found.candidate.type is CandidateType.SRFLX and found.candidate.base == host.addr
    assert found.candidate.related_address == "10.1.0.2"
    with pytest.raises(BadPacket):
        g.receive_untrusted(reply, host.addr, STUN_SERVER, 0.06)  # no longer pending
    sends = []
    now = 0.0
    while (deadline := g.next_deadline()) is not None:
        now = deadline
        g.handle_timeout(now)
        sends += [now] * len(g.datagrams_to_send())
    assert sends == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]  # RFC 8489 §6.2.1, Rc = 7
    assert now == pytest.approx(39.5)
    failed = g.next_event()
    assert isinstance(failed, GatherFailed) and g.done
