"""Metrics of real nodes and of the real signalling server, scraped over HTTP from inside the
lab namespaces (each listens on its namespace's loopback).

Topology: one switch with the signalling server's host and two node hosts; the nodes learn
each other through signalling (ICE finds a host path). Also: garbage and silent HTTP clients
do not stop a node serving metrics or traffic, and a taken metrics port is one line, exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ipop_trio.lab.measure import ping_rtts
from ipop_trio.lab.netns import Host, Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import TwoHosts, failed, print_logs

pytestmark = pytest.mark.lab

NODE_METRICS = "127.0.0.1:9464"
SIGNAL_METRICS = "127.0.0.1:9465"
MESH_TIMEOUT = 30.0
DEADLINE = 15.0

# Run inside a namespace: GET argv[1] (host:port), print {"status": code, "body": text}.
SCRAPE = """
import json, socket, sys
host, port = sys.argv[1].rsplit(":", 1)
with socket.create_connection((host, int(port)), timeout=10) as s:
    s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: " + sys.argv[1].encode() + b"\\r\\n\\r\\n")
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
head, _, body = reply.partition(b"\\r\\n\\r\\n")
print(json.dumps({"status": int(head.split()[1]) if head else 0, "body": body.decode()}))
"""
# Run inside a namespace against argv[1]: one client sends garbage (prints the answer's
# status line), MAX_CONNECTIONS+2 others connect and say nothing; prints how long the
# server took to close each silent one (it must, within its read timeout), as JSON.
HOSTILE = """
import json, socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
addr = (host, int(port))
with socket.create_connection(addr, timeout=10) as g:
    g.sendall(b"\\x16\\x03\\x01\\x00\\xffnot http at all\\r\\n\\r\\n")
    garbage = g.recv(4096).split(b"\\r\\n", 1)[0].decode()
silent = [socket.create_connection(addr, timeout=10) for _ in range(10)]
start = time.monotonic()
closed = []
for s in silent:
    try:
        data = s.recv(1)
    except ConnectionResetError:
        data = b""
    closed.append((data.decode(), round(time.monotonic() - start, 2)))
    s.close()
print(json.dumps({"garbage": garbage, "closed": closed}))
"""


@dataclass
class World:
    lab: Lab
    overlay: Overlay
    sig: Host
    n1: OverlayNode
    n2: OverlayNode


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        sig_host = lab.add_host("sig")
        lab.attach(sig_host, switch)
        overlay = Overlay(lab)
        try:
            overlay.start_signalling(sig_host, metrics=SIGNAL_METRICS)
            nodes = []
            for name in ("n1", "n2"):
                host = lab.add_host(name)
                lab.attach(host, switch)
                nodes.append(overlay.add_node(name, host, signalling=True, metrics=NODE_METRICS))
            overlay.start()
            overlay.wait_established(nodes[0], nodes[1], MESH_TIMEOUT)
            yield World(lab, overlay, sig_host, nodes[0], nodes[1])
        finally:
            if failed(request):
                print_logs(overlay)
                if overlay.signal is not None:
                    print(overlay.signal.log.read_text(errors="replace")[-4000:])


def scrape(host: Host, where: str) -> dict[str, float]:
    """`name{labels}` -> value, from GET /metrics inside `host`'s namespace."""
    reply = json.loads(host.check([sys.executable, "-c", SCRAPE, where], timeout=DEADLINE))
    assert reply["status"] == 200, reply
    out = {}
    for family in text_string_to_metric_families(reply["body"]):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def peer_series(got: dict[str, float], peer: str) -> dict[str, float]:
    return {k: v for k, v in got.items() if f'peer="{peer}"' in k}


def test_a_nodes_metrics_show_its_peer_after_a_ping(world: World) -> None:
    n1, n2 = world.n1, world.n2
    assert len(ping_rtts(n1.host, n2.address, count=3, interval=0.2)) == 3
    got = scrape(n1.host, NODE_METRICS)
    beta = peer_series(got, n2.name)
    for direction in ("tx", "rx"):
        assert beta[f'ipop_trio_peer_bytes_total{{direction="{direction}",peer="n2"}}'] > 0
        assert beta[f'ipop_trio_peer_packets_total{{direction="{direction}",peer="n2"}}'] >= 3
    assert beta['ipop_trio_peer_link_state{peer="n2",state="established"}'] == 1
    assert sum(v for k, v in beta.items() if k.startswith("ipop_trio_peer_link_state{")) == 1
    # ICE on one switch, no NAT: a host path, and the metric agrees with `status`.
    status_path = world.overlay.peer_status(n1, n2)["path"]["type"]  # type: ignore[index]
    assert status_path == "host"
    assert beta['ipop_trio_peer_path_type{peer="n2",type="host"}'] == 1
    assert beta['ipop_trio_peer_path_type{peer="n2",type="relay"}'] == 0
    assert beta['ipop_trio_peer_secure{peer="n2"}'] == 1
    assert beta['ipop_trio_peer_rtt_seconds{peer="n2"}'] > 0
    assert beta['ipop_trio_peer_last_handshake_timestamp_seconds{peer="n2"}'] > time.time() - 120
    assert got['ipop_trio_signalling_state{state="connected"}'] == 1
    assert got["ipop_trio_signalling_members"] == 1
    assert got['ipop_trio_stage_batches_total{stage="seal"}'] > 0
    assert got["ipop_trio_uptime_seconds"] > 0

    sig = scrape(world.sig, SIGNAL_METRICS)
    assert sig['ipop_trio_signal_members{overlay="lab"}'] == 2
    assert sig["ipop_trio_signal_connections"] == 2
    assert sig["ipop_trio_signal_admissions_total"] >= 2
    assert sig['ipop_trio_signal_relays_total{type="con_req"}'] >= 1
    assert sig['ipop_trio_signal_relays_total{type="con_resp"}'] >= 1


def test_garbage_and_silent_clients_leave_the_node_serving(world: World) -> None:
    n1, n2 = world.n1, world.n2
    hostile = n1.host.check([sys.executable, "-c", HOSTILE, NODE_METRICS], timeout=60)
    report = json.loads(hostile)
    assert report["garbage"] == "HTTP/1.1 400 Bad Request", report
    # Every silent client is closed without an answer, none later than the read timeout
    # (5 s) and some slack; those beyond the connection cap at once.
    assert all(data == "" and after < 8.0 for data, after in report["closed"]), report
    assert world.overlay.status(n1)["node"]["name"] == "n1"
    assert n1.proc is not None and n1.proc.poll() is None
    got = scrape(n1.host, NODE_METRICS)
    assert got['ipop_trio_peer_link_state{peer="n2",state="established"}'] == 1
    assert len(ping_rtts(n1.host, n2.address, count=2, interval=0.2)) == 2


HOLD_PORT = """
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen()
print("ready", flush=True)
time.sleep(120)
"""


def test_a_taken_metrics_port_is_one_line_and_exit_2(two_hosts: TwoHosts, overlay: Overlay) -> None:
    node = overlay.add_node("alpha", two_hosts.a, peers=(), metrics=NODE_METRICS)
    overlay.write_config(node)
    holder = two_hosts.a.popen(
        [sys.executable, "-c", HOLD_PORT, NODE_METRICS.rsplit(":", 1)[1]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        done = two_hosts.a.run(
            [sys.executable, "-m", "ipop_trio", "run", "-c", str(node.config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, (done.stdout, done.stderr)
    errors = [line for line in done.stderr.splitlines() if "ipop-trio:" in line]
    assert errors == [
        f"ipop-trio: config error: metrics.listen: cannot listen on {NODE_METRICS}: "
        "Address already in use"
    ], done.stderr
    assert "Traceback" not in done.stderr
    assert node.tap not in two_hosts.a.link_names()  # the TAP it made is gone again
