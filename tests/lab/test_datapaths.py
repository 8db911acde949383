"""The native core and the Python reference, node against node: every pairing carries TCP
both ways with TAP offloads on and off, and an in-kernel lossy underlay costs datagrams,
never the transfer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ipop_trio.lab.impair import Impairment, WiredOverlay, build_wired_pair
from ipop_trio.lab.measure import iperf3, start_iperf3_server
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay

from .conftest import TwoHosts, failed, print_logs

PAIRINGS = [("native", "native"), ("native", "python"), ("python", "python")]
BAD = {"bad_datagram", "bad_tap_frame", "bad_inner_payload", "unknown_session"}


@pytest.mark.parametrize("offload", [True, False], ids=["offload-on", "offload-off"])
@pytest.mark.parametrize("paths", PAIRINGS, ids=["-".join(p) for p in PAIRINGS])
def test_each_pairing_carries_tcp_both_ways(
    two_hosts: TwoHosts, overlay: Overlay, paths: tuple[str, str], offload: bool
) -> None:
    alpha = overlay.add_node("alpha", two_hosts.a, datapath=paths[0], offload=offload)
    beta = overlay.add_node("beta", two_hosts.b, datapath=paths[1], offload=offload)
    overlay.start()
    overlay.wait_established(alpha, beta)
    for node, want in ((alpha, paths[0]), (beta, paths[1])):
        assert overlay.status(node)["node"]["datapath"] == want
    start_iperf3_server(two_hosts.b)
    for reverse in (False, True):
        result = iperf3(two_hosts.a, beta.address, 2, reverse=reverse)  # raises on error
        assert result.bytes > 1_000_000
    for node in (alpha, beta):
        drops = overlay.status(node)["stats"]["drops"]
        assert not BAD & set(drops), drops
        peer = overlay.status(node)["peers"][0]
        assert peer["rx_bytes"] > 1_000_000 and peer["tx_bytes"] > 1_000_000, peer


def test_in_kernel_loss_costs_datagrams_not_the_transfer(request: pytest.FixtureRequest) -> None:
    with Lab() as lab:
        pair = build_wired_pair(lab, Impairment(loss=0.01, kernel=True))
        overlay = WiredOverlay(pair)
        try:
            alpha = overlay.add_node("alpha", pair.a, datapath="native")
            beta = overlay.add_node("beta", pair.b, datapath="native")
            overlay.start()
            overlay.wait_established(alpha, beta)
            start_iperf3_server(pair.b)
            before = pair.wire.counters()
            result = iperf3(pair.a, beta.address, 3)  # raises on error
            after = pair.wire.counters()
            assert result.bytes > 1_000_000
            way = {k: after["a_to_b"][k] - before["a_to_b"][k] for k in ("received", "lost")}
            # about 1% of the datagrams alpha sent were lost in the kernel...
            assert way["received"] > 1000 and 0.003 < way["lost"] / way["received"] < 0.03, way
            # ...and each loss cost beta one datagram: every one that arrived opened.
            drops = overlay.status(beta)["stats"]["drops"]
            assert not BAD & set(drops), drops
            status = overlay.status(beta)
            partial = [
                v for k, v in _walk(status["stats"]) if k in ("frames_partial", "segments_rebuilt")
            ]
            assert partial and max(partial) > 0, status["stats"]
        finally:
            if failed(request):
                print_logs(overlay)


def _walk(value: object, key: str = "") -> Iterator[tuple[str, int]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, str(k))
    elif isinstance(value, int):
        yield key, value
