"""Measuring in the lab: iperf3, ping and a UDP echo between lab hosts, a process's CPU and
memory from /proc, percentiles, and a description of the machine the numbers came from.

The bench, the demo, profiling and the lab tests measure with these, so a number means the same
thing wherever it is printed. Every tool runs inside a lab host's namespace (`Host.run`,
`Host.popen`), never outside the lab; a server started here is a process the lab tracks, so
its teardown stops it.
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
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ipop_trio.errors import LabError
from ipop_trio.lab.netns import UNDERLAY_MTU, Host

IPERF_PORT = 5201
ECHO_PORT = 5202
PING_COUNT = 200  # per direction
PING_INTERVAL = 0.01  # seconds; below 0.2 needs root, which the lab has anyway
LISTEN_TIMEOUT = 10.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PING_TIME = re.compile(r"\btime=([0-9.]+) ms")


@dataclass(frozen=True, slots=True)
class IperfResult:
    bits_per_second: float
    bytes: int
    retransmits: int | None


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


def wait_tcp_idle(host: Host, port: int, timeout: float = LISTEN_TIMEOUT) -> None:
    """Poll until no TCP connection in `host` with local port `port` is still open on the
    server's side (established, or closed by the peer but not yet by the server): the
    server is done with its last client. TIME-WAIT and FIN-WAIT remains do not count."""
    deadline = time.monotonic() + timeout
    states = [w for s in _SERVER_OPEN_STATES for w in ("state", s)]
    while True:
        out = host.run(
            ["ss", "-Htn", *states, f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        if not out.strip():
            return
        if time.monotonic() >= deadline:
            raise LabError(f"{host.name}:{port} still has connections after {timeout:.0f}s")
        time.sleep(0.05)


_SERVER_OPEN_STATES = ("established", "syn-recv", "close-wait", "last-ack")
# iperf3's words when its server refused or dropped a test on the control connection before
# any result (iperf3 3.x runs one test at a time): worth one more try, unlike anything else.
_IPERF_REFUSED = ("server is busy", "control message")


def iperf3_server_refused(exc: LabError) -> bool:
    """Did an `iperf3` call fail on its control connection (server busy or reset)?"""
    return any(words in str(exc) for words in _IPERF_REFUSED)


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
    source: str | None = None,
) -> list[float]:
    """Per-reply round-trip times (ms) of `count` pings from `host` to `address` (from the
    address `source`, if given)."""
    argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "1", address]
    if pattern:
        argv[1:1] = ["-p", pattern]
    if source:
        argv[1:1] = ["-I", source]
    timeout = count * interval + 15
    try:
        done = host.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"ping {address} from {host.name} did not finish") from exc
    return [float(m) for m in _PING_TIME.findall(done.stdout)]


# The cheapest user-space hop: a blocking UDP echo. Its RTT minus the direct ping's (which
# the kernel answers) is what one trip through a user-space process costs on this machine
# (a wake-up, a receive, a send); an overlay ping makes four (each node, each way).
_ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""
_ECHO_CLIENT = """
import json, socket, sys, time
host, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1.0)
deadline = time.monotonic() + 10
while True:  # until the server answers: it may still be starting
    s.sendto(b"ready?", (host, port))
    try:
        s.recvfrom(2048)
        break
    except TimeoutError:
        if time.monotonic() > deadline:
            sys.exit(f"no UDP echo from {host}:{port}")
rtts = []
for i in range(count):
    time.sleep(interval)
    tag = i.to_bytes(4, "big") + bytes(60)
    start = time.perf_counter()
    s.sendto(tag, (host, port))
    try:
        while s.recvfrom(2048)[0] != tag:
            pass
    except TimeoutError:
        continue
    rtts.append((time.perf_counter() - start) * 1000)
print(json.dumps(rtts))
"""


def udp_echo_rtts(
    client: Host,
    server: Host,
    address: str,
    count: int = PING_COUNT,
    interval: float = PING_INTERVAL,
    *,
    port: int = ECHO_PORT,
) -> list[float]:
    """RTTs (ms) of `count` 64-byte UDP messages from `client` to a blocking Python echo
    server in `server` at `address`, sent `interval` apart like the bench's pings."""
    proc = server.popen(
        [sys.executable, "-c", _ECHO_SERVER, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        argv = [sys.executable, "-c", _ECHO_CLIENT, address, str(port), str(count), str(interval)]
        out = client.check(argv, timeout=count * (interval + 1) + 30)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return [float(r) for r in json.loads(out)]


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
        "tcp_cc": _read_text("/proc/sys/net/ipv4/tcp_congestion_control"),
        "iperf3": _iperf3_version(),
        "underlay_mtu": UNDERLAY_MTU,
        "stage_timers": os.environ.get("IPOP_TRIO_STAGE_TIMERS", "1") != "0",
    }


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _iperf3_version() -> str | None:
    try:
        out = subprocess.run(["iperf3", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    first = out.stdout.split("\n", 1)[0].split()
    return first[1] if len(first) > 1 else None
