"""IPv6 inside the overlay: two nodes with dual-stack certificates ping each other over IPv6
(their certified ULA addresses and their link-local ones), carry iperf3 over IPv6 with
offloads on without a TCP error, and a peer sending from an IPv6 address its certificate
does not hold gets nothing onto the TAP (counted as spoofed_ip6)."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import pytest

from ipop_trio.lab.measure import iperf3, ping_rtts, start_iperf3_server
from ipop_trio.lab.netns import Host
from ipop_trio.lab.overlay import Overlay, OverlayNode
from ipop_trio.proto.ndp import link_local_for_mac
from tests.lab.capture import Capture
from tests.lab.conftest import TwoHosts, failed, print_logs

pytestmark = pytest.mark.lab

NETWORK6 = "fd77::/64"


@pytest.fixture
def dual(request: pytest.FixtureRequest, two_hosts: TwoHosts) -> Iterator[Overlay]:
    overlay = Overlay(two_hosts.lab, name="dual", network6=NETWORK6)
    try:
        alpha = overlay.add_node("alpha", two_hosts.a)
        beta = overlay.add_node("beta", two_hosts.b)
        overlay.start()
        overlay.wait_established(alpha, beta)
        yield overlay
    finally:
        if failed(request):
            print_logs(overlay)


def link_local(overlay: Overlay, node: OverlayNode) -> str:
    mac = overlay.status(node)["node"]["mac"]
    return str(ipaddress.IPv6Address(link_local_for_mac(bytes.fromhex(mac.replace(":", "")))))


def tcp_errors(host: Host) -> dict[str, int]:
    """The kernel's TCP error counters in `host` (/proc/net/snmp: a bad checksum, a segment
    refused as malformed)."""
    lines = [
        line.split()
        for line in host.run(
            ["cat", "/proc/net/snmp"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
        if line.startswith("Tcp:")
    ]
    names, values = lines[0][1:], [int(v) for v in lines[1][1:]]
    counters = dict(zip(names, values, strict=True))
    return {name: counters[name] for name in ("InErrs", "InCsumErrors")}


def test_ipv6_pings_both_ways_on_certified_and_link_local_addresses(
    two_hosts: TwoHosts, dual: Overlay
) -> None:
    alpha, beta = dual.nodes["alpha"], dual.nodes["beta"]
    for node in (alpha, beta):
        mine = dual.status(node)["node"]
        assert mine["address6"] == f"{node.ip6}/64", mine  # status shows both addresses
    targets = [
        (two_hosts.a, beta.ip6),
        (two_hosts.b, alpha.ip6),
        (two_hosts.a, f"{link_local(dual, beta)}%{alpha.tap}"),
        (two_hosts.b, f"{link_local(dual, alpha)}%{beta.tap}"),
    ]
    for host, target in targets:
        rtts = ping_rtts(host, target, count=5, interval=0.1)
        assert len(rtts) == 5, f"{host.name} -> {target}: {5 - len(rtts)} lost"
    for node in (alpha, beta):
        stats = dual.status(node)["stats"]
        assert stats["drops"] == {}, (node.name, stats["drops"])
        # the peer's addresses were resolved by our own switch, never across the overlay
        assert stats["counters"].get("ipv6_nd_answered", 0) >= 2, stats["counters"]


def test_iperf3_over_ipv6_with_offloads_and_no_tcp_error(
    two_hosts: TwoHosts, dual: Overlay
) -> None:
    alpha, beta = dual.nodes["alpha"], dual.nodes["beta"]
    assert dual.status(alpha)["node"].get("offload"), dual.status(alpha)["node"]
    before = tcp_errors(two_hosts.b)
    start_iperf3_server(two_hosts.b)
    result = iperf3(two_hosts.a, beta.ip6, 3)
    assert result.bits_per_second > 100e6, f"{result.bits_per_second / 1e6:.0f} Mbit/s"
    assert tcp_errors(two_hosts.b) == before
    for node in (alpha, beta):
        stats = dual.status(node)["stats"]
        assert stats["drops"] == {}, (node.name, stats["drops"])


def test_a_peer_sending_from_an_uncertified_ipv6_address_gets_nothing_onto_the_tap(
    two_hosts: TwoHosts, dual: Overlay
) -> None:
    alpha, beta = dual.nodes["alpha"], dual.nodes["beta"]
    forged = "fd77::99"  # in the overlay's network, but nobody's certificate holds it
    two_hosts.b.run(
        ["ip", "-6", "addr", "add", f"{forged}/64", "dev", beta.tap, "nodad"],
        check=True,
        timeout=10,
    )
    cap = Capture(two_hosts.a, alpha.tap, two_hosts.lab.workdir / "alpha-tap.pcap")
    two_hosts.b.run(
        ["ping", "-6", "-n", "-c", "5", "-i", "0.1", "-W", "1", "-I", forged, alpha.ip6],
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + 10
    while dual.status(alpha)["stats"]["drops"].get("spoofed_ip6", 0) < 5:
        assert time.monotonic() < deadline, dual.status(alpha)["stats"]
        time.sleep(0.1)
    # a genuine ping after the forged ones: once it is in the capture, so would they be
    assert len(ping_rtts(two_hosts.b, alpha.ip6, count=1, interval=0.1, source=beta.ip6)) == 1
    cap.wait_for(ipaddress.IPv6Address(beta.ip6).packed)
    seen = cap.stop()
    assert ipaddress.IPv6Address(forged).packed not in seen


def test_a_healthy_dual_stack_link_with_the_default_config_drops_nothing_for_30_s(
    request: pytest.FixtureRequest, two_hosts: TwoHosts
) -> None:
    """The kernel's own IPv6 housekeeping (router solicitations, MLD reports, DAD) comes in
    a node's first seconds and again later: each is handled by name, none counted as a drop."""
    overlay = Overlay(two_hosts.lab, name="dflt", network6=NETWORK6, tap_mtu=None)
    try:
        alpha = overlay.add_node("alpha", two_hosts.a)
        beta = overlay.add_node("beta", two_hosts.b)
        overlay.start()
        overlay.wait_established(alpha, beta)
        assert len(ping_rtts(two_hosts.a, beta.ip6, count=3, interval=0.2)) == 3
        watched_until = time.monotonic() + 30
        while time.monotonic() < watched_until:  # the observation window itself, not a wait
            for node in (alpha, beta):
                stats = overlay.status(node)["stats"]
                assert stats["drops"] == {}, (node.name, stats["drops"])
            time.sleep(1)
        counters = overlay.status(alpha)["stats"]["counters"]
        local = [name for name in counters if name.startswith("ipv6_") and name.endswith("_local")]
        assert local, counters  # the housekeeping was seen, and named
    finally:
        if failed(request):
            print_logs(overlay)
