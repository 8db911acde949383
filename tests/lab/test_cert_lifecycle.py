"""Certificate lifecycle in the lab: renewal and CA rotation, each under a running ping.

* A node's certificate renewed for the same key (SIGHUP) keeps its link: the ping loses
  nothing, the link is re-keyed (not removed), its own `status` shows the new expiry and so
  does its peer's (which learns the certificate from the re-key handshake).
* A CA rotated through a bundle: three nodes a, b, c on one switch, all on the old CA;
  every node comes to trust old + new (one PEM file, SIGHUP); a and b are re-issued under
  the new CA and still interoperate with c, on the old one; then a and b drop the old CA
  (SIGHUP) and refuse c, while the ping a -> b runs throughout without loss.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ipop_trio import pki
from ipop_trio.lab.measure import ping_rtts
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import Pair, TwoHosts, failed, print_logs

TIMEOUT = 20.0
RELOADED = "SIGHUP: reloaded"


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll `check()` until it returns something true; return it (fail with `what`)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            pytest.fail(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.05)


def sighup(overlay: Overlay, node: OverlayNode) -> None:
    """SIGHUP the node and wait until its log says the reload was applied."""
    before = node.log.read_text(errors="replace").count(RELOADED)
    assert node.proc is not None
    node.proc.send_signal(signal.SIGHUP)

    def applied() -> bool:
        text = node.log.read_text(errors="replace")
        assert "SIGHUP: keeping the running configuration" not in text, overlay.log_tail(node)
        return text.count(RELOADED) > before

    wait_for(f"{node.name} reloaded", applied)


def fingerprint(node: OverlayNode) -> str:
    return pki.fingerprint(pki.load_certificate_der_bytes(node.cert_pem))


def peer_cert(overlay: Overlay, node: OverlayNode, peer: OverlayNode) -> dict[str, Any] | None:
    """`node`'s status entry for `peer`, when established; else None."""
    entry = overlay.peer_status(node, peer)
    return entry if entry and entry["state"] == "established" else None


class Ping:
    """A ping from `src` to `dst` running in the background; `stop()` returns (sent, got)."""

    def __init__(self, src: OverlayNode, dst: OverlayNode) -> None:
        self.proc = src.host.popen(
            ["ping", "-n", "-i", "0.02", "-W", "1", dst.address],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.dst = dst

    def stop(self) -> tuple[int, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # ping prints its summary and exits
        out, _ = self.proc.communicate(timeout=10)
        found = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert found, out[-500:]
        return int(found.group(1)), int(found.group(2))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def traffic_flows(overlay: Overlay, src: OverlayNode, dst: OverlayNode, packets: int = 20) -> None:
    """Wait until `src` has received `packets` more packets from `dst` (the ping's replies)."""
    start = (overlay.peer_status(src, dst) or {}).get("rx_packets", 0)
    wait_for(
        f"{packets} packets from {dst.name} to {src.name}",
        lambda: (overlay.peer_status(src, dst) or {}).get("rx_packets", 0) >= start + packets,
    )


def assert_no_loss(sent: int, got: int, at_least: int) -> None:
    assert sent >= at_least, f"the ping ran too briefly ({sent} sent)"
    # The one request in flight when ping is interrupted counts as lost.
    assert got >= sent - 1, f"{sent - got} of {sent} pings lost"


# ---------------------------------------------------------------------------------------------
# Renewal


@pytest.fixture
def pair(two_hosts: TwoHosts, overlay: Overlay) -> Pair:
    """Two nodes with 2-day certificates from a CA that lasts longer (room to renew)."""
    overlay.ca = overlay.new_ca("lab", days=400)
    alpha = overlay.add_node("alpha", two_hosts.a)
    beta = overlay.add_node("beta", two_hosts.b)
    overlay.start()
    overlay.wait_established(alpha, beta)
    return Pair(two_hosts, overlay, alpha, beta)


def test_renewed_certificate_on_sighup_keeps_the_link(pair: Pair) -> None:
    overlay, alpha, beta = pair.overlay, pair.alpha, pair.beta
    old = overlay.status(alpha)["node"]["cert"]
    assert old["fingerprint"] == fingerprint(alpha)
    assert old["days_left"] < 3  # the lab's certificates last 2 days
    assert wait_for("beta knows alpha's certificate", lambda: peer_cert(overlay, beta, alpha))[
        "cert"
    ] == {"not_after": old["not_after"], "fingerprint": old["fingerprint"]}
    ping = Ping(alpha, beta)
    try:
        traffic_flows(overlay, alpha, beta)  # the ping runs before the renewal ...
        overlay.reissue(alpha, days=30)
        renewed = fingerprint(alpha)
        sighup(overlay, alpha)
        new = wait_for(
            "alpha's status shows the renewed certificate",
            lambda: (c := overlay.status(alpha)["node"]["cert"])["fingerprint"] == renewed and c,
        )
        assert 29 < new["days_left"] <= 30
        seen = wait_for(
            "beta sees alpha's renewed certificate",
            lambda: (
                (e := peer_cert(overlay, beta, alpha)) and e["cert"]["fingerprint"] == renewed and e
            ),
        )
        assert seen["cert"]["not_after"] == new["not_after"]
        traffic_flows(overlay, alpha, beta)  # ... and after it
        sent, got = ping.stop()
    finally:
        ping.kill()
    assert_no_loss(sent, got, at_least=40)
    log = alpha.log.read_text(errors="replace")
    assert "1 link(s) re-keyed" in log
    assert "link removed" not in log and "link removed" not in beta.log.read_text()
    entry = overlay.peer_status(alpha, beta)
    assert entry is not None and entry["state"] == "established" and entry["failures"] == 0
    # `ipop-trio status` prints the new expiry
    shown = alpha.host.check(
        [sys.executable, "-m", "ipop_trio", "status", "-s", str(alpha.control)]
    )
    day = time.strftime("%Y-%m-%d", time.gmtime(new["not_after"]))
    assert f"certificate {renewed[:16]} expires {day} (30d)" in shown, shown


# ---------------------------------------------------------------------------------------------
# CA rotation


@dataclass
class Three:
    lab: Lab
    overlay: Overlay
    a: OverlayNode
    b: OverlayNode
    c: OverlayNode


@pytest.fixture
def three(request: pytest.FixtureRequest) -> Iterator[Three]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        overlay = Overlay(lab)
        nodes = []
        for name in ("a", "b", "c"):
            host = lab.add_host(name)
            lab.attach(host, switch)
            node = overlay.add_node(name, host)
            overlay.set_trust(node, overlay.ca)  # a bundle file; peers by public key
            nodes.append(node)
        try:
            overlay.start()
            for x, y in ((0, 1), (0, 2), (1, 2)):
                overlay.wait_established(nodes[x], nodes[y])
            yield Three(lab, overlay, *nodes)
        finally:
            if failed(request):
                print_logs(overlay)


def test_ca_rotated_through_a_bundle_with_a_ping_running(three: Three) -> None:
    t = three
    overlay, a, b, c = t.overlay, t.a, t.b, t.c
    old_ca = overlay.ca
    new_ca = overlay.new_ca(old_ca.name)  # same overlay name and network, a new key
    ping = Ping(a, b)
    try:
        traffic_flows(overlay, a, b)
        # 1. Every node trusts both CAs (one PEM file holding two certificates).
        for node in (a, b, c):
            overlay.set_trust(node, old_ca, new_ca)
            sighup(overlay, node)
            assert len(overlay.status(node)["node"]["ca"]) == 2

        # 2. a and b move to the new CA (same keys); c stays on the old one.
        for node in (a, b):
            overlay.reissue(node, ca=new_ca)
            sighup(overlay, node)
        fa, fb, fc = fingerprint(a), fingerprint(b), fingerprint(c)
        for x, y, expect in ((b, a, fa), (a, b, fb), (c, a, fa), (c, b, fb), (a, c, fc)):
            wait_for(
                f"{x.name} established with {y.name}'s certificate {expect[:8]}",
                lambda x=x, y=y, expect=expect: (
                    (e := peer_cert(overlay, x, y)) and e["cert"]["fingerprint"] == expect
                ),
            )
        assert len(ping_rtts(a.host, c.address, count=3, interval=0.1)) == 3  # new <-> old
        assert len(ping_rtts(c.host, b.address, count=3, interval=0.1)) == 3

        # 3. a and b drop the old CA: c, still on it, is refused.
        for node in (a, b):
            overlay.set_trust(node, new_ca)
            sighup(overlay, node)
            assert len(overlay.status(node)["node"]["ca"]) == 1
        for node in (a, b):
            refused = wait_for(
                f"{node.name} refuses c",
                lambda node=node: (
                    (e := overlay.peer_status(node, c))
                    and e["state"] != "established"
                    and e["refused"]
                ),
            )
            assert "not signed by overlay CA" in refused, refused
        assert ping_rtts(a.host, c.address, count=3, interval=0.1) == []
        assert peer_cert(overlay, a, b) is not None and peer_cert(overlay, b, a) is not None
        traffic_flows(overlay, a, b)  # the ping goes on after the last reload
        sent, got = ping.stop()
    finally:
        ping.kill()
    assert_no_loss(sent, got, at_least=50)
