"""profiling.stages: interval deltas of stats snapshots, derived figures, the CPU bounds."""

from __future__ import annotations

from typing import Any

import pytest

from ipop_trio.stats import HIST_BUCKETS, STAGES, Stats
from profiling import stages


def snap(**stage_seconds: float) -> dict[str, Any]:
    s = Stats()
    for name, seconds in stage_seconds.items():
        st = s[name]
        st.batches, st.items, st.bytes, st.ns = 10, 40, 40_000, int(seconds * 1e9)
        st.hist[2] = 10
    return s.snapshot()


def test_diff_of_real_snapshots() -> None:
    before = snap(seal=1.0, open=0.5)
    after = snap(seal=3.0, open=0.5)
    after["stages"]["seal"].update(batches=30, items=100, bytes=100_000)
    after["stages"]["seal"]["batch_hist"][2] = 25
    after["stages"]["seal"]["batch_hist"][5] = 5
    after["drops"] = {"outbound_queue_full": 3}
    after["uptime"] = before["uptime"] + 2.0
    delta = stages.diff_snapshots(before, after)
    assert list(delta["stages"]) == list(STAGES)
    seal = delta["stages"]["seal"]
    assert seal["batches"] == 20 and seal["items"] == 60 and seal["bytes"] == 60_000
    assert seal["seconds"] == pytest.approx(2.0)
    assert seal["batch_hist"][2] == 15 and seal["batch_hist"][5] == 5
    assert delta["stages"]["open"]["seconds"] == pytest.approx(0.0)
    assert delta["drops"] == {"outbound_queue_full": 3}
    assert delta["interval"] == pytest.approx(2.0)


def test_missing_and_new_sections_are_tolerated() -> None:
    before: dict[str, Any] = {"stages": {"seal": {"seconds": 1.0}}}
    after: dict[str, Any] = {
        "stages": {"seal": {"seconds": 1.5, "batch_hist": [1, 2]}, "zz_new": {"seconds": 0.25}},
        "gauges": {"outbound_queue": 2, "bogus": "x"},
        "drops": {"a": 0},
    }
    delta = stages.diff_snapshots(before, after)
    assert list(delta["stages"]) == ["seal", "zz_new"]  # known flow order, then new ones
    assert delta["stages"]["seal"]["batch_hist"] == [1, 2]
    assert delta["stages"]["zz_new"]["seconds"] == 0.25
    assert delta["drops"] == {}
    assert delta["gauges"] == {"outbound_queue": 2}
    assert delta["channels"] is None
    assert any("channel" in m for m in delta["missing"])


def test_channels_when_reported() -> None:
    before = {"channels": {"outbound": {"depth": 1, "wait_seconds": 1.0, "batches": 10}}}
    after = {"channels": {"outbound": {"depth": 3, "wait_seconds": 1.5, "batches": 30}}}
    delta = stages.diff_snapshots(before, after)
    assert delta["channels"] == {"outbound": {"depth": 3, "wait_seconds": 0.5, "batches": 20}}
    assert stages.WANTED_SECTIONS["channels"] not in delta["missing"]


def test_stage_rows() -> None:
    delta = stages.diff_snapshots(snap(), snap(seal=0.003, tap_read=0.001))
    rows = {r["stage"]: r for r in stages.stage_rows(delta)}
    seal = rows["seal"]
    assert seal["direction"] == "outbound" and rows["open"]["direction"] == "inbound"
    assert seal["share"] == pytest.approx(0.75)
    assert seal["us_per_batch"] == pytest.approx(300.0)
    assert seal["ns_per_item"] == pytest.approx(75_000.0)
    assert seal["mean_batch"] == pytest.approx(4.0)
    assert rows["open"]["us_per_batch"] is None and rows["open"]["share"] == 0.0
    assert stages.total_seconds(delta) == pytest.approx(0.004)


def test_bucket_labels_match_stats_buckets() -> None:
    labels = stages.bucket_labels()
    assert len(labels) == HIST_BUCKETS
    assert labels[:4] == ["1", "2-3", "4-7", "8-15"] and labels[-1] == "2048+"
    s = Stats()
    for items, label in ((1, "1"), (3, "2-3"), (100, "64-127"), (5000, "2048+")):
        s["seal"].record(items, 0, 0)
        assert labels[s["seal"].hist.index(1)] == label
        s["seal"].hist = [0] * HIST_BUCKETS


@pytest.mark.parametrize(
    ("stage_s", "cpu_s", "wait_s", "ok"),
    [
        (0.8, 1.0, None, True),  # a quiet machine: most CPU inside stages
        (0.2, 1.0, None, False),  # a timer not running
        (1.4, 1.0, 0.0, False),  # a span counted twice
        (1.4, 1.0, 0.6, True),  # a busy machine: preempted inside stages
        (1000.0, 1.0, 0.5, False),  # wrong unit
        (0.0, 0.0, None, False),  # no CPU: nothing to compare
    ],
)
def test_consistency_bounds(stage_s: float, cpu_s: float, wait_s: float | None, ok: bool) -> None:
    got = stages.consistency(stage_s, cpu_s, wait_s)
    assert got["consistent"] is ok
    if cpu_s:
        assert got["ratio"] == pytest.approx(stage_s / cpu_s)


def test_gauge_summary() -> None:
    polls = [{"gauges": {"q": 0}}, {"gauges": {"q": 4}}, {"gauges": {}}, {}]
    assert stages.gauge_summary(polls) == {"q": {"samples": 2, "min": 0, "mean": 2.0, "max": 4}}
