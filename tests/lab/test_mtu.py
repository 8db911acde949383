"""The TAP MTU follows the underlay: two nodes with no `mtu` in their config, on a 1280- and a
1400-byte underlay, carry TCP at least half as fast as the same overlay on 1500 bytes, with
no datagram refused for its size (with the old fixed 1400, TCP crawled at ~0.2 Mbit/s)."""

from __future__ import annotations

import pytest

from ipop_trio.config import tap_mtu_for
from ipop_trio.lab.measure import iperf3, start_iperf3_server
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay
from ipop_trio.status import format_status

pytestmark = pytest.mark.lab


def _overlay_rate(lab: Lab, underlay: int) -> float:
    """iperf3 through two default-MTU nodes on a veth of `underlay` bytes, in bits/s."""
    a, b = lab.add_host(f"a{underlay}"), lab.add_host(f"b{underlay}")
    lab.connect(a, b, mtu=underlay)
    overlay = Overlay(lab, name=f"mtu{underlay}", tap_mtu=None)
    alpha = overlay.add_node("alpha", a, peers=("beta",))
    beta = overlay.add_node("beta", b, peers=("alpha",))
    overlay.start()
    overlay.wait_established(alpha, beta)
    for node in (alpha, beta):
        mine = overlay.status(node)["node"]
        assert mine["mtu"] == tap_mtu_for(underlay), mine
        assert f"mtu {underlay} towards" in mine["mtu_why"], mine
    # The largest packet the TAP takes crosses whole, both ways (DF set, no fragments).
    size = str(tap_mtu_for(underlay) - 28)
    for host, to in ((a, beta.address), (b, alpha.address)):
        done = host.run(
            ["ping", "-n", "-c", "3", "-i", "0.05", "-W", "2", "-M", "do", "-s", size, to],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0 and " 0% packet loss" in done.stdout, done.stdout
    start_iperf3_server(b)
    rate = iperf3(a, beta.address, 3).bits_per_second
    for node in (alpha, beta):
        drops = overlay.status(node).get("stats", {}).get("drops", {})
        assert not drops.get("udp_send_failed"), drops
    return rate


@pytest.mark.parametrize("underlay", [1280, 1400])
def test_the_default_mtu_fits_a_narrow_underlay(lab: Lab, underlay: int) -> None:
    assert tap_mtu_for(underlay) < tap_mtu_for(1500) == 1400
    wide = _overlay_rate(lab, 1500)
    narrow = _overlay_rate(lab, underlay)
    assert narrow >= wide / 2, f"{narrow / 1e6:.0f} Mbit/s on {underlay} vs {wide / 1e6:.0f}"


def test_a_tap_mtu_too_big_for_the_path_is_corrected_by_icmp(lab: Lab) -> None:
    """`mtu = 1400` set by hand on a 1400-byte underlay: the first full-size datagram is
    refused (EMSGSIZE), the node learns the path from the route, answers larger frames with
    ICMP 'fragmentation needed', the sender's TCP lowers its MSS, and iperf3 runs at least
    half as fast as with the derived MTU (it crawled at ~0.09 Mbit/s before)."""
    a, b = lab.add_host("a"), lab.add_host("b")
    lab.connect(a, b, mtu=1400)
    overlay = Overlay(lab, name="fixed", tap_mtu=1400)
    alpha = overlay.add_node("alpha", a, peers=("beta",))
    beta = overlay.add_node("beta", b, peers=("alpha",))
    overlay.start()
    overlay.wait_established(alpha, beta)
    start_iperf3_server(b)
    rate = iperf3(a, beta.address, 3).bits_per_second
    entry = overlay.peer_status(alpha, beta) or {}
    assert entry.get("path_mtu") == tap_mtu_for(1400), entry
    assert "mtu 1400 towards" in entry.get("path_mtu_why", ""), entry
    stats = overlay.status(alpha)["stats"]
    assert stats["drops"].get("too_big_for_path", 0) > 0, stats["drops"]
    assert "narrower paths" in format_status(overlay.status(alpha))
    derived = _overlay_rate(lab, 1400)
    assert rate >= derived / 2, f"{rate / 1e6:.1f} Mbit/s vs {derived / 1e6:.0f} derived"
