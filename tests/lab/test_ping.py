"""`ipop-trio ping PEER` over a direct link: every probe answered by the peer's node, the path
printed, and nothing of it on either TAP. (The relayed case: tests/lab/test_ice.py.)"""

from __future__ import annotations

import re
import secrets
import sys
from pathlib import Path

import pytest

from .capture import Capture
from .conftest import Pair
from .test_two_nodes import send_udp

pytestmark = pytest.mark.lab

IPOP = str(Path(sys.executable).parent / "ipop-trio")
PONG = re.compile(r"^pong from (\S+) \((\S+)\) via (\S+) \(direct\) in ([\d.]+) ms$")


def test_ping_over_a_direct_link(pair: Pair) -> None:
    a, b = pair.hosts.a, pair.hosts.b
    alpha, beta = pair.alpha, pair.beta
    workdir = pair.hosts.lab.workdir
    taps = [Capture(a, alpha.tap, workdir / "a.pcap"), Capture(b, beta.tap, workdir / "b.pcap")]

    done = a.run(
        [IPOP, "ping", "beta", "-s", str(alpha.control), "-n", "3", "-i", "0.1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done
    *probes, summary = done.stdout.splitlines()
    assert len(probes) == 3, done.stdout
    endpoint = pair.overlay.peer_status(alpha, beta)["endpoint"]  # type: ignore[index]
    for line in probes:
        m = PONG.match(line)
        assert m is not None, line
        assert m.groups()[:3] == ("beta", beta.address, endpoint) and float(m[4]) > 0, line
    assert summary.startswith("--- beta: 3 probes, 3 pongs, rtt min/avg/max "), summary
    answered = pair.overlay.status(beta)["stats"]["counters"].get("probe_answered")
    assert answered == 3, pair.overlay.status(beta)["stats"]

    # The probes are the nodes' own: neither kernel saw one (EtherType 0x88B5).
    for cap, host, dst in ((taps[0], a, alpha), (taps[1], b, beta)):
        sentinel = secrets.token_bytes(16)
        send_udp(host, str(pair.overlay.network.broadcast_address), 9, sentinel)
        cap.wait_for(sentinel)
        assert b"\x88\xb5IPOP" not in cap.stop(), f"a probe reached {dst.name}'s TAP"

    unknown = a.run(
        [IPOP, "ping", "gamma", "-s", str(alpha.control), "-n", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == "ipop-trio: no link to 'gamma' (peers: beta)", unknown
