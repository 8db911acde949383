"""Revocation in namespaces (issue 18 item 2): a revoked node's links close within 5 s of its
peers' SIGHUP, and the signalling server refuses it from its own SIGHUP on.

Topology: one switch (a bridge namespace) with the signalling server's host and one host per
node. alpha, beta and gamma learn each other through signalling; alpha and gamma name a
revocation list in their config (`[node] revoked`), the server has `--revoked`. Beta's
certificate is then revoked everywhere: alpha and gamma close their links to it, the server
drops it (its leave announced) and refuses it again, beta's `status` says why, and the link
between alpha and gamma carries on.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ipop_trio import pki
from ipop_trio.lab.measure import ping_rtts
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import failed, print_logs

pytestmark = pytest.mark.lab

MESH_TIMEOUT = 30.0
CLOSE_WITHIN = 5.0  # the stated bound: a revoked peer's link is gone 5 s after the SIGHUP


@dataclass
class Trio:
    overlay: Overlay
    alpha: OverlayNode
    beta: OverlayNode
    gamma: OverlayNode
    server_list: Path  # the signalling server's --revoked file


def write_list(path: Path, *fingerprints: str) -> None:
    path.write_text("# revoked certificates (sha256 of the DER)\n" + "".join(
        f"{fp}  # revoked by the lab test\n" for fp in fingerprints
    ))  # fmt: skip


@pytest.fixture
def nodes(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Trio]:
    switch = lab.add_switch("net")
    sig_host = lab.add_host("sig")
    lab.attach(sig_host, switch)
    overlay = Overlay(lab)
    server_list = overlay.dir / "server-revoked.txt"
    write_list(server_list)
    overlay.start_signalling(sig_host, extra_args=["--revoked", str(server_list)])
    made = []
    for name in ("alpha", "beta", "gamma"):
        host = lab.add_host(name)
        lab.attach(host, switch)
        node = overlay.add_node(name, host, signalling=True)
        if name != "beta":
            node.revoked = "revoked.txt"
            node.dir.mkdir(parents=True, exist_ok=True)
            write_list(node.dir / "revoked.txt")
        made.append(node)
    try:
        overlay.start()
        yield Trio(overlay, *made, server_list)
    finally:
        if failed(request):
            print_logs(overlay)
            if overlay.signal is not None:
                print(overlay.signal.log.read_text(errors="replace")[-4000:])


def wait_for(what: str, condition: Callable[[], bool], timeout: float) -> float:
    """Poll `condition` until true; the seconds it took. Fails naming `what` at the deadline."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start >= timeout:
            pytest.fail(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def established(overlay: Overlay, a: OverlayNode, b: OverlayNode) -> bool:
    entry = overlay.peer_status(a, b)
    return entry is not None and entry["state"] == "established"


def signal_log(overlay: Overlay) -> str:
    assert overlay.signal is not None
    return overlay.signal.log.read_text(errors="replace")


def test_a_revoked_node_is_cut_off_by_its_peers_and_the_server(nodes: Trio) -> None:
    overlay, alpha, beta, gamma = nodes.overlay, nodes.alpha, nodes.beta, nodes.gamma
    everyone = (alpha, beta, gamma)
    wait_for(
        "a full mesh",
        lambda: all(established(overlay, x, y) for x in everyone for y in everyone if x is not y),
        MESH_TIMEOUT,
    )
    fp = pki.fingerprint(pki.load_certificate_der_bytes(beta.cert_pem))

    # The nodes' lists: alpha's and gamma's links to beta are gone within 5 s of the SIGHUP.
    for node in (alpha, gamma):
        write_list(node.dir / "revoked.txt", fp)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGHUP)
    hup = time.monotonic()
    for node in (alpha, gamma):
        wait_for(
            f"{node.name}'s link to beta closed",
            partial(lambda n: not established(overlay, n, beta), node),
            CLOSE_WITHIN - (time.monotonic() - hup),
        )
    for node in (alpha, gamma):
        status = overlay.status(node)
        assert status["node"]["revoked"] == 1
        entry = next((p for p in status["peers"] if p["name"] == "beta"), None)
        if entry is not None:  # still listed (beta is a member yet): refused, and says why
            assert entry["state"] != "established", entry
            assert entry["refused"] == f"certificate revoked (sha256 {fp})", entry
        assert status["stats"]["drops"].get("peer_revoked", 0) >= 1, status["stats"]["drops"]
    assert established(overlay, alpha, gamma) and established(overlay, gamma, alpha)

    # A broken list keeps the one in force, and says why.
    (alpha.dir / "revoked.txt").write_text(f"{fp}\nnot a fingerprint\n")
    assert alpha.proc is not None
    alpha.proc.send_signal(signal.SIGHUP)
    wait_for(
        "alpha's log to name the broken line",
        lambda: "node.revoked" in alpha.log.read_text() and "line 2" in alpha.log.read_text(),
        5.0,
    )
    assert alpha.proc.poll() is None and not established(overlay, alpha, beta)

    # The server's list: beta is dropped (its leave announced: alpha and gamma remove the
    # link) and refused from then on; beta's status says why.
    write_list(nodes.server_list, fp)
    assert overlay.signal is not None and overlay.signal.proc is not None
    overlay.signal.proc.send_signal(signal.SIGHUP)

    def beta_refused() -> bool:
        sg: dict[str, Any] = overlay.status(beta)["signalling"]
        return sg["refused"] == "certificate_revoked" and sg["state"] == "backoff"

    wait_for("beta's status to say it is refused, backing off", beta_refused, 5.0)
    sg = overlay.status(beta)["signalling"]
    assert "certificate_revoked" in sg["last_error"] and fp in sg["last_error"], sg
    log = signal_log(overlay)
    assert "dropped beta" in log and "1 revoked (1 added, 0 removed)" in log, log[-2000:]
    for node in (alpha, gamma):
        wait_for(
            f"beta gone from {node.name}'s status",
            partial(lambda n: overlay.peer_status(n, beta) is None, node),
            5.0,
        )
    beta_log = beta.log.read_text()
    assert "WARNING" in beta_log and "revocation list" in beta_log, beta_log[-2000:]

    # A broken server list keeps the one in force too.
    nodes.server_list.write_text("garbage\n")
    overlay.signal.proc.send_signal(signal.SIGHUP)
    wait_for(
        "the server's log to name the broken line",
        lambda: "keeping the revocation list in force" in signal_log(overlay),
        5.0,
    )
    assert overlay.signal.proc.poll() is None
    assert "line 1: 'garbage'" in signal_log(overlay)

    # The others are unaffected.
    assert established(overlay, alpha, gamma)
    assert len(ping_rtts(alpha.host, gamma.address, count=2, interval=0.2)) == 2
