"""[dns] in the lab: two nodes that met through signalling answer NAME.lab. for each other.

Topology: one switch with the signalling server's host and the two nodes' hosts; both nodes
have an empty `[dns]` section, so each answers on its own overlay address, port 53, for the
overlay's name ("lab", the CA's). Queries are made with `dig` (bind9-dnsutils) inside a
node's namespace: to the node's own server, and across the overlay to the other's.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ipop_trio.lab.netns import Host, Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import failed, print_logs

pytestmark = pytest.mark.lab

MESH_TIMEOUT = 30.0


@dataclass
class Named:
    overlay: Overlay
    alpha: OverlayNode
    beta: OverlayNode


@pytest.fixture
def named(request: pytest.FixtureRequest) -> Iterator[Named]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        sig_host = lab.add_host("sig")
        lab.attach(sig_host, switch)
        overlay = Overlay(lab)  # the CA, so the overlay and the domain, is "lab"
        overlay.start_signalling(sig_host)
        nodes = []
        for name in ("alpha", "beta"):
            host = lab.add_host(name[0])
            lab.attach(host, switch)
            nodes.append(overlay.add_node(name, host, signalling=True, extra_config="[dns]\n"))
        try:
            overlay.start()
            overlay.wait_established(nodes[0], nodes[1], MESH_TIMEOUT)
            yield Named(overlay, *nodes)
        finally:
            if failed(request):
                print_logs(overlay)


def dig(host: Host, server: str, name: str, *args: str) -> tuple[str, list[str]]:
    """(status, answer lines) of `dig @server name` run in `host`'s namespace."""
    out = host.check(
        ["dig", f"@{server}", name, *args, "+norecurse", "+time=2", "+tries=3",
         "+noall", "+comments", "+answer"],
        timeout=30,
    )  # fmt: skip
    status = re.search(r"status: (\w+)", out)
    assert status, out
    answers = [line.split() for line in out.splitlines() if line and not line.startswith(";")]
    return status.group(1), [" ".join(a) for a in answers]


def test_members_resolve_to_their_certified_addresses(named: Named) -> None:
    overlay, alpha, beta = named.overlay, named.alpha, named.beta
    assert overlay.status(alpha)["dns"] == {"listen": f"{alpha.address}:53", "domain": "lab."}
    # alpha's own server: the other member (learned through signalling), and alpha itself
    status, answers = dig(alpha.host, alpha.address, "beta.lab", "A")
    assert status == "NOERROR"
    assert [a.split()[-1] for a in answers] == [beta.address]
    assert answers[0].split()[1] == "30"  # the TTL: short, membership changes
    assert dig(alpha.host, alpha.address, "ALPHA.Lab")[1][0].split()[-1] == alpha.address
    # beta's server, asked across the overlay (through the link), over UDP and TCP
    for transport in ("+notcp", "+tcp"):
        status, answers = dig(alpha.host, beta.address, "alpha.lab", transport)
        assert status == "NOERROR" and answers[0].split()[-1] == alpha.address, transport
    # unknown inside the domain, and outside it
    assert dig(alpha.host, alpha.address, "gamma.lab")[0] == "NXDOMAIN"
    assert dig(alpha.host, alpha.address, "example.com")[0] == "REFUSED"
    # no IPv6 in today's certificates: NODATA, not NXDOMAIN
    status, answers = dig(alpha.host, alpha.address, "beta.lab", "AAAA")
    assert status == "NOERROR" and answers == []


def test_garbage_on_the_dns_port_is_a_counted_drop(named: Named) -> None:
    overlay, alpha = named.overlay, named.alpha
    # a query header announcing one question, then no name but a reserved label type; and
    # one byte
    junk = [bytes.fromhex("1234 0100 0001 0000 0000 0000 ffff"), b"\x00"]
    send = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"[s.sendto(b, ({alpha.address!r}, 53)) for b in {junk!r}]"
    )
    alpha.host.check([sys.executable, "-c", send])
    deadline = time.monotonic() + 10
    while overlay.status(alpha)["stats"]["drops"].get("dns_malformed", 0) < 2:
        assert time.monotonic() < deadline, overlay.status(alpha)["stats"]["drops"]
        time.sleep(0.1)
    # and the server still answers
    assert dig(alpha.host, alpha.address, "beta.lab")[0] == "NOERROR"
    counters = overlay.status(alpha)["stats"]["counters"]
    assert counters.get("dns_answer", 0) >= 1
