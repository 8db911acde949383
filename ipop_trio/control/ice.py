"""The node's ICE service: candidates, STUN/TURN servers and the routing of STUN datagrams.

    udp receiver ──STUN (0..3) / ChannelData (0x40..0x4F)──► IceService.on_ice
        ├── Binding responses to our srflx gathering      → SrflxGatherer
        ├── from a TURN server                            → its TurnClient
        │       └── relayed payload: STUN → an agent (local base = the relayed address)
        │                            link datagram → back to the data path (`via` = the relay)
        └── checks and their responses                    → the peer's IceAgent
                                                             (requests by USERNAME, responses
                                                             by transaction id)

One service per node, shared by every link: host candidates from the interfaces (never the
overlay TAP or `[ice] ignore_interfaces`), server-reflexive ones through the `[ice] stun`
servers and from `[signalling] advertise` (an address that reaches our socket from outside,
e.g. a port forward: server-reflexive by meaning, found by the operator instead of STUN),
one relayed candidate per `[ice] turn` server (RFC 8656). All of it on the node's one UDP
socket. The per-peer agents live in the link tasks (control/links.py), which `register`
each with the function that wakes its task; this module finds them their datagrams, gives
every registered agent the candidates found late, and sends the agents' datagrams: from a
host candidate with IP_PKTINFO, or wrapped for a relay (ChannelData once a channel is bound,
a Send indication before).

A relay's allocation can be lost (a restarted TURN server forgets it): the TurnClient notices
it from the server's answers or silence, and from `suspect` (the link tasks call it when
consent is lost on a relayed pair: one Refresh on a short timer asks the server). A lost
relay's candidate is withdrawn at once (datagrams from its old address are dropped and
counted, not sent from a socket that does not have it), and a new allocation is made with
bounded, jittered backoff; its candidate goes to every agent and bumps `generation`, which
tells the link tasks that links without a path should re-signal (an ICE restart with it).

`ready` is set when every server answered or GATHER_TIMEOUT passed: the controller holds
its con_reqs until then, so peers get every candidate in one message (no trickle).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from ..config import IceConfig, endpoint_text
from ..errors import BadPacket, LocalProtocolError
from ..net import netlink
from ..net.udp import UdpSocket
from ..proto import stun
from ..proto.ice import (
    Candidate,
    GatherFailed,
    IceAgent,
    SrflxFound,
    SrflxGatherer,
    candidates_to_sdp,
    host_candidate,
    relay_candidate,
    srflx_candidate,
)
from ..proto.stun import Addr, Class
from ..proto.turn import (
    Allocated,
    AllocationFailed,
    AllocationLost,
    ChannelBindFailed,
    PermissionFailed,
    TurnClient,
    TurnState,
    channel_data_iov,
)
from ..stats import Stats

log = logging.getLogger("ipop_trio.ice")

# Gathering waits at most this long for STUN and TURN servers before the node's candidates
# go to peers (the servers that answer later add their candidates to later exchanges).
GATHER_TIMEOUT = 3.0
# Backoff of a relay's allocation attempts: MIN * 2^(failures-1), at most MAX, times a
# random factor in [1 - JITTER, 1 + JITTER] (nodes that lost one server together spread out).
TURN_RETRY_MIN, TURN_RETRY_MAX, TURN_RETRY_JITTER = 1.0, 60.0, 0.25
LOST_BASES = 16  # relayed addresses of lost allocations remembered (to drop their sends)
SOFTWARE = "ipop-trio"

Relayed = tuple[TurnClient, Addr, bytes]  # (relay it came through, peer address, payload)
Wake = Callable[[], None]  # wakes the link task that drives an agent


class Relay:
    """One `[ice] turn` server: its client (replaced after a loss) and relayed candidate."""

    def __init__(self, server: Addr, username: str, password: str) -> None:
        self.server = server
        self.username = username
        self.password = password
        self.client: TurnClient | None = None
        self.candidate: Candidate | None = None
        self.failures = 0
        self.retry_at: float | None = 0.0  # allocate at the first look
        self.error: str | None = None
        self.lost = 0  # allocations this relay had and lost
        self.reallocating = False  # lost one and has not made a new one yet

    @property
    def settled(self) -> bool:
        """Allocated, or failed at least once (gathering does not wait for it any more)."""
        return self.candidate is not None or self.failures > 0

    @property
    def state(self) -> str:
        """For status: idle / allocating / allocated / retrying (never had one yet) /
        reallocating (had one, lost it, making a new one)."""
        if self.reallocating:
            return "reallocating"
        if self.client is None:
            return "retrying" if self.failures else "idle"
        return self.client.state.value


class IceService:
    def __init__(
        self,
        udp: UdpSocket,
        stats: Stats,
        config: IceConfig,
        *,
        tap_name: str,
        listen_host: str,
        advertise: Iterable[Addr] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.udp = udp
        self.stats = stats
        self.config = config
        self.tap_name = tap_name
        self.listen_host = listen_host
        self._rng = rng or random.SystemRandom()
        self.port = udp.local[1]
        self.advertise = tuple(advertise)
        self.host: list[Candidate] = []
        self.srflx: list[Candidate] = []
        self.relays: dict[Addr, Relay] = {
            t.server.sockaddr: Relay(t.server.sockaddr, t.username, t.password) for t in config.turn
        }
        self.gatherer = SrflxGatherer(rng=self._rng, software=SOFTWARE)
        self.agents: dict[str, tuple[IceAgent, Wake]] = {}  # by our local ufrag
        self.ready = False
        self.generation = 0  # bumped when a relayed candidate is re-made after a loss
        self._lost_bases: dict[Addr, None] = {}  # insertion-ordered, at most LOST_BASES
        self._gather_deadline = 0.0
        self._wake_send, self._wake = trio.open_memory_channel[None](1)

    # --- candidates -----------------------------------------------------------------------

    def local_candidates(self) -> list[Candidate]:
        relayed = [r.candidate for r in self.relays.values() if r.candidate is not None]
        return [*self.host, *self.srflx, *relayed]

    def offer_lines(self) -> list[str]:
        return candidates_to_sdp(self.local_candidates())

    def gather_hosts(self) -> list[Candidate]:
        """Host candidates: the listen address if it is specific, else every usable local
        address of the socket's family (RFC 8445 §5.1.1.1), each its own local preference."""
        if self.listen_host not in ("0.0.0.0", "::"):
            addresses = [self.listen_host]
        else:
            version = 6 if ":" in self.listen_host else 4
            skip = frozenset((self.tap_name, *self.config.ignore_interfaces))
            addresses = [a for _, a in netlink.host_addresses(skip=skip, version=version)]
        self.host = [
            host_candidate((a, self.port), 65535 - i) for i, a in enumerate(addresses[:32])
        ]
        for addr in self.advertise:
            base = next((h for h in self.host if (":" in h.address) == (":" in addr[0])), None)
            if base is not None:
                self._add_srflx(srflx_candidate(addr, base, addr), addr)
        return self.host

    def _add_candidate(self, cand: Candidate) -> None:
        """A candidate gathered late (a TURN allocation made again): every agent gets it."""
        for agent, wake in self.agents.values():
            agent.add_local_candidate(cand)
            wake()

    # --- agents ---------------------------------------------------------------------------

    def register(self, agent: IceAgent, wake: Wake) -> None:
        """Route the agent's STUN datagrams to it (requests by our ufrag, responses by
        transaction id); `wake` tells its link task there is something to do."""
        self.agents[agent.local_ufrag] = (agent, wake)

    def unregister(self, ufrag: str) -> None:
        if self.agents.pop(ufrag, None) is not None:
            self.permit()  # its peers' permissions lapse, unless another agent has them

    def relay_for(self, local_base: Addr) -> TurnClient | None:
        """The TURN client whose relayed address is `local_base` (None: a host candidate)."""
        for relay in self.relays.values():
            if relay.candidate is not None and relay.candidate.addr == local_base:
                return relay.client
        return None

    def suspect(self, local_base: Addr) -> None:
        """Consent was lost on a pair whose local candidate is `local_base`: if that is a
        relay's, ask its server whether it still has our allocation (TurnClient.check)."""
        client = self.relay_for(local_base)
        if client is not None and client.check(time.monotonic()):
            self.stats.count("turn_checks")
            relay = self.relays.get(client.server)
            if relay is not None:
                self._flush_turn(relay)
            self._kick()

    def permit(self) -> None:
        """TURN permissions on every relay for exactly the addresses of the live agents'
        remote candidates: new ones created, those no agent has any more left to lapse.
        So they are bounded by the agents (MAX_REMOTE_CANDIDATES each), not by every
        address members ever put in a con_req. Call it when an agent's candidates change."""
        wanted = {c.address for agent, _ in self.agents.values() for c in agent.remote_candidates}
        now = time.monotonic()
        for relay in self.relays.values():
            client = relay.client
            if client is None:
                continue
            client.retain_permissions(wanted)
            if client.state is TurnState.ALLOCATED:
                v6 = ":" in relay.server[0]
                for ip in wanted:
                    if (":" in ip) == v6:
                        client.create_permission(ip, now)
                self._flush_turn(relay)
        self._kick()

    def bind(self, client: TurnClient, peer: Addr) -> None:
        """A relayed pair carries the link from now on: bind a channel (4-byte framing)."""
        try:
            client.bind_channel(peer, time.monotonic())
        except LocalProtocolError as exc:
            log.warning("TURN %s: cannot bind a channel to %s: %s", client.server, peer, exc)
        relay = self.relays.get(client.server)
        if relay is not None:
            self._flush_turn(relay)
        self._kick()

    def flush_agent(self, agent: IceAgent) -> None:
        for base, remote, data in agent.datagrams_to_send():
            if not self.send(base, remote, data):
                self.stats.drop("ice_send_failed")

    def send(self, local_base: Addr, remote: Addr, data: bytes) -> bool:
        """An ICE datagram from one of our candidates' bases to `remote`."""
        client = self.relay_for(local_base)
        if client is not None:
            return self.send_via(client, remote, data)
        if local_base in self._lost_bases:
            self.stats.drop("ice_relay_lost")  # an agent's pair on a lost allocation
            return True  # counted here, not again as a failed send
        return self.udp.send_from(data, local_base[0], remote)

    def send_via(self, client: TurnClient, peer: Addr, data: bytes) -> bool:
        """One datagram to `peer` through a relay."""
        if client.state is not TurnState.ALLOCATED:
            return False
        try:
            wrapped = client.wrap(peer, data)
        except LocalProtocolError:
            return False
        return self.udp.send_one(wrapped, client.server)

    def send_iov_via(
        self, client: TurnClient, peer: Addr, iov: list[bytes], sizes: list[int]
    ) -> int:
        """The data path's datagrams (two iov parts each) to `peer` through a relay; how
        many were dropped. On a bound channel each gets a 4-byte ChannelData header in
        front of its first part and is padded to a multiple of 4 bytes, and the batch keeps
        UDP GSO; before the channel is bound, one Send indication each. (RFC 8656 §12.5
        makes padding optional over UDP, but coturn stops serving an allocation that sends
        an unpadded ChannelData message: found in the lab, where pings then vanished.)"""
        if client.state is not TurnState.ALLOCATED:
            return len(sizes)
        channel = client.bound_channel(peer)
        if channel is None:
            return sum(
                not self.send_via(client, peer, iov[2 * i] + iov[2 * i + 1])
                for i in range(len(sizes))
            )
        framed, framed_sizes = channel_data_iov(channel, iov, sizes, pad=True)
        return self.udp.send_iov(framed, framed_sizes, client.server)

    # --- datagrams from the data path -----------------------------------------------------

    def on_ice(self, data: memoryview, addr: Addr) -> Relayed | None:
        """A STUN or ChannelData datagram from the socket (sync, in the receiver task, right
        after the receive call that returned it). Returns a relayed link datagram for the
        data path; everything else is handled here or counted as a drop. Never raises."""
        now = time.monotonic()
        first = data[0]
        if first < 4:
            try:
                hdr = stun.header_untrusted(data)
            except BadPacket:
                self.stats.drop("stun_malformed")
                return None
            if self.gatherer.owns(hdr.transaction_id):
                base = (self.udp.last_local or "", self.port)
                try:
                    self.gatherer.receive_untrusted(data, base, addr, now)
                except BadPacket:
                    self.stats.drop("stun_refused")
                self._kick()
                return None
        relay = self.relays.get(addr)
        if relay is not None and relay.client is not None:
            try:
                got = relay.client.receive_untrusted(data, now)
            except BadPacket:
                self.stats.drop("turn_refused")
                return None
            self._flush_turn(relay)
            self._kick()
            if got is None:
                return None
            peer, payload = got
            if payload and payload[0] < 4:
                if relay.candidate is None:  # relayed before the allocation completed
                    self.stats.drop("turn_early_data")
                else:
                    self._to_agent(payload, relay.candidate.addr, peer, now)
                return None
            return relay.client, peer, payload
        if first >= 4:
            self.stats.drop("channel_data_not_from_relay")
            return None
        self._to_agent(data, (self.udp.last_local or "", self.port), addr, now)
        return None

    def _to_agent(self, data: bytes | memoryview, base: Addr, remote: Addr, now: float) -> None:
        try:
            msg = stun.parse_untrusted(data)
        except BadPacket:
            self.stats.drop("stun_malformed")
            return
        found: tuple[IceAgent, Wake] | None
        if msg.cls is Class.REQUEST:
            found = self.agents.get((msg.username or "").partition(":")[0])
        else:
            tid = msg.transaction_id
            found = next((a for a in self.agents.values() if a[0].owns(tid)), None)
        if found is None:
            self.stats.drop("stun_no_agent")
            return
        agent, wake = found
        agent.receive(data, base, remote, now)
        self.flush_agent(agent)  # answers go out now, not at the link task's next turn
        wake()

    # --- the task -------------------------------------------------------------------------

    def _kick(self) -> None:
        try:
            self._wake_send.send_nowait(None)
        except trio.WouldBlock:
            pass

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        now = time.monotonic()
        self._gather_deadline = now + GATHER_TIMEOUT
        for base in self.host:
            for server in self.config.stun:
                if (":" in server.host) == (":" in base.address):
                    self.gatherer.add(base, server.sockaddr, now)
        log.info(
            "ICE: %d host candidates (%s), %d STUN and %d TURN servers",
            len(self.host),
            ", ".join(c.address for c in self.host) or "none",
            len(self.config.stun),
            len(self.relays),
        )
        task_status.started()
        try:
            while True:
                now = time.monotonic()
                self._step(now)
                deadline = self._next_deadline(now)
                with trio.move_on_after(max(0.0, deadline - now)):
                    await self._wake.receive()
        finally:
            self._close()

    def _step(self, now: float) -> None:
        g = self.gatherer
        g.handle_timeout(now)
        for base, server, data in g.datagrams_to_send():
            self.udp.send_from(data, base[0], server)
        while (ev := g.next_event()) is not None:
            if isinstance(ev, SrflxFound):
                self._add_srflx(ev.candidate, ev.server)
            elif isinstance(ev, GatherFailed):
                log.warning("ICE: STUN server %s:%d: %s", *ev.server, ev.reason)
        for relay in self.relays.values():
            self._step_relay(relay, now)
        if not self.ready and (
            now >= self._gather_deadline
            or (g.done and all(r.settled for r in self.relays.values()))
        ):
            self.ready = True
            log.info("ICE: candidates gathered: %s", "; ".join(self.offer_lines()) or "none")
            for agent, wake in self.agents.values():
                agent.end_of_local_candidates()
                wake()

    def _add_srflx(self, cand: Candidate, server: Addr) -> None:
        if cand.base == cand.addr or any(c.addr == cand.addr for c in self.srflx):
            return  # no NAT in between (or already known): redundant (RFC 8445 §5.1.3)
        self.srflx.append(cand)
        log.info("ICE: server-reflexive %s:%d (via %s:%d)", cand.address, cand.port, *server)
        self._add_candidate(cand)

    def _step_relay(self, relay: Relay, now: float) -> None:
        client = relay.client
        if client is None:
            if relay.retry_at is None or now < relay.retry_at:
                return
            relay.retry_at = None
            client = relay.client = TurnClient(
                relay.server, relay.username, relay.password, rng=self._rng, software=SOFTWARE
            )
            client.allocate(now)
        client.handle_timeout(now)
        self._flush_turn(relay)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, Allocated):
                relay.failures = 0
                relay.error = None
                relay.candidate = relay_candidate(ev.relayed, relay.server, ev.mapped or ev.relayed)
                self._lost_bases.pop(relay.candidate.addr, None)
                log.info("ICE: TURN %s:%d relays for us at %s:%d", *relay.server, *ev.relayed)
                if relay.reallocating:
                    relay.reallocating = False
                    self.generation += 1
                    self.stats.count("turn_reallocated")
                self._add_candidate(relay.candidate)
                if ev.mapped is not None and self.host:
                    self._add_srflx(
                        srflx_candidate(ev.mapped, self.host[0], relay.server), relay.server
                    )
                self.permit()
            elif isinstance(ev, AllocationFailed | AllocationLost):
                if isinstance(ev, AllocationLost):
                    relay.lost += 1
                    relay.reallocating = True
                    relay.failures = 0  # the server was there a moment ago: retry soon
                    self.stats.count("turn_lost")
                    if relay.candidate is not None:
                        self._lost_bases[relay.candidate.addr] = None
                        while len(self._lost_bases) > LOST_BASES:
                            del self._lost_bases[next(iter(self._lost_bases))]
                relay.failures += 1
                relay.error = ev.reason
                relay.candidate = None
                relay.client = None
                backoff = self._backoff(relay.failures)
                relay.retry_at = now + backoff
                log.warning(
                    "ICE: TURN %s:%d: %s; retrying in %.1f s", *relay.server, ev.reason, backoff
                )
                return
            elif isinstance(ev, PermissionFailed | ChannelBindFailed):
                log.warning("ICE: TURN %s:%d: %s", *relay.server, ev)
        self._flush_turn(relay)

    def _backoff(self, failures: int) -> float:
        base = min(TURN_RETRY_MAX, TURN_RETRY_MIN * 2 ** min(failures - 1, 16))
        return base * self._rng.uniform(1 - TURN_RETRY_JITTER, 1 + TURN_RETRY_JITTER)

    def _flush_turn(self, relay: Relay) -> None:
        if relay.client is None:
            return
        for data in relay.client.datagrams_to_send():
            if not self.udp.send_one(data, relay.server):
                self.stats.drop("turn_send_failed")

    def _next_deadline(self, now: float) -> float:
        times = [now + 1.0]
        if (d := self.gatherer.next_deadline()) is not None:
            times.append(d)
        if not self.ready:
            times.append(self._gather_deadline)
        for relay in self.relays.values():
            if relay.client is not None and (d := relay.client.next_deadline()) is not None:
                times.append(d)
            elif relay.client is None and relay.retry_at is not None:
                times.append(relay.retry_at)
        return min(times)

    def _close(self) -> None:
        """Release allocations (best effort: one Refresh of lifetime 0 each)."""
        now = time.monotonic()
        for relay in self.relays.values():
            if relay.client is not None:
                relay.client.close(now)
                self._flush_turn(relay)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "candidates": self.offer_lines(),
            "stun": [str(s) for s in self.config.stun],
            "turn": [
                {
                    "server": endpoint_text(*r.server),
                    "state": r.state,
                    "lost": r.lost,
                    "relayed": None
                    if r.candidate is None
                    else endpoint_text(r.candidate.address, r.candidate.port),
                    "error": r.error,
                    "permissions": 0 if r.client is None else len(r.client.permitted),
                }
                for r in self.relays.values()
            ],
            "agents": len(self.agents),
        }


__all__ = ["IceService", "Relay", "Relayed"]
