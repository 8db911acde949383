"""`ipop-trio status` shows each link's ICE path: type, RTT, the pair and the relay."""

from __future__ import annotations

from ipop_trio.status import format_status

PEER = {
    "name": "beta",
    "address": "10.77.0.2",
    "state": "established",
    "mode": "secure",
    "learned": "signalling",
    "endpoint": "10.199.255.1:49160",
    "tx_bytes": 2048,
    "rx_bytes": 1024,
    "drops": 0,
    "last_handshake": 990.0,
    "via": "relay 10.199.255.1:3478",
    "ice": {"state": "completed"},
    "path": {
        "type": "relay",
        "local": "10.199.255.1:49160 (relay)",
        "remote": "10.199.255.3:4600 (srflx)",
        "rtt_ms": 1.25,
        "nominated": True,
    },
}
STATUS = {
    "node": {"name": "alpha"},
    "ice": {
        "candidates": ["a", "b", "c"],
        "stun": ["10.199.255.1:3478"],
        "turn": [
            {"server": "10.199.255.1:3478", "state": "allocated", "relayed": "10.199.255.1:49160"}
        ],
    },
    "peers": [PEER, {**PEER, "name": "gamma", "path": None, "ice": None, "via": None}],
}


def test_the_table_shows_path_type_rtt_pair_and_relay() -> None:
    text = format_status(STATUS, now=1000.0)
    header = next(line for line in text.splitlines() if line.startswith("PEER"))
    assert "PATH" in header and "RTT" in header
    beta = next(line for line in text.splitlines() if line.startswith("beta"))
    assert " relay " in beta and "1.2ms" in beta
    gamma = next(line for line in text.splitlines() if line.startswith("gamma"))
    assert " direct " in gamma  # a configured peer: no ICE, a fixed endpoint
    assert "beta: 10.199.255.1:49160 (relay) -> 10.199.255.3:4600 (srflx) via relay" in text
    assert "ice 3 candidates  stun 10.199.255.1:3478  turn 10.199.255.1:3478 allocated" in text


def test_the_table_says_which_data_path_runs_and_why_not_native() -> None:
    native = {**STATUS, "node": {"name": "alpha", "datapath": "native", "cipher": "aes-256-gcm"}}
    assert "datapath native  cipher aes-256-gcm" in format_status(native, now=1000.0)
    python = {
        **STATUS,
        "node": {"datapath": "python", "datapath_why": "disabled by IPOP_TRIO_PURE_PYTHON=1"},
    }
    assert "datapath python (disabled by IPOP_TRIO_PURE_PYTHON=1)" in format_status(python, now=1.0)


def test_refusals_are_shown_with_the_reason() -> None:
    fp = "ab" * 32
    refused = {**PEER, "state": "idle", "refused": f"certificate revoked (sha256 {fp})"}
    sg = {
        "url": "ws://192.0.2.1:8765/",
        "state": "backoff",
        "refused": "address_in_use",
        "last_error": "refused: address_in_use: address 10.77.0.2 is held by member beta",
    }
    text = format_status({**STATUS, "peers": [refused], "signalling": sg}, now=1000.0)
    assert "refused peers:\n  beta: certificate revoked (sha256 " + fp + ")" in text
    assert "  refused by the server: refused: address_in_use: address 10.77.0.2 is held" in text
    assert "refused" not in format_status(STATUS, now=1000.0)


def test_a_dual_stack_node_and_peer_show_both_addresses() -> None:
    node = {"name": "alpha", "address": "10.77.0.1/24", "address6": "fd77::1/64"}
    peer = {**PEER, "address6": "fd77::2"}
    text = format_status({**STATUS, "node": node, "peers": [peer]}, now=1000.0)
    assert "address 10.77.0.1/24 fd77::1/64  " in text
    beta = next(line for line in text.splitlines() if line.startswith("beta"))
    assert "10.77.0.2 fd77::2" in beta
    v4 = format_status({**STATUS, "node": {**node, "address6": None}}, now=1000.0)
    assert "address 10.77.0.1/24  " in v4
