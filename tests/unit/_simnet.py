"""A seeded, simulated UDP network for sans-IO cores: loss, duplication, reordering, NATs.

No sockets, no sleeps: `SimNet.run` advances a float clock from event to event (the next
delivery or the next deadline of any node). Nodes implement `SimNode`. NATs map private
sources to a public address, endpoint-independently ("eim", port preserving when free) or
per destination ("symmetric", random ports), and filter inbound datagrams either by the
remote's address and port (Linux conntrack style) or not at all ("full cone").
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Addr = tuple[str, int]


class SimNode(Protocol):
    def addresses(self) -> list[str]: ...
    def deliver(self, data: bytes, local: Addr, remote: Addr, now: float) -> None: ...
    def outgoing(self) -> list[tuple[Addr, Addr, bytes]]: ...
    def next_deadline(self) -> float | None: ...
    def handle_timeout(self, now: float) -> None: ...


@dataclass
class Nat:
    public_ip: str
    private_prefix: str  # e.g. "10.1." : the addresses behind this NAT
    symmetric: bool = False
    filtering: bool = True  # address-and-port dependent filtering; False = full cone
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    _map: dict[object, int] = field(default_factory=dict)
    _rev: dict[int, tuple[Addr, set[Addr]]] = field(default_factory=dict)

    def inside(self, ip: str) -> bool:
        return ip.startswith(self.private_prefix)

    def outbound(self, src: Addr, dst: Addr) -> Addr:
        key: object = (src, dst) if self.symmetric else src
        port = self._map.get(key)
        if port is None:
            port = src[1] if not self.symmetric and src[1] not in self._rev else 0
            while port == 0 or port in self._rev:
                port = self.rng.randrange(1024, 65536)
            self._map[key] = port
            self._rev[port] = (src, set())
        self._rev[port][1].add(dst)
        return self.public_ip, port

    def inbound(self, dst: Addr, src: Addr) -> Addr | None:
        entry = self._rev.get(dst[1])
        if entry is None:
            return None
        private, allowed = entry
        if self.filtering and src not in allowed:
            return None
        return private


class SimNet:
    def __init__(
        self,
        seed: int = 0,
        *,
        loss: float = 0.0,
        dup: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.01,
        jitter: float = 0.0,
    ) -> None:
        self.rng = random.Random(seed)
        self.loss, self.dup, self.reorder = loss, dup, reorder
        self.delay, self.jitter = delay, jitter
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self._owner: dict[str, SimNode] = {}
        self.nats: list[Nat] = []
        self.blocked: set[frozenset[str]] = set()  # IP pairs that cannot talk (both ways)
        self._heap: list[tuple[float, int, Addr, Addr, bytes]] = []
        self._seq = itertools.count()
        self.sent = 0
        self.dropped = 0

    def add(self, node: SimNode) -> SimNode:
        self.nodes.append(node)
        for ip in node.addresses():
            self._owner[ip] = node
        return node

    def add_nat(self, nat: Nat) -> Nat:
        self.nats.append(nat)
        return nat

    def block(self, a: str, b: str) -> None:
        self.blocked.add(frozenset((a, b)))

    def unblock(self, a: str, b: str) -> None:
        self.blocked.discard(frozenset((a, b)))

    def _nat_of(self, ip: str) -> Nat | None:
        return next((n for n in self.nats if n.inside(ip)), None)

    def send(self, src: Addr, dst: Addr, data: bytes) -> None:
        self.sent += 1
        nat = self._nat_of(src[0])
        if nat is not None and not nat.inside(dst[0]):
            src = nat.outbound(src, dst)
        if self.rng.random() < self.loss:
            self.dropped += 1
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            at = self.now + self.delay + self.rng.uniform(0.0, self.jitter)
            if self.rng.random() < self.reorder:
                at += self.rng.uniform(0.0, 5 * self.delay)
            heapq.heappush(self._heap, (at, next(self._seq), src, dst, data))

    def _arrive(self, src: Addr, dst: Addr, data: bytes) -> None:
        if frozenset((src[0], dst[0])) in self.blocked:
            self.dropped += 1
            return
        for nat in self.nats:
            if dst[0] == nat.public_ip:
                private = nat.inbound(dst, src)
                if private is None:
                    self.dropped += 1
                    return
                dst = private
                break
        else:
            src_nat = self._nat_of(src[0])
            dst_nat = self._nat_of(dst[0])
            if dst_nat is not None and dst_nat is not src_nat:
                self.dropped += 1  # a private address behind another NAT: unroutable
                return
        node = self._owner.get(dst[0])
        if node is None:
            self.dropped += 1
            return
        node.deliver(data, dst, src, self.now)

    def _flush(self) -> None:
        for node in self.nodes:
            for src, dst, data in node.outgoing():
                self.send(src, dst, data)

    def run(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Advance to `until` (absolute); True as soon as `stop()` holds."""
        for _ in range(2_000_000):
            self._flush()
            if stop is not None and stop():
                return True
            times = [d for n in self.nodes if (d := n.next_deadline()) is not None]
            if self._heap:
                times.append(self._heap[0][0])
            if not times or min(times) > until:
                self.now = max(self.now, until)
                return stop() if stop is not None else False
            self.now = max(self.now, min(times))
            while self._heap and self._heap[0][0] <= self.now:
                _, _, src, dst, data = heapq.heappop(self._heap)
                self._arrive(src, dst, data)
            for node in self.nodes:
                deadline = node.next_deadline()
                if deadline is not None and deadline <= self.now:
                    node.handle_timeout(self.now)
        raise AssertionError("simulation did not settle (a deadline that never moves?)")
