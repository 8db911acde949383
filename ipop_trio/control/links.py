"""Link tasks: one per peer, driving the sans-IO `proto.link.Link`.

The data path never waits for the control plane and vice versa:
  * the UDP receiver hands handshake datagrams to `on_handshake`, which decides at once,
    cheaply, what becomes of each: an initiation passes mac1 and the cookie guard
    (proto/cookie.py: under load only initiations whose mac2 proves their source address,
    rate-limited per address; the others get a cookie reply) before it may enter the
    bounded handshake queue (full: a counted drop); responses (mac1 checked) and cookie
    replies go straight to the inbox of the peer owning their receiver index;
  * the handshake task does the expensive part (X25519, certificate check) of initiations
    and routes them to the owning peer's inbox (typed messages: `Initiation`, `Response`,
    `CookieReply`, `Wake`);
  * each link task sleeps until its Link's next deadline or a message, feeds it, sends what
    it produced, and publishes the session to send on in the peer's `PeerPort`.
One peer's failure (refused certificate, no answer, a message its Link refuses) is logged,
counted, retried with backoff; it never reaches the node's nursery.

`LinkManager` is given its collaborators and reaches nothing else (docs/architecture.md,
"Layers"): the session table (the one owner of receiver indices), the switch (one port per
peer), the TAP writer (frames flushed by a restarted peer's reassembler), the outbound stage
(frames staged while a link came up), the UDP socket (handshakes, keepalives) and the ICE
service (agents' datagrams, relays). The controller drives it through the methods its
`Links` protocol names (`add`, `remove`, `set_endpoint`, `start_ice`, ...).

Peers come from the configuration (at start) or from the controller (while running: peers
learned through signalling). Each link task runs in its own cancel scope inside the links
nursery, so removing a peer ends exactly its task, retires its sessions and takes its port
out of the switch.

Peers learned through signalling with ICE parameters get an `IceAgent` (RFC 8445; started by
the controller through `start_ice`), driven by the same link task: the agent's valid pairs
are the peer's possible paths, its first valid pair carries the handshake at once, its
nominated pair is the path from then on, and when consent on the path is lost the link
moves to the best other valid pair (direct → relay) without a new handshake; a better
pair that becomes valid again (relay → direct) is selected by the controlling side. When no
pair is left the controller is asked for an ICE restart (new credentials, new candidates).
The path is `(port.endpoint, port.relay)`; ICE-managed ports never roam on data.

Links and the data path's timestamps run on one monotonic clock (`clock`, time.monotonic in a
node), so a wall-clock step never stretches a retransmission or a session's lifetime; each
Link is told the current wall-clock offset (`wall_offset`) for the two things that need real
time: certificate validity and initiation timestamps.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from ..config import Endpoint, PeerConfig, endpoint_text
from ..datapath.outbound import Outbound
from ..datapath.sessions import SessionEntry, SessionTable
from ..datapath.switch import PeerPort, Switch
from ..errors import BadPacket, LocalProtocolError
from ..pki import fingerprint
from ..proto import handshake
from ..proto.cert import Identity, encode_key, mac_for_key
from ..proto.cookie import CookieGuard, Verdict, cookie_reply_receiver_index_untrusted
from ..proto.handshake import LocalIdentity, ResponderState
from ..proto.ice import (
    BetterPairValid,
    Candidate,
    CandidatePair,
    ConsentLost,
    Failed,
    IceAgent,
    IceEvent,
    IceState,
    Nominated,
    PairValid,
    RoleChanged,
)
from ..proto.link import (
    HandshakeFailed,
    Link,
    LinkState,
    PeerRefused,
    SessionEstablished,
    SessionRetired,
)
from ..proto.policy import Decision, SecurityPolicy, advertise, decide
from ..proto.session import Cipher, Session
from ..proto.wire import Kind
from ..stats import Stats
from .ice import IceService

log = logging.getLogger("ipop_trio.links")

Addr = tuple[str, int]

HANDSHAKE_QUEUE = 64  # initiations waiting for X25519 (the rate limits: proto/cookie.py)
INBOX_SIZE = 16  # messages waiting for one link task
IDLE_WAKE = 1.0  # link tasks look at the data path's timestamps at least this often
RETRY_MIN, RETRY_MAX = 2.0, 60.0  # backoff after a failed or refused handshake


class Learned(enum.Enum):
    """Where a peer came from."""

    CONFIG = "config"  # a [[peer]] of the node's configuration
    SIGNALLING = "signalling"  # a member the controller chose (it may also remove it)


@dataclass(frozen=True, slots=True)
class PeerSetup:
    """A peer as the configuration (or signalling) gives it, checked against the CA."""

    config: PeerConfig
    public_key: bytes
    identity: Identity | None  # when a certificate was given


# --- What a link task's inbox carries ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Initiation:
    """An initiation the handshake task verified (mac1, DH, certificate) for this peer."""

    state: ResponderState
    addr: Addr
    via: object | None  # the relay it came through, None: directly


@dataclass(frozen=True, slots=True)
class Response:
    """A handshake response naming one of this peer's receiver indices (not yet opened)."""

    data: bytes
    addr: Addr
    via: object | None


@dataclass(frozen=True, slots=True)
class CookieReply:
    """A cookie reply naming one of this peer's receiver indices (not yet opened)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Wake:
    """Something changed (frames staged, ICE news, a new endpoint): look now."""


WAKE = Wake()
LinkMessage = Initiation | Response | CookieReply | Wake


class FrameSink(Protocol):
    """Where frames for our own TAP go (the TAP writer)."""

    def submit(self, frames: list[bytes]) -> None: ...


class DatagramSender(Protocol):
    """Sends one control datagram (handshake, keepalive) from the node's socket."""

    def send_one(self, datagram: bytes, addr: Addr) -> bool: ...


class PeerRuntime:
    """A peer with a link: its data-path port, its Link machine and its task's inbox."""

    def __init__(
        self,
        setup: PeerSetup,
        port: PeerPort,
        *,
        learned: Learned,
        initiate: bool,
        local: LocalIdentity,
        cipher: Cipher,
        ext: Mapping[str, Any],
        replay_floor: int,
        allocate: Callable[[PeerRuntime], int],
        decide: Callable[[Identity, Mapping[str, Any]], Decision],
        make_session: Callable[..., Session],
        check_peer: Callable[[Identity], str | None] | None = None,
    ) -> None:
        self.setup = setup
        self.name = setup.config.name
        self.learned = learned
        self.initiate = initiate  # start the handshake ourselves (else wait for the peer's)
        self.scope = trio.CancelScope()
        self.port = port
        if setup.config.endpoint is not None:
            port.endpoint = setup.config.endpoint.sockaddr
        port.wake = self.wake
        self.inbox_send, self.inbox = trio.open_memory_channel[LinkMessage](INBOX_SIZE)
        self.refused: str | None = None
        self.failures = 0
        self.retry_at: float | None = None
        self.logged_mode: str | None = None  # the last mode a session was logged in at INFO
        self.decision: Decision | None = None  # the mode chosen at the last handshake, and why
        self._allocate_for = allocate
        self._decide_for = decide
        self.link = Link(
            local,
            setup.public_key,
            allocate_index=self._allocate,
            cipher=cipher,
            expect_address=None if setup.identity is None else setup.identity.address,
            expect_name=setup.config.name,
            ext=ext,
            decide_secure=self._decide,
            replay_floor=replay_floor,
            make_session=make_session,
            check_peer=check_peer,
        )
        # Answer one handshake here (address, relay), not on the path.
        self.reply_to: tuple[Addr, object | None] | None = None
        self.ice: IceAgent | None = None  # peers learned with ICE parameters
        self.ice_restart = False  # no path left: the controller restarts ICE
        self.ice_generation = 0  # the ICE service's candidate generation the agent started with
        self.path: CandidatePair | None = None  # the ICE pair the link uses
        self.path_changes = 0
        self.con_at: float | None = None  # monotonic: the con_req that started this link
        self.first_data: float | None = None  # monotonic: the first data frame from the peer

    @property
    def key(self) -> bytes:
        return self.setup.public_key

    @property
    def established(self) -> bool:
        return self.link.state is LinkState.ESTABLISHED

    def _decide(self, peer: Identity, peer_ext: Mapping[str, Any]) -> bool:
        """Secure or plain, for a session being made now (selective security)."""
        self.decision = self._decide_for(peer, peer_ext)
        return self.decision.secure

    def _allocate(self) -> int:
        return self._allocate_for(self)

    def wake(self) -> None:
        try:
            self.inbox_send.send_nowait(WAKE)
        except trio.WouldBlock:
            pass  # a wake-up is already waiting


class LinkManager:
    def __init__(
        self,
        *,
        local: LocalIdentity,
        cipher: Cipher,
        policy: SecurityPolicy,
        groups: frozenset[str],
        peers: Sequence[PeerSetup],
        sessions: SessionTable[PeerRuntime],
        switch: Switch,
        writer: FrameSink,
        outbound: Outbound,
        udp: DatagramSender,
        ice: IceService,
        stats: Stats,
        clock: Callable[[], float] = time.monotonic,
        revoked: frozenset[str] = frozenset(),
    ) -> None:
        self.local = local
        self.cipher = cipher
        self.policy = policy
        self.groups = groups
        self.sessions = sessions
        self.switch = switch
        self.writer = writer
        self.outbound = outbound
        self.udp = udp
        self.ice = ice
        self.stats = stats
        self.clock = clock
        self.revoked = frozenset(revoked)  # certificate fingerprints refused (pki.fingerprint)
        self.hs_send, self.hs_receive = trio.open_memory_channel[tuple[bytes, Addr, object | None]](
            HANDSHAKE_QUEUE
        )
        self.guard = CookieGuard(
            local.public_key, handshake.mac1_key(local.public_key), queue_size=HANDSHAKE_QUEUE
        )
        self.peers: list[PeerRuntime] = []
        self.by_key: dict[bytes, PeerRuntime] = {}
        self._configured = tuple(peers)
        self._nursery: trio.Nursery | None = None
        # Newest initiation timestamp per peer key, kept when a peer is removed and re-added.
        self.replay_floor: dict[bytes, int] = {}
        # The controller's say on an authenticated initiation from a peer we have no link for
        # (it may have learned the peer from signalling a moment after the peer did): True
        # when it added the peer (`add`) and the initiation should be answered. Set by the
        # node when it runs a controller (the one link the two need back to each other).
        self.admit_unknown: Callable[[Identity, Addr], bool] | None = None

    def _now(self, link: Link) -> float:
        """The timer clock now, with the Link's wall-clock offset refreshed."""
        mono = self.clock()
        link.wall_offset = time.time() - mono
        return mono

    # --- selective security -----------------------------------------------------------------

    def advertised(self) -> dict[str, Any]:
        """What our handshakes say of our policy and groups (authenticated by the handshake;
        peers believe the groups only where our certificate agrees)."""
        return advertise(self.policy, self.groups)

    def decide(self, peer: Identity, peer_ext: Mapping[str, Any]) -> Decision:
        return decide(self.policy, self.groups, peer_ext, peer.groups)

    def reconfigure(
        self, local: LocalIdentity, policy: SecurityPolicy, groups: frozenset[str]
    ) -> int:
        """New certificate / CAs / policy / groups (SIGHUP): every link uses them from its
        next handshake; links whose mode changes, or whose certificate is new, are re-keyed
        now, the others keep their sessions; a peer whose certificate the CAs trusted now
        refuse loses its sessions now. Returns how many links were re-keyed."""
        if local.public_key != self.local.public_key:
            self.guard = CookieGuard(
                local.public_key, handshake.mac1_key(local.public_key), queue_size=HANDSHAKE_QUEUE
            )
        self.local, self.policy, self.groups = local, policy, groups
        ext = self.advertised()
        rekeyed = 0
        for rt in self.peers:
            link = rt.link
            now = self._now(link)
            new_cert = link.local.cert_der != local.cert_der
            link.reconfigure(local=local, ext=ext)
            if not link.recheck_peer(now):
                rt.port.session = None
                rt.wake()  # its task retires the sessions and backs off (PeerRefused)
                continue
            session, peer = link.current, link.peer
            if session is None or peer is None:
                continue
            if new_cert or self.decide(peer, link.peer_ext).secure != session.secure:
                link.rekey(now)
                # Tightened (plain -> secure): nothing more leaves in clear; frames wait in
                # the port's stage until the secure session exists (fail closed: an on-path
                # party that drops the handshake stops the link, it cannot keep it plain).
                rt.port.session = self._sendable(rt, link.current)
                rt.wake()
                rekeyed += 1
        return rekeyed

    # --- revocation and address ownership -------------------------------------------------

    def refusal(self, peer: Identity) -> str | None:
        """Why an authenticated peer is refused on this node's own account (counted), or
        None: its certificate is revoked, or its overlay address is held by another key
        whose link is established (the first holder keeps it; a newcomer with the same
        address would take its traffic)."""
        if self.revoked:
            fp = fingerprint(peer.der)
            if fp in self.revoked:
                self.stats.drop("peer_revoked")
                return f"certificate revoked (sha256 {fp})"
        for rt in self.peers:
            held = rt.link.peer
            if (
                held is not None
                and held.address == peer.address
                and rt.key != peer.public_key
                and rt.established
            ):
                self.stats.drop("peer_address_in_use")
                return f"address {peer.address} is held by {rt.name} (another key, linked)"
        return None

    def set_revoked(self, revoked: frozenset[str]) -> list[str]:
        """A new revocation list (SIGHUP): the links of peers it names are closed now and
        their handshakes refused from then on; a peer no longer named may try again at
        once. Returns the names of the links closed."""
        self.revoked = frozenset(revoked)
        closed = []
        for rt in self.peers:
            peer = rt.link.peer or rt.setup.identity
            fp = None if peer is None else fingerprint(peer.der)
            if fp is None or fp not in self.revoked:
                if rt.refused is not None and rt.refused.startswith("certificate revoked"):
                    rt.refused, rt.retry_at, rt.failures = None, None, 0
                    rt.wake()  # idle with an endpoint and no retry pending: it connects
                continue
            why = f"certificate revoked (sha256 {fp})"
            rt.refused = why
            if rt.link.state is LinkState.IDLE:
                continue  # nothing to close; its next handshake is refused
            self.stats.drop("peer_revoked")
            rt.link.refuse(why)
            rt.port.session = None  # nothing more leaves for it, from this moment
            rt.wake()  # its task retires the sessions
            closed.append(rt.name)
        return closed

    def _sendable(self, rt: PeerRuntime, session: Session | None) -> Session | None:
        """`session`, unless it is plain and our configuration now wants the link secure."""
        if session is None or session.secure or rt.link.peer is None:
            return session
        if self.decide(rt.link.peer, rt.link.peer_ext).secure:
            return None
        return session

    # --- called by the data path (sync, per handshake datagram) --------------------------

    def on_handshake(self, data: bytes, addr: Addr, via: object | None = None) -> None:
        """One handshake datagram from the network (0xA1..0xA3), decided on at once: only
        what passed the cheap checks takes a queue slot or reaches a link's inbox."""
        kind = data[0] if data else 0
        if kind == Kind.HANDSHAKE_INIT:
            self._on_initiation(data, addr, via)
            return
        try:
            if kind == Kind.HANDSHAKE_RESP:
                handshake.check_response_mac1_untrusted(self.local, data)
                index = handshake.response_receiver_index_untrusted(data)
                msg: LinkMessage = Response(data, addr, via)
            elif kind == Kind.COOKIE_REPLY:
                index = cookie_reply_receiver_index_untrusted(data)
                msg = CookieReply(data)
            else:
                self.stats.drop("handshake_unhandled_type")
                return
        except BadPacket:
            self.stats.drop(
                "handshake_refused" if kind == Kind.COOKIE_REPLY else "handshake_mac1_bad"
            )
            return
        owner = self.sessions.owner(index)
        if owner is None:
            self.stats.drop("handshake_unknown_index")
            return
        try:
            owner.inbox_send.send_nowait(msg)
        except trio.WouldBlock:
            self.stats.drop("link_inbox_full")

    def _on_initiation(self, data: bytes, addr: Addr, via: object | None) -> None:
        queued = self.hs_send.statistics().current_buffer_used
        admission = self.guard.admit_untrusted(data, addr, self.clock(), queued)
        verdict = admission.verdict
        if verdict is Verdict.MAC1_BAD or verdict is Verdict.RATE_LIMITED:
            self.stats.drop(f"handshake_{verdict.value}")
            return
        self.stats.count(f"handshake_{verdict.value}")
        if verdict is Verdict.COOKIE:
            assert admission.reply is not None
            if not self._send_control(admission.reply, addr, via):
                self.stats.drop("handshake_cookie_send_failed")
            return
        try:
            self.hs_send.send_nowait((data, addr, via))
        except trio.WouldBlock:
            self.stats.drop("handshake_queue_full")

    # --- tasks ----------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The handshake task and one link task per peer, until cancelled."""
        for setup in self._configured:
            self._runtime(setup, Learned.CONFIG, initiate=True)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._handshake_task)
            for rt in self.peers:
                nursery.start_soon(self._run_link_scoped, rt)
            task_status.started()

    def _runtime(self, setup: PeerSetup, learned: Learned, *, initiate: bool) -> PeerRuntime:
        ip4 = ip6 = None
        groups: frozenset[str] = frozenset()
        if (ident := setup.identity) is not None:
            groups = ident.groups
            ip4 = None if ident.ip4 is None else ident.ip4.packed
            ip6 = None if ident.ip6 is None else ident.ip6.packed
        port = PeerPort(setup.config.name, mac_for_key(setup.public_key), ip4, groups)
        self.switch.add(port)
        if ip6 is not None:
            self.switch.set_ip6(port, ip6)
        rt = PeerRuntime(
            setup,
            port,
            learned=learned,
            initiate=initiate,
            local=self.local,
            cipher=self.cipher,
            ext=self.advertised(),
            replay_floor=self.replay_floor.get(setup.public_key, -1),
            allocate=self.sessions.allocate,
            decide=self.decide,
            make_session=self.sessions.make_session,
            check_peer=self.refusal,
        )
        self.peers.append(rt)
        self.by_key[setup.public_key] = rt
        return rt

    # --- the controller's interface (its `Links` protocol) -------------------------------

    def get(self, public_key: bytes) -> PeerRuntime | None:
        return self.by_key.get(public_key)

    def learned(self) -> list[PeerRuntime]:
        """The links the controller added (and may remove)."""
        return [rt for rt in self.peers if rt.learned is Learned.SIGNALLING]

    def add(self, identity: Identity, endpoint: Addr | None, initiate: bool) -> PeerRuntime:
        """Start a link to a member learned through signalling (its task runs now)."""
        if self._nursery is None:
            raise RuntimeError("LinkManager.add before serve() started")
        if identity.public_key in self.by_key:
            raise ValueError(f"peer {identity.name} already has a link")
        config = PeerConfig(
            name=identity.name,
            cert=None,
            public_key=identity.public_key,
            endpoint=None if endpoint is None else Endpoint(*endpoint),
        )
        setup = PeerSetup(config, identity.public_key, identity)
        rt = self._runtime(setup, Learned.SIGNALLING, initiate=initiate)
        self._nursery.start_soon(self._run_link_scoped, rt)
        log.info("%s: link added (%s)", rt.name, rt.learned.value)
        return rt

    def remove(self, public_key: bytes, why: str) -> None:
        """End the peer's link task, retire its sessions, take its port out of the switch."""
        rt = self.by_key.pop(public_key, None)
        if rt is None:
            return
        self.peers.remove(rt)
        rt.scope.cancel()
        rt.link.close()
        if rt.ice is not None:
            self.ice.unregister(rt.ice.local_ufrag)
            rt.ice.close()
        while (ev := rt.link.next_event()) is not None:
            if isinstance(ev, SessionRetired):
                self.sessions.release(ev.local_index)
        self.sessions.release_owner(rt)
        port = rt.port
        port.session = None
        port.staged.clear()
        self.switch.remove(port)
        self.sessions.forget_port(port)  # its half-reassembled frames are never flushed now
        log.info("%s: link removed (%s)", rt.name, why)

    def set_endpoint(self, public_key: bytes, endpoint: Addr) -> None:
        """A (new) underlay address for the peer, e.g. from a con_req: try it now."""
        rt = self.by_key.get(public_key)
        if rt is None:
            return
        rt.port.endpoint = endpoint
        if rt.initiate and rt.link.current is None:
            rt.retry_at = None
            rt.wake()

    def ice_creds(self, public_key: bytes) -> tuple[str, str | None] | None:
        """(our ufrag, the peer's ufrag) of the peer's running ICE agent, if any."""
        rt = self.by_key.get(public_key)
        if rt is None or rt.ice is None:
            return None
        return rt.ice.local_ufrag, rt.ice.remote_ufrag

    async def _run_link_scoped(self, rt: PeerRuntime) -> None:
        with rt.scope:
            await self._run_link(rt)

    async def _handshake_task(self) -> None:
        cipher = self.cipher
        async for data, addr, via in self.hs_receive:
            # Only initiations that passed mac1 and the cookie guard (`on_handshake`) are
            # here: each costs two X25519 operations and a certificate check.
            msg: LinkMessage
            try:
                state = handshake.consume_initiation_untrusted(
                    self.local, data, cipher, time.time()
                )
                rt = self.by_key.get(state.peer_static)
                why = self.refusal(state.peer)
                if why is not None:
                    # Before admit_unknown: a refused member gets no link either.
                    news = rt is None or rt.refused != why
                    if rt is not None:
                        rt.refused = why
                    log.log(
                        logging.INFO if news else logging.DEBUG,
                        "initiation from %s (%s) refused: %s",
                        state.peer.name,
                        addr[0],
                        why,
                    )
                    continue
                admit = self.admit_unknown
                if rt is None and admit is not None and admit(state.peer, addr):
                    rt = self.by_key.get(state.peer_static)
                if rt is None:
                    self.stats.drop("handshake_unknown_peer")
                    log.info(
                        "initiation from %s (%s) refused: not a configured peer",
                        state.peer.name,
                        addr[0],
                    )
                    continue
                msg = Initiation(state, addr, via)
            except BadPacket as exc:
                self.stats.drop("handshake_refused")
                log.debug("handshake datagram from %s refused: %s", addr, exc)
                continue
            try:
                rt.inbox_send.send_nowait(msg)
            except trio.WouldBlock:
                self.stats.drop("link_inbox_full")

    async def _run_link(self, rt: PeerRuntime) -> None:
        link = rt.link
        port = rt.port
        if port.endpoint is not None and rt.initiate:
            link.connect(self._now(link))
        while True:
            self._drain(rt)
            now = self._now(link)
            deadline = link.next_deadline()
            if rt.ice is not None and (ice_deadline := rt.ice.next_deadline()) is not None:
                deadline = ice_deadline if deadline is None else min(deadline, ice_deadline)
            wake_in = IDLE_WAKE if deadline is None else min(IDLE_WAKE, max(0.0, deadline - now))
            if rt.retry_at is not None:
                wake_in = min(wake_in, max(0.0, rt.retry_at - now))
            msg: LinkMessage | None = None
            with trio.move_on_after(wake_in):
                msg = await rt.inbox.receive()
            now = self._now(link)
            if msg is not None:
                self._handle(rt, msg, now)
            if port.last_sent and port.last_sent != link.last_sent:
                link.note_sent(port.last_sent)
            if port.last_data and port.last_data != link.last_received:
                if rt.first_data is None:
                    rt.first_data = port.last_data
                link.note_received(port.last_data, data=True)
            if port.last_received and port.last_received != link.last_received:
                link.note_received(port.last_received, data=False)  # keepalives only
            if rt.retry_at is not None and now >= rt.retry_at:
                rt.retry_at = None
                if port.endpoint is not None:
                    link.connect(now)
            link.handle_timeout(now)
            if rt.ice is not None:
                rt.ice.handle_timeout(now)
                self._check_candidates(rt)

    def _handle(self, rt: PeerRuntime, msg: LinkMessage, now: float) -> None:
        link, port = rt.link, rt.port
        try:
            if isinstance(msg, Initiation):
                addr, via = msg.addr, msg.via
                link.receive_initiation(msg.state, now)
                self.replay_floor[rt.setup.public_key] = link.last_initiation_ts
                plain = rt.decision is not None and not rt.decision.secure
                if plain and rt.ice is not None:
                    # A plain link's only guard is its path, and an initiation can be
                    # replayed: with ICE, only ICE's checks choose the path.
                    rt.reply_to = (addr, via)
                elif port.endpoint is None or (not plain and rt.ice is None):
                    # the peer proved its key; secure data re-checks it
                    port.endpoint, port.relay = addr, via
                elif port.endpoint != addr or port.relay is not via:
                    # An initiation can be replayed, and a plain link's only guard is its
                    # path: answer there, but move the path only through a handshake we
                    # initiated (answered with our fresh ephemeral) or through signalling.
                    # ICE-managed paths move only by ICE: answer where the peer asked.
                    rt.reply_to = (addr, via)
            elif isinstance(msg, Response):
                link.receive_response_untrusted(msg.data, now)
                if rt.ice is None or port.endpoint is None:
                    port.endpoint, port.relay = msg.addr, msg.via
            elif isinstance(msg, CookieReply):
                try:
                    link.receive_cookie_reply_untrusted(msg.data, now)
                except BadPacket:
                    self.stats.drop("handshake_cookie_refused")
                    return
                self.stats.count("handshake_cookie_received")
                log.info("%s: the peer is under load: cookie received", rt.name)
            elif link.current is None and port.endpoint is not None and rt.retry_at is None:
                link.connect(now)  # a Wake: frames are waiting, or a path appeared
        except BadPacket as exc:
            self.stats.drop("handshake_refused")
            log.debug("%s: handshake refused: %s", rt.name, exc)
        except LocalProtocolError as exc:
            # Our own state refused what the handshake task routed here (a bug, never the
            # peer's doing): this one message is dropped, the link and the node go on.
            self.stats.drop("handshake_internal_error")
            log.error("%s: handshake message dropped: %s", rt.name, exc)

    def _drain(self, rt: PeerRuntime) -> None:
        """Send what the Link produced and act on its events; publish the send session."""
        link, port = rt.link, rt.port
        agent = rt.ice
        if agent is not None:
            ice = self.ice
            ice.flush_agent(agent)
            while (iev := agent.next_event()) is not None:
                self._ice_event(rt, agent, iev)
            ice.flush_agent(agent)
        while (ev := link.next_event()) is not None:
            if isinstance(ev, SessionEstablished):
                session = ev.session
                self.sessions.add(
                    session.local_index,
                    SessionEntry(session, port, self._confirmer(rt, session.local_index)),
                )
                rt.failures = 0
                rt.refused = None
                # The groups the firewall's rules see: those of the certificate this key
                # just proved (a renewed certificate may carry others than the config's).
                self.switch.set_groups(port, ev.peer.groups)
                # A restarted peer numbers its super-frames from 0 again: forget the ids
                # we saw, or every piece would look late and be rebuilt one by one.
                flushed: list[bytes] = []
                self.sessions.reset_reassembly(port, flushed)
                # what the peer sent is the switch's to check, as every inbound write is
                now = self.clock()
                flushed = [w for w in flushed if self.switch.accept_inbound(port, w, now)]
                if flushed:
                    self.writer.submit(flushed)
                # the addresses it may send from: those its certificate holds now
                if (ip4 := ev.peer.ip4) is not None and port.ip4 != ip4.packed:
                    self.switch.set_ip4(port, ip4.packed)
                ip6 = None if ev.peer.ip6 is None else ev.peer.ip6.packed
                if port.ip6 != ip6:
                    self.switch.set_ip6(port, ip6)
                # The first session, or one in another mode, is news; a scheduled rekey
                # (every 2 minutes per peer) is not.
                mode = "secure" if session.secure else "plain"
                log.log(
                    logging.DEBUG if mode == rt.logged_mode else logging.INFO,
                    "%s: session %08x established (%s)",
                    rt.name,
                    session.local_index,
                    mode,
                )
                rt.logged_mode = mode
            elif isinstance(ev, SessionRetired):
                self.sessions.release(ev.local_index)
            elif isinstance(ev, HandshakeFailed | PeerRefused):
                rt.logged_mode = None  # the next session, when it comes, is news again
                rt.failures += 1
                backoff = min(RETRY_MAX, RETRY_MIN * 2 ** (rt.failures - 1))
                rt.retry_at = self.clock() + backoff
                if isinstance(ev, PeerRefused):
                    rt.refused = ev.reason
                    self.stats.drop("peer_refused")
                log.warning("%s: %s; retrying in %.0f s", rt.name, ev.reason, backoff)
        port.session = self._sendable(rt, link.current)
        out = link.datagrams_to_send()
        dest, relay = rt.reply_to or (port.endpoint, port.relay)
        rt.reply_to = None
        if out and dest is not None:
            for d in out:
                if not self._send_control(d, dest, relay):
                    self.stats.drop("handshake_send_failed")
        if port.session is not None and port.staged:
            frames = list(port.staged)
            port.staged.clear()
            self.outbound.send(port, frames, self.clock())

    def _send_control(self, datagram: bytes, dest: Addr, relay: object | None) -> bool:
        """A handshake or keepalive datagram on a path (directly, or through a relay)."""
        if relay is None:
            return self.udp.send_one(datagram, dest)
        return self.ice.send_via(relay, dest, datagram)  # type: ignore[arg-type]

    # --- ICE ------------------------------------------------------------------------------

    def start_ice(
        self,
        public_key: bytes,
        local: tuple[str, str],
        remote: tuple[str, str],
        candidates: list[Candidate],
        controlling: bool,
    ) -> None:
        """A (new) ICE session with the peer: our credentials as we sent them, the peer's
        credentials and candidates as it sent them. Replaces a running agent (ICE restart);
        the link keeps its path and sessions until the new agent finds one."""
        rt = self.by_key.get(public_key)
        if rt is None:
            return
        if rt.con_at is None:
            rt.con_at = self.clock()
        ice = self.ice
        if rt.ice is not None:
            ice.unregister(rt.ice.local_ufrag)
            rt.ice.close()
        agent = IceAgent(
            controlling=controlling,
            local_ufrag=local[0],
            local_pwd=local[1],
            software="ipop-trio",
        )
        agent.set_remote_credentials(*remote)
        for cand in ice.local_candidates():
            agent.add_local_candidate(cand)
        if ice.ready:
            agent.end_of_local_candidates()
        rt.ice = agent
        rt.ice_restart = False
        rt.ice_generation = ice.generation
        rt.path = None
        rt.port.roam = False
        ice.register(agent, rt.wake)
        self._add_remote_candidates(rt, candidates)
        agent.end_of_remote_candidates()
        log.info(
            "%s: ICE %s (%s), %d local and %d remote candidates",
            rt.name,
            local[0],
            "controlling" if controlling else "controlled",
            len(agent.local_candidates),
            len(candidates),
        )
        rt.wake()

    def add_ice_candidates(self, public_key: bytes, candidates: list[Candidate]) -> None:
        """More of the peer's candidates for its running agent (a repeated offer)."""
        rt = self.by_key.get(public_key)
        if rt is not None:
            self._add_remote_candidates(rt, candidates)

    def _add_remote_candidates(self, rt: PeerRuntime, candidates: list[Candidate]) -> None:
        if rt.ice is None:
            return
        for cand in candidates:
            rt.ice.add_remote_candidate(cand)
        self.ice.permit()  # what the agent kept (at most MAX_REMOTE_CANDIDATES), no more
        rt.wake()

    def _ice_event(self, rt: PeerRuntime, agent: IceAgent, ev: IceEvent) -> None:
        now = self._now(rt.link)
        if isinstance(ev, PairValid):
            if rt.path is None:
                self._use_pair(rt, ev.pair, "first valid pair")
            else:
                self._update_paths(rt)
        elif isinstance(ev, Nominated):
            self._use_pair(rt, ev.pair, "nominated")
        elif isinstance(ev, BetterPairValid):
            if agent.controlling and agent.state is IceState.COMPLETED and ev.pair.valid:
                agent.select(ev.pair, now)
                self._use_pair(rt, ev.pair, "a better pair works again")
        elif isinstance(ev, ConsentLost):
            # Through a relay, silence may mean the TURN server lost our allocation: ask it.
            self.ice.suspect(ev.pair.local_base)
            if ev.selected or rt.path is ev.pair:
                best = agent.best_valid_pair()
                if best is not None and agent.state in (IceState.RUNNING, IceState.COMPLETED):
                    agent.select(best, now)
                    self._use_pair(rt, best, f"consent lost on {ev.pair.path_type.value}")
                else:
                    rt.path = None
                    rt.ice_restart = True
                    log.warning("%s: consent lost on the only path; restarting ICE", rt.name)
            self._update_paths(rt)
        elif isinstance(ev, Failed):
            rt.ice_restart = True
            log.warning("%s: ICE failed (%s); restarting", rt.name, ev.reason)
        elif isinstance(ev, RoleChanged):
            log.info("%s: ICE role conflict: now %s", rt.name, ev.controlling)

    def _check_candidates(self, rt: PeerRuntime) -> None:
        """A relayed candidate was re-made (a TURN server lost our allocation) since the
        agent started: a link without a path asks the controller for an ICE restart, so
        the peer gets the new candidate and both agents pair it."""
        if rt.path is None and not rt.ice_restart and rt.ice_generation != self.ice.generation:
            rt.ice_restart = True
            log.info("%s: no path and a relayed candidate was re-made; restarting ICE", rt.name)

    def _use_pair(self, rt: PeerRuntime, pair: CandidatePair, why: str) -> None:
        ice = self.ice
        port = rt.port
        relay = ice.relay_for(pair.local_base)
        if relay is not None:
            ice.bind(relay, pair.remote_addr)
        changed = rt.path is not pair
        port.endpoint, port.relay = pair.remote_addr, relay
        rt.path = pair
        self._update_paths(rt)
        if changed:
            rt.path_changes += 1
            log.info(
                "%s: path %s %s:%d -> %s:%d (%s)",
                rt.name,
                pair.path_type.value,
                *pair.local_base,
                *pair.remote_addr,
                why,
            )
        link = rt.link
        if link.current is None and rt.initiate and rt.retry_at is None:
            # A handshake sent before there was a path went nowhere: send a fresh one now.
            if link.handshaking:
                link.rekey(self._now(link))
            else:
                link.connect(self._now(link))

    def _update_paths(self, rt: PeerRuntime) -> None:
        """The paths a plain link accepts data on: ICE's valid pairs (both ends may use
        different ones while nomination settles)."""
        if rt.ice is None:
            return
        relay_for = self.ice.relay_for
        rt.port.paths = frozenset(
            (p.remote_addr, relay_for(p.local_base)) for p in rt.ice.valid_pairs()
        )

    def _confirmer(self, rt: PeerRuntime, index: int) -> Callable[[], None]:
        def confirm() -> None:
            entry = self.sessions.entries.get(index)
            if entry is not None:
                entry.confirm = None
            if rt.link.confirm(index, self._now(rt.link)):
                rt.port.session = self._sendable(rt, rt.link.current)
                rt.wake()

        return confirm

    # --- status -------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        out = []
        for rt in self.peers:
            link, port = rt.link, rt.port
            session = link.current
            peer = link.peer or rt.setup.identity
            state = link.state.value
            if link.state is LinkState.ESTABLISHED and rt.ice is not None and rt.path is None:
                # Keys but nowhere to send: ICE lost its last path (or has not found one).
                state = "reconnecting" if rt.ice_restart else "no path"
            out.append(
                {
                    "name": rt.name,
                    "address": None if peer is None else str(peer.address),
                    "address6": None if peer is None or peer.ip6 is None else str(peer.ip6),
                    "groups": None if peer is None else sorted(peer.groups),
                    # the peer's certificate as last verified (a handshake, or the config)
                    "cert": None
                    if peer is None
                    else {
                        "not_after": peer.not_after,
                        "fingerprint": fingerprint(peer.der),
                    },
                    "state": state,
                    "link_state": link.state.value,
                    "handshaking": link.handshaking,  # an initiation of ours is in flight
                    "mode": None if session is None else ("secure" if session.secure else "plain"),
                    "mode_reason": None if rt.decision is None else rt.decision.reason,
                    "endpoint": None if port.endpoint is None else endpoint_text(*port.endpoint),
                    "learned": rt.learned.value,
                    "key": encode_key(rt.setup.public_key),
                    "tx_bytes": port.tx_bytes,
                    "rx_bytes": port.rx_bytes,
                    "tx_packets": port.tx_packets,
                    "rx_packets": port.rx_packets,
                    "staged": len(port.staged),
                    "drops": port.drops,
                    "last_handshake": None
                    if link.last_handshake is None
                    else link.last_handshake + link.wall_offset,  # wall clock, for people
                    "refused": rt.refused,
                    "via": None
                    if port.relay is None
                    else "relay " + endpoint_text(*port.relay.server),  # type: ignore[attr-defined]
                    "path": None if rt.path is None else _path_status(rt.path),
                    "path_changes": rt.path_changes,
                    # set once a send proved the path narrower than the TAP's MTU
                    "path_mtu": port.path_mtu,
                    "path_mtu_why": port.path_mtu_why or None,
                    "ice": None
                    if rt.ice is None
                    else {
                        "state": rt.ice.state.value,
                        "role": "controlling" if rt.ice.controlling else "controlled",
                        "pairs": len(rt.ice.pairs),
                        "valid": len(rt.ice.valid_pairs()),
                        "restart_wanted": rt.ice_restart,
                        "counters": dict(rt.ice.stats),
                    },
                    # Link set-up: our first con_req/con_resp for this link and the first data
                    # frame from the peer (CLOCK_MONOTONIC: comparable between nodes on one
                    # machine, which the set-up benchmark relies on).
                    "setup": {"con_at": rt.con_at, "first_data": rt.first_data},
                    "setup_seconds": None
                    if rt.con_at is None or rt.first_data is None
                    else max(0.0, rt.first_data - rt.con_at),
                    "failures": rt.failures,
                    "retry_in": None
                    if rt.retry_at is None
                    else max(0.0, rt.retry_at - self.clock()),
                }
            )
        return out


def _path_status(pair: CandidatePair) -> dict[str, Any]:
    local = pair.mapped or pair.local
    return {
        "type": pair.path_type.value,
        "local": f"{endpoint_text(pair.local.address, pair.local.port)} ({pair.local.type.value})",
        "local_seen_as": f"{endpoint_text(local.address, local.port)} ({local.type.value})",
        "remote": f"{endpoint_text(pair.remote.address, pair.remote.port)} "
        f"({pair.remote.type.value})",
        "rtt_ms": None if pair.rtt is None else round(pair.rtt * 1000, 3),
        "nominated": pair.nominated,
    }


__all__ = ["Learned", "LinkManager", "PeerRuntime", "PeerSetup"]
