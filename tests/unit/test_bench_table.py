"""`ipop-trio bench`'s pure parts: the user-space hop line under the targets, the order the
rows' runs interleave in, and how per-run counters add up."""

from __future__ import annotations

from typing import Any

from ipop_trio.lab.bench import _add_counts, _interleave, format_table


def row(scenario: str, rtt: float, mbps: float, cpu: float | None) -> dict[str, Any]:
    return {
        "scenario": scenario,
        "streams": 1,
        "netem": None,
        "throughput_mbps": mbps,
        "rtt_p50_ms": rtt,
        "rtt_p99_ms": rtt * 2,
        "cpu_s_per_gb": cpu,
        "rss_mb_max": None if cpu is None else 60.0,
        "retransmits": 0,
    }


MACHINE = {"cpu": "test cpu", "nproc": 2, "kernel": "6.0", "python": "3.11"}


def test_the_hop_cost_is_the_echo_rtt_less_the_direct_ping() -> None:
    rows = [row("direct", 0.061, 15000.0, None), row("secure", 1.4, 850.0, 15.0)]
    table = format_table(
        {"machine": MACHINE, "rows": rows, "echo": {"rtt_p50_ms": 0.251, "rtt_p99_ms": 0.4}}
    )
    assert "one user-space hop costs 0.190 ms here" in table
    assert "RTT p50 0.251 ms, less the direct ping's 0.061" in table


def test_no_hop_line_without_an_echo_measurement() -> None:
    rows = [row("direct", 0.061, 15000.0, None), row("secure", 1.4, 850.0, 15.0)]
    assert "user-space hop" not in format_table({"machine": MACHINE, "rows": rows})


def test_runs_interleave_round_by_round() -> None:
    # Three single-stream rows of 3 runs and a 4-stream row of 1: every row's first run
    # comes before any row's second.
    assert _interleave([3, 1, 3, 3]) == [0, 1, 2, 3, 0, 2, 3, 0, 2, 3]
    assert _interleave([]) == []
    assert _interleave([0, 2]) == [1, 1]


def test_per_run_counters_add_up_and_gauges_keep_the_latest() -> None:
    total: dict[str, dict[str, int]] = {}
    _add_counts(total, {"a_to_b": {"lost": 3, "waiting": 7}}, gauges=["waiting"])
    _add_counts(
        total, {"a_to_b": {"lost": 2, "waiting": 1}, "b_to_a": {"lost": 1}}, gauges=["waiting"]
    )
    assert total == {"a_to_b": {"lost": 5, "waiting": 1}, "b_to_a": {"lost": 1}}
