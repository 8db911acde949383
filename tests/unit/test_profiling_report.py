"""profiling.report, the progress bar, py-spy's command line and its attach errors, and the
bench row of a lab profile: the parts of `ipop-trio profile` that need no lab."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from profiling import pyspy, session, stages
from profiling.report import render_html, summary_text

RAW = (
    "thread (7): MainThread;run (trio/_core/_run.py:1);"
    "Outbound.send (ipop_trio/datapath/outbound.py:41) 30\n"
    "thread (7): MainThread;run (trio/_core/_run.py:1);get_events (trio/_io.py:2) 10\n"
)


def fake_profile(tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "alpha").mkdir()
    (tmp_path / "alpha" / "pyspy.raw").write_text(RAW)
    before = {"uptime": 0.0, "stages": {}}
    after = {
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
                "channels": None,
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
    assert "(consistent)" in text
    assert str(tmp_path / "report.html") in text


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    html = render_html(fake_profile(tmp_path), tmp_path, {"alpha": "<svg>flame</svg>"})
    assert html.startswith("<!doctype html>")
    for needle in (
        "800 Mbit/s",
        "seal (AEAD)",
        "Batch sizes",
        "udp_send_failed",
        "<svg>flame</svg>",
        "75.0%",
        'class="dp"',
        "consistent",
    ):
        assert needle in html, needle
    assert "<script" not in html and "http" not in html.replace("https://www.speedscope.app", "")


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
