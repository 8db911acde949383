"""The bench's user-space hop probe: a blocking UDP echo between two lab hosts."""

from __future__ import annotations

import pytest

from ipop_trio.lab.measure import udp_echo_rtts

from .conftest import TwoHosts

pytestmark = pytest.mark.lab


def test_udp_echo_times_every_message_and_leaves_nothing_running(two_hosts: TwoHosts) -> None:
    a, b, link = two_hosts.a, two_hosts.b, two_hosts.link
    rtts = udp_echo_rtts(a, b, b.address_on(link), count=20, interval=0.005)
    assert len(rtts) == 20, rtts  # an idle veth loses nothing
    assert all(0 < r < 1000 for r in rtts), rtts
    assert b.pids() == [], "the echo server outlived its measurement"
