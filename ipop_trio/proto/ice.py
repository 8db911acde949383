"""ICE (RFC 8445) for one link as a sans-IO agent, consent freshness (RFC 7675), and the
pure part of server-reflexive gathering.

The node owns the socket and the clock. It gives an `IceAgent` its local candidates (host
candidates it found, srflx results of a `SrflxGatherer`, relayed addresses of a TURN
client), the peer's candidates and credentials (from `con_req` / `con_resp`), every STUN
datagram that arrives for this link, and `now`; it sends what `datagrams_to_send()` returns
and acts on `next_event()`. One component (1), one data stream, UDP only.

An agent is addressed by (local base, remote address): a local base is the address of a
host candidate, or the relayed address of a TURN allocation, and the node maps it to "send
from the UDP socket" or "wrap through the TURN client". Datagrams that arrive through TURN
are fed with the relayed address as their local base and the peer address as their source.

What it does, by RFC 8445 section:
  5.1.2   candidate priorities (`candidate_priority`)
  5.3     credentials (`new_credentials`)
  6.1.2   pairs: formation (host and relay locals only: srflx locals are pruned into their
          base, §6.1.2.4), priorities (§6.1.2.3), initial states per foundation (§6.1.2.6),
          at most MAX_PAIRS (§6.1.2.5)
  6.1.4.2 one check per Ta: triggered queue first, then the best Waiting pair, unfreezing
          one Frozen pair per foundation when nothing is Waiting
  7.2     checks: USERNAME "remote:local", PRIORITY, ICE-CONTROLLING/-CONTROLLED,
          MESSAGE-INTEGRITY with the remote password, FINGERPRINT; RFC 8489 retransmission;
          responses: 487 role conflict (§7.2.5.1), non-symmetric addresses fail the pair
          (§7.2.5.2.1), peer-reflexive local candidates (§7.2.5.3.1), valid pairs
          (§7.2.5.3.2), unfreezing the foundation (§7.2.5.3.3)
  7.3     answering checks: role conflict by tie-breaker (§7.3.1.1), peer-reflexive remote
          candidates (§7.3.1.3), triggered checks (§7.3.1.4), USE-CANDIDATE (§7.3.1.5)
  8.1     regular nomination by the controlling agent
RFC 7675  consent: an authenticated check every CONSENT_INTERVAL (randomised 0.8..1.2) on
          every valid pair; no success response for CONSENT_TIMEOUT → ConsentLost.

Deviations, on purpose:
  * Checks go on after nomination (RFC 8445 §8.1.2 would stop lower-priority ones): the
    other valid pairs are standby paths for failover (direct → relay) and keep consent.
    Failed pairs better than the selected one are rechecked every RECHECK_INTERVAL, so
    a path that comes back (relay → direct) is seen: `BetterPairValid`.
  * `select(pair)` moves to another valid pair without an ICE restart. On the controlling
    agent it also sends USE-CANDIDATE on that pair, and the controlled agent follows with
    a new `Nominated`. Our link handshake authenticates every path, so the only job of ICE
    here is finding paths that work.
  * Unauthenticated or malformed requests are dropped and counted, not answered with
    400/401 (no reflection of junk; the peer learns nothing it needs from them).

This module must never read a clock, touch a socket or an event loop (a test scans the
imports). `IceAgent.receive` never raises: whatever the network sends is a counted drop.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import ipaddress
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import BadPacket, LocalProtocolError
from . import stun
from .stun import Addr, Class, Message, Method, StunTransaction

# --- Protocol constants -------------------------------------------------------------------

COMPONENT = 1  # one component: the overlay link's datagrams


class CandidateType(enum.Enum):
    HOST = "host"
    PRFLX = "prflx"
    SRFLX = "srflx"
    RELAY = "relay"


# §5.1.2.2 recommended type preferences.
TYPE_PREFERENCE = {
    CandidateType.HOST: 126,
    CandidateType.PRFLX: 110,
    CandidateType.SRFLX: 100,
    CandidateType.RELAY: 0,
}
MAX_LOCAL_PREFERENCE = 65535

# --- Tuning knobs (constructor arguments override them) ----------------------------------

TA = 0.05  # §14.2 pacing: one new check per Ta
CHECK_RTO = 0.5  # §14.3 / RFC 8489 §6.2.1
CHECK_RC = 7
CHECK_RM = 16
NOMINATION_DELAY = 1.0  # after the first valid pair, how long to wait for a better one
CONSENT_INTERVAL = 5.0  # RFC 7675 §5.1: every 5 s, randomised in [0.8, 1.2]
# RFC 7675 §5.1 lets consent expire after at most 30 s without a response. A dead path
# black-holes the link's traffic until consent expires, so we fail over sooner: a consent
# check goes every ~5 s and is retransmitted CONSENT_RC times, so 10 s is at least one
# whole failed transaction.
CONSENT_TIMEOUT = 10.0
CONSENT_RC = 4  # a consent transaction ends (0, .5, 1.5, 3.5 s; gives up at 5 s) ...
CONSENT_RM = 3  # ... before the next one starts
RECHECK_INTERVAL = 10.0  # how often failed pairs better than the selected one are retried
MAX_PAIRS = 100  # §6.1.2.5
MAX_REMOTE_CANDIDATES = 64  # the peer's candidates come from the network: bound them

_ICE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


# --- Candidates ---------------------------------------------------------------------------


def candidate_priority(
    ctype: CandidateType, local_preference: int = MAX_LOCAL_PREFERENCE, component: int = COMPONENT
) -> int:
    """§5.1.2.1: 2^24 * type preference + 2^8 * local preference + (256 - component ID)."""
    if not 0 <= local_preference <= MAX_LOCAL_PREFERENCE or not 1 <= component <= 256:
        raise LocalProtocolError("local preference or component out of range")
    return (TYPE_PREFERENCE[ctype] << 24) + (local_preference << 8) + (256 - component)


def pair_priority(controlling: int, controlled: int) -> int:
    """§6.1.2.3: 2^32 * MIN(G, D) + 2 * MAX(G, D) + (G > D ? 1 : 0), with G the priority of
    the controlling agent's candidate and D the controlled agent's."""
    g, d = controlling, controlled
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def local_preference_of(priority: int) -> int:
    return (priority >> 8) & 0xFFFF


def foundation(ctype: CandidateType, base_ip: str, server_ip: str | None = None) -> str:
    """§5.1.1.3: equal for candidates of the same type, base IP, server and transport."""
    text = f"{ctype.value}|{base_ip}|{server_ip or ''}|udp".encode()
    return hashlib.blake2s(text, digest_size=5).hexdigest()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A transport address the peers may use (§5.1). `base` is set on local candidates only:
    where datagrams for this candidate are sent from (host and relay: the candidate itself;
    srflx and prflx: the host candidate behind the NAT). It never goes to the peer."""

    foundation: str
    priority: int
    address: str
    port: int
    type: CandidateType
    component: int = COMPONENT
    transport: str = "udp"
    related_address: str | None = None
    related_port: int | None = None
    base: Addr | None = None

    @property
    def addr(self) -> Addr:
        return (self.address, self.port)

    def to_sdp(self) -> str:
        """The candidate-attribute value of RFC 8839 §5.1 (what signalling carries)."""
        text = (
            f"{self.foundation} {self.component} {self.transport.upper()} {self.priority} "
            f"{self.address} {self.port} typ {self.type.value}"
        )
        if self.related_address is not None and self.related_port is not None:
            text += f" raddr {self.related_address} rport {self.related_port}"
        return text

    @classmethod
    def from_sdp_untrusted(cls, text: str) -> Candidate:
        """Parse `to_sdp` output from the peer (via signalling), or raise BadPacket."""
        if len(text) > 512:
            raise BadPacket("candidate line too long")
        fields = text.removeprefix("candidate:").split()
        if len(fields) < 8 or fields[6] != "typ" or len(fields) % 2:
            raise BadPacket("candidate: wrong number of fields")
        fnd, comp, transport, prio, address, port, _, typ = fields[:8]
        if not 1 <= len(fnd) <= 32 or any(c not in _ICE_CHARS for c in fnd):
            raise BadPacket("candidate: bad foundation")
        if transport.lower() != "udp":
            raise BadPacket("candidate: not UDP")
        try:
            ctype = CandidateType(typ)
            component, priority, port_n = int(comp), int(prio), int(port)
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise BadPacket("candidate: bad type, number or address") from None
        if component != COMPONENT or not 1 <= priority < 2**31 or not 0 < port_n < 65536:
            raise BadPacket("candidate: component, priority or port out of range")
        related: dict[str, str] = dict(zip(fields[8::2], fields[9::2], strict=True))
        raddr = related.get("raddr")
        rport: int | None = None
        if raddr is not None:
            try:
                raddr = str(ipaddress.ip_address(raddr))
                rport = int(related.get("rport", "x"))
            except ValueError:
                raise BadPacket("candidate: bad related address") from None
            if not 0 <= rport < 65536:
                raise BadPacket("candidate: bad related port")
        return cls(fnd, priority, str(ip), port_n, ctype, component, "udp", raddr, rport)


def host_candidate(addr: Addr, local_preference: int = MAX_LOCAL_PREFERENCE) -> Candidate:
    """A host candidate (§5.1.1.1). Give each host address its own local preference
    (§5.1.2.1: unique per base when multihomed)."""
    return Candidate(
        foundation(CandidateType.HOST, addr[0]),
        candidate_priority(CandidateType.HOST, local_preference),
        addr[0],
        addr[1],
        CandidateType.HOST,
        base=addr,
    )


def srflx_candidate(mapped: Addr, base: Candidate, server: Addr) -> Candidate:
    """A server-reflexive candidate (§5.1.1.2) found through `server` from `base`."""
    return Candidate(
        foundation(CandidateType.SRFLX, base.address, server[0]),
        candidate_priority(CandidateType.SRFLX, local_preference_of(base.priority)),
        mapped[0],
        mapped[1],
        CandidateType.SRFLX,
        related_address=base.address,
        related_port=base.port,
        base=base.addr,
    )


def relay_candidate(
    relayed: Addr, server: Addr, mapped: Addr, local_preference: int = MAX_LOCAL_PREFERENCE
) -> Candidate:
    """A relayed candidate (§5.1.1.2, RFC 8656): its base is itself; the related address is
    the client's mapped address on the TURN server (RFC 8839 §5.1)."""
    return Candidate(
        foundation(CandidateType.RELAY, relayed[0], server[0]),
        candidate_priority(CandidateType.RELAY, local_preference),
        relayed[0],
        relayed[1],
        CandidateType.RELAY,
        related_address=mapped[0],
        related_port=mapped[1],
        base=relayed,
    )


def new_credentials(rng: random.Random) -> tuple[str, str]:
    """(ufrag, pwd) per §5.3: at least 24 and 128 random bits of ice-chars."""
    ufrag = "".join(rng.choice(_ICE_CHARS) for _ in range(8))
    pwd = "".join(rng.choice(_ICE_CHARS) for _ in range(24))
    return ufrag, pwd


def _same_family(a: str, b: str) -> bool:
    return (":" in a) == (":" in b)


# --- Pairs --------------------------------------------------------------------------------


class PairState(enum.Enum):
    FROZEN = "frozen"
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


_PATH_RANK = {
    CandidateType.HOST: 0,
    CandidateType.SRFLX: 1,
    CandidateType.PRFLX: 2,
    CandidateType.RELAY: 3,
}


@dataclass(eq=False, slots=True)
class CandidatePair:
    """A check-list entry (§6.1.2): `local` is a host or relay candidate (datagrams go from
    `local.addr`), `remote` the peer's candidate. Once a check succeeds the pair is valid;
    `mapped` is the local address the peer saw (the valid pair's local candidate,
    §7.2.5.3.2) and `valid_priority` the valid pair's priority. Owned by the agent: read it,
    do not change it."""

    local: Candidate
    remote: Candidate
    priority: int
    state: PairState = PairState.FROZEN
    valid: bool = False
    nominated: bool = False
    mapped: Candidate | None = None
    valid_priority: int = 0
    rtt: float | None = None
    consent_at: float | None = None
    consent_next: float | None = None
    nominate_on_success: bool = False
    recheck: bool = False

    @property
    def key(self) -> tuple[Addr, Addr]:
        return self.local.addr, self.remote.addr

    @property
    def local_base(self) -> Addr:
        return self.local.addr

    @property
    def remote_addr(self) -> Addr:
        return self.remote.addr

    @property
    def foundation(self) -> str:
        return f"{self.local.foundation}:{self.remote.foundation}"

    @property
    def path_type(self) -> CandidateType:
        """What the path goes through, the "worst" end first: relay, prflx, srflx, host."""
        local_type = self.mapped.type if self.mapped is not None else self.local.type
        if self.local.type is CandidateType.RELAY:
            local_type = CandidateType.RELAY
        return max(local_type, self.remote.type, key=_PATH_RANK.__getitem__)

    def __repr__(self) -> str:
        return (
            f"CandidatePair({self.local.addr}->{self.remote.addr} {self.path_type.value} "
            f"{self.state.value}{' valid' if self.valid else ''}"
            f"{' nominated' if self.nominated else ''})"
        )


# --- Events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PairValid:
    """A pair passed its first check and is in the valid list (§7.2.5.3.2)."""

    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class Nominated:
    """Send on `pair` from now on: nominated (§8.1.1), re-nominated by the controlling peer,
    or, on the controlling side, chosen by `select` and confirmed. May come more than once."""

    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class BetterPairValid:
    """After nomination, a pair better than the selected one became valid: `select` it to
    move (relay → direct)."""

    pair: CandidatePair


@dataclass(frozen=True, slots=True)
class ConsentLost:
    """No authenticated response on `pair` for CONSENT_TIMEOUT (RFC 7675 §5.1): it left the
    valid list. If `selected`, nothing is selected any more: `select(best_valid_pair())`
    to fail over, or restart ICE if there is none."""

    pair: CandidatePair
    selected: bool


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """A role conflict (§7.3.1.1, §7.2.5.1) switched our role."""

    controlling: bool


@dataclass(frozen=True, slots=True)
class Failed:
    """Every pair failed and both candidate lists are complete: no path (§8.1.2 / §8.2)."""

    reason: str


IceEvent = PairValid | Nominated | BetterPairValid | ConsentLost | RoleChanged | Failed


class IceState(enum.Enum):
    RUNNING = "running"  # checking, nothing nominated yet
    COMPLETED = "completed"  # a pair is (or was) nominated; checks and consent go on
    FAILED = "failed"
    CLOSED = "closed"


class _Kind(enum.Enum):
    CHECK = "check"
    CONSENT = "consent"


@dataclass(eq=False, slots=True)
class _Check:
    pair: CandidatePair
    tx: StunTransaction
    kind: _Kind
    use_candidate: bool
    controlling: bool  # our role when the request left (§7.2.5.1)
    priority: int  # the PRIORITY it carried: a prflx local candidate gets it (§7.2.5.3.1)
    cancelled: bool = False


# --- The agent ----------------------------------------------------------------------------


class IceAgent:
    """One ICE session (one link), sans-IO.

    Drive it like every core here: `receive(data, local_base, remote_addr, now)`
    for each STUN datagram of this link, `handle_timeout(now)` at `next_deadline()`, then
    send every `(local_base, remote_addr, data)` of `datagrams_to_send()` and drain
    `next_event()`. Checks start once the remote credentials and candidates are known."""

    def __init__(
        self,
        *,
        controlling: bool,
        local_ufrag: str,
        local_pwd: str,
        rng: random.Random | None = None,
        tie_breaker: int | None = None,
        ta: float = TA,
        check_rto: float = CHECK_RTO,
        check_rc: int = CHECK_RC,
        check_rm: int = CHECK_RM,
        nomination_delay: float = NOMINATION_DELAY,
        consent_interval: float = CONSENT_INTERVAL,
        consent_timeout: float = CONSENT_TIMEOUT,
        recheck_interval: float = RECHECK_INTERVAL,
        software: str | None = None,
    ) -> None:
        if ":" in local_ufrag or not local_ufrag or not local_pwd:
            raise LocalProtocolError("bad local ICE credentials")
        self._rng = rng or random.SystemRandom()
        self.controlling = controlling
        self.tie_breaker = tie_breaker if tie_breaker is not None else self._rng.getrandbits(64)
        self.local_ufrag = local_ufrag
        self.local_pwd = local_pwd
        self._local_key = stun.short_term_key(local_pwd)
        self.remote_ufrag: str | None = None
        self._remote_key: bytes | None = None
        self.ta = ta
        self._check_timer = (check_rto, check_rc, check_rm)
        self.nomination_delay = nomination_delay
        self.consent_interval = consent_interval
        self.consent_timeout = consent_timeout
        self.recheck_interval = recheck_interval
        self.software = software

        self.state = IceState.RUNNING
        self.local_candidates: list[Candidate] = []
        self.remote_candidates: list[Candidate] = []
        self.pairs: list[CandidatePair] = []  # the check list, best first
        self._by_key: dict[tuple[Addr, Addr], CandidatePair] = {}
        self._triggered: collections.deque[tuple[CandidatePair, bool]] = collections.deque()
        self._checks: dict[bytes, _Check] = {}
        self._out: list[tuple[Addr, Addr, bytes]] = []
        self._events: collections.deque[IceEvent] = collections.deque()
        self._pace_at = -math.inf
        self._first_valid_at: float | None = None
        self._nominating: CandidatePair | None = None
        self._recheck_at: float | None = None
        self._local_complete = False
        self._remote_complete = False
        self._prflx_count = 0
        self.selected_pair: CandidatePair | None = None
        # Counters: rx, drops by reason, checks sent, ... (`ipop-trio status` can show them).
        self.stats: collections.Counter[str] = collections.Counter()

    # --- Setup ----------------------------------------------------------------------------

    def set_remote_credentials(self, ufrag: str, pwd: str) -> None:
        """The peer's ufrag and pwd (from signalling)."""
        if not ufrag or ":" in ufrag or not pwd:
            raise LocalProtocolError("bad remote ICE credentials")
        self.remote_ufrag = ufrag
        self._remote_key = stun.short_term_key(pwd)

    def add_local_candidate(self, cand: Candidate) -> None:
        """A host, srflx or relay candidate of ours (with `base` set). srflx candidates are
        not paired (§6.1.2.4: pruned into their base) but recognise the valid pair's local
        candidate; redundant ones (same address and base, §5.1.3) are ignored."""
        if cand.base is None:
            raise LocalProtocolError("a local candidate needs its base")
        if any(c.addr == cand.addr and c.base == cand.base for c in self.local_candidates):
            return
        self.local_candidates.append(cand)
        if cand.type in (CandidateType.HOST, CandidateType.RELAY):
            for remote in self.remote_candidates:
                self._add_pair(cand, remote)
        self._update()

    def add_remote_candidate(self, cand: Candidate) -> None:
        """One of the peer's candidates (e.g. `Candidate.from_sdp_untrusted(line)`)."""
        if cand.component != COMPONENT:
            return
        for i, known in enumerate(self.remote_candidates):
            if known.addr == cand.addr:
                if known.type is CandidateType.PRFLX:  # signalling tells us what it really is
                    self.remote_candidates[i] = cand
                return
        if len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
            self.stats["drop_remote_candidate_limit"] += 1
            return
        self.remote_candidates.append(cand)
        for local in self.local_candidates:
            if local.type in (CandidateType.HOST, CandidateType.RELAY):
                self._add_pair(local, cand)
        self._update()

    def end_of_local_candidates(self) -> None:
        self._local_complete = True
        self._update()

    def end_of_remote_candidates(self) -> None:
        self._remote_complete = True
        self._update()

    # --- Reading state --------------------------------------------------------------------

    def valid_pairs(self) -> list[CandidatePair]:
        """The valid list, best first."""
        return sorted(
            (p for p in self.pairs if p.valid), key=lambda p: p.valid_priority, reverse=True
        )

    def owns(self, transaction_id: bytes) -> bool:
        """Whether a STUN response with this transaction id answers one of our checks (the
        node routes responses to the agent that sent the request)."""
        return transaction_id in self._checks

    def best_valid_pair(self, exclude: CandidatePair | None = None) -> CandidatePair | None:
        for pair in self.valid_pairs():
            if pair is not exclude:
                return pair
        return None

    # --- Sans-IO interface ----------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[Addr, Addr, bytes]]:
        """(local base, remote address, datagram) to send; the list is handed over."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        if self.state in (IceState.FAILED, IceState.CLOSED):
            return None
        times = [d for c in self._checks.values() if (d := c.tx.next_deadline()) is not None]
        if self._has_check_work():
            times.append(self._pace_at)
        if self._nomination_pending():
            assert self._first_valid_at is not None
            times.append(self._first_valid_at + self.nomination_delay)
        for pair in self.pairs:
            if pair.valid and pair.consent_at is not None and pair.consent_next is not None:
                times.append(min(pair.consent_next, pair.consent_at + self.consent_timeout))
        if self._recheck_at is not None:
            times.append(self._recheck_at)
        return min(times, default=None)

    def handle_timeout(self, now: float) -> None:
        if self.state in (IceState.FAILED, IceState.CLOSED):
            return
        for tid, check in list(self._checks.items()):
            if check.tx.handle_timeout(now):
                self._out.append((check.pair.local.addr, check.pair.remote.addr, check.tx.request))
                self.stats["tx_retransmit"] += 1
            elif check.tx.done:
                del self._checks[tid]
                self._check_timed_out(check)
        self._update(now)
        if now >= self._pace_at:
            self._paced_check(now)
        self._consent(now)
        if self._recheck_at is not None and now >= self._recheck_at:
            self._recheck(now)
        self._update(now)

    def receive(
        self, data: bytes | memoryview, local_base: Addr, remote_addr: Addr, now: float
    ) -> None:
        """One STUN datagram that arrived at `local_base` from `remote_addr`. Never raises:
        malformed, unauthenticated and unexpected messages are counted in `stats`."""
        self.stats["rx"] += 1
        if self.state in (IceState.FAILED, IceState.CLOSED):
            self.stats["drop_finished"] += 1
            return
        try:
            msg = stun.parse_untrusted(data)
        except BadPacket:
            self.stats["drop_malformed"] += 1
            return
        if msg.method is not Method.BINDING:
            self.stats["drop_method"] += 1
        elif msg.cls is Class.REQUEST:
            self._on_request(msg, local_base, remote_addr, now)
        elif msg.cls is Class.INDICATION:
            self.stats["rx_indication"] += 1  # RFC 8445 §11 keepalive: nothing to do
        else:
            self._on_response(msg, local_base, remote_addr, now)
        self._update(now)

    # --- Path control ---------------------------------------------------------------------

    def select(self, pair: CandidatePair, now: float) -> None:
        """Send on another valid pair from now on (failover, or relay → direct). The
        controlling agent also nominates it (USE-CANDIDATE) so the peer follows with its
        own `Nominated`; no event comes back here unless that check fails (`ConsentLost`)."""
        if pair not in self.pairs or not pair.valid:
            raise LocalProtocolError("only a valid pair can be selected")
        if self.state not in (IceState.RUNNING, IceState.COMPLETED):
            raise LocalProtocolError(f"cannot select in state {self.state.value}")
        if self.selected_pair is not None and self.selected_pair is not pair:
            self.selected_pair.nominated = False
        self.selected_pair = pair
        pair.nominated = True
        self.state = IceState.COMPLETED
        if self.controlling:
            self._triggered.append((pair, True))
            self._nominating = pair
        self._update(now)

    def close(self) -> None:
        """Stop: no more datagrams, events or deadlines."""
        self.state = IceState.CLOSED
        self._checks.clear()
        self._triggered.clear()
        self._out.clear()

    # --- Pairs ----------------------------------------------------------------------------

    def _priority(self, local: Candidate, remote: Candidate) -> int:
        if self.controlling:
            return pair_priority(local.priority, remote.priority)
        return pair_priority(remote.priority, local.priority)

    def _add_pair(self, local: Candidate, remote: Candidate) -> CandidatePair | None:
        if not _same_family(local.address, remote.address):
            return None
        key = (local.addr, remote.addr)
        if key in self._by_key:
            return self._by_key[key]
        pair = CandidatePair(local, remote, self._priority(local, remote))
        # §6.1.2.6: one Waiting pair per foundation, the rest Frozen.
        if not any(
            p.foundation == pair.foundation
            and p.state in (PairState.WAITING, PairState.IN_PROGRESS)
            for p in self.pairs
        ):
            pair.state = PairState.WAITING
        self.pairs.append(pair)
        self._by_key[key] = pair
        self._sort()
        if len(self.pairs) > MAX_PAIRS:  # §6.1.2.5: drop the lowest-priority pair
            drop = next(
                (p for p in reversed(self.pairs) if not p.valid and p is not pair), self.pairs[-1]
            )
            self._remove_pair(drop)
            if drop is pair:
                return None
        return pair

    def _remove_pair(self, pair: CandidatePair) -> None:
        self.pairs.remove(pair)
        del self._by_key[pair.key]
        for tid in [t for t, c in self._checks.items() if c.pair is pair]:
            del self._checks[tid]

    def _sort(self) -> None:
        self.pairs.sort(key=lambda p: p.priority, reverse=True)

    def _switch_role(self) -> None:
        self.controlling = not self.controlling
        self.stats["role_switch"] += 1
        for pair in self.pairs:
            pair.priority = self._priority(pair.local, pair.remote)
            if pair.mapped is not None:
                pair.valid_priority = self._priority(pair.mapped, pair.remote)
        self._sort()
        self._nominating = None
        self._events.append(RoleChanged(self.controlling))

    # --- Sending checks (§7.2.2, RFC 7675) ------------------------------------------------

    def _has_check_work(self) -> bool:
        if self._remote_key is None or self.state not in (IceState.RUNNING, IceState.COMPLETED):
            return False
        return bool(self._triggered) or any(p.state is PairState.WAITING for p in self.pairs)

    def _paced_check(self, now: float) -> None:
        """§6.1.4.2: one check per Ta, triggered checks first."""
        if self._remote_key is None:
            return
        while self._triggered:
            pair, use_candidate = self._triggered.popleft()
            if pair not in self.pairs:
                continue
            if use_candidate:
                if pair.valid:
                    self._send_check(pair, now, _Kind.CHECK, use_candidate=True)
                    return
                if self._nominating is pair:
                    self._nominating = None
                continue
            if pair.state is PairState.WAITING:
                self._send_check(pair, now, _Kind.CHECK)
                return
        for pair in self.pairs:
            if pair.state is PairState.WAITING:
                self._send_check(pair, now, _Kind.CHECK)
                return

    def _send_check(
        self, pair: CandidatePair, now: float, kind: _Kind, *, use_candidate: bool = False
    ) -> None:
        assert self._remote_key is not None and self.remote_ufrag is not None
        tid = stun.new_transaction_id(self._rng)
        prflx_priority = candidate_priority(
            CandidateType.PRFLX, local_preference_of(pair.local.priority)
        )
        msg = Message(
            Method.BINDING,
            Class.REQUEST,
            tid,
            username=f"{self.remote_ufrag}:{self.local_ufrag}",
            priority=prflx_priority,
            ice_controlling=self.tie_breaker if self.controlling else None,
            ice_controlled=None if self.controlling else self.tie_breaker,
            use_candidate=use_candidate and self.controlling,
            software=self.software,
        )
        data = stun.encode(msg, key=self._remote_key)
        if kind is _Kind.CONSENT:
            tx = StunTransaction(tid, data, now, rto=CHECK_RTO, rc=CONSENT_RC, rm=CONSENT_RM)
        else:
            rto, rc, rm = self._check_timer
            tx = StunTransaction(tid, data, now, rto=rto, rc=rc, rm=rm)
            if pair.state is not PairState.SUCCEEDED:
                pair.state = PairState.IN_PROGRESS
            self._pace_at = now + self.ta
        self._checks[tid] = _Check(
            pair, tx, kind, use_candidate and self.controlling, self.controlling, prflx_priority
        )
        self._out.append((pair.local.addr, pair.remote.addr, data))
        self.stats[f"tx_{kind.value}"] += 1

    def _check_timed_out(self, check: _Check) -> None:
        pair = check.pair
        if check.kind is _Kind.CONSENT or check.cancelled:
            return
        if check.use_candidate:
            # The nomination got no answer: the path is gone; nominate again later.
            if self._nominating is pair:
                self._nominating = None
            self._fail_pair(pair)
        elif pair.state is PairState.IN_PROGRESS and not any(
            c.pair is pair and c.kind is _Kind.CHECK for c in self._checks.values()
        ):
            self._fail_pair(pair)  # §7.2.5.2: a check that times out fails its pair

    def _fail_pair(self, pair: CandidatePair) -> None:
        pair.state = PairState.FAILED
        pair.nominate_on_success = False
        if self._nominating is pair:
            self._nominating = None
        was_selected = pair is self.selected_pair
        if pair.valid:
            pair.valid = False
            pair.consent_at = pair.consent_next = None
            if was_selected:
                self.selected_pair = None
                pair.nominated = False
            self._events.append(ConsentLost(pair, was_selected))

    # --- Responses (§7.2.5) ---------------------------------------------------------------

    def _on_response(self, msg: Message, local_base: Addr, remote_addr: Addr, now: float) -> None:
        check = self._checks.get(msg.transaction_id)
        if check is None:
            self.stats["drop_stray_response"] += 1
            return
        assert self._remote_key is not None
        if not stun.verify_integrity(msg, self._remote_key):
            self.stats["drop_bad_integrity"] += 1  # keep waiting for the real answer
            return
        del self._checks[msg.transaction_id]
        check.tx.complete()
        pair = check.pair
        if remote_addr != pair.remote.addr or local_base != pair.local.addr:
            self.stats["drop_asymmetric"] += 1  # §7.2.5.2.1: the pair fails
            if check.kind is _Kind.CHECK:
                self._fail_pair(pair)
            return
        if msg.cls is Class.ERROR:
            self._on_error_response(msg, check)
            return
        if msg.xor_mapped_address is None:
            self.stats["drop_no_mapped_address"] += 1
            return
        self.stats["rx_success"] += 1
        if not check.tx.retransmitted:  # Karn: a retransmitted request's RTT is ambiguous
            pair.rtt = now - check.tx.sent_at
        self._on_success(pair, check, msg.xor_mapped_address, now)

    def _on_error_response(self, msg: Message, check: _Check) -> None:
        pair = check.pair
        code = msg.error_code.code if msg.error_code is not None else 0
        self.stats[f"rx_error_{code}"] += 1
        if code == stun.ROLE_CONFLICT:
            # §7.2.5.1: switch role if we still hold the one the request claimed, and retry.
            if check.controlling == self.controlling:
                self._switch_role()
            if check.kind is _Kind.CHECK and pair.state is not PairState.SUCCEEDED:
                pair.state = PairState.WAITING
                self._triggered.append((pair, False))
            return
        if check.kind is _Kind.CHECK:
            if check.use_candidate and self._nominating is pair:
                self._nominating = None
            self._fail_pair(pair)  # §7.2.5.2.4: an unrecoverable error fails the pair

    def _on_success(self, pair: CandidatePair, check: _Check, mapped: Addr, now: float) -> None:
        if check.kind is _Kind.CONSENT:
            if pair.valid:  # RFC 7675 §5.1: an authenticated success response refreshes consent
                pair.consent_at = now
            return
        pair.consent_at = now
        if pair.consent_next is None:
            pair.consent_next = now + self._consent_delay()
        # §7.2.5.3.1: a mapped address we do not know is a peer-reflexive local candidate.
        local = next((c for c in self.local_candidates if c.addr == mapped), None)
        if local is None:
            local = Candidate(
                foundation(CandidateType.PRFLX, pair.local.address),
                check.priority,
                mapped[0],
                mapped[1],
                CandidateType.PRFLX,
                base=pair.local.addr,
            )
            self.local_candidates.append(local)
        # §7.2.5.3.2: the valid pair is (the candidate at the mapped address, the remote).
        pair.mapped = local
        pair.valid_priority = self._priority(local, pair.remote)
        pair.state = PairState.SUCCEEDED
        pair.recheck = False
        newly_valid = not pair.valid
        pair.valid = True
        # §7.2.5.3.3: unfreeze the pairs of the same foundation.
        for other in self.pairs:
            if other.state is PairState.FROZEN and other.foundation == pair.foundation:
                other.state = PairState.WAITING
        if newly_valid:
            if self._first_valid_at is None:
                self._first_valid_at = now
            self._events.append(PairValid(pair))
            selected = self.selected_pair
            if selected is not None and pair.valid_priority > selected.valid_priority:
                self._events.append(BetterPairValid(pair))
        if check.use_candidate and self.controlling:
            if self._nominating is pair:
                self._nominating = None
            self._nominate(pair)  # §8.1.1: a valid pair whose USE-CANDIDATE check succeeded
        elif not self.controlling and pair.nominate_on_success:
            pair.nominate_on_success = False
            self._nominate(pair)  # §7.3.1.5: nominated by the peer before it was valid

    def _nominate(self, pair: CandidatePair) -> None:
        if self.selected_pair is pair:
            return
        if self.selected_pair is not None:
            self.selected_pair.nominated = False
        pair.nominated = True
        self.selected_pair = pair
        self.state = IceState.COMPLETED
        self._events.append(Nominated(pair))
        best = self.best_valid_pair()
        if best is not None and best.valid_priority > pair.valid_priority:
            self._events.append(BetterPairValid(best))

    # --- Requests (§7.3) -------------------------------------------------------------------

    def _on_request(self, msg: Message, local_base: Addr, remote_addr: Addr, now: float) -> None:
        local = next(
            (
                c
                for c in self.local_candidates
                if c.addr == local_base and c.type in (CandidateType.HOST, CandidateType.RELAY)
            ),
            None,
        )
        if local is None:
            self.stats["drop_unknown_base"] += 1
            return
        if msg.username is None or not msg.has_integrity:
            self.stats["drop_unauthenticated"] += 1
            return
        ours, sep, theirs = msg.username.partition(":")
        if (
            not sep
            or ours != self.local_ufrag
            or (self.remote_ufrag is not None and theirs != self.remote_ufrag)
        ):
            self.stats["drop_bad_username"] += 1
            return
        if not stun.verify_integrity(msg, self._local_key):
            self.stats["drop_bad_integrity"] += 1
            return
        self.stats["rx_check"] += 1
        if msg.unknown_required:
            self._respond(
                stun.error_response(
                    msg,
                    stun.UNKNOWN_ATTRIBUTE,
                    "Unknown Attribute",
                    unknown_attributes=msg.unknown_required,
                ),
                local_base,
                remote_addr,
            )
            return
        if msg.priority is None:
            self._respond(stun.error_response(msg, stun.BAD_REQUEST), local_base, remote_addr)
            return
        # §7.3.1.1: role conflict, decided by the tie-breakers.
        if self.controlling and msg.ice_controlling is not None:
            if self.tie_breaker >= msg.ice_controlling:
                self._role_conflict(msg, local_base, remote_addr)
                return
            self._switch_role()
        elif not self.controlling and msg.ice_controlled is not None:
            if self.tie_breaker >= msg.ice_controlled:
                self._switch_role()
            else:
                self._role_conflict(msg, local_base, remote_addr)
                return
        self._respond(
            stun.success_response(msg, xor_mapped_address=remote_addr, software=self.software),
            local_base,
            remote_addr,
        )
        # §7.3.1.3: a source address we do not know is a peer-reflexive remote candidate.
        remote = next((c for c in self.remote_candidates if c.addr == remote_addr), None)
        if remote is None:
            if len(self.remote_candidates) >= MAX_REMOTE_CANDIDATES:
                self.stats["drop_remote_candidate_limit"] += 1
                return
            self._prflx_count += 1
            remote = Candidate(
                f"prflx{self._prflx_count}",
                msg.priority,
                remote_addr[0],
                remote_addr[1],
                CandidateType.PRFLX,
            )
            self.remote_candidates.append(remote)
        # §7.3.1.4: triggered check.
        pair = self._by_key.get((local_base, remote_addr)) or self._add_pair(local, remote)
        if pair is None:
            return
        if pair.state is PairState.IN_PROGRESS:
            for check in self._checks.values():
                if check.pair is pair and check.kind is _Kind.CHECK and not check.use_candidate:
                    check.tx.cancel()
                    check.cancelled = True
            pair.state = PairState.WAITING
            self._triggered.append((pair, False))
        elif pair.state is not PairState.SUCCEEDED:
            pair.state = PairState.WAITING
            if not any(p is pair and not uc for p, uc in self._triggered):
                self._triggered.append((pair, False))
        # §7.3.1.5: USE-CANDIDATE from the controlling agent.
        if msg.use_candidate and not self.controlling:
            if pair.valid and pair.state is PairState.SUCCEEDED:
                self._nominate(pair)
            else:
                pair.nominate_on_success = True

    def _role_conflict(self, msg: Message, local_base: Addr, remote_addr: Addr) -> None:
        self.stats["tx_role_conflict"] += 1
        response = stun.error_response(msg, stun.ROLE_CONFLICT, "Role Conflict")
        self._respond(response, local_base, remote_addr)

    def _respond(self, response: Message, local_base: Addr, remote_addr: Addr) -> None:
        # Responses carry MESSAGE-INTEGRITY under our own password (§7.3.1, RFC 8489 §9.1.3).
        self._out.append((local_base, remote_addr, stun.encode(response, key=self._local_key)))

    # --- Timers: nomination, consent, rechecks, failure ------------------------------------

    def _nomination_pending(self) -> bool:
        return (
            self.controlling
            and self.state is IceState.RUNNING
            and self.selected_pair is None
            and self._nominating is None
            and self._first_valid_at is not None
            and any(p.valid for p in self.pairs)
        )

    def _maybe_nominate(self, now: float) -> None:
        """§8.1.1 regular nomination: the best valid pair, once nothing better is pending or
        NOMINATION_DELAY after the first valid pair."""
        if not self._nomination_pending():
            return
        best = self.best_valid_pair()
        if best is None:
            return
        assert self._first_valid_at is not None
        better_pending = any(
            p.state in (PairState.FROZEN, PairState.WAITING, PairState.IN_PROGRESS)
            and p.priority > best.valid_priority
            for p in self.pairs
        )
        if better_pending and now < self._first_valid_at + self.nomination_delay:
            return
        self._nominating = best
        self._triggered.appendleft((best, True))
        self.stats["nominations"] += 1

    def _consent_delay(self) -> float:
        return self.consent_interval * self._rng.uniform(0.8, 1.2)

    def _consent(self, now: float) -> None:
        """RFC 7675 §5.1 on every valid pair: refresh every ~interval, expire after timeout."""
        for pair in list(self.pairs):
            if not pair.valid or pair.consent_at is None or pair.consent_next is None:
                continue
            if now >= pair.consent_at + self.consent_timeout:
                self.stats["consent_lost"] += 1
                self._fail_pair(pair)
            elif now >= pair.consent_next and self._remote_key is not None:
                pair.consent_next = now + self._consent_delay()
                self._send_check(pair, now, _Kind.CONSENT)

    def _recheck(self, now: float) -> None:
        """Failed pairs better than the selected one get another check (relay → direct)."""
        self._recheck_at = now + self.recheck_interval
        floor = self.selected_pair.valid_priority if self.selected_pair is not None else -1
        for pair in self.pairs:
            if pair.state is PairState.FAILED and pair.priority > floor:
                pair.state = PairState.WAITING
                pair.recheck = True
                self.stats["rechecks"] += 1

    def _update(self, now: float | None = None) -> None:
        """Bookkeeping after every input: unfreeze, nominate, arm rechecks, detect failure."""
        if self.state not in (IceState.RUNNING, IceState.COMPLETED):
            return
        # §6.1.4.2 step 3: nothing Waiting → one Frozen pair per idle foundation.
        if not any(p.state is PairState.WAITING for p in self.pairs):
            busy = {
                p.foundation
                for p in self.pairs
                if p.state in (PairState.WAITING, PairState.IN_PROGRESS)
            }
            for pair in self.pairs:
                if pair.state is PairState.FROZEN and pair.foundation not in busy:
                    pair.state = PairState.WAITING
                    busy.add(pair.foundation)
        if now is not None:
            self._maybe_nominate(now)
            if self.state is IceState.COMPLETED and self._recheck_at is None:
                self._recheck_at = now + self.recheck_interval
        if (
            self.state is IceState.RUNNING
            and self._local_complete
            and self._remote_complete
            and not self._triggered
            and all(p.state is PairState.FAILED for p in self.pairs)
        ):
            self.state = IceState.FAILED
            self._checks.clear()
            self._events.append(Failed("every candidate pair failed"))


# --- Server-reflexive gathering (RFC 8445 §5.1.1.2, RFC 8489 Binding) ----------------------


@dataclass(frozen=True, slots=True)
class SrflxFound:
    """`server` saw `base` as `candidate.addr`: add `candidate` to the agents (and send it to
    peers). If the mapped address equals the base there is no NAT and it is redundant."""

    base: Candidate
    server: Addr
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class GatherFailed:
    base: Candidate
    server: Addr
    reason: str


GatherEvent = SrflxFound | GatherFailed


class SrflxGatherer:
    """Binding requests to STUN servers, one transaction per (host candidate, server).

    The node sends `datagrams_to_send()` from each base to its server and feeds every STUN
    datagram whose transaction id `owns` to `receive_untrusted`."""

    def __init__(
        self,
        *,
        rng: random.Random | None = None,
        rto: float = stun.RTO,
        rc: int = stun.RC,
        rm: int = stun.RM,
        software: str | None = None,
    ) -> None:
        self._rng = rng or random.SystemRandom()
        self._timer = (rto, rc, rm)
        self.software = software
        self._pending: dict[bytes, tuple[Candidate, Addr, StunTransaction]] = {}
        self._out: list[tuple[Addr, Addr, bytes]] = []
        self._events: collections.deque[GatherEvent] = collections.deque()
        self.stats: collections.Counter[str] = collections.Counter()

    def add(self, base: Candidate, server: Addr, now: float) -> None:
        """Ask `server` what `base` (a host candidate) looks like from outside."""
        tid = stun.new_transaction_id(self._rng)
        msg = Message(Method.BINDING, Class.REQUEST, tid, software=self.software)
        data = stun.encode(msg)
        rto, rc, rm = self._timer
        self._pending[tid] = (base, server, StunTransaction(tid, data, now, rto=rto, rc=rc, rm=rm))
        self._out.append((base.addr, server, data))

    @property
    def done(self) -> bool:
        return not self._pending

    def owns(self, transaction_id: bytes) -> bool:
        return transaction_id in self._pending

    def datagrams_to_send(self) -> list[tuple[Addr, Addr, bytes]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> GatherEvent | None:
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        times = [d for _, _, tx in self._pending.values() if (d := tx.next_deadline()) is not None]
        return min(times, default=None)

    def handle_timeout(self, now: float) -> None:
        for tid, (base, server, tx) in list(self._pending.items()):
            if tx.handle_timeout(now):
                self._out.append((base.addr, server, tx.request))
            elif tx.done:
                del self._pending[tid]
                self._events.append(GatherFailed(base, server, "no response"))

    def receive_untrusted(
        self, data: bytes | memoryview, local_base: Addr, remote_addr: Addr, now: float
    ) -> None:
        """A STUN datagram from a server. Raises BadPacket if it is malformed or not an
        answer to one of our requests from the server we asked."""
        msg = stun.parse_untrusted(data)
        entry = self._pending.get(msg.transaction_id)
        if entry is None or msg.method is not Method.BINDING or msg.cls < Class.SUCCESS:
            raise BadPacket("not a response to a pending Binding request")
        base, server, tx = entry
        if remote_addr != server or local_base != base.addr:
            raise BadPacket("Binding response from the wrong address")
        del self._pending[msg.transaction_id]
        tx.complete()
        if msg.cls is Class.ERROR:
            code = msg.error_code.code if msg.error_code else 0
            self._events.append(GatherFailed(base, server, f"error {code}"))
            return
        mapped = msg.xor_mapped_address or msg.mapped_address
        if mapped is None:
            self._events.append(GatherFailed(base, server, "no mapped address"))
            return
        self._events.append(SrflxFound(base, server, srflx_candidate(mapped, base, server)))


def candidates_to_sdp(cands: Iterable[Candidate]) -> list[str]:
    """The lines to put in `con_req` / `con_resp` (prflx candidates are never signalled)."""
    return [c.to_sdp() for c in cands if c.type is not CandidateType.PRFLX]
