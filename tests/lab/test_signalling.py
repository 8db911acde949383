"""Nodes that find each other through the signalling server, in namespaces.

Topology: one switch (a bridge namespace) with the signalling server's host and one host per
node on it. No node has a [[peer]]: every link comes from membership.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ipop_trio.lab.measure import ping_rtts
from ipop_trio.lab.netns import Host, Lab, LabSwitch
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import failed, print_logs

pytestmark = pytest.mark.lab

MESH_TIMEOUT = 30.0
# A SIGKILLed node's TCP connection is reset by its kernel; the server announces the leave and
# every peer removes the link at once. The stated bound (README) is 10 s.
LEAVE_TIMEOUT = 10.0


@dataclass
class Mesh:
    lab: Lab
    switch: LabSwitch
    overlay: Overlay
    nodes: list[OverlayNode]

    def add(self, name: str) -> OverlayNode:
        host = self.lab.add_host(name)
        self.lab.attach(host, self.switch)
        node = self.overlay.add_node(name, host, signalling=True)
        self.nodes.append(node)
        return node


@pytest.fixture
def mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        sig_host = lab.add_host("sig")
        lab.attach(sig_host, switch)
        overlay = Overlay(lab)
        overlay.start_signalling(sig_host)
        built = Mesh(lab, switch, overlay, [])
        try:
            for name in ("n1", "n2", "n3", "n4"):
                built.add(name)
            overlay.start()
            yield built
        finally:
            if failed(request):
                print_logs(overlay)
                if overlay.signal is not None:
                    print(overlay.signal.log.read_text(errors="replace")[-4000:])


def peers_of(overlay: Overlay, node: OverlayNode) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in overlay.status(node).get("peers", [])}


def wait_full_mesh(overlay: Overlay, nodes: list[OverlayNode], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        missing = []
        for node in nodes:
            peers = peers_of(overlay, node)
            for other in nodes:
                entry = peers.get(other.name)
                if other is not node and (entry is None or entry["state"] != "established"):
                    missing.append(f"{node.name}->{other.name}")
        if not missing:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"no full mesh after {timeout:.0f}s: missing {missing}")
        time.sleep(0.1)


def ping_ok(host: Host, address: str) -> bool:
    return len(ping_rtts(host, address, count=2, interval=0.2)) == 2


def test_four_nodes_reach_full_mesh_by_themselves(mesh: Mesh) -> None:
    overlay, nodes = mesh.overlay, mesh.nodes
    wait_full_mesh(overlay, nodes, MESH_TIMEOUT)
    for a, b in itertools.permutations(nodes, 2):
        assert ping_ok(a.host, b.address), f"{a.name} cannot ping {b.name}"
    for node in nodes:
        peers = peers_of(overlay, node)
        assert len(peers) == 3, peers  # one link per pair: simultaneous con_reqs made one
        assert {p["learned"] for p in peers.values()} == {"signalling"}
        status = overlay.status(node)["signalling"]
        assert status["state"] == "connected" and status["members"] == 3


def test_a_killed_node_disappears_from_its_peers_status(mesh: Mesh) -> None:
    overlay, nodes = mesh.overlay, mesh.nodes
    wait_full_mesh(overlay, nodes, MESH_TIMEOUT)
    victim, survivors = nodes[0], nodes[1:]
    overlay.stop(victim, signal.SIGKILL)
    killed = time.monotonic()
    while any(victim.name in peers_of(overlay, n) for n in survivors):
        assert time.monotonic() - killed < LEAVE_TIMEOUT, {
            n.name: sorted(peers_of(overlay, n)) for n in survivors
        }
        time.sleep(0.1)
    # The others are unaffected.
    wait_full_mesh(overlay, survivors, 5)
    assert ping_ok(survivors[0].host, survivors[1].address)


def test_restarting_the_server_does_not_interrupt_links_and_a_fifth_node_joins(
    mesh: Mesh,
) -> None:
    overlay, nodes = mesh.overlay, mesh.nodes
    wait_full_mesh(overlay, nodes, MESH_TIMEOUT)
    a, b = nodes[0], nodes[1]
    # 60 echo requests, 0.1 s apart, across the whole restart.
    ping = a.host.popen(
        ["ping", "-n", "-q", "-c", "60", "-i", "0.1", "-W", "1", b.address],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert overlay.stop_signalling() == 0
    deadline = time.monotonic() + 10
    while any(overlay.status(n)["signalling"]["state"] == "connected" for n in nodes):
        assert time.monotonic() < deadline, "nodes did not notice the server went away"
        time.sleep(0.1)
    overlay.start_signalling()
    deadline = time.monotonic() + 20
    while not all(overlay.status(n)["signalling"]["state"] == "connected" for n in nodes):
        assert time.monotonic() < deadline, "nodes did not reconnect to the restarted server"
        time.sleep(0.1)
    out, _ = ping.communicate(timeout=30)
    assert ping.returncode == 0 and " 0% packet loss" in out, out
    wait_full_mesh(overlay, nodes, 5)

    fifth = mesh.add("n5")
    overlay.start(fifth)
    wait_full_mesh(overlay, [*nodes, fifth], MESH_TIMEOUT)
    for other in nodes:
        assert ping_ok(fifth.host, other.address), other.name
