"""A replayed initiation flooded at a real node from many source addresses (issue 13,
item 3): the node comes under load, answers the replays with cookie replies instead of
spending X25519 on them, and a real peer's new handshake still completes well within
REKEY_ATTEMPT_TIME (its first initiation gets a cookie, its retransmission carries mac2)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from ipop_trio import pki
from ipop_trio.lab.overlay import OverlayNode
from ipop_trio.proto import handshake
from ipop_trio.proto.session import REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, Cipher

from .capture import Lines
from .conftest import Pair

pytestmark = pytest.mark.lab

SOURCES = 200  # source addresses the flood comes from (aliases on host a's link)
RATE = 10_000  # datagrams per second: the rate issue 13 measured starvation at
# Sends the payload (hex) to address:port from SOURCES sockets, one per alias address,
# round robin, paced to RATE per second, until killed; prints "ready" once bound.
FLOOD = """
import socket, sys, time
dst, port, payload = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
prefix, first, count, rate = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
socks = []
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((f"{prefix}.{first + i}", 0))
    s.setblocking(False)
    socks.append(s)
print("ready", flush=True)
start, sent = time.monotonic(), 0
while True:
    due = int((time.monotonic() - start) * rate)
    while sent < due:
        try:
            socks[sent % count].sendto(payload, (dst, port))
        except BlockingIOError:
            pass
        sent += 1
    time.sleep(0.002)
"""


def _view(pair: Pair, node: OverlayNode, peer: OverlayNode) -> dict[str, Any]:
    entry = pair.overlay.peer_status(node, peer)
    assert entry is not None
    return entry


def _counters(pair: Pair, node: object) -> dict[str, int]:
    return dict(pair.overlay.status(node)["stats"]["counters"])  # type: ignore[arg-type]


def test_a_replayed_initiation_flood_gets_cookies_and_a_real_handshake_completes(
    pair: Pair,
) -> None:
    alpha, beta = pair.alpha, pair.beta
    a = pair.hosts.a
    # The replay: a valid initiation from alpha to beta, as one captured off the wire before
    # the link came up (its timestamp is older than the one beta accepted since).
    local = handshake.LocalIdentity(
        pki.load_private_key(alpha.dir / "node.key"),
        pki.load_certificate_der(alpha.dir / "node.crt"),
        pki.load_trust_anchor(alpha.dir / "ca.crt"),
    )
    beta_key = pki.public_key_of(pki.load_private_key_bytes(beta.key_pem))
    captured, _ = handshake.create_initiation(
        local, beta_key, 4242, Cipher.AES_256_GCM, {}, time.time() - 30
    )
    iface = pair.hosts.link.end(a)
    prefix = str(iface.address.ip).rsplit(".", 1)[0]
    for i in range(SOURCES):
        a.check(["ip", "addr", "add", f"{prefix}.{20 + i}/24", "dev", iface.ifname])
    beta_ip = pair.overlay.endpoint(alpha, beta).rsplit(":", 1)[0]
    argv = [sys.executable, "-c", FLOOD, beta_ip, str(beta.port), captured.hex()]
    argv += [prefix, "20", str(SOURCES), str(RATE)]
    # The handshakes that brought the link up are over (both ends initiated at start), so
    # the one handshake below is alpha's and alpha holds no cookie yet.
    deadline = time.monotonic() + 15
    while any(_view(pair, x, y)["handshaking"] for x, y in ((alpha, beta), (beta, alpha))):
        assert time.monotonic() < deadline, "the link's first handshakes never settled"
        time.sleep(0.1)
    flood = a.popen(argv, stdout=subprocess.PIPE)
    try:
        assert Lines(flood.stdout).next(30) == "ready"
        # beta is under load: the replays get cookies.
        deadline = time.monotonic() + 15
        while _counters(pair, beta).get("handshake_cookie_sent", 0) < 1000:
            assert time.monotonic() < deadline, _counters(pair, beta)
            time.sleep(0.1)
        before = _counters(pair, beta)
        before_hs = _view(pair, alpha, beta)["last_handshake"] or 0
        # A real handshake: alpha gets a new certificate and re-keys on SIGHUP.
        pair.overlay.reissue(alpha, alpha.groups)
        assert alpha.proc is not None
        started = time.monotonic()
        alpha.proc.send_signal(signal.SIGHUP)
        deadline = started + REKEY_ATTEMPT_TIME
        while True:
            view = _view(pair, alpha, beta)
            if not view["handshaking"] and (view["last_handshake"] or 0) > before_hs:
                break  # alpha's own handshake completed (as initiator: only it ran)
            assert time.monotonic() < deadline, "no handshake within REKEY_ATTEMPT_TIME"
            time.sleep(0.1)
        took = time.monotonic() - started
        after = _counters(pair, beta)
        at_alpha = _counters(pair, alpha)
    finally:
        flood.kill()
        flood.wait(timeout=10)
    sent = after["handshake_cookie_sent"] - before.get("handshake_cookie_sent", 0)
    print(
        f"\nreplay flood at {RATE}/s from {SOURCES} addresses: handshake in {took:.1f}s;"
        f" beta sent {sent} cookie replies meanwhile ({sent / took:.0f}/s),"
        f" mac2_ok {after.get('handshake_mac2_ok', 0)},"
        f" queued {after.get('handshake_queued', 0)};"
        f" alpha received {at_alpha.get('handshake_cookie_received', 0)} cookie(s)"
    )
    assert after.get("handshake_mac2_ok", 0) - before.get("handshake_mac2_ok", 0) >= 1
    assert at_alpha.get("handshake_cookie_received", 0) == 1  # for its first initiation
    assert took >= REKEY_TIMEOUT - 0.5  # ... and went through with mac2 when retransmitted
    assert sent >= 0.5 * RATE * took  # most replays were answered with cookies, not queued
    drops = pair.overlay.status(beta)["stats"]["drops"]
    assert drops.get("handshake_rate_limited", 0) == 0  # no replay ever proved an address
