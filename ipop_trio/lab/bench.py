"""`ipop-trio bench`: the direct underlay against the overlay, measured in one run.

Topology (after WireGuard's netns.sh): two lab hosts joined by one veth,
a node on each. For the impaired rows a second lab puts a wire between them instead
(`ipop_trio.lab.impair`: this kernel has no netem, so `ipop_trio.lab.wire` loses and delays
frames, and the JSON says so), or a bridge whose nftables rule drops 1% of frames at random
(the in-kernel loss rows: no user-space relay in the way). Every overlay row runs on both
data paths, the native core and the Python reference (`"datapath"` in each row), over a pair
of nodes of its own; the targets are the native rows', the Python ratios stand beside them
(`ratios_python`). For each scenario: iperf3 TCP (-J: received bits/s,
retransmits; single-stream rows run `runs` times, median and spread reported, the rows' runs
interleaved round by round so a noisy machine's drift falls on every row alike), ping RTT both
ways (p50/p99 of the per-reply times, measured idle, once per path and shared by that path's
rows), and for overlay scenarios the CPU seconds both node processes spent during the iperf3
runs (utime+stime from /proc/PID/stat) per GB received, and their peak RSS (VmHWM).
Beside the rows, the RTT of a blocking UDP echo over the direct veth (`echo` in the JSON):
less the direct ping's, the cost of one trip through a user-space process on this machine,
the floor under the overlay's RTT overhead (an overlay ping makes four such trips).

A scenario is a row: secure or plain links, impairment and multi-stream runs are `Scenario`
values, not new code paths. The `firewall` rows are secure links whose nodes have ten
firewall rules each (alpha outbound, beta inbound; proto/firewall.py), the iperf3 flow
allowed by the last of them: the firewall's cost is their difference from the secure rows.
A scenario the node cannot run yet (plain: selective security) is reported as skipped with
the reason, never measured as something else. The primitives (iperf3, ping, /proc
accounting) are `ipop_trio.lab.measure`'s, shared with the demo, profiling and the lab
tests. This module never runs anything outside the lab's namespaces.
"""

from __future__ import annotations

import ipaddress
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipop_trio.errors import IpopError, LabError
from ipop_trio.lab.impair import (
    RX_COALESCE_NS,
    Impairment,
    KernelWire,
    WiredOverlay,
    WireProcess,
    build_wired_pair,
    wire_delta,
)
from ipop_trio.lab.measure import (
    IPERF_PORT,
    PING_COUNT,
    PING_INTERVAL,
    IperfResult,
    cpu_seconds,
    iperf3,
    iperf3_server_refused,
    machine_info,
    peak_rss_mb,
    percentile,
    ping_rtts,
    start_iperf3_server,
    udp_echo_rtts,
    wait_tcp_idle,
)
from ipop_trio.lab.netns import Host, Lab, sigterm_raises
from ipop_trio.lab.overlay import Overlay, OverlayNode

RUNS = 3  # iperf3 runs of each single-stream row (median and spread reported)

Print = Callable[[str], None]

# The underlay impairment of the loss rows: `tc netem loss 1% delay 5ms` on each way.
# Seeded, so two runs lose the same frame numbers (the traffic differs, so not the same data).
LOSSY = Impairment(loss=0.01, delay=0.005, seed=6)
# 1% of the underlay's frames dropped by nftables (`numgen random`) in w's bridge: loss with
# no user-space relay in the way (and so no delay: this kernel has no netem).
KERNEL_LOSS = Impairment(loss=0.01, kernel=True)
WIRE_NOTE = "labwire"  # how the impairment is made (no netem in this kernel)
KERNEL_NOTE = "nftables"
WIRE_MACHINE_NOTE = (
    "impaired rows: a - labwire - b, one /24; labwire is a Python AF_PACKET relay in its own "
    "namespace (random loss, fixed delay per frame, FIFO); TSO/GSO and UDP segmentation off "
    "on the four wire-side interfaces and GRO on the wire's two, checksum offload kept "
    "(virtio_net_hdr relayed); a and b receive with GRO and a "
    f"{RX_COALESCE_NS // 1000} us flush timeout (a NIC's interrupt moderation)"
)
KERNEL_MACHINE_NOTE = (
    "in-kernel loss rows: a - w - b, one /24; w bridges its two veths and an nftables "
    "bridge-forward rule drops frames at random (numgen); offloads as on the labwire rows"
)
# Scenarios the node cannot run yet, and why. Reported as skipped rows, never faked.
UNAVAILABLE: dict[str, str] = {}
# Plain rows run over a second pair of nodes with `security = "groups"` and no common group
# (selective security), beside the secure pair on the same hosts: an overlay of its own, so
# its TAPs' subnet does not overlap the secure pair's.
PLAIN_GROUPS = (("bench-a",), ("bench-b",))
PLAIN_NETWORK = "10.78.0.0/24"
# Each overlay row runs on both data paths: the native core and the Python reference
# (IPOP_TRIO_PURE_PYTHON=1), each over a pair of nodes of its own (own CA and TAP subnet).
DATAPATHS = ("native", "python")
PAIR_NETWORKS = {
    ("secure", "native"): None,  # the overlay's own CA
    ("plain", "native"): PLAIN_NETWORK,
    ("secure", "python"): "10.79.0.0/24",
    ("plain", "python"): "10.80.0.0/24",
    ("firewall", "native"): "10.81.0.0/24",
    ("firewall", "python"): "10.82.0.0/24",
}
# The firewall rows' rules: ten that all apply to the peer (so none is compiled away), the
# first nine not matching iperf3's TCP flow to port 5201 (the ninth allows the RTT pings),
# the tenth allowing it. Written for alpha's outbound and beta's inbound direction.
FIREWALL_GROUP = "bench"
_FIREWALL_RULES = (
    ("tcp", "22", "groups", FIREWALL_GROUP, "allow"),
    ("udp", "53", "host", "any", "allow"),
    ("tcp", "8081", "host", "any", "deny"),
    ("tcp", '"8000-8100"', "groups", FIREWALL_GROUP, "allow"),
    ("tcp", "443", "cidr", "10.99.0.0/16", "allow"),
    ("udp", '"5000-5100"', "host", "any", "allow"),
    ("tcp", "5432", "groups", FIREWALL_GROUP, "allow"),
    ("udp", "161", "host", "any", "deny"),
    ("icmp", None, "host", "any", "allow"),
    ("tcp", "5201", "groups", FIREWALL_GROUP, "allow"),
)


def firewall_rules(direction: str) -> str:
    """The firewall rows' ten rules as `[[firewall.DIRECTION]]` TOML."""
    out = []
    for proto, port, key, value, action in _FIREWALL_RULES:
        out += [f"[[firewall.{direction}]]", f'proto = "{proto}"']
        if port is not None:
            out.append(f"port = {port}")
        out.append(f'{key} = ["{value}"]' if key == "groups" else f'{key} = "{value}"')
        out += [f'action = "{action}"', ""]
    return "\n".join(out)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One row of the bench."""

    name: str  # "direct" | "secure" | "plain" | "firewall" (secure, with ten rules)
    overlay: bool  # measure over the overlay (TAP) addresses, else the underlay
    streams: int = 1  # iperf3 -P
    impair: Impairment | None = None  # a lossy/delayed underlay (the wire), else plain veth
    datapath: str | None = None  # the nodes' data path (overlay rows): "native" | "python"

    @property
    def netem(self) -> str | None:
        """The netem arguments this row's underlay emulates, and how, for the table/JSON."""
        if self.impair is None:
            return None
        return f"{self.impair.netem} ({KERNEL_NOTE if self.impair.kernel else WIRE_NOTE})"

    @property
    def underlay(self) -> str:
        """ "veth", "labwire" or "nftables": which rows compare with which."""
        if self.impair is None:
            return "veth"
        return KERNEL_NOTE if self.impair.kernel else WIRE_NOTE

    @property
    def skipped(self) -> str | None:
        """Why this row cannot be measured yet; None when it can."""
        return UNAVAILABLE.get(self.name)


def _both(name: str, **kw: Any) -> tuple[Scenario, ...]:
    return tuple(Scenario(name, overlay=True, datapath=d, **kw) for d in DATAPATHS)


SCENARIOS = (
    Scenario("direct", overlay=False),
    Scenario("direct", overlay=False, streams=4),
    *_both("secure"),
    *_both("secure", streams=4),
    *_both("plain"),
    *_both("plain", streams=4),
    *_both("firewall"),
    Scenario("direct", overlay=False, impair=KERNEL_LOSS),
    *_both("secure", impair=KERNEL_LOSS),
    Scenario("direct", overlay=False, impair=LOSSY),
    *_both("secure", impair=LOSSY),
)


# ---------------------------------------------------------------------------------------------
# The bench


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass(slots=True)
class _Path:
    """Where one lab's rows run: hosts, underlay addresses, the overlay (when started)."""

    a: Host
    b: Host
    underlay_a: str
    underlay_b: str
    overlay: Overlay
    # (mode, data path) -> the pair of nodes its rows cross
    pairs: dict[tuple[str, str], tuple[OverlayNode, OverlayNode]]
    wire: WireProcess | KernelWire | None = None  # on impaired paths

    def nodes(self, sc: Scenario) -> tuple[OverlayNode, OverlayNode]:
        """The two nodes a scenario's traffic crosses."""
        return self.pairs[(sc.name, sc.datapath or DATAPATHS[0])]


def _groups(
    scenarios: Sequence[Scenario],
) -> Iterator[tuple[Impairment | None, list[tuple[int, Scenario]]]]:
    """Scenarios (with their row index) by underlay, one lab each, in first-seen order."""
    seen: dict[Impairment | None, list[tuple[int, Scenario]]] = {}
    for i, sc in enumerate(scenarios):
        seen.setdefault(sc.impair, []).append((i, sc))
    yield from seen.items()


def _skipped_row(sc: Scenario) -> dict[str, Any]:
    return {
        "scenario": sc.name,
        "streams": sc.streams,
        "netem": sc.netem,
        "throughput_mbps": None,
        "rtt_p50_ms": None,
        "rtt_p99_ms": None,
        "cpu_s_per_gb": None,
        "rss_mb_max": None,
        "datapath": sc.datapath,
        "underlay": sc.underlay,
        "skipped": sc.skipped,
    }


def _build(lab: Lab, impair: Impairment | None, say: Print, pairs: set[tuple[str, str]]) -> _Path:
    """Two hosts on a veth (or on the wire, when impaired) and, for each (mode, data path)
    in `pairs`, a pair of nodes on them (not started): plain pairs are made plain by
    selective security (no common group), each pair but the first has a CA of its own."""
    wire: WireProcess | KernelWire | None
    if impair is None:
        a, b = lab.add_host("a"), lab.add_host("b")
        link = lab.connect(a, b)
        overlay = Overlay(lab, name="bench")
        under_a, under_b, wire = a.address_on(link), b.address_on(link), None
        say(f"lab {lab.id}: {a.ns} {under_a} <-> {b.ns} {under_b} (veth)")
    else:
        pair = build_wired_pair(lab, impair)
        a, b, wire = pair.a, pair.b, pair.wire
        overlay = WiredOverlay(pair, name="bench")
        under_a, under_b = pair.address_a, pair.address_b
        how = KERNEL_NOTE if impair.kernel else WIRE_NOTE
        say(f"lab {lab.id}: {a.ns} {under_a} <-> {how} ({impair.netem}) <-> {b.ns} {under_b}")
    built: dict[tuple[str, str], tuple[OverlayNode, OverlayNode]] = {}
    for mode, datapath in sorted(pairs, key=list(PAIR_NETWORKS).index):
        network = PAIR_NETWORKS[(mode, datapath)]
        tag = {"secure": "", "plain": "-p", "firewall": "-fw"}[mode]
        tag += "" if datapath == "native" else "-py"
        kw: dict[str, Any] = {"datapath": datapath}
        if network is not None:
            kw["ca"] = overlay.new_ca(f"bench{tag}", network)
            hosts = ipaddress.ip_network(network).hosts()
        ends = []
        for i, (name, host) in enumerate((("alpha", a), ("beta", b))):
            extra = dict(kw)
            if network is not None:
                extra["address"] = str(next(hosts))
            if mode == "plain":
                extra.update(groups=PLAIN_GROUPS[i], security="groups")
            elif mode == "firewall":
                direction = "outbound" if name == "alpha" else "inbound"
                extra.update(groups=(FIREWALL_GROUP,), extra_config=firewall_rules(direction))
            other = ("beta" if name == "alpha" else "alpha") + tag
            ends.append(overlay.add_node(name + tag, host, peers=(other,), **extra))
        built[(mode, datapath)] = (ends[0], ends[1])
    return _Path(a, b, under_a, under_b, overlay, built, wire=wire)


def _node_drops(path: _Path, sc: Scenario) -> dict[str, dict[str, int]]:
    return {
        n.name: dict(path.overlay.status(n).get("stats", {}).get("drops", {}))
        for n in path.nodes(sc)
    }


def _interleave(runs: Sequence[int]) -> list[int]:
    """The order rows run in, as row positions: round r runs the r-th run of every row that
    has one, so a slow drift of a noisy machine falls on all rows alike, not on one."""
    return [i for r in range(max(runs, default=0)) for i, n in enumerate(runs) if r < n]


def _add_counts(
    total: dict[str, dict[str, int]],
    delta: dict[str, dict[str, int]],
    *,
    gauges: Iterable[str] = (),
) -> None:
    """Add per-key counter deltas (grouped, e.g. by node or direction) into `total`; a gauge
    takes the latest value."""
    keep = set(gauges)
    for group, counts in delta.items():
        mine = total.setdefault(group, {})
        for key, n in counts.items():
            mine[key] = n if key in keep else mine.get(key, 0) + n


@dataclass(slots=True)
class _Row:
    """One scenario's iperf3 runs, interleaved with other rows' runs: CPU, node drops and
    wire counters are taken around each run and summed, so no row is charged another's."""

    path: _Path
    sc: Scenario
    rtts: list[float]
    runs: int
    results: list[IperfResult] = field(default_factory=list)
    cpu: float = 0.0  # both nodes' CPU seconds during this row's runs
    wire_cpu: float = 0.0
    elapsed: float = 0.0
    drops: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> reason -> n
    wire: dict[str, dict[str, int]] = field(default_factory=dict)  # direction -> counter -> n

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.path.nodes(self.sc)] if self.sc.overlay else []

    def run_once(self, duration: float, say: Print) -> None:
        """One iperf3 run of this row. A run whose iperf3 control connection the server
        dropped (the single-test server still winding down the run before it, seen on the
        lossy, delayed wire) is measured again once the server holds no connection: no
        counter was taken from the failed attempt."""
        try:
            self._measure(duration, say)
        except LabError as exc:
            if not iperf3_server_refused(exc):
                raise
            say(f"{self.sc.name}: {exc}; once more, when the server is idle")
            wait_tcp_idle(self.path.b, IPERF_PORT)
            self._measure(duration, say)

    def _measure(self, duration: float, say: Print) -> None:
        path, sc, pids, wire = self.path, self.sc, self.pids, self.path.wire
        dst = path.nodes(sc)[1].address if sc.overlay else path.underlay_b
        drops_before = _node_drops(path, sc) if pids else {}
        wire_before = wire.counters() if wire is not None else None
        cpu_before = sum(cpu_seconds(pid) for pid in pids)
        wire_pid = None if wire is None or wire.proc is None else wire.proc.pid
        wire_cpu_before = cpu_seconds(wire_pid) if wire_pid is not None else 0.0
        started = time.monotonic()
        n = len(self.results) + 1
        say(f"{sc.name}: iperf3 {duration:g}s, {sc.streams} stream(s), run {n}/{self.runs}")
        self.results.append(iperf3(path.a, dst, duration, streams=sc.streams))
        self.elapsed += time.monotonic() - started
        self.cpu += sum(cpu_seconds(pid) for pid in pids) - cpu_before
        if wire is not None and wire_before is not None:
            if wire_pid is not None:
                self.wire_cpu += cpu_seconds(wire_pid) - wire_cpu_before
            _add_counts(self.wire, wire_delta(wire_before, wire.counters()), gauges=["waiting"])
        if pids:
            after = _node_drops(path, sc)
            _add_counts(
                self.drops,
                {
                    node: {k: v - drops_before[node].get(k, 0) for k, v in reasons.items()}
                    for node, reasons in after.items()
                },
            )

    def finish(self, duration: float, say: Print) -> dict[str, Any]:
        path, sc, pids, results, rtts = self.path, self.sc, self.pids, self.results, self.rtts
        gigabytes = sum(r.bytes for r in results) / 1e9
        mbps = [r.bits_per_second / 1e6 for r in results]
        retrans = [r.retransmits for r in results if r.retransmits is not None]
        row: dict[str, Any] = {
            "scenario": sc.name,
            "streams": sc.streams,
            "netem": sc.netem,
            "underlay": sc.underlay,
            "datapath": sc.datapath,
            "throughput_mbps": round(statistics.median(mbps), 1),
            "rtt_p50_ms": _round(percentile(rtts, 50), 3),
            "rtt_p99_ms": _round(percentile(rtts, 99), 3),
            "cpu_s_per_gb": round(self.cpu / gigabytes, 2) if pids and gigabytes else None,
            "rss_mb_max": round(max(peak_rss_mb(p) for p in pids), 1) if pids else None,
            "runs": self.runs,
            "duration_s": duration,
            "throughput_runs_mbps": [round(m, 1) for m in mbps],
            "retransmits": sum(retrans) if retrans else None,
            "pings": len(rtts),
        }
        if pids:
            alpha, beta = path.nodes(sc)
            row["rss_mb"] = {n.name: round(peak_rss_mb(n.pid), 1) for n in (alpha, beta)}
            entry = path.overlay.peer_status(alpha, beta) or {}
            row["mode"] = entry.get("mode")
            # Datagrams/frames the nodes themselves dropped during the runs, by node and reason.
            row["node_drops"] = {
                node: {k: n for k, n in reasons.items() if n}
                for node, reasons in self.drops.items()
            }
            if entry.get("mode") not in (None, _link_mode(sc)):
                say(f"note: {sc.name} row ran over a link in mode {entry.get('mode')!r}")
        if path.wire is not None:
            row["wire"] = self.wire
            got = sum(d["received"] for d in self.wire.values())
            lost = sum(d["lost"] for d in self.wire.values())
            row["wire_loss_pct"] = round(100 * lost / got, 3) if got else None
            # The wire is one Python thread: near 1.0 it, not TCP or the node, set the pace.
            if path.wire.proc is not None:
                row["wire_cpu_util"] = round(self.wire_cpu / self.elapsed, 2)
        return row


def _link_mode(sc: Scenario) -> str:
    """The link mode a scenario's row must run over."""
    return "secure" if sc.name == "firewall" else sc.name


def measure(
    duration: float = 5.0,
    *,
    scenarios: Sequence[Scenario] = SCENARIOS,
    ping_count: int = PING_COUNT,
    runs: int = RUNS,
    say: Print = print,
) -> dict[str, Any]:
    """Build a lab per underlay (plain veth, each impairment), run its scenarios, tear it
    down; return {"machine", "rows", "ratios"} with rows in `scenarios` order."""
    rows: dict[int, dict[str, Any]] = {}
    machine = machine_info()
    result_echo: dict[str, Any] | None = None
    for impair, group in _groups(scenarios):
        todo = [(i, sc) for i, sc in group if sc.skipped is None]
        for i, sc in group:
            if sc.skipped is not None:
                say(f"{sc.name} ×{sc.streams}: skipped, {sc.skipped}")
                rows[i] = _skipped_row(sc)
        if not todo:
            continue
        if impair is not None and not impair.kernel:
            machine["wire"] = WIRE_MACHINE_NOTE
        elif impair is not None:
            machine["kernel_loss"] = KERNEL_MACHINE_NOTE
        with Lab() as lab:
            needed = {(sc.name, sc.datapath or DATAPATHS[0]) for _, sc in todo if sc.overlay}
            path = _build(lab, impair, say, needed)
            if needed:
                path.overlay.start()
                for (mode, datapath), (alpha, beta) in path.pairs.items():
                    path.overlay.wait_established(alpha, beta)
                    say(f"{mode} pair up ({datapath}): {alpha.address} <-> {beta.address}")
            start_iperf3_server(path.b)
            if impair is None:
                say(f"user-space hop: UDP echo both ways ({ping_count} each)")
                echo = udp_echo_rtts(path.a, path.b, path.underlay_b, ping_count)
                echo += udp_echo_rtts(path.b, path.a, path.underlay_a, ping_count)
                result_echo = {
                    "rtt_p50_ms": _round(percentile(echo, 50), 3),
                    "rtt_p99_ms": _round(percentile(echo, 99), 3),
                    "pings": len(echo),
                    "what": "blocking Python UDP echo over the direct veth, 64 B, "
                    f"{PING_INTERVAL * 1000:g} ms apart",
                }
            rtt_cache: dict[tuple[str, str | None], list[float]] = {}
            for _, sc in todo:
                key = (sc.name, sc.datapath)
                if key not in rtt_cache:
                    dst_b, dst_a = path.underlay_b, path.underlay_a
                    if sc.overlay:
                        alpha, beta = path.nodes(sc)
                        dst_b, dst_a = beta.address, alpha.address
                    say(f"{sc.name} {sc.datapath or ''}: ping both ways ({ping_count} each)")
                    rtt_cache[key] = ping_rtts(path.a, dst_b, ping_count) + ping_rtts(
                        path.b, dst_a, ping_count
                    )
            table = [
                _Row(path, sc, rtt_cache[(sc.name, sc.datapath)], runs if sc.streams == 1 else 1)
                for _, sc in todo
            ]
            for k in _interleave([row.runs for row in table]):
                table[k].run_once(duration, say)
            for (i, _), row in zip(todo, table, strict=True):
                rows[i] = row.finish(duration, say)
    ordered = [rows[i] for i in sorted(rows)]
    out = {
        "machine": machine,
        "rows": ordered,
        "ratios": ratios(ordered),
        "ratios_python": ratios(ordered, "python"),
    }
    if result_echo is not None:
        out["echo"] = result_echo
    return out


def _find(
    rows: Sequence[dict[str, Any]], name: str, underlay: str, datapath: str | None = None
) -> dict[str, Any] | None:
    """The single-stream row of `name` on `underlay` ("veth", "labwire", "nftables") and,
    for overlay rows, `datapath` (rows written before there were two count as native)."""
    for row in rows:
        if (
            row["scenario"] == name
            and row["streams"] == 1
            and row.get("underlay", "veth" if row["netem"] is None else WIRE_NOTE) == underlay
            and (name == "direct" or row.get("datapath", "native") == datapath)
            and row["throughput_mbps"] is not None
        ):
            return row
    return None


def _ratio(x: dict[str, Any] | None, y: dict[str, Any] | None) -> float | None:
    if x is None or y is None or not y["throughput_mbps"]:
        return None
    return round(x["throughput_mbps"] / y["throughput_mbps"], 3)


# The overlay's performance targets (for the native data path), as (comparison, bound).
TARGETS = {
    "secure_over_direct": (">=", 0.20),
    "secure_over_plain": (">=", 0.9),
    "secure_over_direct_lossy": (">=", 0.8),
    "rtt_p50_overhead_ms": ("<=", 0.6),
    "cpu_s_per_gb_secure": ("<=", 3.5),
    "rss_mb_max": ("<=", 80.0),
}


def ratios(rows: Sequence[dict[str, Any]], datapath: str = "native") -> dict[str, float | None]:
    """The targets' comparisons from single-stream rows of one data path (None where a
    side is missing). Loss: the in-kernel row; the labwire row (loss and delay, through a
    Python relay) is reported beside it."""
    direct, secure = _find(rows, "direct", "veth"), _find(rows, "secure", "veth", datapath)
    plain = _find(rows, "plain", "veth", datapath)
    walled = _find(rows, "firewall", "veth", datapath)
    overhead = None
    if direct and secure and direct["rtt_p50_ms"] is not None and secure["rtt_p50_ms"] is not None:
        overhead = round(secure["rtt_p50_ms"] - direct["rtt_p50_ms"], 3)
    mine = [r for r in rows if r.get("datapath", "native") == datapath]
    cpu = [r["cpu_s_per_gb"] for r in mine if r.get("cpu_s_per_gb") is not None]
    rss = [r["rss_mb_max"] for r in mine if r.get("rss_mb_max") is not None]
    lossy = _ratio(_find(rows, "secure", KERNEL_NOTE, datapath), _find(rows, "direct", KERNEL_NOTE))
    wired = _ratio(_find(rows, "secure", WIRE_NOTE, datapath), _find(rows, "direct", WIRE_NOTE))
    return {
        "secure_over_direct": _ratio(secure, direct),
        "secure_over_plain": _ratio(secure, plain),
        "firewall_over_secure": _ratio(walled, secure),
        "cpu_s_per_gb_firewall": None if walled is None else walled.get("cpu_s_per_gb"),
        "secure_over_direct_lossy": lossy if lossy is not None else wired,
        "secure_over_direct_labwire": wired,
        "rtt_p50_overhead_ms": overhead,
        # the secure tunnel's cost (both nodes, user + system) on the veth, 1 stream
        "cpu_s_per_gb_secure": None if secure is None else secure.get("cpu_s_per_gb"),
        "cpu_s_per_gb_max": max(cpu) if cpu else None,
        "rss_mb_max": max(rss) if rss else None,
    }


_COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("streams", "streams", "{}"),
    ("datapath", "path", "{}"),
    ("netem", "underlay", "{}"),
    ("throughput_mbps", "Mbit/s", "{:.1f}"),
    ("spread", "runs min-max", "{}"),
    ("rtt_p50_ms", "RTT p50 ms", "{:.3f}"),
    ("rtt_p99_ms", "RTT p99 ms", "{:.3f}"),
    ("cpu_s_per_gb", "CPU s/GB", "{:.2f}"),
    ("rss_mb_max", "RSS MB", "{:.1f}"),
    ("retransmits", "retrans", "{}"),
)

_TEXT = {"scenario", "datapath", "netem"}  # left-aligned columns

_RATIO_LINES = (
    ("secure_over_direct", "secure / direct, 1 stream", "{:.3f}×"),
    ("secure_over_plain", "secure / plain, 1 stream", "{:.3f}×"),
    ("firewall_over_secure", "firewall (10 rules) / secure, 1 stream", "{:.3f}×"),
    ("secure_over_direct_lossy", "secure / direct under loss, 1 stream", "{:.3f}×"),
    ("secure_over_direct_labwire", "  the same through labwire (+5 ms)", "{:.3f}×"),
    ("rtt_p50_overhead_ms", "RTT p50 overhead, secure - direct", "{:+.3f} ms"),
    ("cpu_s_per_gb_secure", "secure tunnel CPU, 1 stream", "{:.2f} CPU-s/GB"),
    ("cpu_s_per_gb_firewall", "  the same with the firewall's 10 rules", "{:.2f} CPU-s/GB"),
    ("cpu_s_per_gb_max", "  tunnel CPU, worst row (loss rows too)", "{:.2f} CPU-s/GB"),
    ("rss_mb_max", "node peak RSS, worst row", "{:.1f} MB"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    if key == "netem":
        return row["netem"] or "veth"
    if key == "spread":
        runs = row.get("throughput_runs_mbps") or []
        return f"{min(runs):.0f}-{max(runs):.0f}" if len(runs) > 1 else "-"
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def format_table(result: dict[str, Any]) -> str:
    """The bench rows as an aligned text table, the machine line on top, ratios below."""
    m = result["machine"]
    head = f"{m['cpu']} ×{m['nproc']}, Linux {m['kernel']}, Python {m['python']}"
    if m.get("tcp_cc"):
        head += f", TCP {m['tcp_cc']}"
    cells = [[title for _, title, _ in _COLUMNS]]
    notes = []
    for row in result["rows"]:
        if row.get("skipped"):
            notes.append(f"{row['scenario']} ×{row['streams']}: skipped, {row['skipped']}")
            cells.append([_cell(row, k, f) for k, _, f in _COLUMNS[:3]] + ["skipped"])
            cells[-1] += [""] * (len(_COLUMNS) - len(cells[-1]))
            continue
        cells.append([_cell(row, k, fmt) for k, _, fmt in _COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.ljust(w) if key in _TEXT else c.rjust(w)
            for c, w, (key, _, _) in zip(r, widths, _COLUMNS, strict=True)
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines = [line.rstrip() for line in lines]
    foot = [""]
    ratio_values = result.get("ratios") or ratios(result["rows"])
    python = result.get("ratios_python") or ratios(result["rows"], "python")
    label_w = max(len(label) for _, label, _ in _RATIO_LINES)
    foot.append(f"{'native data path'.ljust(label_w)}  {'':>16}   {'':22}  python")
    for key, label, fmt in _RATIO_LINES:
        value = ratio_values.get(key)
        text = "n/a" if value is None else fmt.format(value)
        target = TARGETS.get(key)
        met = ""
        if target is not None and value is not None:
            met = "  ok" if _meets(value, *target) else "  MISSED"
        aim = f"(target {target[0]} {target[1]:g}){met}" if target else ""
        other = python.get(key)
        beside = "n/a" if other is None else fmt.format(other)
        foot.append(f"{label.ljust(label_w)}  {text:>16}   {aim:<22}  {beside}")
    echo, direct = result.get("echo"), _find(result["rows"], "direct", "veth")
    if echo and direct and echo["rtt_p50_ms"] is not None and direct["rtt_p50_ms"] is not None:
        hop = echo["rtt_p50_ms"] - direct["rtt_p50_ms"]
        foot.append(
            f"one user-space hop costs {hop:.3f} ms here (a blocking UDP echo: RTT p50 "
            f"{echo['rtt_p50_ms']:.3f} ms, less the direct ping's {direct['rtt_p50_ms']:.3f}); "
            "an overlay ping makes four (each node, each way)"
        )
    if any(r.get("wire_cpu_util") is not None for r in result["rows"]):
        foot.append(
            f"underlay impairment by {WIRE_NOTE} (a Python L2 relay; this kernel has no netem); "
            "its CPU use per row (1.0 = one core: the wire set the pace):"
        )
        for row in result["rows"]:
            if row.get("wire_cpu_util") is not None:
                foot.append(
                    f"  {row['scenario']} {row.get('datapath') or ''} ×{row['streams']}: "
                    f"wire {row['wire_cpu_util']:.2f} "
                    f"core, measured loss {row['wire_loss_pct']}%"
                )
    foot += notes
    return "\n".join([head, *lines, *foot])


def _meets(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound


def run_bench(
    duration: float = 5.0, json_path: str | Path | None = None, *, quick: bool = False
) -> int:
    """CLI entry point: measure, print the table, write JSON; return an exit code.

    `quick`: 1-second runs, one run per row, 20 pings each way (a smoke test, not a result)."""
    with sigterm_raises():
        try:
            if quick:
                result = measure(min(duration, 1.0), ping_count=20, runs=1)
            else:
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
