"""`ipop-trio bench`'s table: the user-space hop line under the targets."""

from __future__ import annotations

from typing import Any

from ipop_trio.bench import format_table


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
