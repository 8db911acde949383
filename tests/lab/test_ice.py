"""NAT traversal end to end: two nodes that know each other only through the
signalling server, behind the lab's nftables NATs, with coturn for STUN and TURN.

Each case states the path ICE must choose for the NAT behaviours the lab built, and why;
the test asserts that ping works and that both nodes report that path type. The lab's NATs
filter by address *and* port (conntrack: only replies to an existing 5-tuple come in) and
do not hairpin (lab/nat.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.nat import DEFAULT_TURN_USERS, NatPair, Placement, add_nat_pair, block, unblock
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .conftest import print_logs

pytestmark = pytest.mark.lab

PATH_TIMEOUT = 30.0
IPOP = str(Path(sys.executable).parent / "ipop-trio")
# Failover waits for consent on the direct path to expire (proto/ice.py CONSENT_TIMEOUT,
# 10 s after the last answered check); going back waits for the recheck of failed better
# pairs (RECHECK_INTERVAL, 10 s) and the nomination that follows.
FAILOVER_TIMEOUT = 30.0


@dataclass
class IceLab:
    pair: NatPair
    overlay: Overlay
    a: OverlayNode
    b: OverlayNode

    def path(self, node: OverlayNode, peer: OverlayNode) -> dict[str, Any] | None:
        entry = self.overlay.peer_status(node, peer)
        return None if entry is None else entry.get("path")

    def wait_path(self, want: str, timeout: float = PATH_TIMEOUT) -> dict[str, Any]:
        """Poll until both nodes use a nominated path of type `want`; return a's."""
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while True:
            paths = {n.name: self.path(n, p) for n, p in ((self.a, self.b), (self.b, self.a))}
            seen = paths
            if all(p is not None and p["nominated"] and p["type"] == want for p in paths.values()):
                return paths["a"]  # type: ignore[return-value]
            if time.monotonic() >= deadline:
                pytest.fail(f"no {want} path after {timeout:.0f}s: {seen}")
            time.sleep(0.2)

    def ipop_ping(self) -> list[str]:
        """`ipop-trio ping b` on a, three probes: its per-probe lines."""
        r = self.pair.a.run(
            [IPOP, "ping", "b", "-s", str(self.a.control), "-n", "3", "-i", "0.1"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout.splitlines()[:-1]

    def ping(self, count: int = 5) -> None:
        """`count` pings from a to b over the overlay, every one answered."""
        r = self.pair.a.run(
            ["ping", "-c", str(count), "-i", "0.2", "-W", "2", self.b.address],
            capture_output=True,
            text=True,
            timeout=count * 3 + 10,
        )
        assert r.returncode == 0 and f"{count} received" in r.stdout, r.stdout + r.stderr


@contextmanager
def ice_lab(
    a: Placement,
    b: Placement | str,
    *,
    a_kw: dict[str, Any] | None = None,
    b_kw: dict[str, Any] | None = None,
) -> Iterator[IceLab]:
    with Lab() as lab:
        pair = add_nat_pair(lab, a, b)  # type: ignore[arg-type]
        overlay = Overlay(lab)
        overlay.start_signalling(pair.server)
        user, password = next(iter(DEFAULT_TURN_USERS.items()))
        ice = {
            "stun": [pair.turn.stun_url],
            "turn": [(pair.turn.turn_url, user, password)],
        }
        na = overlay.add_node("a", pair.a, signalling=True, **ice, **(a_kw or {}))  # type: ignore[arg-type]
        nb = overlay.add_node("b", pair.b, signalling=True, **ice, **(b_kw or {}))  # type: ignore[arg-type]
        ok = False
        try:
            overlay.start()
            overlay.wait_established(na, nb, timeout=PATH_TIMEOUT)
            yield IceLab(pair, overlay, na, nb)
            ok = True
        finally:
            if not ok:
                print_logs(overlay)
                print(pair.turn.log_tail())


# (a's NAT, b's NAT, the path ICE predicts, why)
CASES = [
    pytest.param(None, None, "host", id="no-nat"),  # host candidates reach each other
    # Port-preserving EIM mappings: each side's check to the other's srflx address opens its
    # own NAT's filter for the answer; the host pair fails (private addresses).
    pytest.param("eim", "eim", "srflx", id="eim-eim"),
    # The symmetric side's mapping towards b is a new random port b has never sent to, and
    # b's srflx is only reachable from where b sent: no direct pair passes both filters.
    # Only a relay works (a check from b to a's relayed address opens b's filter).
    pytest.param("symmetric", "eim", "relay", id="symmetric-eim"),
    pytest.param("symmetric", "symmetric", "relay", id="symmetric-symmetric"),
    # Both on one LAN: the host pair works; the srflx pair would need hairpinning.
    pytest.param("eim", "same", "host", id="same-nat"),
]


@pytest.mark.parametrize(("a", "b", "expected"), CASES)
def test_ice_finds_the_predicted_path(a: Placement, b: Placement | str, expected: str) -> None:
    with ice_lab(a, b) as world:
        path = world.wait_path(expected)
        world.ping()
        assert world.path(world.a, world.b)["type"] == expected  # type: ignore[index]
        assert path["rtt_ms"] is not None
        status = world.overlay.status(world.a)
        # Host candidates are the host's underlay addresses, never the overlay TAP's.
        addresses = {line.split()[4] for line in status["ice"]["candidates"]}
        assert world.a.address not in addresses and world.pair.a.address in addresses
        relayed = status["ice"]["turn"][0]["relayed"]
        assert relayed is not None and relayed.startswith(world.pair.turn.address + ":")
        peer = world.overlay.peer_status(world.a, world.b)
        assert peer is not None and peer["ice"]["state"] == "completed"
        assert (peer["via"] is not None) == (path["local"].endswith("(relay)")), (
            "the data path sends through the relay exactly when the local candidate is relayed"
        )
        # `ipop-trio ping` says which path its probes took, relay or direct.
        probes = world.ipop_ping()
        assert len(probes) == 3 and all(line.startswith("pong from b (") for line in probes)
        for line in probes:
            if expected == "relay":
                assert f" via relay {world.pair.turn.address}:" in line, line
            else:
                assert "(direct), ICE " + expected + " pair" in line, line


def test_blocked_direct_path_fails_over_to_the_relay_and_comes_back() -> None:
    with ice_lab("eim", "eim") as world:
        world.wait_path("srflx")
        world.ping()
        before = world.overlay.peer_status(world.a, world.b)
        assert before is not None
        assert world.pair.a_nat is not None and world.pair.b_nat is not None
        router = world.pair.a_nat.host
        block(router, world.pair.b_nat.public_address)
        world.wait_path("relay", FAILOVER_TIMEOUT)
        world.ping()
        unblock(router)
        world.wait_path("srflx", FAILOVER_TIMEOUT)
        world.ping()
        after = world.overlay.peer_status(world.a, world.b)
        assert after is not None
        # The overlay link survived: no failed handshake, no ICE restart, the same link
        # (its byte counters only grew), and at least two path changes (away and back).
        assert after["state"] == "established" and after["failures"] == 0
        assert after["tx_packets"] > before["tx_packets"]
        assert after["path_changes"] >= before["path_changes"] + 2
        assert not after["ice"]["restart_wanted"]


def test_a_plain_link_runs_over_the_relay_and_only_on_ice_paths() -> None:
    """Selective security over ICE: disjoint groups make the link plain (no per-packet
    cipher), and a plain link accepts data only on the paths ICE validated; through the
    relay that is (peer address, relay), which the data path must match on receive."""
    kw_a = {"groups": ["web"], "security": "groups"}
    kw_b = {"groups": ["db"], "security": "groups"}
    with ice_lab("symmetric", "eim", a_kw=kw_a, b_kw=kw_b) as world:
        world.wait_path("relay")

        def wrong_path() -> int:
            drops = world.overlay.status(world.b)["stats"]["drops"]
            return int(drops.get("plain_wrong_path", 0))

        # Before ICE validated a path, a datagram may arrive on none (a counted drop, by
        # design); once the path is chosen, every ping's datagrams are on it.
        before = wrong_path()
        world.ping(10)
        assert wrong_path() == before
        for node, peer in ((world.a, world.b), (world.b, world.a)):
            entry = world.overlay.peer_status(node, peer)
            assert entry is not None and entry["mode"] == "plain", entry


# coturn down this long: consent on every relayed pair is lost (CONSENT_TIMEOUT, 10 s) and
# the allocation check that follows goes unanswered (proto/turn.py, 5 s) while it is down.
TURN_OUTAGE = 20.0
TURN_RECOVERY = 30.0  # the link is back this soon after coturn is (issue 13)
OUTAGE_STATES = {"no path", "reconnecting"}


def _ping_replies(path: Path) -> list[tuple[float, int]]:
    """(time, icmp_seq) of each reply in the output of `ping -D`."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"\[(\d+\.\d+)\] \d+ bytes from .* icmp_seq=(\d+)", line)
        if m:
            out.append((float(m.group(1)), int(m.group(2))))
    return out


def test_relayed_link_survives_a_turn_server_restart() -> None:
    """Both nodes behind symmetric NATs: only the relay works. coturn stops for 20 s and
    starts again, forgetting every allocation: both nodes notice, re-allocate, re-signal
    their new relayed candidates and ICE pairs them; a running ping resumes within 30 s of
    coturn's return, and meanwhile `status` says the link has no path and the relay is
    being re-made (not `established` / `allocated`)."""
    with ice_lab("symmetric", "symmetric") as world:
        world.wait_path("relay")
        world.ping()
        turn = world.pair.turn
        relayed_before = world.overlay.status(world.a)["ice"]["turn"][0]["relayed"]
        log = world.overlay.lab.workdir / "restart-ping.log"
        with open(log, "w") as out:
            ping = world.pair.a.popen(
                ["ping", "-D", "-i", "0.2", "-W", "1", world.b.address],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 10.0
            while not _ping_replies(log):
                assert time.monotonic() < deadline, "the running ping got no reply"
                time.sleep(0.2)

            stopped = time.time()
            turn.stop()
            # While coturn is away: status must show the outage, on both sides of it.
            seen_link: set[str] = set()
            seen_turn: set[str] = set()
            back_at = time.monotonic() + TURN_OUTAGE
            while time.monotonic() < back_at:
                entry = world.overlay.peer_status(world.a, world.b)
                if entry is not None:
                    seen_link.add(str(entry["state"]))
                seen_turn.add(world.overlay.status(world.a)["ice"]["turn"][0]["state"])
                time.sleep(0.2)
            turn.start()
            restarted = time.time()
            assert seen_link & OUTAGE_STATES, f"status never showed the outage: {seen_link}"
            assert "reallocating" in seen_turn, f"relay states seen: {seen_turn}"

            # Back: a new allocation on both nodes, a relayed path, pings answered again.
            deadline = time.monotonic() + TURN_RECOVERY
            while True:
                paths = [world.path(world.a, world.b), world.path(world.b, world.a)]
                replies = [t for t, _seq in _ping_replies(log) if t > restarted]
                if replies and all(p is not None and p["type"] == "relay" for p in paths):
                    break
                if time.monotonic() >= deadline:
                    pytest.fail(f"no relayed link {TURN_RECOVERY:.0f}s after coturn's return")
                time.sleep(0.2)
            recovered = replies[0]
            entry = world.overlay.peer_status(world.a, world.b)
            assert entry is not None and entry["state"] == "established", entry
            status = world.overlay.status(world.a)
            relay = status["ice"]["turn"][0]
            assert relay["state"] == "allocated" and relay["lost"] >= 1, relay
            assert relay["relayed"] is not None and relay["relayed"] != relayed_before
            counters = status["stats"]["counters"]
            assert counters.get("turn_lost", 0) >= 1 and counters.get("turn_reallocated", 0) >= 1
        finally:
            ping.terminate()
            ping.wait(timeout=5)
        before = [t for t, _seq in _ping_replies(log) if t < stopped]
        print(
            f"\nTURN restart: last reply {stopped - before[-1]:.1f}s before coturn stopped,"
            f" coturn down {restarted - stopped:.1f}s, first reply {recovered - restarted:.1f}s"
            f" after it was back; link states seen {sorted(seen_link)},"
            f" relay states seen {sorted(seen_turn)}"
        )
        world.ping()
