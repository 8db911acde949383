"""The controller's decisions, fed events and a clock (no sockets): who sends the con_req,
one link per pair, leaves, the cap, and refusing what does not verify."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from ipop_trio.config import SignallingConfig
from ipop_trio.control.controller import RESPONDER_GRACE, Controller
from ipop_trio.proto import signalling as sig
from ipop_trio.proto.cert import Identity
from ipop_trio.proto.link import LinkState
from ipop_trio.signalling.client import Connected, Disconnected

from . import _lab_identities as ids


@dataclass
class FakeLink:
    state: LinkState = LinkState.IDLE


@dataclass
class FakeRuntime:
    identity: Identity
    endpoint: tuple[str, int] | None
    initiate: bool
    learned: str = "signalling"
    failures: int = 0
    link: FakeLink = field(default_factory=FakeLink)

    @property
    def setup(self) -> Any:
        return self

    @property
    def public_key(self) -> bytes:
        return self.identity.public_key


class FakeLinks:
    def __init__(self) -> None:
        self.rts: dict[bytes, FakeRuntime] = {}
        self.admit_unknown: Any = None
        self.removed: list[tuple[bytes, str]] = []

    def get(self, key: bytes) -> Any:
        return self.rts.get(key)

    def learned(self) -> list[Any]:
        return [r for r in self.rts.values() if r.learned == "signalling"]

    def add(self, identity: Identity, endpoint: tuple[str, int] | None, initiate: bool) -> None:
        assert identity.public_key not in self.rts
        self.rts[identity.public_key] = FakeRuntime(identity, endpoint, initiate)

    def remove(self, key: bytes, why: str) -> None:
        del self.rts[key]
        self.removed.append((key, why))

    def set_endpoint(self, key: bytes, endpoint: tuple[str, int]) -> None:
        self.rts[key].endpoint = endpoint


class FakeClient:
    def __init__(self) -> None:
        self.sent: list[sig.Message] = []

    def send(self, msg: sig.Message) -> bool:
        self.sent.append(msg)
        return True


def make(node: ids.Node, max_links: int = 32) -> tuple[Controller, FakeLinks, FakeClient]:
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
    from ipop_trio.control.policy import SecurityPolicy, advertise, decide

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
