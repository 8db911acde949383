"""The controller's decisions, fed events and a clock (no sockets): who sends the con_req,
one link per pair, leaves, the cap, and refusing what does not verify; with ICE, the
credential rules of the module docstring (first exchange, retransmissions, restarts by
either side or both at once, stale answers, bad candidate lines, peers without ICE)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import pytest

from ipop_trio.config import SignallingConfig
from ipop_trio.control.controller import (
    CON_RESP_BURST,
    REFRESH_AFTER_FAILURES,
    REQUEST_RETRY_MIN,
    RESPONDER_GRACE,
    Controller,
)
from ipop_trio.control.links import Learned
from ipop_trio.proto import signalling as sig
from ipop_trio.proto.cert import Identity
from ipop_trio.proto.ice import Candidate, candidates_to_sdp, host_candidate
from ipop_trio.proto.link import LinkState
from ipop_trio.proto.signalling import Connected, Disconnected

from . import _lab_identities as ids


@dataclass
class FakeLink:
    state: LinkState = LinkState.IDLE


@dataclass
class FakeRuntime:
    identity: Identity
    endpoint: tuple[str, int] | None
    initiate: bool
    learned: Learned = Learned.SIGNALLING
    failures: int = 0
    link: FakeLink = field(default_factory=FakeLink)
    ice_restart: bool = False
    # (local ufrag, remote ufrag) of the running ICE agent, as `Links.ice_creds` reports it
    ice_running: tuple[str, str] | None = None

    @property
    def key(self) -> bytes:
        return self.identity.public_key

    @property
    def established(self) -> bool:
        return self.link.state is LinkState.ESTABLISHED


@dataclass(frozen=True)
class Started:
    """One `start_ice` call."""

    key: bytes
    local: tuple[str, str]
    remote: tuple[str, str]
    candidates: list[Candidate]
    controlling: bool


class FakeLinks:
    def __init__(self) -> None:
        self.rts: dict[bytes, FakeRuntime] = {}
        self.removed: list[tuple[bytes, str]] = []
        self.started: list[Started] = []
        self.added_candidates: list[tuple[bytes, list[Candidate]]] = []

    def get(self, key: bytes) -> Any:
        return self.rts.get(key)

    def learned(self) -> list[Any]:
        return [r for r in self.rts.values() if r.learned is Learned.SIGNALLING]

    def add(self, identity: Identity, endpoint: tuple[str, int] | None, initiate: bool) -> None:
        assert identity.public_key not in self.rts
        self.rts[identity.public_key] = FakeRuntime(identity, endpoint, initiate)

    def remove(self, key: bytes, why: str) -> None:
        del self.rts[key]
        self.removed.append((key, why))

    def set_endpoint(self, key: bytes, endpoint: tuple[str, int]) -> None:
        self.rts[key].endpoint = endpoint

    def ice_creds(self, key: bytes) -> tuple[str, str | None] | None:
        rt = self.rts.get(key)
        return None if rt is None else rt.ice_running

    def start_ice(
        self,
        key: bytes,
        local: tuple[str, str],
        remote: tuple[str, str],
        candidates: list[Candidate],
        controlling: bool,
    ) -> None:
        self.started.append(Started(key, local, remote, candidates, controlling))
        rt = self.rts[key]
        rt.ice_running = (local[0], remote[0])
        rt.ice_restart = False  # as LinkManager.start_ice: the restart is done

    def add_ice_candidates(self, key: bytes, candidates: list[Candidate]) -> None:
        self.added_candidates.append((key, candidates))


class FakeClient:
    def __init__(self) -> None:
        self.sent: list[sig.Message] = []

    def send(self, msg: sig.Message) -> bool:
        self.sent.append(msg)
        return True


OUR_CANDIDATES = [host_candidate(("192.0.2.1", 4600))]
OUR_LINES = tuple(candidates_to_sdp(OUR_CANDIDATES))


@dataclass
class FakeIce:
    """The node's ICE service as the controller sees it."""

    ready: bool = True

    def local_candidates(self) -> list[Candidate]:
        return list(OUR_CANDIDATES)


def make(
    node: ids.Node, max_links: int = 32, ice: FakeIce | None = None
) -> tuple[Controller, FakeLinks, FakeClient]:
    links, client = FakeLinks(), FakeClient()
    ident = node.bundle.identity
    ctl = Controller(
        own_key=node.public_key,
        cert_der=node.bundle.cert_der,
        groups=ident.groups,
        policy="always",
        overlay=ident.overlay,
        anchor=node.local.anchor,
        links=links,
        client=client,
        config=SignallingConfig(url="ws://192.0.2.1:8765/", ca=None, max_links=max_links),
        udp_port=4600,
        listen_host="0.0.0.0",
        wall=lambda: ids.NOW,
        ice=ice,
    )
    return ctl, links, client


def member(node: ids.Node) -> sig.Member:
    i = node.bundle.identity
    return sig.Member(node.public_key, i.name, str(i.address))


def connected(node: ids.Node, *others: ids.Node) -> Connected:
    welcome = sig.Welcome("lab", member(node), tuple(member(o) for o in others))
    return Connected(welcome, "192.0.2.10")


def ordered() -> tuple[ids.Node, ids.Node]:
    a, b = ids.alice(), ids.bob()
    return (a, b) if a.public_key < b.public_key else (b, a)


def deliver(msg: sig.Message, to: Controller, now: float) -> None:
    assert isinstance(msg, sig.ConReq | sig.ConResp)
    to.handle_event(msg, now)


def test_the_lower_key_asks_the_higher_answers_one_link_each_side() -> None:
    low, high = ordered()
    c_low, l_low, s_low = make(low)
    c_high, l_high, s_high = make(high)
    c_low.handle_event(connected(low, high), 0.0)
    c_high.handle_event(connected(high, low), 0.0)
    assert [type(m) for m in s_low.sent] == [sig.ConReq] and s_high.sent == []
    req = s_low.sent[0]
    assert isinstance(req, sig.ConReq)
    assert req.candidates == (sig.Candidate("host", "192.0.2.10", 4600),)
    deliver(req, c_high, 0.1)
    resp = s_high.sent[-1]
    assert isinstance(resp, sig.ConResp) and resp.request_id == req.request_id
    deliver(resp, c_low, 0.2)
    assert l_low.rts[high.public_key].initiate and not l_high.rts[low.public_key].initiate
    assert l_low.rts[high.public_key].endpoint == ("192.0.2.10", 4600)
    # Nothing more is asked while the links exist.
    c_low.tick(100.0)
    c_high.tick(100.0)
    assert len(s_low.sent) == 1 and len(s_high.sent) == 1


def test_crossed_requests_still_make_one_link_per_side() -> None:
    low, high = ordered()
    c_low, l_low, s_low = make(low)
    c_high, l_high, s_high = make(high)
    c_low.handle_event(connected(low, high), 0.0)
    c_high.handle_event(connected(high, low), 0.0)
    c_high.tick(RESPONDER_GRACE + 0.1)  # the low key's request was lost: the high asks too
    req_high = s_high.sent[-1]
    assert isinstance(req_high, sig.ConReq)
    deliver(s_low.sent[0], c_high, 4.0)
    deliver(req_high, c_low, 4.0)
    deliver(s_high.sent[-1], c_low, 4.1)
    deliver(s_low.sent[-1], c_high, 4.1)
    assert list(l_low.rts) == [high.public_key] and list(l_high.rts) == [low.public_key]
    assert l_low.rts[high.public_key].initiate and not l_high.rts[low.public_key].initiate


def test_a_leave_removes_the_link_and_a_server_outage_does_not() -> None:
    low, high = ordered()
    c_low, l_low, s_low = make(low)
    c_low.handle_event(connected(low, high), 0.0)
    c_high, _, s_high = make(high)
    c_high.handle_event(connected(high, low), 0.0)
    deliver(s_low.sent[0], c_high, 0.1)
    deliver(s_high.sent[-1], c_low, 0.2)
    l_low.rts[high.public_key].link.state = LinkState.ESTABLISHED
    c_low.handle_event(Disconnected("server gone"), 1.0)
    c_low.handle_event(connected(low), 5.0)  # back, but high has not reconnected yet
    assert high.public_key in l_low.rts  # established: kept
    c_low.handle_event(sig.Join(member(high)), 6.0)
    c_low.handle_event(sig.Leave(high.public_key, "bob"), 7.0)
    assert l_low.removed == [(high.public_key, "left the overlay")]


def test_a_con_req_with_a_foreign_or_mismatched_certificate_is_ignored() -> None:
    low, high = ordered()
    c_high, l_high, s_high = make(high)
    c_high.handle_event(connected(high, low), 0.0)
    mallory = ids.node("mallory", "10.77.0.9", authority=ids.ca(tag="evil"))
    base: dict[str, Any] = dict(
        to=high.public_key,
        overlay="lab",
        request_id="r1",
        candidates=(),
        groups=(),
        policy="always",
    )
    c_high.handle_event(
        sig.ConReq(sender=mallory.public_key, cert=mallory.bundle.cert_der, **base), 1.0
    )
    # A valid certificate, but not the key the message claims to come from.
    c_high.handle_event(
        sig.ConReq(sender=secrets.token_bytes(32), cert=low.bundle.cert_der, **base), 1.0
    )
    assert l_high.rts == {} and s_high.sent == []
    assert c_high.counters == {"con_refused_certificate": 1, "con_refused_mismatch": 1}


def test_max_links_caps_the_mesh() -> None:
    me = ids.alice()
    others = [ids.node(f"p{i}", f"10.77.0.{20 + i}") for i in range(6)]
    ctl, _links, client = make(me, max_links=2)
    ctl.handle_event(connected(me, *others), 0.0)
    ctl.tick(RESPONDER_GRACE + 1)
    asked = {m.to for m in client.sent if isinstance(m, sig.ConReq)}
    assert len(asked) == 2 and asked == set(ctl.desired())


def test_groups_claimed_in_signalling_never_reach_the_mode_decision() -> None:
    """Issue 5: carol is certified {ops}; her con_req claims {eng}. The link is set up with
    her *certified* identity, so with security=groups an {eng} node still finds no common
    group (plain), exactly as if she had claimed nothing."""
    from ipop_trio.proto.policy import SecurityPolicy, advertise, decide

    alice, carol = ids.alice(), ids.carol()
    ctl, links, _ = make(alice)
    ctl.handle_event(connected(alice, carol), 0.0)
    claim = sig.ConReq(
        sender=carol.public_key,
        to=alice.public_key,
        overlay="lab",
        request_id="r9",
        candidates=(),
        cert=carol.bundle.cert_der,
        groups=("eng",),  # not in her certificate
        policy="groups",
    )
    ctl.handle_event(claim, 1.0)
    rt = links.rts[carol.public_key]
    assert rt.identity.groups == frozenset({"ops"})
    # What the link decides from (the handshake's claims and the certified groups):
    handshake_ext = advertise(SecurityPolicy.GROUPS, frozenset({"eng"}))  # she claims it there too
    d = decide(SecurityPolicy.GROUPS, frozenset({"eng"}), handshake_ext, rt.identity.groups)
    assert not d.secure and d.reason == "no common group"


# --- ICE: credentials, restarts and offers (the rules in controller.py's docstring) -------


@dataclass
class Side:
    node: ids.Node
    ctl: Controller
    links: FakeLinks
    client: FakeClient
    ice: FakeIce

    @property
    def key(self) -> bytes:
        return self.node.public_key

    def reqs(self) -> list[sig.ConReq]:
        return [m for m in self.client.sent if isinstance(m, sig.ConReq)]

    def resps(self) -> list[sig.ConResp]:
        return [m for m in self.client.sent if isinstance(m, sig.ConResp)]


def ice_pair(ready: bool = True) -> tuple[Side, Side]:
    """Two ICE-enabled controllers (lower key first), connected to the server at 0.0."""
    sides = []
    for node in ordered():
        ice = FakeIce(ready)
        ctl, links, client = make(node, ice=ice)
        sides.append(Side(node, ctl, links, client, ice))
    lo, hi = sides
    lo.ctl.handle_event(connected(lo.node, hi.node), 0.0)
    hi.ctl.handle_event(connected(hi.node, lo.node), 0.0)
    return lo, hi


def offer(msg: sig.Message) -> sig.IceOffer:
    """The IceOffer of a con message, which must carry all our candidates."""
    assert isinstance(msg, sig.ConReq | sig.ConResp)
    assert msg.ice is not None and msg.ice.candidates == OUR_LINES
    return msg.ice


def creds(o: sig.IceOffer) -> tuple[str, str]:
    return (o.ufrag, o.pwd)


def parsed(lines: tuple[str, ...]) -> list[Candidate]:
    return [Candidate.from_sdp_untrusted(line) for line in lines]


def con(
    kind: type[sig.ConReq] | type[sig.ConResp],
    frm: ids.Node,
    to: ids.Node,
    request_id: str,
    ice: sig.IceOffer | None,
    candidates: tuple[sig.Candidate, ...] = (),
) -> sig.ConReq | sig.ConResp:
    """A con_req / con_resp made by hand, with `frm`'s valid certificate."""
    return kind(
        sender=frm.public_key,
        to=to.public_key,
        overlay="lab",
        request_id=request_id,
        candidates=candidates,
        cert=frm.bundle.cert_der,
        groups=(),
        policy="always",
        ice=ice,
    )


def first_exchange(lo: Side, hi: Side) -> None:
    """Deliver the lower key's con_req and the answer: ICE runs on both sides."""
    deliver(lo.reqs()[-1], hi.ctl, 0.1)
    deliver(hi.resps()[-1], lo.ctl, 0.2)
    assert len(lo.links.started) == 1 and len(hi.links.started) == 1


def test_ice_con_reqs_wait_for_gathering_and_every_con_message_carries_our_offer() -> None:
    lo, hi = ice_pair(ready=False)
    lo.ctl.tick(1.0)
    hi.ctl.tick(RESPONDER_GRACE + 1.0)  # even the higher key's fallback request waits
    assert lo.client.sent == [] and hi.client.sent == []
    lo.ice.ready = hi.ice.ready = True
    lo.ctl.tick(1.5)
    [req] = lo.client.sent
    assert isinstance(req, sig.ConReq) and req.to == hi.key
    o_req = offer(req)
    deliver(req, hi.ctl, 1.6)
    [resp] = hi.client.sent
    assert isinstance(resp, sig.ConResp) and resp.request_id == req.request_id
    o_resp = offer(resp)
    # Credentials are per side: each its own ufrag and pwd.
    assert o_req.ufrag != o_resp.ufrag and o_req.pwd != o_resp.pwd


def test_ice_the_first_exchange_starts_ice_on_both_sides_with_matching_credentials() -> None:
    lo, hi = ice_pair()
    [req] = lo.reqs()
    deliver(req, hi.ctl, 0.1)
    [resp] = hi.resps()
    deliver(resp, lo.ctl, 0.2)
    [s_lo], [s_hi] = lo.links.started, hi.links.started
    assert s_lo.key == hi.key and s_hi.key == lo.key
    assert s_lo.local == creds(offer(req)) and s_lo.remote == creds(offer(resp))
    assert s_hi.local == s_lo.remote and s_hi.remote == s_lo.local
    assert s_lo.controlling and not s_hi.controlling  # the lower key controls
    assert s_lo.candidates == parsed(OUR_LINES) and s_hi.candidates == parsed(OUR_LINES)
    # ICE finds the path: the host candidate of the con message is not the endpoint.
    assert lo.links.rts[hi.key].endpoint is None and hi.links.rts[lo.key].endpoint is None
    # Nothing more is asked or started while the agents run.
    lo.ctl.tick(100.0)
    hi.ctl.tick(100.0)
    assert len(lo.client.sent) == 1 and len(hi.client.sent) == 1
    assert len(lo.links.started) == 1 and len(hi.links.started) == 1
    assert lo.ctl.counters == {} and hi.ctl.counters == {}


def test_ice_a_retransmitted_con_req_only_adds_candidates_and_only_the_latest_answer_counts() -> (
    None
):
    lo, hi = ice_pair()
    lo.ctl.tick(REQUEST_RETRY_MIN)  # no answer yet: the con_req goes again
    req1, req2 = lo.reqs()
    assert req1.request_id != req2.request_id
    assert creds(offer(req1)) == creds(offer(req2))  # same credentials: not a restart
    deliver(req1, hi.ctl, 2.1)
    deliver(req2, hi.ctl, 2.2)
    assert len(hi.links.started) == 1
    assert hi.links.added_candidates == [(lo.key, parsed(OUR_LINES))]
    resp1, resp2 = hi.resps()
    assert creds(offer(resp1)) == creds(offer(resp2))
    assert [resp1.request_id, resp2.request_id] == [req1.request_id, req2.request_id]
    deliver(resp1, lo.ctl, 2.3)  # answers a con_req that is no longer our latest
    assert lo.links.started == [] and lo.ctl.counters == {"ice_stale_con_resp": 1}
    deliver(resp2, lo.ctl, 2.4)
    [s_lo] = lo.links.started
    assert s_lo.local == creds(offer(req2)) and s_lo.remote == creds(offer(resp2))
    assert hi.ctl.counters == {}


def test_ice_a_stale_con_resp_is_ignored_and_counted() -> None:
    lo, hi = ice_pair()
    first_exchange(lo, hi)
    running = lo.links.rts[hi.key].ice_running
    other = sig.IceOffer("Stale123", "s" * 22, OUR_LINES)
    lo.ctl.handle_event(con(sig.ConResp, hi.node, lo.node, "not-ours", other), 1.0)
    assert len(lo.links.started) == 1 and lo.links.added_candidates == []
    assert lo.links.rts[hi.key].ice_running == running
    assert lo.ctl.counters == {"ice_stale_con_resp": 1}
    assert len(lo.client.sent) == 1  # a con_resp is never answered


def test_ice_a_peer_restart_makes_us_restart_with_fresh_credentials() -> None:
    lo, hi = ice_pair()
    first_exchange(lo, hi)
    h1 = hi.links.started[0].local
    # The lower key restarted ICE (say, its process): a con_req with a ufrag we never saw.
    restart = sig.IceOffer("Restart1", "r" * 22, OUR_LINES)
    hi.ctl.handle_event(con(sig.ConReq, lo.node, hi.node, "rr1", restart), 5.0)
    assert hi.ctl.counters == {"ice_restarted_by_peer": 1}
    s = hi.links.started[-1]
    assert len(hi.links.started) == 2
    assert s.local[0] != h1[0] and s.local[1] != h1[1]  # fresh credentials
    assert s.remote == creds(restart) and not s.controlling
    resp = hi.resps()[-1]
    assert resp.request_id == "rr1" and creds(offer(resp)) == s.local
    # The same request again (retransmitted): candidates only, the same answer.
    hi.ctl.handle_event(con(sig.ConReq, lo.node, hi.node, "rr2", restart), 6.0)
    assert len(hi.links.started) == 2 and hi.links.added_candidates[-1][0] == lo.key
    assert hi.ctl.counters == {"ice_restarted_by_peer": 1}
    assert creds(offer(hi.resps()[-1])) == s.local


def test_ice_our_restart_sends_fresh_credentials_and_retransmissions_keep_them() -> None:
    lo, hi = ice_pair()
    first_exchange(lo, hi)
    l1, h1 = lo.links.started[0].local, hi.links.started[0].local
    rt = lo.links.rts[hi.key]
    rt.link.state = LinkState.ESTABLISHED  # a restart does not wait for the link to fail
    rt.ice_restart = True  # the agent failed or lost its last path
    lo.ctl.tick(10.0)
    req1 = lo.reqs()[-1]
    l2 = creds(offer(req1))
    assert len(lo.reqs()) == 2 and l2[0] != l1[0] and l2[1] != l1[1]
    lo.ctl.tick(10.0 + REQUEST_RETRY_MIN / 2)  # not due yet
    assert len(lo.reqs()) == 2
    lo.ctl.tick(10.0 + REQUEST_RETRY_MIN)  # unanswered: again, with the same credentials
    req2 = lo.reqs()[-1]
    assert len(lo.reqs()) == 3 and req2.request_id != req1.request_id
    assert creds(offer(req2)) == l2
    deliver(req2, hi.ctl, 12.1)
    assert hi.ctl.counters == {"ice_restarted_by_peer": 1}
    s_hi = hi.links.started[-1]
    assert s_hi.remote == l2 and s_hi.local[0] != h1[0]
    deliver(hi.resps()[-1], lo.ctl, 12.2)
    s_lo = lo.links.started[-1]
    assert len(lo.links.started) == 2 and s_lo.local == l2 and s_lo.remote == s_hi.local
    assert s_lo.controlling and not rt.ice_restart
    # Done: no more requests, no more restarts.
    lo.ctl.tick(100.0)
    hi.ctl.tick(100.0)
    assert len(lo.reqs()) == 3 and len(hi.reqs()) == 0
    assert len(lo.links.started) == 2 and len(hi.links.started) == 2


@pytest.mark.parametrize("order", ["requests_first", "an_answer_overtakes_a_request"])
def test_ice_crossing_restarts_use_the_pending_credentials_and_do_not_loop(order: str) -> None:
    lo, hi = ice_pair()
    first_exchange(lo, hi)
    l1, h1 = lo.links.started[0].local, hi.links.started[0].local
    for side, peer in ((lo, hi), (hi, lo)):
        side.links.rts[peer.key].ice_restart = True
        side.ctl.tick(10.0)
    req_lo, req_hi = lo.reqs()[-1], hi.reqs()[-1]
    l2, h2 = creds(offer(req_lo)), creds(offer(req_hi))
    assert l2[0] != l1[0] and h2[0] != h1[0]
    if order == "requests_first":
        deliver(req_hi, lo.ctl, 10.1)
        deliver(req_lo, hi.ctl, 10.1)
        deliver(lo.resps()[-1], hi.ctl, 10.2)
        deliver(hi.resps()[-1], lo.ctl, 10.2)
    else:
        deliver(req_hi, lo.ctl, 10.1)
        deliver(lo.resps()[-1], hi.ctl, 10.2)  # hi restarts with the answer ...
        deliver(req_lo, hi.ctl, 10.3)  # ... then lo's request only adds candidates
        deliver(hi.resps()[-1], lo.ctl, 10.4)
    # Each side restarted once, with the credentials it had sent (not fresh ones).
    assert [s.local for s in lo.links.started] == [l1, l2]
    assert [s.remote for s in lo.links.started[1:]] == [h2]
    assert [s.local for s in hi.links.started] == [h1, h2]
    assert [s.remote for s in hi.links.started[1:]] == [l2]
    for side in (lo, hi):
        assert "ice_restarted_by_peer" not in side.ctl.counters
        assert creds(offer(side.resps()[-1])) == (l2 if side is lo else h2)
    # And nothing more: no new requests, no new agents.
    sent = (len(lo.client.sent), len(hi.client.sent))
    lo.ctl.tick(100.0)
    hi.ctl.tick(100.0)
    assert (len(lo.client.sent), len(hi.client.sent)) == sent
    assert len(lo.links.started) == 2 and len(hi.links.started) == 2


def test_ice_bad_candidate_lines_are_counted_and_the_good_ones_used() -> None:
    lo, hi = ice_pair()
    good = (
        "abc123 1 UDP 2130706431 198.51.100.7 4600 typ host",
        "def456 1 UDP 1694498815 203.0.113.9 40000 typ srflx raddr 198.51.100.7 rport 4600",
    )
    bad = (
        "garbage",
        "abc 1 TCP 2130706431 198.51.100.7 4600 typ host",  # not UDP
        "abc 1 UDP 2130706431 not-an-ip 4600 typ host",
        "abc 2 UDP 2130706431 198.51.100.7 4600 typ host",  # component 2
        "abc 1 UDP 2130706431 198.51.100.7 0 typ host",  # port 0
        "abc 1 UDP 2130706431 127.0.0.1 4600 typ host",  # nothing a peer is reached at
    )
    o = sig.IceOffer("Peer1234", "p" * 22, (bad[0], good[0], *bad[1:], good[1]))
    hi.ctl.handle_event(con(sig.ConReq, lo.node, hi.node, "r1", o), 1.0)
    assert hi.ctl.counters == {"ice_bad_candidate": len(bad)}
    [s] = hi.links.started
    assert s.candidates == parsed(good) and s.remote == creds(o)
    offer(hi.resps()[-1])


def test_ice_a_peer_without_ice_keeps_the_host_endpoint_and_starts_no_agent() -> None:
    lo, hi = ice_pair()
    host = (sig.Candidate("host", "198.51.100.7", 4600),)
    hi.ctl.handle_event(con(sig.ConReq, lo.node, hi.node, "r1", None, host), 1.0)
    rt = hi.links.rts[lo.key]
    assert rt.endpoint == ("198.51.100.7", 4600)
    assert hi.links.started == [] and hi.links.added_candidates == []
    assert hi.resps()[-1].request_id == "r1"  # answered (its "ice" field is ignored there)
    moved = (sig.Candidate("host", "198.51.100.8", 4601),)
    hi.ctl.handle_event(con(sig.ConReq, lo.node, hi.node, "r2", None, moved), 2.0)
    assert rt.endpoint == ("198.51.100.8", 4601) and hi.links.started == []
    assert hi.ctl.counters == {}


def test_without_our_ice_service_a_peer_offer_is_ignored() -> None:
    low, high = ordered()
    ctl, links, client = make(high)  # no ICE here
    ctl.handle_event(connected(high, low), 0.0)
    host = (sig.Candidate("host", "198.51.100.7", 4600),)
    o = sig.IceOffer("Peer1234", "p" * 22, OUR_LINES)
    ctl.handle_event(con(sig.ConReq, low, high, "r1", o, host), 1.0)
    assert links.rts[low.public_key].endpoint == ("198.51.100.7", 4600)
    assert links.started == []
    [resp] = client.sent
    assert isinstance(resp, sig.ConResp) and resp.ice is None


def test_ice_an_answered_refresh_is_not_followed_by_another_restart_at_once() -> None:
    lo, hi = ice_pair()
    first_exchange(lo, hi)
    rt = lo.links.rts[hi.key]
    rt.failures = REFRESH_AFTER_FAILURES  # the link keeps failing: ask for fresh candidates
    lo.ctl.tick(10.0)
    assert len(lo.reqs()) == 2
    deliver(lo.reqs()[-1], hi.ctl, 10.1)
    deliver(hi.resps()[-1], lo.ctl, 10.2)
    assert len(lo.links.started) == 2  # the refresh restarted ICE: the agents need time
    assert len(lo.reqs()) == 2, "another ICE restart right after the refresh was answered"


def test_a_replayed_or_flooded_con_req_gets_at_most_one_answer_per_id_and_a_budget() -> None:
    """Issue 13 item 6: each con_req must not buy a con_resp, or two hostile members push
    a victim over its signalling rate limit by reflection."""
    low, high = ordered()
    c_low, _, s_low = make(low)
    c_high, _, s_high = make(high)
    c_low.handle_event(connected(low, high), 0.0)
    c_high.handle_event(connected(high, low), 0.0)
    req = s_low.sent[0]
    assert isinstance(req, sig.ConReq)
    for i in range(5):
        deliver(req, c_high, 0.1 + i * 0.01)
    assert len(s_high.sent) == 1  # one answer for one request id
    assert c_high.counters.get("con_req_duplicate") == 4
    # Fresh ids, delivered faster than any honest retransmission: the budget runs out.
    for i in range(50):
        fresh = sig.ConReq(**{**_fields(req), "request_id": f"{i:016x}"})
        deliver(fresh, c_high, 0.2 + i * 0.001)
    assert len(s_high.sent) <= 1 + CON_RESP_BURST
    assert c_high.counters.get("con_resp_over_budget", 0) >= 50 - CON_RESP_BURST
    # The budget refills: an honest retransmission later is answered.
    later = sig.ConReq(**{**_fields(req), "request_id": "ffffffffffffffff"})
    before = len(s_high.sent)
    deliver(later, c_high, 100.0)
    assert len(s_high.sent) == before + 1


def _fields(msg: sig.ConReq) -> dict[str, Any]:
    return {f: getattr(msg, f) for f in msg.__dataclass_fields__}
