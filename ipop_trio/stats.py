"""Per-stage counters and timers, cheap enough to stay on in production.

Each data-path stage records once per *batch*: how many items, how many bytes, how long
(perf_counter_ns), and which power-of-two batch-size bucket. Drops are counted by reason.
`snapshot()` gives plain JSON-able dicts for `ipop-trio status --json` and the profiler.
Nothing here logs or allocates per packet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

# The data path's stages, in flow order (docs/architecture.md, "The data path").
# outbound = TAP -> UDP, inbound = UDP -> TAP.
STAGES = (
    "tap_read",
    "switch",
    "encode",  # TAP reads -> inner payloads (TSO split into pieces)
    "seal",
    "udp_send",
    "udp_recv",
    "open",  # decrypt + replay check
    "reassemble",  # pieces -> super-frames / segments, switch checks
    "tap_write",
)
CHANNELS = ("outbound", "tap_write")
HIST_BUCKETS = 12  # batch sizes 1, 2-3, 4-7, ... 2048+

now_ns = time.perf_counter_ns


class Stage:
    """Counters of one stage. `record` is the only per-batch call."""

    __slots__ = ("batches", "bytes", "hist", "items", "name", "ns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.batches = 0
        self.items = 0
        self.bytes = 0
        self.ns = 0
        self.hist = [0] * HIST_BUCKETS

    def record(self, items: int, nbytes: int, started_ns: int) -> None:
        self.batches += 1
        self.items += items
        self.bytes += nbytes
        self.ns += now_ns() - started_ns
        self.hist[min(items.bit_length(), HIST_BUCKETS) - 1 if items else 0] += 1

    def add(self, items: int, nbytes: int, ns: int) -> None:
        """Like `record`, for a stage timed in pieces (the caller summed `ns`)."""
        self.batches += 1
        self.items += items
        self.bytes += nbytes
        self.ns += ns
        self.hist[min(items.bit_length(), HIST_BUCKETS) - 1 if items else 0] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "items": self.items,
            "bytes": self.bytes,
            "seconds": self.ns / 1e9,
            "batch_hist": list(self.hist),
        }


class Channel:
    """A bounded queue between two stages: depth now and at most, and how long batches
    waited in it (stamped when put, summed when taken)."""

    __slots__ = ("batches", "depth", "max_depth", "wait_ns")

    def __init__(self) -> None:
        self.depth = self.max_depth = self.batches = self.wait_ns = 0

    def put(self) -> int:
        """A batch went in; returns the stamp to hand to `taken`."""
        self.depth += 1
        if self.depth > self.max_depth:
            self.max_depth = self.depth
        return now_ns()

    def taken(self, stamp: int) -> None:
        self.depth -= 1
        self.batches += 1
        self.wait_ns += now_ns() - stamp

    def snapshot(self) -> dict[str, Any]:
        return {
            "depth": self.depth,
            "max_depth": self.max_depth,
            "batches": self.batches,
            "wait_seconds": self.wait_ns / 1e9,
        }


class NullStage(Stage):
    """A stage whose timer is off: `record` does nothing (to measure what timers cost)."""

    __slots__ = ()

    def record(self, items: int, nbytes: int, started_ns: int) -> None:
        return None

    def add(self, items: int, nbytes: int, ns: int) -> None:
        return None


# Timers stay on in production; IPOP_TRIO_STAGE_TIMERS=0 turns them off only so the bench can
# measure their cost (the data path still calls now_ns() once per batch and stage).
TIMERS_ENV = "IPOP_TRIO_STAGE_TIMERS"


class Stats:
    """All stages and drop counters of one node."""

    def __init__(self, timers: bool | None = None) -> None:
        if timers is None:
            timers = os.environ.get(TIMERS_ENV, "1") != "0"
        self.timers = timers
        kind = Stage if timers else NullStage
        self.stages = {name: kind(name) for name in STAGES}
        self.channels = {name: Channel() for name in CHANNELS}
        self.drops: dict[str, int] = {}
        self.gauges: dict[str, int] = {}
        self.events: dict[str, int] = {}  # things that happened and are not drops (`count`)
        # Counters kept elsewhere (e.g. reassembly), read only when a snapshot is taken.
        self.providers: list[Callable[[], dict[str, int]]] = []
        self.started = time.monotonic()

    def __getitem__(self, name: str) -> Stage:
        return self.stages[name]

    def drop(self, reason: str, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def count(self, name: str, n: int = 1) -> None:
        """Something worth counting that is not a drop (a cookie sent, a relay re-made)."""
        self.events[name] = self.events.get(name, 0) + n

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = dict(self.events)
        for provide in self.providers:
            for key, value in provide().items():
                out[key] = out.get(key, 0) + value
        return out

    def snapshot(self) -> dict[str, Any]:
        return {
            "timers": self.timers,
            "uptime": time.monotonic() - self.started,
            "stages": {name: s.snapshot() for name, s in self.stages.items()},
            "drops": dict(self.drops),
            "gauges": dict(self.gauges),
            "channels": {name: c.snapshot() for name, c in self.channels.items()},
            "counters": self.counters(),
        }
