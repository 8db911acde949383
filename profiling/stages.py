"""Per-stage timings over an interval: the difference of two `Stats.snapshot()`s.

The node's stage timers (ipop_trio/stats.py) are cumulative since start. What happened while
we recorded is `after - before`: per stage, how many batches and items, how many bytes and how
many seconds; the batch-size histogram of those batches; the drops counted meanwhile. This
module is pure (dicts in, dicts out) and tolerant: a stage, drop reason or gauge that one
snapshot lacks counts as zero, and sections the node does not report yet (channel waits, the
TAP writer's queue depth) are named in ``missing`` instead of failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ipop_trio.stats import HIST_BUCKETS, STAGES

# What each stage covers, for people reading a report (docs/architecture.md, "The data path").
STAGE_LABELS: dict[str, str] = {
    "tap_read": "TAP read",
    "switch": "switch (route, ARP)",
    "encode": "encode (TSO split into pieces)",
    "seal": "seal (AEAD)",
    "udp_send": "UDP send (GSO)",
    "udp_recv": "UDP receive (GRO)",
    "open": "open + replay check",
    "reassemble": "reassemble (pieces -> super-frames)",
    "tap_write": "TAP write",
}
OUTBOUND = ("tap_read", "switch", "encode", "seal", "udp_send")
INBOUND = ("udp_recv", "open", "reassemble", "tap_write")

# Sections a complete snapshot would carry for the report; absent ones are listed as missing.
# `channels`: per channel {"depth", "max_depth", "wait_seconds", "batches"} (cumulative waits).
WANTED_SECTIONS = {
    "channels": "channel depths and queue waits (per channel: depth, max depth, wait seconds)",
}
WANTED_GAUGES: dict[str, str] = {}  # channel depths now live under `channels`


def bucket_labels(n: int = HIST_BUCKETS) -> list[str]:
    """Labels of the power-of-two batch-size buckets: 1, 2-3, 4-7, ..., 2048+."""
    labels = ["1"]
    for i in range(1, n - 1):
        labels.append(f"{1 << i}-{(1 << (i + 1)) - 1}")
    labels.append(f"{1 << (n - 1)}+")
    return labels[:n]


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def _stage_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    hist_a = list(after.get("batch_hist") or [])
    hist_b = list(before.get("batch_hist") or [])
    width = max(len(hist_a), len(hist_b))
    hist_a += [0] * (width - len(hist_a))
    hist_b += [0] * (width - len(hist_b))
    return {
        "batches": int(_num(after.get("batches")) - _num(before.get("batches"))),
        "items": int(_num(after.get("items")) - _num(before.get("items"))),
        "bytes": int(_num(after.get("bytes")) - _num(before.get("bytes"))),
        "seconds": _num(after.get("seconds")) - _num(before.get("seconds")),
        "batch_hist": [int(a - b) for a, b in zip(hist_a, hist_b, strict=True)],
    }


def _ordered(names: Iterable[str]) -> list[str]:
    """Known stages in flow order, then any new ones the node reports, sorted."""
    names = set(names)
    return [s for s in STAGES if s in names] + sorted(names - set(STAGES))


def diff_snapshots(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What the node did between two `stats` snapshots.

    Returns {"interval", "stages": {name: {batches, items, bytes, seconds, batch_hist}},
    "drops": {reason: n}, "gauges": {name: value at the end}, "channels": ... or None,
    "missing": [what the snapshot does not report]}."""
    st_b = before.get("stages") or {}
    st_a = after.get("stages") or {}
    stages = {
        name: _stage_delta(st_b.get(name) or {}, st_a.get(name) or {})
        for name in _ordered([*st_a, *st_b])
    }
    dr_b = before.get("drops") or {}
    dr_a = after.get("drops") or {}
    drops = {r: int(_num(dr_a.get(r)) - _num(dr_b.get(r))) for r in sorted({*dr_a, *dr_b})}
    drops = {r: n for r, n in drops.items() if n}
    gauges = {k: v for k, v in (after.get("gauges") or {}).items() if isinstance(v, int | float)}
    missing = [why for key, why in WANTED_SECTIONS.items() if key not in after]
    missing += [f"gauge {g!r}: {why}" for g, why in WANTED_GAUGES.items() if g not in gauges]
    channels = after.get("channels")
    if isinstance(channels, dict) and isinstance(before.get("channels"), dict):
        channels = _channel_delta(before["channels"], channels)
    return {
        "interval": _num(after.get("uptime")) - _num(before.get("uptime")),
        "stages": stages,
        "drops": drops,
        "gauges": gauges,
        "channels": channels if isinstance(channels, dict) else None,
        "missing": missing,
    }


def _channel_delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Cumulative channel counters (waits, batches) as differences; depths as reported."""
    out: dict[str, Any] = {}
    for name, ch in after.items():
        if not isinstance(ch, dict):
            continue
        prev = before.get(name)
        if not isinstance(prev, dict):
            prev = {}
        row = dict(ch)
        if "wait_seconds" in ch:
            row["wait_seconds"] = _num(ch.get("wait_seconds")) - _num(prev.get("wait_seconds"))
        if "batches" in ch:
            row["batches"] = int(_num(ch.get("batches")) - _num(prev.get("batches")))
        out[name] = row
    return out


def stage_rows(delta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per stage with derived figures: share of all stage time, µs per batch,
    ns per item, mean batch size, MB/s while busy."""
    stages: Mapping[str, Mapping[str, Any]] = delta.get("stages") or {}
    total = sum(_num(s.get("seconds")) for s in stages.values())
    rows = []
    for name, s in stages.items():
        seconds = _num(s.get("seconds"))
        batches = int(_num(s.get("batches")))
        items = int(_num(s.get("items")))
        nbytes = int(_num(s.get("bytes")))
        rows.append(
            {
                "stage": name,
                "label": STAGE_LABELS.get(name, name),
                "direction": "outbound"
                if name in OUTBOUND
                else "inbound"
                if name in INBOUND
                else "-",
                "batches": batches,
                "items": items,
                "bytes": nbytes,
                "seconds": seconds,
                "share": seconds / total if total > 0 else 0.0,
                "us_per_batch": seconds / batches * 1e6 if batches else None,
                "ns_per_item": seconds / items * 1e9 if items else None,
                "mean_batch": items / batches if batches else None,
                "busy_mb_per_s": nbytes / seconds / 1e6 if seconds > 0 else None,
                "batch_hist": list(s.get("batch_hist") or []),
            }
        )
    return rows


def total_seconds(delta: Mapping[str, Any]) -> float:
    """Sum of all stage timers over the interval."""
    return sum(_num(s.get("seconds")) for s in (delta.get("stages") or {}).values())


# Consistency of stage timers with the process's CPU time.
#
# The stage timers are wall-clock spans (perf_counter_ns) around each stage's work, and that
# work is almost all CPU: Python code, AEAD, and syscalls (sendmsg/recvmsg/read/write count as
# system CPU). So their sum is tied to the node's busy time over the same interval, but it is
# not equal to its CPU time, for reasons that pull both ways:
#   - CPU outside every stage: Trio's scheduler and epoll, the loop around each batch, link
#     keepalives, the control socket answering our polls. Lower bound: stages >= LOW x CPU.
#   - wall time inside a stage that is not CPU: the thread was runnable but another process had
#     the CPU (on a 2-vCPU machine running iperf3 client and server, two nodes and two py-spys,
#     this is most of the gap: the sum of stage timers reached 2x the CPU time), or it slept
#     (the TAP writer thread waiting for the GIL; py-spy pausing it in --blocking mode).
#     The run-queue wait is measured (schedstat), so the upper bound is on CPU + wait:
#     stages <= HIGH x (CPU + run-queue wait) + SLACK.
# Measured in the lab under iperf3 (2 vCPUs): stages = 1.0x CPU on a quiet machine; with other
# work running, 1.6-2.6x CPU but 0.5-0.8x (CPU + run-queue wait). LOW = 0.35 is far below
# anything seen, so only a stage timer that is not running fails it. HIGH = 1.25 and
# SLACK = 50 ms leave room for GIL waits (the TAP writer: <10% of stage time) and the 10 ms
# tick of /proc CPU times (schedstat, in ns, is used when the kernel has it); beyond that a
# span is counted twice or in the wrong unit.
CONSISTENT_LOW = 0.35
CONSISTENT_HIGH = 1.25
CONSISTENT_SLACK_S = 0.05


def consistency(stage_s: float, cpu_s: float, wait_s: float | None = None) -> dict[str, Any]:
    """Whether the stage timers' total fits the node's CPU time (and run-queue wait, when
    known): LOW x CPU <= stages <= HIGH x (CPU + wait) + SLACK."""
    busy = cpu_s + (wait_s or 0.0)
    low = CONSISTENT_LOW * cpu_s
    high = CONSISTENT_HIGH * busy + CONSISTENT_SLACK_S
    return {
        "stage_seconds": stage_s,
        "cpu_seconds": cpu_s,
        "runqueue_wait_seconds": wait_s,
        "ratio": stage_s / cpu_s if cpu_s > 0 else None,
        "ratio_busy": stage_s / busy if busy > 0 else None,
        "bounds_seconds": [low, high],
        "band": [CONSISTENT_LOW, CONSISTENT_HIGH],
        "consistent": cpu_s > 0 and low <= stage_s <= high,
    }


def gauge_summary(samples: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Min/mean/max of each gauge over snapshots polled while recording."""
    values: dict[str, list[float]] = {}
    for snap in samples:
        for name, value in (snap.get("gauges") or {}).items():
            if isinstance(value, int | float):
                values.setdefault(name, []).append(float(value))
    return {
        name: {
            "samples": len(v),
            "min": min(v),
            "mean": sum(v) / len(v),
            "max": max(v),
        }
        for name, v in sorted(values.items())
    }


__all__ = [
    "CONSISTENT_HIGH",
    "CONSISTENT_LOW",
    "CONSISTENT_SLACK_S",
    "INBOUND",
    "OUTBOUND",
    "STAGE_LABELS",
    "bucket_labels",
    "consistency",
    "diff_snapshots",
    "gauge_summary",
    "stage_rows",
    "total_seconds",
]
