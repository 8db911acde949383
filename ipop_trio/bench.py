"""`ipop-trio bench`: the direct veth path against the overlay, measured in one run.

Topology (perf-techniques §7, after WireGuard's netns.sh): two lab hosts joined by one veth,
a node on each. For each scenario: iperf3 single-stream TCP (-J: received bits/s,
retransmits), ping RTT both ways (p50/p99 of the per-reply times), and for overlay scenarios
the CPU seconds both node processes spent during the iperf3 run (utime+stime from
/proc/PID/stat) per GB received, and their peak RSS (VmHWM).

A scenario is a row; plain links, netem impairment and multi-stream runs are further
`Scenario` values, not new code paths. The primitives (iperf3, ping, /proc accounting) are
also used by the demo and the lab tests. This module never runs anything outside the lab's
namespaces.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ipop_trio.errors import IpopError, LabError
from ipop_trio.lab import Host, Lab, Overlay, sigterm_raises

IPERF_PORT = 5201
PING_COUNT = 200  # per direction
PING_INTERVAL = 0.01  # seconds; below 0.2 needs root, which the lab has anyway
LISTEN_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PING_TIME = re.compile(r"\btime=([0-9.]+) ms")

Print = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One row of the bench."""

    name: str  # "direct" | "secure" (later "plain")
    overlay: bool  # measure over the overlay (TAP) addresses, else the underlay veth
    streams: int = 1  # iperf3 -P
    netem: str | None = None  # tc netem arguments on the underlay (later), e.g. "delay 5ms"


SCENARIOS = (Scenario("direct", overlay=False), Scenario("secure", overlay=True))


@dataclass(frozen=True, slots=True)
class IperfResult:
    bits_per_second: float
    bytes: int
    retransmits: int | None


# ---------------------------------------------------------------------------------------------
# Primitives


def wait_listening(host: Host, port: int, timeout: float = LISTEN_TIMEOUT) -> None:
    """Poll until something in `host` listens on TCP `port`."""
    deadline = time.monotonic() + timeout
    while True:
        out = host.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        if out.strip():
            return
        if time.monotonic() >= deadline:
            raise LabError(f"nothing listens on {host.name}:{port} after {timeout:.0f}s")
        time.sleep(0.05)


def start_iperf3_server(
    host: Host, port: int = IPERF_PORT, *, one_off: bool = False
) -> subprocess.Popen[Any]:
    """An iperf3 server in `host` (stopped by the lab's teardown), ready when this returns."""
    argv = ["iperf3", "-s", "-p", str(port)] + (["-1"] if one_off else [])
    log = host.lab.workdir / f"iperf3-{host.name}-{port}.log"
    with open(log, "ab") as out:  # its "interrupt" note at teardown is no news to the user
        proc = host.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    wait_listening(host, port)
    return proc


def iperf3(
    host: Host,
    server: str,
    duration: float,
    *,
    streams: int = 1,
    port: int = IPERF_PORT,
    reverse: bool = False,
) -> IperfResult:
    """Run an iperf3 TCP client in `host` against `server`; parse its JSON report."""
    argv = ["iperf3", "-c", server, "-p", str(port), "-t", str(duration), "-J", "-i", "0"]
    argv += ["-P", str(streams)] + (["-R"] if reverse else [])
    try:
        done = host.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"iperf3 to {server} did not finish") from exc
    try:
        report = json.loads(done.stdout)
    except ValueError as exc:
        raise LabError(f"iperf3 to {server}: no JSON ({done.stderr.strip()})") from exc
    if done.returncode != 0 or "error" in report:
        raise LabError(f"iperf3 to {server} failed: {report.get('error', done.stderr.strip())}")
    end = report["end"]
    received = end["sum_received"]
    retransmits = end.get("sum_sent", {}).get("retransmits")
    return IperfResult(float(received["bits_per_second"]), int(received["bytes"]), retransmits)


def ping_rtts(
    host: Host,
    address: str,
    count: int = PING_COUNT,
    interval: float = PING_INTERVAL,
    *,
    pattern: str | None = None,
) -> list[float]:
    """Per-reply round-trip times (ms) of `count` pings from `host` to `address`."""
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address]
    if pattern:
        argv[1:1] = ["-p", pattern]
    timeout = count * interval + 15
    try:
        done = host.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"ping {address} from {host.name} did not finish") from exc
    return [float(m) for m in _PING_TIME.findall(done.stdout)]


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise LabError(f"no VmHWM for pid {pid}")


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        crypto = metadata.version("cryptography")
    except metadata.PackageNotFoundError:
        crypto = None
    return {
        "kernel": platform.release(),
        "cpu": model,
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "cryptography": crypto,
    }


# ---------------------------------------------------------------------------------------------
# The bench


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def measure(
    duration: float = 10.0,
    *,
    scenarios: Sequence[Scenario] = SCENARIOS,
    ping_count: int = PING_COUNT,
    say: Print = print,
) -> dict[str, Any]:
    """Build the lab, run every scenario, tear down; return {"machine", "rows"}."""
    rows = []
    with Lab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        link = lab.connect(a, b)
        say(f"lab {lab.id}: {a.ns} {a.address_on(link)} <-> {b.ns} {b.address_on(link)}")
        overlay = Overlay(lab, name="bench")
        alpha = overlay.add_node("alpha", a)
        beta = overlay.add_node("beta", b)
        if any(s.overlay for s in scenarios):
            overlay.start()
            overlay.wait_established(alpha, beta)
            say(f"overlay up: alpha {alpha.address} <-> beta {beta.address}")
        start_iperf3_server(b)
        for sc in scenarios:
            if sc.netem is not None:
                raise LabError(f"scenario {sc.name}: netem is not supported yet")
            if sc.overlay:
                dst_b, dst_a = beta.address, alpha.address
            else:
                dst_b, dst_a = b.address_on(link), a.address_on(link)
            say(f"{sc.name}: ping both ways ({ping_count} each)")
            rtts = ping_rtts(a, dst_b, ping_count) + ping_rtts(b, dst_a, ping_count)
            pids = [n.pid for n in (alpha, beta)] if sc.overlay else []
            before = sum(cpu_seconds(pid) for pid in pids)
            say(f"{sc.name}: iperf3 {duration:g}s, {sc.streams} stream(s)")
            result = iperf3(a, dst_b, duration, streams=sc.streams)
            cpu = sum(cpu_seconds(pid) for pid in pids) - before
            gigabytes = result.bytes / 1e9
            rows.append(
                {
                    "scenario": sc.name,
                    "streams": sc.streams,
                    "netem": sc.netem,
                    "throughput_mbps": round(result.bits_per_second / 1e6, 1),
                    "rtt_p50_ms": _round(percentile(rtts, 50), 3),
                    "rtt_p99_ms": _round(percentile(rtts, 99), 3),
                    "cpu_s_per_gb": round(cpu / gigabytes, 2) if pids and gigabytes else None,
                    "rss_mb_max": round(max(peak_rss_mb(p) for p in pids), 1) if pids else None,
                    "retransmits": result.retransmits,
                }
            )
            if sc.overlay:
                entry = overlay.peer_status(alpha, beta) or {}
                if entry.get("mode") not in (None, sc.name):
                    say(f"note: {sc.name} row ran over a link in mode {entry.get('mode')!r}")
    return {"machine": machine_info(), "rows": rows}


_COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("streams", "streams", "{}"),
    ("throughput_mbps", "Mbit/s", "{:.1f}"),
    ("rtt_p50_ms", "RTT p50 ms", "{:.3f}"),
    ("rtt_p99_ms", "RTT p99 ms", "{:.3f}"),
    ("cpu_s_per_gb", "CPU s/GB", "{:.2f}"),
    ("rss_mb_max", "RSS MB", "{:.1f}"),
    ("retransmits", "retrans", "{}"),
)


def format_table(result: dict[str, Any]) -> str:
    """The bench rows as an aligned text table, with the machine line on top."""
    m = result["machine"]
    head = f"{m['cpu']} ×{m['nproc']}, Linux {m['kernel']}, Python {m['python']}"
    cells = [[title for _, title, _ in _COLUMNS]]
    for row in result["rows"]:
        cells.append(["-" if row.get(k) is None else fmt.format(row[k]) for k, _, fmt in _COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([head, *lines])


def run_bench(duration: float = 10.0, json_path: str | Path | None = None) -> int:
    """CLI entry point: measure, print the table, write JSON; return an exit code."""
    with sigterm_raises():
        try:
            result = measure(duration)
        except IpopError as exc:
            print(f"ipop-trio bench: {exc}", file=sys.stderr)
            return 1
        print()
        print(format_table(result))
        if json_path is not None:
            path = Path(json_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(f"\nwrote {path}")
    return 0
