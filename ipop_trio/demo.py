"""`ipop-trio demo`: a signalling server and three nodes in namespaces, explained.

Builds a switch (a bridge namespace) with four hosts on it: one runs `ipop-trio signal`, the
others an ipop-trio node each, with a certificate from a fresh overlay CA and no peer in its
config, only the signalling server's URL. The nodes find each other through the server, link
up in a full mesh, and the demo shows ping between every pair, a short iperf3 over the overlay
and each node's status (how each link was learned). Everything it made is removed on exit,
also on Ctrl-C or SIGTERM. Never touches anything outside its own namespaces.
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ipop_trio.bench import iperf3, ping_rtts, start_iperf3_server
from ipop_trio.errors import IpopError
from ipop_trio.lab import Lab, Overlay, OverlayNode, sigterm_raises

IPERF_SECONDS = 3


def _formatter() -> Callable[[dict[str, Any]], str]:
    try:
        from ipop_trio.status import format_status
    except ImportError:
        return lambda status: json.dumps(status, indent=2)
    return format_status


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


MESH_TIMEOUT = 30.0


def _wait_mesh(overlay: Overlay, nodes: list[OverlayNode]) -> None:
    deadline = time.monotonic() + MESH_TIMEOUT
    while True:
        missing = []
        for node in nodes:
            states = {p["name"]: p["state"] for p in overlay.status(node).get("peers", [])}
            missing += [
                f"{node.name}->{o.name}"
                for o in nodes
                if o is not node and states.get(o.name) != "established"
            ]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise IpopError(f"no full mesh after {MESH_TIMEOUT:.0f}s: missing {missing}")
        time.sleep(0.1)


def demo() -> None:
    """The demo itself; raises IpopError when a step fails."""
    with Lab() as lab:
        _step("Building the underlay: a switch with four hosts (namespaces) on it")
        switch = lab.add_switch("net")
        hosts = [lab.add_host(name) for name in ("sig", "a", "b", "c")]
        for host in hosts:
            iface = lab.attach(host, switch)
            _say(f"{host.ns}: {iface.ifname} {iface.address}")
        sig_host, a, b, c = hosts

        _step("Creating an overlay CA and a certificate for each node")
        overlay = Overlay(lab, name="demo")
        nodes = [
            overlay.add_node(name, host, signalling=True)
            for name, host in (("alpha", a), ("beta", b), ("gamma", c))
        ]
        alpha, beta, _gamma = nodes
        _say(f"CA 'demo' for {overlay.network} (Ed25519)")
        for node in nodes:
            _say(f"{node.name}: overlay address {node.address}, X25519 link key, in {node.dir}")

        _step("Starting the signalling server (it trusts the overlay CA, nothing else)")
        server = overlay.start_signalling(sig_host)
        pid = server.proc.pid if server.proc is not None else "?"
        _say(f"ipop-trio signal on {server.url} in {sig_host.ns}, pid {pid}")

        _step("Starting the nodes: no peers configured, only the signalling URL")
        overlay.start()
        for node in nodes:
            info = overlay.status(node).get("node", {})
            _say(
                f"{node.name}: pid {node.pid}, tap {info.get('tap', node.tap)} "
                f"mac {info.get('mac', '?')}, listening on {info.get('listen', node.port)}"
            )
        _say("each node: hello + certificate → challenge → proof of its X25519 key → welcome")

        _step("Waiting for the full mesh: con_req / con_resp through the server, then handshakes")
        _wait_mesh(overlay, nodes)
        for x, y in itertools.combinations(nodes, 2):
            entry = overlay.peer_status(x, y) or {}
            _say(
                f"{x.name} <-> {y.name}: {entry.get('state')}, mode {entry.get('mode')}, "
                f"learned via {entry.get('learned')}, endpoint {entry.get('endpoint')}"
            )

        _step("Ping over the overlay, every pair")
        for src, dst in itertools.permutations(nodes, 2):
            rtts = ping_rtts(src.host, dst.address, count=3, interval=0.2)
            if not rtts:
                raise IpopError(f"no ping reply from {dst.name} ({dst.address})")
            shown = ", ".join(f"{t:.3f}" for t in rtts)
            _say(f"{src.name} -> {dst.name} {dst.address}: {len(rtts)}/3 replies, ms: {shown}")

        _step(f"iperf3 for {IPERF_SECONDS} s over the overlay (TCP, one stream)")
        start_iperf3_server(b)
        result = iperf3(a, beta.address, IPERF_SECONDS)
        _say(
            f"{alpha.name} -> {beta.name}: {result.bits_per_second / 1e6:.1f} Mbit/s, "
            f"{result.retransmits if result.retransmits is not None else '?'} retransmits"
        )

        _step("Status of each node (what `ipop-trio status` shows)")
        fmt = _formatter()
        for node in nodes:
            print(f"\n[{node.name}]")
            print(fmt(overlay.status(node)), flush=True)

        _step(f"Cleaning up lab {lab.id}: stopping server and nodes, deleting veths and namespaces")
    _say("done: nothing left behind")


def run_demo() -> int:
    """CLI entry point: run the demo; return an exit code."""
    with sigterm_raises():
        try:
            demo()
        except IpopError as exc:
            print(f"\nipop-trio demo: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nipop-trio demo: interrupted; lab removed", file=sys.stderr)
            return 130
    return 0
