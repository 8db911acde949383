"""The metrics collector: a status snapshot in, Prometheus families out (ipop_trio/metrics.py),
checked through the text exposition a scraper reads."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipop_trio import metrics

PEER_BETA: dict[str, Any] = {
    "name": "beta",
    "address": "10.77.0.2",
    "state": "established",
    "link_state": "established",
    "handshaking": False,
    "mode": "secure",
    "endpoint": "10.199.0.2:4600",
    "learned": "signalling",
    "tx_bytes": 1200,
    "rx_bytes": 3400,
    "tx_packets": 12,
    "rx_packets": 34,
    "staged": 0,
    "drops": 2,
    "last_handshake": 1_700_000_000.5,
    "path": {"type": "relay", "rtt_ms": 1.5, "local": "x", "remote": "y"},
    "path_changes": 3,
    "ice": {"state": "completed"},
    "setup_seconds": 0.25,
    "failures": 0,
}
PEER_GAMMA: dict[str, Any] = {
    "name": "gamma",
    "address": None,
    "state": "no path",
    "handshaking": True,
    "mode": None,
    "endpoint": None,
    "learned": "signalling",
    "tx_bytes": 0,
    "rx_bytes": 0,
    "tx_packets": 0,
    "rx_packets": 0,
    "staged": 5,
    "drops": 0,
    "last_handshake": None,
    "path": None,
    "path_changes": 0,
    "ice": {"state": "checking"},
    "setup_seconds": None,
    "failures": 2,
}
PEER_DELTA: dict[str, Any] = {  # configured endpoint, no ICE
    **PEER_GAMMA,
    "name": "delta",
    "state": "established",
    "endpoint": "10.199.0.3:4600",
    "ice": None,
    "mode": "plain",
    "learned": "config",
}


def status(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": {
            "name": "alpha",
            "overlay": "lab",
            "address": "10.77.0.1/24",
            "tap": "ipop0",
            "datapath": "native",
            "cipher": "aes-256-gcm",
            "started": 1_700_000_000.0,
        },
        "peers": [PEER_BETA, PEER_GAMMA, PEER_DELTA],
        "signalling": {
            "url": "ws://192.0.2.1:8765/",
            "state": "connected",
            "connects": 2,
            "members": 4,
            "learned_links": 2,
            "max_links": 32,
            "counters": {"con_req_duplicate": 1},
        },
        "ice": {
            "candidates": ["a", "b", "c"],
            "turn": [{"server": "192.0.2.9:3478", "relayed": "192.0.2.9:50000", "lost": 1}],
        },
        "stats": {
            "timers": True,
            "uptime": 12.5,
            "stages": {
                "seal": {"batches": 3, "items": 30, "bytes": 4500, "seconds": 0.002},
                "open": {"batches": 4, "items": 40, "bytes": 6000, "seconds": 0.003},
            },
            "drops": {"replay": 7, "bad_tag": 1},
            "gauges": {},
            "channels": {
                "outbound": {"depth": 1, "max_depth": 9, "batches": 5, "wait_seconds": 0.01}
            },
            "counters": {"handshake_queued": 4, "handshake_cookie_sent": 1, "turn_checks": 6},
        },
    }
    base.update(over)
    return base


def scrape(families: Any) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Family name -> {sorted labels: value}, via the exposition text and its parser."""
    collector = metrics.SnapshotCollector(lambda: {}, lambda _snap: families)
    _, body = metrics.page(metrics.registry_for(collector))()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def one(found: dict[str, dict[Any, float]], name: str, **labels: str) -> float:
    return found[name][tuple(sorted(labels.items()))]


def test_per_peer_traffic_state_and_path() -> None:
    got = scrape(metrics.node_families(status()))
    assert one(got, "ipop_trio_peer_bytes_total", peer="beta", direction="tx") == 1200
    assert one(got, "ipop_trio_peer_bytes_total", peer="beta", direction="rx") == 3400
    assert one(got, "ipop_trio_peer_packets_total", peer="beta", direction="rx") == 34
    assert one(got, "ipop_trio_peer_drops_total", peer="beta") == 2
    assert one(got, "ipop_trio_peer_rtt_seconds", peer="beta") == pytest.approx(0.0015)
    assert one(got, "ipop_trio_peer_last_handshake_timestamp_seconds", peer="beta") == (
        1_700_000_000.5
    )
    assert one(got, "ipop_trio_peer_secure", peer="beta") == 1
    assert one(got, "ipop_trio_peer_secure", peer="delta") == 0
    assert one(got, "ipop_trio_peer_path_changes_total", peer="beta") == 3
    assert one(got, "ipop_trio_peer_setup_seconds", peer="beta") == 0.25
    assert one(got, "ipop_trio_peer_staged_frames", peer="gamma") == 5
    assert one(got, "ipop_trio_peer_handshaking", peer="gamma") == 1
    assert one(got, "ipop_trio_peer_link_failures", peer="gamma") == 2
    assert one(got, "ipop_trio_peers") == 3
    info = got["ipop_trio_peer_info"]
    assert info[(("address", "10.77.0.2"), ("learned", "signalling"), ("peer", "beta"))] == 1


def test_enumerated_states_have_one_series_per_value_and_one_is_set() -> None:
    got = scrape(metrics.node_families(status()))
    for peer, state, path in (
        ("beta", "established", "relay"),
        ("gamma", "no_path", None),
        ("delta", "established", "direct"),
    ):
        states = {s: one(got, "ipop_trio_peer_link_state", peer=peer, state=s) for s in
                  metrics.LINK_STATES}  # fmt: skip
        assert states == {s: (1 if s == state else 0) for s in metrics.LINK_STATES}
        paths = {t: one(got, "ipop_trio_peer_path_type", peer=peer, type=t) for t in
                 metrics.PATH_TYPES}  # fmt: skip
        assert paths == {t: (1 if t == path else 0) for t in metrics.PATH_TYPES}
    sig = {s: one(got, "ipop_trio_signalling_state", state=s) for s in metrics.SIGNALLING_STATES}
    assert sig == {"connecting": 0, "connected": 1, "backoff": 0}


def test_a_peer_without_a_known_rtt_handshake_or_session_has_no_such_series() -> None:
    got = scrape(metrics.node_families(status()))
    for name in (
        "ipop_trio_peer_rtt_seconds",
        "ipop_trio_peer_last_handshake_timestamp_seconds",
        "ipop_trio_peer_secure",
        "ipop_trio_peer_setup_seconds",
    ):
        assert (("peer", "gamma"),) not in got[name], name


def test_node_wide_drops_handshakes_events_stages_and_channels() -> None:
    got = scrape(metrics.node_families(status()))
    assert one(got, "ipop_trio_drops_total", reason="replay") == 7
    assert one(got, "ipop_trio_drops_total", reason="bad_tag") == 1
    assert one(got, "ipop_trio_handshakes_total", event="queued") == 4
    assert one(got, "ipop_trio_handshakes_total", event="cookie_sent") == 1
    assert one(got, "ipop_trio_events_total", event="turn_checks") == 6
    assert (("event", "handshake_queued"),) not in got["ipop_trio_events_total"]
    assert one(got, "ipop_trio_stage_seconds_total", stage="seal") == 0.002
    assert one(got, "ipop_trio_stage_items_total", stage="open") == 40
    assert one(got, "ipop_trio_channel_max_depth", channel="outbound") == 9
    assert one(got, "ipop_trio_channel_wait_seconds_total", channel="outbound") == 0.01
    assert one(got, "ipop_trio_uptime_seconds") == 12.5
    assert one(got, "ipop_trio_signalling_members") == 4
    assert one(got, "ipop_trio_signalling_connects_total") == 2
    assert one(got, "ipop_trio_signalling_events_total", event="con_req_duplicate") == 1
    assert one(got, "ipop_trio_turn_allocated", server="192.0.2.9:3478") == 1
    assert one(got, "ipop_trio_turn_lost_total", server="192.0.2.9:3478") == 1
    assert one(got, "ipop_trio_ice_candidates") == 3
    labels = next(iter(got["ipop_trio_node_info"]))
    assert ("name", "alpha") in labels and ("datapath", "native") in labels


def test_stage_timers_switched_off_give_no_stage_series() -> None:
    snap = status()
    snap["stats"] = {**snap["stats"], "timers": False}
    assert "ipop_trio_stage_seconds_total" not in scrape(metrics.node_families(snap))


def test_without_signalling_or_ice_those_families_are_absent() -> None:
    got = scrape(metrics.node_families(status(signalling=None, ice=None, peers=[])))
    assert not any(name.startswith(("ipop_trio_signalling_", "ipop_trio_turn_")) for name in got)
    assert one(got, "ipop_trio_peers") == 0


def test_label_values_from_counter_dicts_are_bounded() -> None:
    """A hostile signalling server can make the controller count server_error_<any code>:
    the family stays at MAX_LABEL_VALUES series plus "_other", and nothing is lost."""
    snap = status()
    codes = {f"server_error_{i:03}": 1 for i in range(500)}
    snap["signalling"] = {**snap["signalling"], "counters": codes}
    got = scrape(metrics.node_families(snap))["ipop_trio_signalling_events_total"]
    assert len(got) == metrics.MAX_LABEL_VALUES + 1
    assert got[(("event", "_other"),)] == 500 - metrics.MAX_LABEL_VALUES
    assert sum(got.values()) == 500


def test_every_name_is_ours_and_every_counter_ends_in_total() -> None:
    collector = metrics.SnapshotCollector(status, metrics.node_families)
    _, body = metrics.page(metrics.registry_for(collector))()
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("ipop_trio_"), family.name
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name


def test_each_scrape_takes_a_new_snapshot() -> None:
    n = {"tx": 0}

    def snapshot() -> dict[str, Any]:
        n["tx"] += 100
        return status(peers=[{**PEER_BETA, "tx_bytes": n["tx"]}])

    render = metrics.node_page(snapshot)
    for want in (100, 200):
        content_type, body = render()
        assert content_type.startswith("text/plain")
        assert f'ipop_trio_peer_bytes_total{{direction="tx",peer="beta"}} {want}.0' in body.decode()


def test_a_snapshot_with_missing_or_odd_fields_still_renders() -> None:
    """The collector reads a dict another module builds: a missing key is 0 or absent,
    never an exception at scrape time."""
    odd = {"name": "x", "tx_bytes": None, "state": None, "path": {}, "drops": True}
    got = scrape(metrics.node_families({"node": {}, "peers": [odd], "stats": {}}))
    assert one(got, "ipop_trio_peer_bytes_total", peer="x", direction="tx") == 0
    assert one(got, "ipop_trio_peer_drops_total", peer="x") == 0
    assert sum(got["ipop_trio_peer_link_state"].values()) == 0


def test_signalling_server_families() -> None:
    stats = {
        "connections": 5,
        "preauth": 1,
        "overlays": {"lab": 3, "other": 1},
        "counters": {
            "admitted": 4,
            "refused_certificate": 2,
            "refused_preauth_source": 1,
            "closed_rate": 1,
            "relayed_con_req": 6,
            "relayed_con_resp": 5,
            "relay_no_peer": 1,
        },
    }
    got = scrape(metrics.signal_families(stats))
    assert one(got, "ipop_trio_signal_connections") == 5
    assert one(got, "ipop_trio_signal_preauth_connections") == 1
    assert one(got, "ipop_trio_signal_members", overlay="lab") == 3
    assert one(got, "ipop_trio_signal_members", overlay="other") == 1
    assert one(got, "ipop_trio_signal_admissions_total") == 4
    refusals = {k[0][1]: v for k, v in got["ipop_trio_signal_refusals_total"].items()}
    assert refusals == {r: 0 for r in metrics.SIGNAL_REFUSALS} | {
        "certificate": 2,
        "preauth_source": 1,
    }
    assert one(got, "ipop_trio_signal_closes_total", reason="rate") == 1
    assert one(got, "ipop_trio_signal_relays_total", type="con_req") == 6
    assert one(got, "ipop_trio_signal_relays_total", type="con_resp") == 5
    assert one(got, "ipop_trio_signal_relay_unknown_peer_total") == 1
    assert one(got, "ipop_trio_signal_connection_errors_total") == 0


def test_server_core_counts_what_the_families_read() -> None:
    """The counter names signal_families reads are the ones ServerCore writes."""
    import ast
    from pathlib import Path

    from ipop_trio.signalling import server

    tree = ast.parse(Path(server.__file__).read_text())
    written = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    read = (
        {"admitted", "relay_no_peer", "connection_errors"}
        | {f"refused_{r}" for r in metrics.SIGNAL_REFUSALS}
        | {f"closed_{r}" for r in metrics.SIGNAL_CLOSES}
        | {f"relayed_{t}" for t in metrics.SIGNAL_RELAYS}
    )
    assert read <= written, read - written
