"""`ipop-trio netcheck` behind the lab's NATs: coturn answers STUN on two ports, so the
mapping shows (endpoint-independent behind nat-a, symmetric behind nat-b); the TURN
allocation works with the right credentials and is refused with the wrong ones; the
signalling server is reachable."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.nat import DEFAULT_TURN_USERS, NatPair, add_nat_pair
from ipop_trio.lab.netns import Host, Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

pytestmark = pytest.mark.lab

IPOP = str(Path(sys.executable).parent / "ipop-trio")


@pytest.fixture
def world() -> Iterator[tuple[NatPair, Overlay]]:
    with Lab() as lab:
        pair = add_nat_pair(lab, "eim", "symmetric")
        overlay = Overlay(lab)
        overlay.start_signalling(pair.server)
        yield pair, overlay


def configured(
    overlay: Overlay, pair: NatPair, name: str, host: Host, password: str
) -> OverlayNode:
    user = next(iter(DEFAULT_TURN_USERS))
    node = overlay.add_node(
        name,
        host,
        signalling=True,
        stun=[f"stun:{addr}:{port}" for addr, port in pair.turn.endpoints],
        turn=[(pair.turn.turn_url, user, password)],
    )
    overlay.write_config(node)
    return node


def netcheck(host: Host, node: OverlayNode) -> tuple[int, dict[str, Any]]:
    done = host.run(
        [IPOP, "netcheck", "-c", str(node.config), "--json", "--timeout", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_netcheck_tells_the_nat_and_reaches_every_server(
    world: tuple[NatPair, Overlay],
) -> None:
    pair, overlay = world
    assert len(pair.turn.endpoints) >= 2  # two destinations: the mapping can be told
    password = next(iter(DEFAULT_TURN_USERS.values()))
    a = configured(overlay, pair, "a", pair.a, password)
    b = configured(overlay, pair, "b", pair.b, password)

    code, report = netcheck(pair.a, a)
    assert code == 0 and report["ok"], report
    assert report["nat"].startswith("endpoint-independent mapping"), report["nat"]
    kinds = [c["kind"] for c in report["checks"]]
    assert kinds.count("stun") == len(pair.turn.endpoints) and "signalling" in kinds, kinds
    mapped = {c["mapped"] for c in report["checks"] if c["kind"] == "stun"}
    assert len(mapped) == 1 and not mapped.pop().startswith(pair.a.address + ":")
    [turn] = [c for c in report["checks"] if c["kind"] == "turn"]
    assert turn["detail"].startswith(f"allocated: relays at {pair.turn.address}:"), turn

    code, report = netcheck(pair.b, b)
    assert code == 0, report
    assert report["nat"].startswith("symmetric mapping"), report["nat"]

    wrong = configured(overlay, pair, "c", pair.a, "not-the-password")
    code, report = netcheck(pair.a, wrong)
    assert code == 1 and not report["ok"]
    [turn] = [c for c in report["checks"] if c["kind"] == "turn"]
    assert not turn["ok"] and turn["detail"].startswith("refused: 401"), turn
