"""`ipop-trio demo`: a two-node overlay in network namespaces, explained as it comes up.

Builds two lab hosts joined by a veth, gives each an ipop-trio node with a certificate from a
fresh overlay CA, waits for the link, then shows ping both ways, a short iperf3 over the
overlay and each node's status. Everything it made is removed on exit, also on Ctrl-C or
SIGTERM. Never touches anything outside its own namespaces.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from ipop_trio.bench import iperf3, ping_rtts, start_iperf3_server
from ipop_trio.errors import IpopError
from ipop_trio.lab import Lab, Overlay, sigterm_raises

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


def demo() -> None:
    """The demo itself; raises IpopError when a step fails."""
    with Lab() as lab:
        _step("Building the underlay: two network namespaces joined by a veth pair")
        a, b = lab.add_host("a"), lab.add_host("b")
        link = lab.connect(a, b)
        _say(f"{a.ns}: {link.ends[0].ifname} {link.ends[0].address}")
        _say(f"{b.ns}: {link.ends[1].ifname} {link.ends[1].address}")

        _step("Creating an overlay CA and a certificate for each node")
        overlay = Overlay(lab, name="demo")
        alpha = overlay.add_node("alpha", a)
        beta = overlay.add_node("beta", b)
        _say(f"CA 'demo' for {overlay.network} (Ed25519)")
        for node in (alpha, beta):
            _say(f"{node.name}: overlay address {node.address}, X25519 link key, in {node.dir}")

        _step("Starting the nodes (each opens a TAP and a UDP socket in its namespace)")
        overlay.start()
        for node in (alpha, beta):
            info = overlay.status(node).get("node", {})
            _say(
                f"{node.name}: pid {node.pid}, tap {info.get('tap', node.tap)} "
                f"mac {info.get('mac', '?')}, listening on {info.get('listen', node.port)}"
            )

        _step("Waiting for the authenticated handshake between alpha and beta")
        entry = overlay.wait_established(alpha, beta)
        _say(f"link established, mode {entry.get('mode', '?')}, endpoint {entry.get('endpoint')}")

        _step("Ping over the overlay, both ways")
        for src, dst, host in ((alpha, beta, a), (beta, alpha, b)):
            rtts = ping_rtts(host, dst.address, count=5, interval=0.2)
            if not rtts:
                raise IpopError(f"no ping reply from {dst.name} ({dst.address})")
            shown = ", ".join(f"{t:.3f}" for t in rtts)
            _say(f"{src.name} -> {dst.name} {dst.address}: {len(rtts)}/5 replies, ms: {shown}")

        _step(f"iperf3 for {IPERF_SECONDS} s over the overlay (TCP, one stream)")
        start_iperf3_server(b)
        result = iperf3(a, beta.address, IPERF_SECONDS)
        _say(
            f"alpha -> beta: {result.bits_per_second / 1e6:.1f} Mbit/s, "
            f"{result.retransmits if result.retransmits is not None else '?'} retransmits"
        )

        _step("Status of each node (what `ipop-trio status` shows)")
        fmt = _formatter()
        for node in (alpha, beta):
            print(f"\n[{node.name}]")
            print(fmt(overlay.status(node)), flush=True)

        _step(f"Cleaning up lab {lab.id}: stopping nodes, deleting veths and namespaces")
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
