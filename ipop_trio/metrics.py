"""Prometheus metrics of a node and of the signalling server (`[metrics] listen`,
`ipop-trio signal --metrics`): snapshot in, metric families out.

The one module that uses prometheus_client. Nothing here runs on the data path: a scrape
takes the same snapshot `ipop-trio status` reads (`Node.status`, `ServerCore.stats`) and
turns it into families, so the counters the node keeps anyway are all there is to it. The
snapshot is taken in the Trio thread (net/httpd.py calls `render` there), never from
another thread while the node changes its state.

Names follow Prometheus' conventions: `ipop_trio_` first, the unit in the name
(`_bytes_total`, `_seconds`), counters end in `_total`. An enumerated state is one series
per possible value (1 for the current one, 0 for the others), so a query can say
`ipop_trio_peer_link_state{state="established"} == 0`. Label values come from bounded
sets: peer names (at most the configured peers plus `[signalling] max_links`), stages,
channels, TURN servers and overlays (from the config), drop reasons and event names (named
in our code; any family holding more than MAX_LABEL_VALUES folds the rest into "_other", so
not even a hostile signalling server's error codes can grow a scrape without bound).

This module must never keep state of its own between scrapes or be called per packet.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import CollectorRegistry

MAX_LABEL_VALUES = 64  # per family and label taken from a counter dict
# What `ipop-trio status` shows in STATE (control/links.py LinkManager.status), underscored.
LINK_STATES = ("idle", "handshaking", "established", "no_path", "reconnecting")
# The ICE path type (host, srflx, prflx: direct; relay: through TURN); "direct" for a peer
# with a configured endpoint (no ICE).
PATH_TYPES = ("host", "srflx", "prflx", "relay", "direct")
SIGNALLING_STATES = ("connecting", "connected", "backoff")  # signalling/client.py ClientState
# ServerCore's counters (signalling/server.py) by what they count.
SIGNAL_REFUSALS = (
    "full",
    "source",
    "preauth",
    "preauth_source",
    "certificate",
    "proof",
    "admit_rate",
    "revoked",
    "address_in_use",
    "name_in_use",
)
SIGNAL_CLOSES = ("rate", "bad_message", "spoofed", "slow", "too_big", "send_timeout", "revoked")
SIGNAL_RELAYS = ("con_req", "con_resp")

Snapshot = Callable[[], Mapping[str, Any]]


class SnapshotCollector:
    """A prometheus_client collector: each `collect` takes one snapshot and gives the
    families `families(snapshot)` makes of it."""

    def __init__(
        self, snapshot: Snapshot, families: Callable[[Mapping[str, Any]], Iterable[Metric]]
    ) -> None:
        self.snapshot = snapshot
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families(self.snapshot())


def registry_for(collector: SnapshotCollector) -> CollectorRegistry:
    """A registry of this collector alone (no process or platform collectors: the node's
    own state, nothing a node exporter would duplicate)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def page(registry: CollectorRegistry) -> Callable[[], tuple[str, bytes]]:
    """The `/metrics` page for net/httpd.py: the text exposition format."""
    return lambda: (CONTENT_TYPE_LATEST, generate_latest(registry))


def node_page(snapshot: Snapshot) -> Callable[[], tuple[str, bytes]]:
    return page(registry_for(SnapshotCollector(snapshot, node_families)))


def signal_page(snapshot: Snapshot) -> Callable[[], tuple[str, bytes]]:
    return page(registry_for(SnapshotCollector(snapshot, signal_families)))


# --- a node ------------------------------------------------------------------------------


def node_families(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The families of one node's `status` snapshot (net/control.py `status`)."""
    node = status.get("node") or {}
    info = GaugeMetricFamily(
        "ipop_trio_node_info",
        "This node (value 1): its name, overlay, overlay address, TAP, data path and cipher",
        labels=["name", "overlay", "address", "tap", "datapath", "cipher"],
    )
    info.add_metric(
        [str(node.get(k) or "") for k in ("name", "overlay", "address", "tap", "datapath")]
        + [str(node.get("cipher") or "")],
        1,
    )
    yield info
    if node.get("started") is not None:
        yield _gauge(
            "ipop_trio_start_time_seconds",
            "When the node started, seconds since the Unix epoch",
            float(node["started"]),
        )
    yield from _peer_families(status.get("peers") or [])
    yield from _stats_families(status.get("stats") or {})
    yield from _signalling_families(status.get("signalling"))
    yield from _ice_families(status.get("ice"))


def _peer_families(peers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    def fam(kind: Callable[..., Metric], name: str, doc: str, *extra: str) -> Any:
        return kind(name, doc, labels=["peer", *extra])

    count = _gauge("ipop_trio_peers", "Peers this node has a link for", len(peers))
    info = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_info",
        "A peer (value 1): its overlay address and how it was learned (config, signalling)",
        "address",
        "learned",
    )
    nbytes = fam(
        CounterMetricFamily,
        "ipop_trio_peer_bytes",
        "Bytes of Ethernet frames sent to (tx) and received from (rx) the peer",
        "direction",
    )
    packets = fam(
        CounterMetricFamily,
        "ipop_trio_peer_packets",
        "Ethernet frames sent to (tx) and received from (rx) the peer",
        "direction",
    )
    drops = fam(
        CounterMetricFamily,
        "ipop_trio_peer_drops",
        "Datagrams from the peer refused (bad tag, replay, spoofed frame); the reasons of all "
        "drops are in ipop_trio_drops_total",
    )
    staged = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_staged_frames",
        "Frames waiting for a session to the peer",
    )
    state = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_link_state",
        "The link's state (1 for the current one): idle, handshaking, established, no_path "
        "(keys but no ICE path), reconnecting (ICE restarting)",
        "state",
    )
    path = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_path_type",
        "The path in use (1; all 0 without one): host, srflx, prflx (direct, found by ICE), "
        "relay (through TURN), direct (a configured endpoint)",
        "type",
    )
    rtt = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_rtt_seconds",
        "Round-trip time of the ICE pair in use (absent while unknown)",
    )
    secure = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_secure",
        "1: the link's session is encrypted; 0: plain (selective security); absent without "
        "a session",
    )
    handshaking = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_handshaking",
        "1 while an initiation of ours to the peer is in flight",
    )
    last_handshake = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_last_handshake_timestamp_seconds",
        "When the current session's handshake completed, seconds since the Unix epoch",
    )
    path_changes = fam(
        CounterMetricFamily,
        "ipop_trio_peer_path_changes",
        "Times the link moved to another ICE pair",
    )
    failures = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_link_failures",
        "Consecutive failures of the link task (it retries with backoff); 0 when healthy",
    )
    setup = fam(
        GaugeMetricFamily,
        "ipop_trio_peer_setup_seconds",
        "Link set-up time, from our first con_req/con_resp to the peer's first data frame",
    )
    for p in peers:
        name = str(p.get("name"))
        info.add_metric([name, str(p.get("address") or ""), str(p.get("learned") or "")], 1)
        for direction in ("tx", "rx"):
            nbytes.add_metric([name, direction], _num(p.get(f"{direction}_bytes")))
            packets.add_metric([name, direction], _num(p.get(f"{direction}_packets")))
        drops.add_metric([name], _num(p.get("drops")))
        staged.add_metric([name], _num(p.get("staged")))
        current = str(p.get("state") or "").replace(" ", "_")
        for s in LINK_STATES:
            state.add_metric([name, s], 1 if s == current else 0)
        kind = path_type(p)
        for t in PATH_TYPES:
            path.add_metric([name, t], 1 if t == kind else 0)
        rtt_ms = (p.get("path") or {}).get("rtt_ms")
        if rtt_ms is not None:
            rtt.add_metric([name], float(rtt_ms) / 1000)
        if p.get("mode") in ("secure", "plain"):
            secure.add_metric([name], 1 if p["mode"] == "secure" else 0)
        handshaking.add_metric([name], 1 if p.get("handshaking") else 0)
        if p.get("last_handshake") is not None:
            last_handshake.add_metric([name], float(p["last_handshake"]))
        path_changes.add_metric([name], _num(p.get("path_changes")))
        failures.add_metric([name], _num(p.get("failures")))
        if p.get("setup_seconds") is not None:
            setup.add_metric([name], float(p["setup_seconds"]))
    yield from (count, info, nbytes, packets, drops, staged, state, path, rtt, secure)
    yield from (handshaking, last_handshake, path_changes, failures, setup)


def path_type(peer: Mapping[str, Any]) -> str | None:
    """The peer's path type as `ipop-trio status` shows it (status.py `_path`), or None."""
    path = peer.get("path")
    if path:
        return str(path.get("type"))
    return "direct" if peer.get("endpoint") and not peer.get("ice") else None


def _stats_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    if "uptime" in stats:
        yield _gauge("ipop_trio_uptime_seconds", "Seconds since the node started", stats["uptime"])
    yield _counter_by(
        "ipop_trio_drops",
        "Datagrams and frames dropped, by reason (every drop of the node, counted where it "
        "happens)",
        "reason",
        stats.get("drops") or {},
    )
    counters = stats.get("counters") or {}
    handshake = {
        k[len("handshake_") :]: v for k, v in counters.items() if k.startswith("handshake_")
    }
    yield _counter_by(
        "ipop_trio_handshakes",
        "Handshake datagrams handled, by what became of them (queued, cookie_sent, mac2_ok, "
        "cookie_received, ...); refusals are in ipop_trio_drops_total",
        "event",
        handshake,
    )
    yield _counter_by(
        "ipop_trio_events",
        "Other things the node counts that are not drops (reassembly, TURN, ...)",
        "event",
        {k: v for k, v in counters.items() if not k.startswith("handshake_")},
    )
    stages = stats.get("stages") or {}
    if stats.get("timers", True) and stages:
        yield from _columns(
            stages,
            "stage",
            (
                (CounterMetricFamily, "ipop_trio_stage_seconds", "seconds",
                 "Time spent in each data-path stage (stats.py, timed per batch)"),
                (CounterMetricFamily, "ipop_trio_stage_batches", "batches",
                 "Batches through each data-path stage"),
                (CounterMetricFamily, "ipop_trio_stage_items", "items",
                 "Items (frames, datagrams) through each data-path stage"),
                (CounterMetricFamily, "ipop_trio_stage_bytes", "bytes",
                 "Bytes through each data-path stage"),
            ),
        )  # fmt: skip
    channels = stats.get("channels") or {}
    if channels:
        yield from _columns(
            channels,
            "channel",
            (
                (GaugeMetricFamily, "ipop_trio_channel_depth", "depth",
                 "Batches queued between two stages now"),
                (GaugeMetricFamily, "ipop_trio_channel_max_depth", "max_depth",
                 "Most batches ever queued between two stages"),
                (CounterMetricFamily, "ipop_trio_channel_wait_seconds", "wait_seconds",
                 "Time batches waited between two stages, summed"),
                (CounterMetricFamily, "ipop_trio_channel_batches", "batches",
                 "Batches that passed between two stages"),
            ),
        )  # fmt: skip


Column = tuple[type[CounterMetricFamily] | type[GaugeMetricFamily], str, str, str]


def _columns(
    table: Mapping[str, Mapping[str, Any]], label: str, columns: Iterable[Column]
) -> Iterator[Metric]:
    """One family per column of a snapshot table ({row: {key: value}}), a series per row
    labelled `label`: the stage timers and the channels."""
    for kind, name, key, doc in columns:
        family = kind(name, doc, labels=[label])
        for row, values in table.items():
            family.add_metric([row], _num(values.get(key)))
        yield family


def _signalling_families(sg: Mapping[str, Any] | None) -> Iterator[Metric]:
    """Only with [signalling]: absent families say the node has none."""
    if not sg:
        return
    state = GaugeMetricFamily(
        "ipop_trio_signalling_state",
        "The signalling client's state (1 for the current one)",
        labels=["state"],
    )
    for s in SIGNALLING_STATES:
        state.add_metric([s], 1 if sg.get("state") == s else 0)
    yield state
    yield _counter(
        "ipop_trio_signalling_connects", "Connections opened to the server", sg.get("connects")
    )
    yield _gauge(
        "ipop_trio_signalling_members",
        "Members of the overlay the server announced",
        sg.get("members"),
    )
    yield _gauge(
        "ipop_trio_signalling_learned_links",
        "Links learned from signalling now",
        sg.get("learned_links"),
    )
    yield _gauge("ipop_trio_signalling_max_links", "[signalling] max_links", sg.get("max_links"))
    yield _counter_by(
        "ipop_trio_signalling_events",
        "What the controller counted (con_req refused, duplicates, server errors, ...)",
        "event",
        sg.get("counters") or {},
    )


def _ice_families(ice: Mapping[str, Any] | None) -> Iterator[Metric]:
    if not ice:
        return
    yield _gauge(
        "ipop_trio_ice_candidates",
        "ICE candidates this node offers",
        len(ice.get("candidates") or []),
    )
    turn = ice.get("turn") or []
    if turn:
        allocated = GaugeMetricFamily(
            "ipop_trio_turn_allocated",
            "1: the TURN server holds a relayed address for us",
            labels=["server"],
        )
        lost = CounterMetricFamily(
            "ipop_trio_turn_lost", "Allocations this TURN server had and lost", labels=["server"]
        )
        for t in turn:
            allocated.add_metric([str(t.get("server"))], 1 if t.get("relayed") else 0)
            lost.add_metric([str(t.get("server"))], _num(t.get("lost")))
        yield from (allocated, lost)


# --- the signalling server ----------------------------------------------------------------


def signal_families(stats: Mapping[str, Any]) -> Iterator[Metric]:
    """The families of the signalling server's `ServerCore.stats()`."""
    counters: Mapping[str, Any] = stats.get("counters") or {}
    yield _gauge(
        "ipop_trio_signal_connections",
        "Connected clients (admitted or still authenticating)",
        stats.get("connections"),
    )
    yield _gauge(
        "ipop_trio_signal_preauth_connections",
        "Connections not yet admitted",
        stats.get("preauth"),
    )
    members = GaugeMetricFamily(
        "ipop_trio_signal_members", "Admitted members of each overlay", labels=["overlay"]
    )
    for overlay, n in sorted((stats.get("overlays") or {}).items()):
        members.add_metric([str(overlay)], _num(n))
    yield members
    yield _counter("ipop_trio_signal_admissions", "Nodes admitted", counters.get("admitted"))
    yield _counter_by(
        "ipop_trio_signal_refusals",
        "Connections refused, by reason: full, source, preauth, preauth_source (connection "
        "limits), certificate, proof (admission), admit_rate (a key admitted too often), "
        "revoked (a certificate on --revoked), address_in_use, name_in_use (held by another "
        "key)",
        "reason",
        {reason: counters.get(f"refused_{reason}") for reason in SIGNAL_REFUSALS},
    )
    yield _counter_by(
        "ipop_trio_signal_closes",
        "Clients disconnected for breaking a limit or the protocol, by reason",
        "reason",
        {reason: counters.get(f"closed_{reason}") for reason in SIGNAL_CLOSES},
    )
    yield _counter_by(
        "ipop_trio_signal_relays",
        "Messages relayed between members, by type",
        "type",
        {kind: counters.get(f"relayed_{kind}") for kind in SIGNAL_RELAYS},
    )
    yield _counter(
        "ipop_trio_signal_relay_unknown_peer",
        "con_req/con_resp to a node that is not a member (answered unknown_peer)",
        counters.get("relay_no_peer"),
    )
    yield _counter(
        "ipop_trio_signal_connection_errors",
        "Connections ended by an error of the transport (TLS, WebSocket)",
        counters.get("connection_errors"),
    )


# --- helpers -----------------------------------------------------------------------------


def _num(value: object) -> float:
    """A snapshot's number; anything else (missing, None) is 0."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def _gauge(name: str, doc: str, value: object) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=_num(value))


def _counter(name: str, doc: str, value: object) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=_num(value))


def _counter_by(name: str, doc: str, label: str, values: Mapping[str, Any]) -> CounterMetricFamily:
    """One counter per key of `values`; past MAX_LABEL_VALUES keys (sorted), the rest are
    summed into "_other" (no name of ours starts with "_")."""
    family = CounterMetricFamily(name, doc, labels=[label])
    keys = sorted(values)
    other = 0.0
    for i, key in enumerate(keys):
        if i < MAX_LABEL_VALUES:
            family.add_metric([str(key)], _num(values[key]))
        else:
            other += _num(values[key])
    if len(keys) > MAX_LABEL_VALUES:
        family.add_metric(["_other"], other)
    return family


__all__ = [
    "LINK_STATES",
    "MAX_LABEL_VALUES",
    "PATH_TYPES",
    "SnapshotCollector",
    "node_families",
    "node_page",
    "path_type",
    "signal_families",
    "signal_page",
]
