"""The controller: from signalling membership to the links a node should have.

    signalling client ──events──► Controller ──add_peer / remove_peer / set_endpoint──► links
          ▲                            │
          └──────── con_req / con_resp ┘

Topology: full mesh, capped at `max_links` links learned from signalling. When the cap bites,
each node prefers the peers whose pair hash SHA-256(min key || max key) is lowest: both ends
of a pair compute the same number, so their preferences mostly agree.

Meeting a peer (one link per pair, deterministically):
  * the node with the lower public key sends the con_req (its candidates, certificate,
    groups, policy); the other answers with a con_resp. Either message gives the receiver
    the sender's candidates, and it adds the link (or updates its endpoint).
  * if the higher node has heard no con_req RESPONDER_GRACE after learning of the peer (a
    lost message, a peer that joined while we were away), it sends one itself. When both
    requests cross, both are answered; links are keyed by peer key, so it is still one link.
  * the lower key starts the Noise handshake; the higher waits for it (it starts one itself
    only on its retry timer or when it has frames to send — the Link copes with both ends
    initiating at once).
  * an authenticated handshake initiation from a member we have no link for yet (its
    con_resp is still in flight) is admitted at once (`admit`).
Every certificate from signalling is verified against our own CA and must certify the key
the server says the message is from: the server is a rendezvous, never trusted for identity.
The link handshake then proves the key again.

ICE (RFC 8445, control/ice.py): every con_req / con_resp also carries our ICE credentials for
that peer and all our candidates (`IceOffer`); con_reqs wait until gathering is done, so a
peer gets every candidate at once. Receiving the peer's offer starts the link's ICE agent
(the lower key controls). Credentials are per peer and change only on an ICE restart:
  * we restart (the link's agent failed or lost its last path, or the link keeps failing)
    by sending a con_req with fresh credentials; the new agent starts with the answer;
  * a con_req with credentials we have not seen while our agent already knew the peer's is
    the peer restarting: we restart too (fresh credentials in the con_resp); if we had just
    restarted ourselves (crossing requests), our pending credentials are used, not new ones;
  * a con_resp counts only if it answers our latest con_req (a late one is ignored);
  * a con_req buys at most one con_resp: one answer per request id and a per-peer budget
    (CON_RESP_BURST, CON_RESP_RATE), so members cannot reflect con_reqs at a victim.

Tear-down: a peer that leaves (the server saw its connection end) is removed at once. While
the server is away nothing is removed; after a reconnect, a learned peer that is not a member
is removed only when its link is not established (so a server restart never interrupts a
working link). A member whose link keeps failing gets a fresh con_req (new candidates) on a
backoff, and the link task's own backoff retries the handshake. Nothing here raises into the
node: bad input from the server or a peer is logged and counted.

The decisions are synchronous methods fed `now` (`handle_event`, `tick`), so they are tested
without sockets; `serve` is the task around them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..config import SignallingConfig, endpoint_text
from ..errors import BadPacket, CertificateRefused
from ..proto import signalling as sig
from ..proto.cert import Identity, TrustAnchor
from ..proto.ice import Candidate, candidates_to_sdp, new_credentials
from .links import Learned

log = logging.getLogger("ipop_trio.controller")

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_RNG = random.SystemRandom()  # ICE credentials (RFC 8445 §5.3: unpredictable)
TICK = 1.0  # the controller looks at its timers at least this often
RESPONDER_GRACE = 3.0  # the higher key waits this long for the lower key's con_req
REQUEST_RETRY_MIN, REQUEST_RETRY_MAX = 2.0, 60.0  # con_req retransmission backoff
# con_resp answer budget per peer (token bucket): an honest peer retransmits every >= 2 s.
CON_RESP_BURST, CON_RESP_RATE = 4, 1.0  # answers, answers per second
REFRESH_AFTER_FAILURES = 2  # a member's link failed this often: ask for fresh candidates
# ... but at most this often per peer: an answered refresh restarts ICE, and the new agents
# need time to find a path before the link's failure count can tell anything again.
REFRESH_INTERVAL = 20.0
EVENT_QUEUE = 256  # client → controller events (full: the client waits)


class LinkView(Protocol):
    """What the controller reads of one link (control/links.py's PeerRuntime)."""

    learned: Learned
    failures: int  # handshakes failed or refused in a row
    ice_restart: bool  # its ICE agent found no path: it wants fresh candidates

    @property
    def key(self) -> bytes: ...
    @property
    def established(self) -> bool: ...


class Links(Protocol):
    """What the controller needs from the link manager (a fake in unit tests)."""

    def get(self, public_key: bytes) -> LinkView | None: ...
    def learned(self) -> Sequence[LinkView]: ...
    def add(
        self, identity: Identity, endpoint: tuple[str, int] | None, initiate: bool
    ) -> object: ...
    def remove(self, public_key: bytes, why: str) -> None: ...
    def set_endpoint(self, public_key: bytes, endpoint: tuple[str, int]) -> None: ...
    def ice_creds(self, public_key: bytes) -> tuple[str, str | None] | None: ...
    def start_ice(
        self,
        public_key: bytes,
        local: tuple[str, str],
        remote: tuple[str, str],
        candidates: list[Candidate],
        controlling: bool,
    ) -> None: ...
    def add_ice_candidates(self, public_key: bytes, candidates: list[Candidate]) -> None: ...


class IceSource(Protocol):
    """What the controller needs from the node's ICE service."""

    ready: bool

    def local_candidates(self) -> list[Candidate]: ...


class Sender(Protocol):
    def send(self, msg: sig.Message) -> bool: ...


@dataclass(slots=True)
class _Request:
    request_id: str
    next_at: float
    attempts: int


def pair_rank(a: bytes, b: bytes) -> bytes:
    """The same number for (a, b) and (b, a): which pairs to prefer under the link cap."""
    lo, hi = sorted((a, b))
    return hashlib.sha256(b"ipop-trio pair" + lo + hi).digest()


class Controller:
    def __init__(
        self,
        *,
        own_key: bytes,
        cert_der: bytes,
        groups: frozenset[str],
        policy: str,
        overlay: str,
        anchor: TrustAnchor,
        links: Links,
        client: Sender,
        config: SignallingConfig,
        udp_port: int,
        listen_host: str,
        wall: Callable[[], float] = time.time,
        ice: IceSource | None = None,
    ) -> None:
        self.own_key = own_key
        self.cert_der = cert_der
        self.groups = tuple(sorted(groups))
        # Informational for peers: the mode is decided from certified groups inside the
        # authenticated handshake, never from what signalling says (control/policy.py).
        self.policy = policy
        self.overlay = overlay
        self.anchor = anchor
        self.links = links
        self.client = client
        self.config = config
        self.udp_port = udp_port
        self.listen_host = listen_host
        self.wall = wall
        self.connected = False
        self.local_address: str | None = None
        self.members: dict[bytes, sig.Member] = {}
        self.first_seen: dict[bytes, float] = {}
        self.requests: dict[bytes, _Request] = {}
        self.counters: dict[str, int] = {}
        self.ice = ice
        self.ice_local: dict[bytes, tuple[str, str]] = {}  # our ICE credentials per peer
        self.ice_request: dict[bytes, str] = {}  # request_id of our latest con_req per peer
        self.refreshed_at: dict[bytes, float] = {}  # when a failing link last asked afresh
        # Reflection guard: the last con_req id answered per peer, and a token bucket per peer
        # (tokens, last refill): a con_req never buys more than one con_resp.
        self.answered: dict[bytes, str] = {}
        self.answer_budget: dict[bytes, tuple[float, float]] = {}

    def reconfigure(
        self,
        cert_der: bytes,
        groups: frozenset[str],
        policy: str,
        *,
        anchor: TrustAnchor | None = None,
    ) -> None:
        """A re-read certificate, groups and policy (SIGHUP): the next con_req/con_resp
        carry them; a re-read CA (bundle) checks the next ones received."""
        if anchor is not None:
            self.anchor = anchor
        self.cert_der = cert_der
        self.groups = tuple(sorted(groups))
        self.policy = policy

    # --- decisions (sync, fed `now`) ------------------------------------------------------

    def candidates(self) -> tuple[sig.Candidate, ...]:
        """Host candidates: configured, else the listen address, else the address we reach
        the signalling server from (ICE will add server-reflexive and relayed ones)."""
        if self.config.advertise:
            return tuple(sig.Candidate("host", e.host, e.port) for e in self.config.advertise)
        host: str | None = self.listen_host
        if host in ("0.0.0.0", "::"):
            host = self.local_address
        return (sig.Candidate("host", host, self.udp_port),) if host else ()

    def desired(self) -> list[bytes]:
        """Keys of the members we want links to (full mesh under the cap)."""
        keys = [k for k in self.members if k != self.own_key]
        if len(keys) > self.config.max_links:
            keys.sort(key=lambda k: pair_rank(self.own_key, k))
            keys = keys[: self.config.max_links]
        return keys

    def handle_event(self, ev: sig.ClientEvent, now: float) -> None:
        if isinstance(ev, sig.Connected):
            self.connected = True
            self.local_address = ev.local
            self.members = {m.key: m for m in ev.welcome.members if m.key != self.own_key}
            self.requests.clear()
            for key in self.members:
                self.first_seen.setdefault(key, now)
            self._prune(now)
        elif isinstance(ev, sig.Disconnected):
            self.connected = False
            self.requests.clear()
        elif isinstance(ev, sig.Join):
            if ev.member.key != self.own_key:
                self.members[ev.member.key] = ev.member
                self.first_seen[ev.member.key] = now
        elif isinstance(ev, sig.Leave):
            self.members.pop(ev.key, None)
            self.first_seen.pop(ev.key, None)
            self.answered.pop(ev.key, None)
            self.answer_budget.pop(ev.key, None)
            self.requests.pop(ev.key, None)
            self.ice_local.pop(ev.key, None)  # a rejoining peer starts ICE afresh
            self.ice_request.pop(ev.key, None)
            self.refreshed_at.pop(ev.key, None)
            rt = self.links.get(ev.key)
            if rt is not None and rt.learned is Learned.SIGNALLING:
                self.links.remove(ev.key, "left the overlay")
        elif isinstance(ev, sig.ConReq | sig.ConResp):
            self._on_con(ev, now)
        elif isinstance(ev, sig.Error):
            self._count(f"server_error_{ev.code}")
            for key, req in list(self.requests.items()):
                if req.request_id == ev.request_id:
                    del self.requests[key]
            log.info("signalling error %s: %s", ev.code, ev.reason)
        self.tick(now)

    def tick(self, now: float) -> None:
        """Send the con_reqs that are due; remove links the membership no longer supports."""
        self._prune(now)
        if not self.connected or (self.ice is not None and not self.ice.ready):
            return  # con_reqs wait for ICE gathering: one message with every candidate
        for key in self.desired():
            rt = self.links.get(key)
            if rt is not None and not self._wants_refresh(rt, key, now):
                self.requests.pop(key, None)
                continue
            waited = now - self.first_seen.get(key, now)
            if rt is None and key < self.own_key and waited < RESPONDER_GRACE:
                continue  # the lower key asks first; give it time
            req = self.requests.get(key)
            if req is not None and now < req.next_at:
                continue
            if req is None and rt is not None:
                self.refreshed_at[key] = now
                if self.ice is not None:
                    self.ice_local[key] = self._new_credentials()  # a refresh restarts ICE
            attempts = 0 if req is None else req.attempts + 1
            delay = min(REQUEST_RETRY_MAX, REQUEST_RETRY_MIN * 2**attempts)
            request_id = secrets.token_hex(8)
            self.requests[key] = _Request(request_id, now + delay, attempts)
            self._send_con(sig.ConReq, key, request_id)

    def admit(self, identity: Identity, addr: tuple[str, int]) -> bool:
        """An authenticated initiation from a peer we have no link to: add it if it is a
        member we want (see the module docstring)."""
        key = identity.public_key
        if key not in self.members or not self._room_for(key):
            return False
        self.links.add(identity, addr, initiate=self.own_key < key)
        self._count("admitted_by_handshake")
        return True

    # --- internals ------------------------------------------------------------------------

    def _wants_refresh(self, rt: LinkView, key: bytes, now: float) -> bool:
        """Ask the peer afresh (new candidates, an ICE restart): when the link's ICE found no
        path (the flag clears when the new agent starts), or when the link keeps failing,
        at most every REFRESH_INTERVAL."""
        if rt.learned is not Learned.SIGNALLING:
            return False
        if rt.ice_restart:
            return True
        if now - self.refreshed_at.get(key, -REFRESH_INTERVAL) < REFRESH_INTERVAL:
            return False
        return not rt.established and rt.failures >= REFRESH_AFTER_FAILURES

    def _room_for(self, key: bytes) -> bool:
        if key in self.desired():
            return True
        return len(self.links.learned()) < self.config.max_links

    def _prune(self, now: float) -> None:
        learned = self.links.learned()
        over = len(learned) - self.config.max_links
        desired = set(self.desired()) if over > 0 else set()
        for rt in learned:
            key = rt.key
            if key in self.members:
                if over > 0 and key not in desired:
                    self.links.remove(key, "over max_links")
                    over -= 1
                continue
            # Not a member (after a reconnect): keep it while its link works, or while the
            # server is away and cannot tell us.
            if self.connected and not rt.established:
                self.links.remove(key, "no longer a member")

    def _new_credentials(self) -> tuple[str, str]:
        return new_credentials(_RNG)

    def _offer(self, to: bytes) -> sig.IceOffer | None:
        if self.ice is None:
            return None
        creds = self.ice_local.get(to)
        if creds is None:
            creds = self.ice_local[to] = self._new_credentials()
        lines = candidates_to_sdp(self.ice.local_candidates())[: sig.MAX_CANDIDATES]
        return sig.IceOffer(creds[0], creds[1], tuple(lines))

    def _send_con(self, kind: type[sig.ConReq] | type[sig.ConResp], to: bytes, rid: str) -> None:
        if kind is sig.ConReq:
            self.ice_request[to] = rid
        msg = kind(
            sender=self.own_key,
            to=to,
            overlay=self.overlay,
            request_id=rid,
            candidates=self.candidates(),
            cert=self.cert_der,
            groups=self.groups,
            policy=self.policy,
            ice=self._offer(to),
        )
        if not self.client.send(msg):
            self._count("signalling_send_dropped")

    def _on_con(self, msg: sig.ConReq | sig.ConResp, now: float) -> None:
        what = "con_req" if isinstance(msg, sig.ConReq) else "con_resp"
        try:
            identity = self.anchor.verify_untrusted(msg.cert, self.wall())
        except CertificateRefused as exc:
            self._count("con_refused_certificate")
            log.warning("%s refused: certificate: %s", what, exc)
            return
        key = identity.public_key
        if key != msg.sender or msg.to != self.own_key or msg.overlay != self.overlay:
            self._count("con_refused_mismatch")
            log.warning("%s from %s refused: from/to/overlay do not match", what, identity.name)
            return
        endpoint = next(((c.address, c.port) for c in msg.candidates if c.type == "host"), None)
        use_ice = self.ice is not None and msg.ice is not None
        if use_ice:
            endpoint = None  # ICE finds the path (a LAN address behind a NAT leads nowhere)
        rt = self.links.get(key)
        if rt is None:
            if not self._room_for(key):
                self._count("con_refused_cap")
                log.info("%s from %s ignored: max_links reached", what, identity.name)
                return
            self.members.setdefault(key, sig.Member(key, identity.name, str(identity.address)))
            self.first_seen.setdefault(key, now)
            self.links.add(identity, endpoint, initiate=self.own_key < key)
        elif endpoint is not None:
            self.links.set_endpoint(key, endpoint)
        if use_ice:
            assert msg.ice is not None
            self._on_ice(key, msg, msg.ice)
        self.requests.pop(key, None)
        if isinstance(msg, sig.ConReq) and self._may_answer(key, msg.request_id, now):
            self._send_con(sig.ConResp, key, msg.request_id)

    def _may_answer(self, key: bytes, rid: str, now: float) -> bool:
        """At most one con_resp per con_req id, within a per-peer budget (issue 13, item 6)."""
        if self.answered.get(key) == rid:
            self._count("con_req_duplicate")
            return False
        tokens, then = self.answer_budget.get(key, (float(CON_RESP_BURST), now))
        tokens = min(float(CON_RESP_BURST), tokens + (now - then) * CON_RESP_RATE)
        if tokens < 1.0:
            self.answer_budget[key] = (tokens, now)
            self._count("con_resp_over_budget")
            return False
        self.answer_budget[key] = (tokens - 1.0, now)
        self.answered[key] = rid
        return True

    def _on_ice(self, key: bytes, msg: sig.ConReq | sig.ConResp, offer: sig.IceOffer) -> None:
        """Start, restart or feed the link's ICE agent (the rules in the module docstring)."""
        candidates: list[Candidate] = []
        for line in offer.candidates:
            try:
                cand = Candidate.from_sdp_untrusted(line)
            except BadPacket:
                self._count("ice_bad_candidate")
                continue
            ip = ipaddress.ip_address(cand.address)
            if ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip == _BROADCAST:
                self._count("ice_bad_candidate")  # nothing a peer can be reached at
                continue
            candidates.append(cand)
        is_req = isinstance(msg, sig.ConReq)
        if not is_req and self.ice_request.get(key) != msg.request_id:
            self._count("ice_stale_con_resp")
            return
        current = self.ice_local.get(key)
        running = self.links.ice_creds(key)  # (local ufrag, remote ufrag) of the agent
        if running is not None and current is not None and running == (current[0], offer.ufrag):
            self.links.add_ice_candidates(key, candidates)
            return
        if (
            is_req
            and running is not None
            and running[1] is not None
            and current is not None
            and running[0] == current[0]
        ):
            current = None  # the peer restarted ICE: so do we, with fresh credentials
            self._count("ice_restarted_by_peer")
        if current is None:
            current = self.ice_local[key] = self._new_credentials()
        self.links.start_ice(
            key, current, (offer.ufrag, offer.pwd), candidates, controlling=self.own_key < key
        )

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "members": len(self.members),
            "learned_links": len(self.links.learned()),
            "max_links": self.config.max_links,
            "candidates": [endpoint_text(c.address, c.port) for c in self.candidates()],
            "counters": dict(self.counters),
        }

    # --- the task -------------------------------------------------------------------------

    async def serve(
        self,
        events: trio.MemoryReceiveChannel[sig.ClientEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        while True:
            ev: sig.ClientEvent | None = None
            with trio.move_on_after(TICK):
                ev = await events.receive()
            now = trio.current_time()
            if ev is None:
                self.tick(now)
            else:
                self.handle_event(ev, now)


__all__ = ["Controller", "LinkView", "Links", "pair_rank"]
