"""`ipop-trio bench --nat`: how long a link takes to come up in each NAT case.

For each case of `nat.add_nat_pair` (no NAT, EIM/EIM, symmetric/EIM, symmetric/symmetric,
one shared NAT) one lab is built with coturn and the signalling server on its "internet";
then, `tries` times: start node a, pin b's overlay MAC in a's neighbour table (so no ARP
retry timer sits in the measurement), ping b from a every 10 ms, start node b, and wait
until b has received a data frame from a. The set-up time of a try is

    b's first data frame from a  -  the con_req's arrival (the earlier `con_at` of the two)

both read from the nodes' status (CLOCK_MONOTONIC, shared by every namespace of the
machine). It spans the con_req/con_resp exchange, ICE checks until a first valid pair, the
Noise handshake and the first frame. Reported per case: median, min, max and the path type.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from ipop_trio import pki
from ipop_trio.errors import LabError
from ipop_trio.lab.nat import DEFAULT_TURN_USERS, NatPair, Placement, add_nat_pair
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode
from ipop_trio.proto.cert import format_mac, mac_for_key

CASES: list[tuple[str, Placement, Placement | str]] = [
    ("no NAT", None, None),
    ("EIM / EIM", "eim", "eim"),
    ("symmetric / EIM", "symmetric", "eim"),
    ("symmetric / symmetric", "symmetric", "symmetric"),
    ("same NAT", "eim", "same"),
]
TRY_TIMEOUT = 30.0
PING_INTERVAL = "0.01"


def _entry(overlay: Overlay, node: OverlayNode, peer: OverlayNode) -> dict[str, Any] | None:
    try:
        return overlay.peer_status(node, peer)
    except LabError:
        return None


def _one_try(pair: NatPair, overlay: Overlay, a: OverlayNode, b: OverlayNode) -> dict[str, Any]:
    overlay.start(a)
    b_key = pki.public_key_of(pki.load_private_key_bytes(b.key_pem))
    mac = format_mac(mac_for_key(b_key))
    neigh = ["ip", "neigh", "replace", b.address, "lladdr", mac, "dev", a.tap, "nud", "permanent"]
    pair.a.check(neigh)
    ping = pair.a.popen(
        ["ping", "-i", PING_INTERVAL, "-W", "1", b.address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        overlay.start(b)
        deadline = time.monotonic() + TRY_TIMEOUT
        while True:
            at_b = _entry(overlay, b, a)
            at_a = _entry(overlay, a, b)
            if at_b and at_a and at_b["setup"]["first_data"] and at_a["setup"]["con_at"]:
                starts = [e["setup"]["con_at"] for e in (at_a, at_b) if e["setup"]["con_at"]]
                path = (at_b.get("path") or {}).get("type")
                return {"seconds": at_b["setup"]["first_data"] - min(starts), "path": path}
            if time.monotonic() >= deadline:
                raise LabError(f"no frame from a at b after {TRY_TIMEOUT:.0f}s: {at_b}")
            time.sleep(0.05)
    finally:
        ping.terminate()
        ping.wait(5)
        overlay.stop(b)
        overlay.stop(a)


def measure_case(name: str, a: Placement, b: Placement | str, tries: int) -> dict[str, Any]:
    with Lab() as lab:
        pair = add_nat_pair(lab, a, b)  # type: ignore[arg-type]
        overlay = Overlay(lab)
        overlay.start_signalling(pair.server)
        user, password = next(iter(DEFAULT_TURN_USERS.items()))
        ice: dict[str, Any] = {
            "stun": [pair.turn.stun_url],
            "turn": [(pair.turn.turn_url, user, password)],
        }
        na = overlay.add_node("a", pair.a, signalling=True, **ice)
        nb = overlay.add_node("b", pair.b, signalling=True, **ice)
        results = [_one_try(pair, overlay, na, nb) for _ in range(tries)]
    seconds = [r["seconds"] for r in results]
    paths = sorted({str(r["path"]) for r in results})
    return {
        "case": name,
        "a": a,
        "b": b,
        "tries": tries,
        "median_ms": statistics.median(seconds) * 1000,
        "min_ms": min(seconds) * 1000,
        "max_ms": max(seconds) * 1000,
        "paths": paths,
        "samples_ms": [round(s * 1000, 1) for s in seconds],
    }


def run_nat_bench(tries: int = 10, json_path: Path | None = None) -> int:
    rows = []
    print(f"link set-up time, con_req to first frame delivered, {tries} tries per case")
    print(f"{'case':<24}{'path':<10}{'median ms':>10}{'min':>8}{'max':>8}")
    for name, a, b in CASES:
        row = measure_case(name, a, b, tries)
        rows.append(row)
        print(
            f"{name:<24}{','.join(row['paths']):<10}{row['median_ms']:>10.1f}"
            f"{row['min_ms']:>8.1f}{row['max_ms']:>8.1f}",
            flush=True,
        )
    if json_path is not None:
        json_path.write_text(json.dumps({"setup": rows}, indent=2) + "\n")
    return 0


__all__ = ["CASES", "measure_case", "run_nat_bench"]
