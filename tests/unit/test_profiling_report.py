"""profiling.report, the progress bar, py-spy's command line and its attach errors, and the
bench row of a lab profile: the parts of `ipop-trio profile` that need no lab."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from profiling import calltree, pyspy, session, stages
from profiling.flamegraph import render_svg
from profiling.report import fmt_value, mapping_table, render_html, summary_text

RAW = (
    "thread (7): MainThread;run (trio/_core/_run.py:1);"
    "Outbound.send (ipop_trio/datapath/outbound.py:41) 30\n"
    "thread (7): MainThread;run (trio/_core/_run.py:1);get_events (trio/_io.py:2) 10\n"
    "thread (8): tap-writer;run (threading.py:1);TapWriter._write (ipop_trio/net/tap.py:1) 10\n"
)


def fake_profile(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "pyspy.raw").write_text(RAW)
    before = {
        "uptime": 0.0,
        "stages": {},
        "channels": {"outbound": {"depth": 0, "max_depth": 0, "batches": 0, "wait_seconds": 0.0}},
    }
    after = {
        # stats.Channel's snapshot, and a shape a later node might report (nested, a list)
        "channels": {
            "outbound": {"depth": 1, "max_depth": 3, "batches": 40, "wait_seconds": 0.002},
            "tap_write": {
                "depth": 0,
                "max_depth": 9,
                "batches": 0,
                "wait_seconds": 0.0,
                "wait": {"p50_seconds": 25e-6, "p99_seconds": 0.0031},
                "peers": ["10.0.0.2", "10.0.0.3"],
                "full": False,
            },
        },
        "uptime": 3.0,
        "stages": {
            "seal": {
                "batches": 10,
                "items": 400,
                "bytes": 560_000,
                "seconds": 0.6,
                "batch_hist": [0, 0, 0, 0, 0, 10],
            },
            "udp_send": {
                "batches": 10,
                "items": 400,
                "bytes": 560_000,
                "seconds": 0.2,
                "batch_hist": [0, 0, 0, 0, 0, 10],
            },
        },
        "drops": {"udp_send_failed": 2},
        "gauges": {"outbound_queue": 1},
    }
    delta = stages.diff_snapshots(before, after)
    return {
        "version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "mode": "lab",
        "requested_s": 3,
        "interval_s": 3.0,
        "machine": {"cpu": "test cpu", "nproc": 2, "kernel": "6.1", "python": "3.11"},
        "traffic": {
            "tool": "iperf3",
            "from": "alpha",
            "to": "beta",
            "streams": 1,
            "seconds": 3,
            "throughput_mbps": 800.0,
            "bytes": 300_000_000,
            "retransmits": 0,
            "rtt_p50_ms": 0.4,
            "rtt_p99_ms": 1.5,
            "link_mode": "secure",
            "cipher": "aes-256-gcm",
        },
        "nodes": {
            "alpha": {
                "pid": 7,
                "role": "sender",
                "interval_s": 3.0,
                "cpu": {
                    "seconds": 1.0,
                    "runqueue_wait_seconds": 0.1,
                    "utilisation": 0.33,
                    "threads": [{"tid": 7, "name": "MainThread", "seconds": 1.0}],
                    "rss_mb_max": 60.0,
                },
                "stages": stages.stage_rows(delta),
                "stage_seconds": 0.8,
                "consistency": stages.consistency(0.8, 1.0, 0.1),
                "drops": delta["drops"],
                "gauges": {"last": delta["gauges"], "polled": stages.gauge_summary([after])},
                "channels": delta["channels"],
                "missing": delta["missing"],
                "pyspy": {
                    "samples": 40,
                    "errors": 0,
                    "rate": 200,
                    "native": False,
                    "blocking": False,
                    "busy_seconds": 0.2,
                    "threads": {},
                    "raw": "alpha/pyspy.raw",
                    "flamegraph": "alpha/flamegraph.svg",
                    "speedscope": "alpha/profile.speedscope.json",
                },
                "hot_functions": [
                    {
                        "function": "Outbound.send (ipop_trio/datapath/outbound.py)",
                        "inclusive": 30,
                        "inclusive_share": 0.75,
                        "self": 30,
                        "self_share": 0.75,
                    }
                ],
                "datapath_functions": {"Outbound.send (ipop_trio/datapath/outbound.py)": 30},
                "scalene": None,
            }
        },
    }


def test_summary_text(tmp_path: Path) -> None:
    text = summary_text(fake_profile(tmp_path), tmp_path)
    assert "throughput 800.0 Mbit/s" in text
    assert "seal 75%, udp_send 25%" in text
    assert "Outbound.send 75%" in text
    assert "drops: udp_send_failed 2" in text
    assert "channels: outbound max depth 3, wait/batch 50.0 µs; tap_write max depth 9" in text
    assert "{" not in text and "[" not in text
    assert "(consistent)" in text
    assert str(tmp_path / "report.html") in text


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    svg = render_svg(calltree.parse_collapsed(RAW), title="alpha (sender)", key="alpha")
    html = render_html(fake_profile(tmp_path), tmp_path, {"alpha": svg})
    assert html.startswith("<!doctype html>")
    assert svg in html
    for needle in (
        "800 Mbit/s",
        "seal (AEAD)",
        "Batch sizes",
        "udp_send_failed",
        "75.0%",
        'class="dp"',
        "consistent",
    ):
        assert needle in html, needle
    # One script, the flame graph's, inline in CDATA; nothing loaded from anywhere.
    assert html.count("<script") == 1 and '<script type="text/javascript"><![CDATA[' in html
    assert "src=" not in html and "<link" not in html and "url(" not in html
    rest = html.replace("https://www.speedscope.app", "").replace("http://www.w3.org/2000/svg", "")
    assert "http" not in rest and "//" not in re.sub(r"<!\[CDATA\[.*?\]\]>", "", rest, flags=re.S)


class _Cells(HTMLParser):
    """The text of every table cell, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: str) -> None:
        if self.cell is not None:
            self.cell.append(data)


def cells(html: str) -> list[list[str]]:
    parser = _Cells()
    parser.feed(html)
    return parser.rows


def test_tables_show_values_not_python_reprs(tmp_path: Path) -> None:
    html = render_html(fake_profile(tmp_path), tmp_path, {"alpha": ""})
    rows = cells(html)
    for row in rows:
        for cell in row:
            assert not re.search(r"[{}\[\]]|': |True|False|None", cell), (cell, row)
    assert "&#x27;" not in html  # an escaped repr's quotes
    by_name = {r[0]: r for r in rows if r}
    assert by_name["channel"] == [
        "channel",
        "batches taken",
        "depth at end",
        "max depth",
        "queue wait",
        "mean wait / batch",
        "wait · p50 seconds",
        "wait · p99 seconds",
        "peers",
        "full",
    ]
    assert by_name["outbound"][:6] == ["outbound", "40", "1", "3", "2.00 ms", "50.0 µs"]
    assert by_name["tap_write"][1:] == [
        "0", "0", "9", "0 s", "–", "25.0 µs", "3.10 ms", "10.0.0.2, 10.0.0.3", "no",
    ]  # fmt: skip
    assert by_name["udp_send_failed"] == ["udp_send_failed", "2"]
    assert by_name["outbound_queue"] == ["outbound_queue", "1", "1", "1", "1"]  # polls, min...


def test_fmt_value_units() -> None:
    assert fmt_value("wait_seconds", 0.0015) == "1.50 ms"
    assert fmt_value(("wait", "p99_seconds"), 2.5e-7) == "250 ns"
    assert fmt_value("bytes", 560_000) == "560.0 kB"
    assert fmt_value("share", 0.25) == "25.0%"
    assert fmt_value("batches", 6218.0) == "6218"
    assert fmt_value("mean", 2.5) == "2.50" and fmt_value("full", True) == "yes"
    assert fmt_value("x", {"a_seconds": 2.0, "b": [1, 2]}) == "a_seconds 2.00 s, b 1, 2"
    assert fmt_value("x", None) == "–" and fmt_value("x", float("nan")) == "–"
    assert "<td>7</td>" in mapping_table({"r": 7}, name="n", value="count")


def test_call_tree_starts_at_the_data_path(tmp_path: Path) -> None:
    html = render_html(fake_profile(tmp_path), tmp_path, {"alpha": ""})
    thread = html.index('<p class="thread">')
    head = html[thread : html.index("</p>", thread)]
    # RAW: MainThread 40 samples (30 through Outbound.send, 10 in get_events), tap-writer 10
    assert "MainThread (tid 7)</b>: 40 samples (80.0% of the node's)" in head
    assert "75.0% of them in the data path" in head
    assert "elided above it:" in head and "trio run loop" in head
    rows = re.findall(
        r'<span class="p">([\d.]+%)</span><span class="s">[^<]*</span> (.*?)(?:</summary>|</div>)',
        html[thread:],
    )
    share, label = rows[0]
    assert share == "75.0%"  # of the thread's samples (60% of the node's)
    assert "Outbound.send (ipop_trio/datapath/outbound.py)" in label
    assert "… trio run loop →" in label and "MainThread" not in label
    assert "get_events 25.0%" in html  # where the rest of the thread's samples went
    writer = html.index("tap-writer (tid 8)</b>: 10 samples (20.0% of the node's)")
    assert "thread start" in html[writer : html.index("</p>", writer)]
    assert re.findall(r'<span class="p">([\d.]+%)</span>', html[writer:])[0] == "100.0%"
    # The full tree is still there, folded, from the thread frame, in shares of the node.
    full = html[html.index('<details class="full">') :]
    assert "Full call tree of alpha" in full[:200]
    assert re.search(r"80.0%</span>.*?thread \(7\): MainThread", full)


def test_progress(tmp_path: Path) -> None:
    line = session.progress_line(1.5, 3.0, {"alpha": 64.4}, width=10)
    assert line == "recording [#####.....]  1.5/3.0 s  alpha 64% CPU"
    pipe = io.StringIO()
    bar = session.Progress(pipe, 4.0)
    for t in (0.1, 0.2, 1.1, 2.5, 3.9):
        bar.update(t, {})
    bar.done(4.0, {})
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("recording [" + "#" * 30)


def test_bench_row(tmp_path: Path) -> None:
    bench = session.bench_rows(fake_profile(tmp_path))
    row = bench["rows"][0]
    assert row["scenario"] == "secure" and row["throughput_mbps"] == 800.0
    assert row["cpu_s_per_gb"] == pytest.approx(3.33)
    assert row["profiled"] is True


def test_record_argv() -> None:
    argv = pyspy.record_argv("py-spy", 42, Path("x.raw"), rate=100)
    assert argv[:6] == ["py-spy", "record", "--format", "raw", "--threads", "--function"]
    assert "--nonblocking" in argv and "--idle" not in argv and "--native" not in argv
    assert argv[argv.index("--pid") + 1] == "42" and argv[argv.index("--rate") + 1] == "100"
    native = pyspy.record_argv("py-spy", 42, Path("x.raw"), native=True)
    assert "--native" in native and "--nonblocking" not in native
    assert "--nonblocking" not in pyspy.record_argv("py-spy", 1, Path("x"), blocking=True)


def test_attach_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scope = tmp_path / "ptrace_scope"
    scope.write_text("1\n")
    monkeypatch.setattr(pyspy, "PTRACE_SCOPE", scope)
    monkeypatch.setattr(pyspy, "_has_cap_sys_ptrace", lambda: False)
    msg = pyspy.attach_error(1, "Error: Permission Denied: Try running again", 1)
    assert "permission denied" in msg
    assert "ptrace_scope is 1" in msg and "sysctl kernel.yama.ptrace_scope=0" in msg
    assert "CAP_SYS_PTRACE" in msg and "--cap-add SYS_PTRACE" in msg
    scope.write_text("3\n")
    assert "until reboot" in pyspy.attach_error(1, "Operation not permitted (os error 1)", 1)
    gone = pyspy.attach_error(2**22 + 12345, "Error: Failed to open process", 1)
    assert "no such process" in gone
    other = pyspy.attach_error(1, "something else", 2)
    assert "(exit 2): something else" in other
