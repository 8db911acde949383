"""Loss robustness in the lab: the lab wire itself (delay and loss as configured),
the overlay over a lossy wire losing single datagrams rather than whole super-frames, and
iperf3 through the overlay with TAP offload on and off.

The kernel has no netem; `ipop_trio.lab.wire` (in a third namespace) loses and delays frames.
Everything is polled with deadlines; the lab's teardown removes the wire with the rest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.bench import SCENARIOS, format_table, measure
from ipop_trio.lab.impair import (
    Impairment,
    WiredOverlay,
    WiredPair,
    build_wired_pair,
    wire_delta,
)
from ipop_trio.lab.measure import iperf3, percentile, ping_rtts, start_iperf3_server
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import TwoHosts, failed, print_logs

pytestmark = pytest.mark.lab

QUIET_FOR = 0.3  # seconds without datagrams that count as "traffic has stopped"


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - sigmas * sd, mean + sigmas * sd


@pytest.fixture
def wired(request: pytest.FixtureRequest, lab: Lab) -> Callable[[Impairment], WiredPair]:
    """Builds `a — wire — b` in the test's lab with the impairment the test asks for."""

    def build(impairment: Impairment) -> WiredPair:
        return build_wired_pair(lab, impairment)

    return build


# ---------------------------------------------------------------------------------------------
# (a) the wire on its own


def test_the_wire_delays_each_way_by_the_configured_delay(
    wired: Callable[[Impairment], WiredPair],
) -> None:
    delay = 0.020
    pair = wired(Impairment(delay=delay))
    rtts = ping_rtts(pair.a, pair.address_b, count=50, interval=0.02)
    assert len(rtts) == 50, "a loss-free wire lost pings"
    expected = 2 * delay * 1000
    assert min(rtts) >= expected - 0.1, f"a frame left early: {min(rtts)} ms < {expected} ms"
    p50 = percentile(rtts, 50)
    assert p50 is not None and p50 <= expected + 3.0, f"p50 {p50} ms, expected ~{expected} ms"
    counters = pair.wire.counters()
    for way in ("a_to_b", "b_to_a"):
        c = counters[way]
        assert c["lost"] == c["overflow"] == c["oversize"] == 0, counters
        assert c["relayed"] == c["received"] - c["waiting"], counters


def test_the_wire_loses_frames_independently_at_the_configured_rate(
    wired: Callable[[Impairment], WiredPair],
) -> None:
    loss, count = 0.2, 400
    pair = wired(Impairment(loss=loss, seed=1234))
    before = pair.wire.counters()
    rtts = ping_rtts(pair.a, pair.address_b, count=count, interval=0.005)
    after = pair.wire.counters()
    # A ping comes back only if neither its request nor its reply was lost.
    low, high = binomial_bounds(count, (1 - loss) ** 2)
    assert low <= len(rtts) <= high, f"{len(rtts)} of {count} pings answered"
    for way, d in wire_delta(before, after).items():
        low, high = binomial_bounds(d["received"], loss)
        assert d["received"] >= count * (1 - loss) ** 2, (way, d)
        assert low <= d["lost"] <= high, (way, d)
        assert d["overflow"] == d["kernel_drops"] == d["send_errors"] == 0, (way, d)


# ---------------------------------------------------------------------------------------------
# (b) the overlay over a lossy wire: drops are per datagram


def stage_items(status: dict[str, Any], stage: str) -> int:
    return int(status["stats"]["stages"][stage]["items"])


def stage_batches(status: dict[str, Any], stage: str) -> int:
    return int(status["stats"]["stages"][stage]["batches"])


def drop_count(status: dict[str, Any], reason: str) -> int:
    return int(status["stats"]["drops"].get(reason, 0))


def udp_rcvbuf_errors(pair: WiredPair) -> int:
    """The kernel's UDP RcvbufErrors in b's namespace (datagrams the node never read)."""
    lines = [ln.split() for ln in pair.b.check(["cat", "/proc/net/snmp"]).splitlines()]
    udp = [ln for ln in lines if ln and ln[0] == "Udp:"]
    return int(dict(zip(udp[0][1:], udp[1][1:], strict=True))["RcvbufErrors"])


def find_counter(value: Any, key: str) -> int | None:
    """The sum of every integer named `key` anywhere in a status reply; None if none is."""
    if isinstance(value, dict):
        found = [find_counter(v, key) for v in value.values()]
        if key in value and isinstance(value[key], int):
            found.append(value[key])
        hits = [f for f in found if f is not None]
        return sum(hits) if hits else None
    if isinstance(value, list):
        hits = [h for h in (find_counter(v, key) for v in value) if h is not None]
        return sum(hits) if hits else None
    return None


def wait_quiet(overlay: Overlay, *nodes: OverlayNode, timeout: float = 15.0) -> None:
    """Poll until no node sent or received a datagram for QUIET_FOR seconds."""
    deadline = time.monotonic() + timeout

    def marks() -> list[int]:
        out = []
        for node in nodes:
            status = overlay.status(node)
            out += [stage_items(status, "udp_send"), stage_items(status, "udp_recv")]
        return out

    last, since = marks(), time.monotonic()
    while time.monotonic() - since < QUIET_FOR:
        assert time.monotonic() < deadline, "the overlay never went quiet"
        time.sleep(0.05)
        now = marks()
        if now != last:
            last, since = now, time.monotonic()


@pytest.fixture
def lossy_overlay(
    request: pytest.FixtureRequest, wired: Callable[[Impairment], WiredPair]
) -> Iterator[tuple[WiredPair, WiredOverlay, OverlayNode, OverlayNode]]:
    pair = wired(Impairment(loss=0.01, delay=0.005, seed=6))
    overlay = WiredOverlay(pair)
    try:
        alpha, beta = overlay.add_node("alpha", pair.a), overlay.add_node("beta", pair.b)
        overlay.start()
        overlay.wait_established(alpha, beta)
        yield pair, overlay, alpha, beta
    finally:
        if failed(request):
            print_logs(overlay)


def test_a_lossy_underlay_costs_single_datagrams_not_super_frames(
    lossy_overlay: tuple[WiredPair, WiredOverlay, OverlayNode, OverlayNode],
) -> None:
    pair, overlay, alpha, beta = lossy_overlay
    start_iperf3_server(pair.b, one_off=True)
    wait_quiet(overlay, alpha, beta)
    s_alpha, s_beta = overlay.status(alpha), overlay.status(beta)
    wire0, rcvbuf0 = pair.wire.counters(), udp_rcvbuf_errors(pair)

    result = iperf3(pair.a, beta.address, 3)  # raises on any iperf3 error

    wait_quiet(overlay, alpha, beta)
    e_alpha, e_beta = overlay.status(alpha), overlay.status(beta)
    wire = wire_delta(wire0, pair.wire.counters())["a_to_b"]
    rcvbuf = udp_rcvbuf_errors(pair) - rcvbuf0

    def delta(start: dict[str, Any], end: dict[str, Any], f: Callable[..., int], k: str) -> int:
        return f(end, k) - f(start, k)

    sent = delta(s_alpha, e_alpha, stage_items, "udp_send")
    sent -= delta(s_alpha, e_alpha, drop_count, "udp_send_failed")
    received = delta(s_beta, e_beta, stage_items, "udp_recv")
    tap_frames = delta(s_alpha, e_alpha, stage_items, "tap_read")
    missing = sent - received
    lost_on_wire = wire["dropped_udp"] + wire["kernel_drops"] + wire["send_errors"]
    report = (
        f"iperf3 {result.bits_per_second / 1e6:.0f} Mbit/s, {result.retransmits} retransmits; "
        f"alpha sent {sent} datagrams for {tap_frames} TAP frames, beta received {received}; "
        f"wire a->b {wire}; beta rcvbuf errors {rcvbuf}"
    )
    print(report)
    assert result.bytes > 0
    assert wire["oversize"] == 0, "super-frames on the wire: offloads were not turned off"
    assert wire["dropped_udp"] > 0, "the wire lost nothing: the test proves nothing"
    if e_alpha["node"]["offload"]:
        assert sent > tap_frames, "no TSO super-frame was split into datagrams: " + report
    # Every datagram that did not arrive is one the wire (or b's socket buffer) dropped...
    assert abs(missing - lost_on_wire - rcvbuf) <= 3, report
    # ...and every one that did arrive opened: no loss made a later datagram undecryptable.
    for reason in ("bad_datagram", "bad_inner_payload", "unknown_session"):
        assert delta(s_beta, e_beta, drop_count, reason) == 0, (reason, e_beta["stats"]["drops"])
    assert delta(s_beta, e_beta, stage_items, "open") == received, report
    # b receives as a host with a NIC does: GRO merged what arrived from the wire, so the
    # node read its datagrams in fewer receive calls (one call each means no coalescing).
    calls = delta(s_beta, e_beta, stage_batches, "udp_recv")
    assert calls < 0.8 * received, f"{calls} receive calls for {received} datagrams; {report}"
    # The inner TCP resent a few segments per lost datagram; a lost super-frame would cost
    # all its segments (sent / tap_frames of them, ~20-25 here). Under a loaded lab RACK/TLP
    # add spurious ones: 1.7x to 4x the losses were seen in CI-like runs, so the bound sits
    # between that and whole-super-frame loss, relative to the measured frame size.
    assert result.retransmits is not None
    per_frame = sent / max(1, tap_frames)
    assert result.retransmits <= 0.5 * per_frame * lost_on_wire + 100, report
    # The receiver wrote incomplete super-frames as the segments that arrived. The node's
    # reassembler counts this; the check runs once the status exposes those counters.
    for key in ("frames_partial", "segments_rebuilt"):
        end = find_counter(e_beta, key)
        if end is not None:
            assert end - (find_counter(s_beta, key) or 0) > 0, (key, report)


# ---------------------------------------------------------------------------------------------
# (c) TAP offload on and off


class OffloadOverlay(Overlay):
    """An `Overlay` whose node configs set ``[tap] offload`` explicitly."""

    def __init__(self, lab: Lab, *, offload: bool) -> None:
        super().__init__(lab)
        self.offload = offload

    def write_config(self, node: OverlayNode) -> Path:
        path = super().write_config(node)
        text = path.read_text()
        setting = f"offload = {'true' if self.offload else 'false'}"
        assert "\n[tap]\n" in text and "offload" not in text, text
        path.write_text(text.replace("\n[tap]\n", f"\n[tap]\n{setting}\n", 1))
        return path


@pytest.mark.parametrize("offload", [True, False], ids=["offload-on", "offload-off"])
def test_iperf3_both_ways_with_tap_offload_on_and_off(
    request: pytest.FixtureRequest, two_hosts: TwoHosts, offload: bool
) -> None:
    overlay = OffloadOverlay(two_hosts.lab, offload=offload)
    try:
        alpha = overlay.add_node("alpha", two_hosts.a)
        beta = overlay.add_node("beta", two_hosts.b)
        overlay.start()
        overlay.wait_established(alpha, beta)
        for node in (alpha, beta):
            assert bool(overlay.status(node)["node"]["offload"]) is offload
        start_iperf3_server(two_hosts.b)
        for reverse in (False, True):
            result = iperf3(two_hosts.a, beta.address, 3, reverse=reverse)  # raises on error
            assert result.bytes > 0
        for node in (alpha, beta):
            drops = overlay.status(node)["stats"]["drops"]
            assert not {"bad_datagram", "bad_tap_frame", "bad_inner_payload"} & set(drops), drops
    finally:
        if failed(request):
            print_logs(overlay)


# ---------------------------------------------------------------------------------------------
# The bench's loss rows (schema and bookkeeping, not targets)


def test_the_bench_reports_its_loss_rows_in_the_documented_schema() -> None:
    scenarios = [
        sc
        for sc in SCENARIOS
        if (sc.impair is not None or sc.name == "plain") and sc.datapath in (None, "native")
    ]
    result = measure(1.0, scenarios=scenarios, ping_count=10, runs=1, say=lambda _: None)
    rows = result["rows"]
    assert [(r["scenario"], r["streams"]) for r in rows] == [
        (sc.name, sc.streams) for sc in scenarios
    ]
    keys = {"throughput_mbps", "rtt_p50_ms", "rtt_p99_ms", "cpu_s_per_gb", "rss_mb_max"}
    for row, sc in zip(rows, scenarios, strict=True):
        assert keys <= set(row), row
        if sc.name == "plain":
            assert row["mode"] == "plain" and row["throughput_mbps"] > 0, row
            continue
        assert row["wire"]["a_to_b"]["lost"] > 0, row
        if sc.impair is not None and sc.impair.kernel:
            assert row["netem"] == "loss 1% (nftables)" and row["underlay"] == "nftables", row
            assert row["throughput_mbps"] > 0, row
            continue
        assert row["netem"] == "loss 1% delay 5ms (labwire)", row
        assert row["throughput_mbps"] > 0 and row["rtt_p50_ms"] >= 10.0, row
        assert row["wire"]["a_to_b"]["oversize"] == 0, row
        assert (row["cpu_s_per_gb"] is not None) is sc.overlay, row
    assert result["ratios"]["secure_over_direct_lossy"] is not None
    assert result["ratios"]["secure_over_direct_labwire"] is not None
    table = format_table(result)
    assert "secure / direct under loss" in table and "secure / plain" in table
