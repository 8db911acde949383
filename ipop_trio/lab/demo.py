"""`ipop-trio demo`: three nodes, two of them behind NATs, find each other; explained.

The project's main job, shown end to end in network namespaces with the real kernel's
conntrack and nftables (`ipop_trio.lab.nat`):

    server: ipop-trio signal + coturn (STUN/TURN)      alpha (public, no NAT)
       |                                                  |
    ---+---------------- "internet" switch ---------------+----------+-------
                 |                                                   |
           nat-beta: endpoint-independent mapping         nat-gamma: symmetric mapping
                 |  (192.168.N.0/24)                                 |  (192.168.M.0/24)
               beta                                                gamma

Each node has a certificate from a fresh overlay CA and no peer in its config: only the
signalling server's URL and coturn as its STUN and TURN server. The nodes find each other
through the server, ICE picks a path for every pair (direct where the NATs allow it, through
coturn's relay where they do not), and the demo prints the path type each node reports next
to the one the NATs predict (and says so when they differ), then ping between every pair, a
short iperf3 over a direct and over the relayed link, and each node's status. Everything it
made (namespaces, veths, nftables rulesets, coturn, nodes) is removed on exit, also on Ctrl-C
or SIGTERM. Never touches anything outside its own namespaces.
"""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ipop_trio.errors import IpopError
from ipop_trio.lab import nat
from ipop_trio.lab.measure import iperf3, ping_rtts, start_iperf3_server
from ipop_trio.lab.nat import DEFAULT_TURN_USERS, NatRouter, TurnServer
from ipop_trio.lab.netns import Host, Lab, sigterm_raises
from ipop_trio.lab.overlay import Overlay, OverlayNode

IPERF_SECONDS = 2
MESH_TIMEOUT = 30.0
# How long ICE gets, once the mesh is up, to nominate the path the NATs predict for every
# pair; after that the demo shows whatever was nominated and says that it differs.
PATH_TIMEOUT = 20.0
POLL = 0.1


@dataclass(frozen=True, slots=True)
class Expectation:
    """The path ICE should nominate between nodes `a` and `b`, given where they sit."""

    a: str
    b: str
    types: frozenset[str]  # path types that meet it
    want: str  # how the demo says it
    why: str


EXPECTATIONS = (
    Expectation(
        "alpha",
        "beta",
        frozenset({"srflx", "prflx"}),
        "srflx or prflx",
        "beta's NAT keeps one public ip:port (its own port) for beta's socket, whatever the "
        "destination, so the server-reflexive address coturn saw works once beta's own check "
        "has opened its NAT's filter for alpha",
    ),
    Expectation(
        "alpha",
        "gamma",
        frozenset({"host", "srflx", "prflx"}),
        "a direct path (host, srflx or prflx)",
        "alpha is public and filters nothing: gamma's checks to alpha's address open a fresh "
        "mapping in gamma's NAT and alpha answers through it (alpha learns it as peer-reflexive)",
    ),
    Expectation(
        "beta",
        "gamma",
        frozenset({"relay"}),
        "relay",
        "gamma's symmetric NAT picks a new port for every destination, so no address gamma "
        "advertises is where its packets to beta come from, and beta's NAT only lets in "
        "replies to where beta sent: only a path through coturn's relay gets past both",
    ),
)


def _formatter() -> Callable[[dict[str, Any]], str]:
    try:
        from ipop_trio.status import format_status
    except ImportError:
        return lambda status: json.dumps(status, indent=2)
    return format_status


def _step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def _wait_mesh(overlay: Overlay, nodes: list[OverlayNode]) -> None:
    deadline = time.monotonic() + MESH_TIMEOUT
    while True:
        missing = []
        for node in nodes:
            states = {p["name"]: p["state"] for p in overlay.status(node).get("peers", [])}
            missing += [
                f"{node.name}->{o.name}"
                for o in nodes
                if o is not node and states.get(o.name) != "established"
            ]
        if not missing:
            return
        if time.monotonic() >= deadline:
            raise IpopError(f"no full mesh after {MESH_TIMEOUT:.0f}s: missing {missing}")
        time.sleep(POLL)


Paths = dict[Expectation, tuple[dict[str, Any], dict[str, Any]]]


def _path(overlay: Overlay, node: OverlayNode, peer: OverlayNode) -> dict[str, Any] | None:
    entry = overlay.peer_status(node, peer)
    path = None if entry is None else entry.get("path")
    return path if path and path.get("nominated") else None


def _wait_paths(overlay: Overlay) -> Paths:
    """Poll until both ends of every pair report a nominated path of the expected type; at
    PATH_TIMEOUT, the nominated paths as they are (IpopError if a pair has none)."""
    deadline = time.monotonic() + PATH_TIMEOUT
    while True:
        seen = {
            exp: (
                _path(overlay, overlay.nodes[exp.a], overlay.nodes[exp.b]),
                _path(overlay, overlay.nodes[exp.b], overlay.nodes[exp.a]),
            )
            for exp in EXPECTATIONS
        }
        missing = [
            f"{x}->{y}"
            for exp, ends in seen.items()
            for (x, y), path in zip(((exp.a, exp.b), (exp.b, exp.a)), ends, strict=True)
            if path is None
        ]
        met = all(p is not None and p["type"] in exp.types for exp, ps in seen.items() for p in ps)
        if not missing and (met or time.monotonic() >= deadline):
            return {exp: (a, b) for exp, (a, b) in seen.items() if a is not None and b is not None}
        if time.monotonic() >= deadline:
            raise IpopError(f"no nominated ICE path after {PATH_TIMEOUT:.0f}s: {missing}")
        time.sleep(POLL)


def _mapping_verdict(host: Host, port: int, mapped: list[tuple[str, int]]) -> str:
    if all(ip == host.address for ip, _ in mapped):
        return "its own address: no NAT"
    if len(set(mapped)) == 1:
        kept = "port kept" if mapped[0][1] == port else "port changed"
        return f"one mapping for both destinations, {kept}: endpoint-independent"
    return "a new mapping per destination: symmetric"


def _build(lab: Lab) -> tuple[Host, dict[str, Host], dict[str, NatRouter]]:
    internet = lab.add_switch("internet")
    server = lab.add_host("server")
    lab.attach(server, internet)
    alpha = lab.add_host("alpha")
    lab.attach(alpha, internet)
    # A public host has a default route: datagrams to the peers' private addresses (their
    # host candidates) vanish, as on the Internet, instead of failing the send.
    nat.add_void_route(alpha)
    routers = {
        "beta": nat.add_nat(lab, "nat-beta", internet, mapping="eim"),
        "gamma": nat.add_nat(lab, "nat-gamma", internet, mapping="symmetric"),
    }
    hosts = {"alpha": alpha}
    hosts |= {name: nat.add_host_behind(lab, r, name) for name, r in routers.items()}
    return server, hosts, routers


def _start_turn(lab: Lab, server: Host, hosts: dict[str, Host]) -> TurnServer:
    turn = nat.add_turn(lab, server, users=DEFAULT_TURN_USERS)
    pid = turn.proc.pid if turn.proc is not None else "?"
    ports = ", ".join(str(p) for _, p in turn.endpoints)
    _say(f"coturn on {turn.address} UDP {ports} in {server.ns}, pid {pid}")
    _say('it answers STUN Binding ("which ip:port do you see me from?") and relays for')
    _say("nodes that log in with a TURN user. One socket on each host asks both its ports:")
    for name, host in hosts.items():
        port, mapped = nat.probe_mappings(host, turn.endpoints)
        seen = " and ".join(f"{ip}:{p}" for ip, p in mapped)
        _say(f"  {name}: port {port} seen as {seen} ({_mapping_verdict(host, port, mapped)})")
    return turn


def demo() -> list[str]:
    """The demo itself; raises IpopError when a step fails. Returns the pairs whose path
    differs from the expectation (normally none)."""
    with Lab() as lab:
        _step(f"Building lab {lab.id}: an 'internet' switch, two NAT routers, four hosts")
        server, hosts, routers = _build(lab)
        _say(f"server {server.address}: will run the signalling server and coturn")
        _say(f"alpha  {hosts['alpha'].address}: directly on the internet, no NAT")
        for name, router in routers.items():
            _say(
                f"{name:6} {hosts[name].address}: behind {router.host.name} "
                f"(public {router.public_address}, LAN {router.lan.subnet})"
            )
        _say("nat-beta (nftables masquerade): one inside ip:port keeps one public ip:port, and")
        _say("  its port, towards every destination: endpoint-independent mapping (home routers)")
        _say("nat-gamma (masquerade fully-random): every new destination gets a new random port:")
        _say("  symmetric mapping (many carrier-grade and corporate NATs)")
        _say("both let in only replies to a mapping's exact 5-tuple (address- and port-dependent")
        _say("  filtering) and do not hairpin, so nothing reaches beta or gamma unasked")

        _step("Starting coturn (STUN/TURN) on the server, and asking it what each NAT does")
        turn = _start_turn(lab, server, hosts)

        _step("Creating an overlay CA and a certificate for each node")
        overlay = Overlay(lab, name="demo")
        user, password = next(iter(DEFAULT_TURN_USERS.items()))
        nodes = [
            overlay.add_node(
                name,
                host,
                signalling=True,
                stun=[turn.stun_url],
                turn=[(turn.turn_url, user, password)],
            )
            for name, host in hosts.items()
        ]
        _say(f"CA 'demo' for {overlay.network} (Ed25519)")
        for node in nodes:
            _say(f"{node.name}: overlay address {node.address}, X25519 link key")

        _step("Starting the signalling server (it trusts the overlay CA, nothing else)")
        sig = overlay.start_signalling(server)
        pid = sig.proc.pid if sig.proc is not None else "?"
        _say(f"ipop-trio signal on {sig.url} in {server.ns}, pid {pid}")

        _step("Starting the nodes: no peers configured, only the signalling URL and coturn")
        started = time.monotonic()
        overlay.start()
        for node in nodes:
            info = overlay.status(node).get("node", {})
            _say(
                f"{node.name}: pid {node.pid}, tap {info.get('tap', node.tap)}, "
                f"listening on {info.get('listen', node.port)}, STUN {turn.stun_url}, "
                f"TURN user {user!r}"
            )
        _say("each node gathers candidates: host (its own address), server-reflexive (its")
        _say("  NAT's mapping, from STUN) and relayed (an allocation on coturn), then logs in")
        _say("  to the server: hello + certificate → challenge → proof of its X25519 key → welcome")

        _step("Waiting for the full mesh: candidates swapped through the server, ICE, handshakes")
        _wait_mesh(overlay, nodes)
        links = len(nodes) * (len(nodes) - 1)
        _say(f"all {links} links established {time.monotonic() - started:.1f}s after the start")
        for x, y in itertools.combinations(nodes, 2):
            entry = overlay.peer_status(x, y) or {}
            _say(
                f"{x.name} <-> {y.name}: {entry.get('state')}, mode {entry.get('mode')}, "
                f"learned via {entry.get('learned')}"
            )

        _step("The path ICE nominated for each pair, as each node reports it")
        paths = _wait_paths(overlay)
        differ = []
        for exp, (at_a, at_b) in paths.items():
            ok = at_a["type"] in exp.types and at_b["type"] in exp.types
            verdict = "as expected" if ok else "DIFFERS from the expectation"
            _say(
                f"{exp.a} <-> {exp.b}: {exp.a} reports {at_a['type']}, {exp.b} reports "
                f"{at_b['type']}; expected {exp.want}: {verdict}"
            )
            for line in textwrap.wrap(
                f"why: {exp.why}", 90, subsequent_indent="     ", break_on_hyphens=False
            ):
                _say(f"  {line}")
            _say(f"  {exp.a}: {at_a['local']} -> {at_a['remote']}, rtt {at_a['rtt_ms']} ms")
            if not ok:
                differ.append(f"{exp.a} <-> {exp.b}")

        _step("Ping over the overlay, every pair")
        for src, dst in itertools.permutations(nodes, 2):
            rtts = ping_rtts(src.host, dst.address, count=3, interval=0.2)
            if not rtts:
                raise IpopError(f"no ping reply from {dst.name} ({dst.address}) to {src.name}")
            shown = ", ".join(f"{t:.3f}" for t in rtts)
            _say(f"{src.name} -> {dst.name} {dst.address}: {len(rtts)}/3 replies, ms: {shown}")

        _step(f"iperf3 for {IPERF_SECONDS} s over a direct and over the relayed link (TCP)")
        by_name = overlay.nodes
        for exp in (EXPECTATIONS[0], EXPECTATIONS[2]):
            client, target = by_name[exp.a], by_name[exp.b]
            start_iperf3_server(target.host)
            result = iperf3(client.host, target.address, IPERF_SECONDS)
            retransmits = "?" if result.retransmits is None else result.retransmits
            _say(
                f"{client.name} -> {target.name} ({paths[exp][0]['type']}): "
                f"{result.bits_per_second / 1e6:.1f} Mbit/s, {retransmits} retransmits"
            )
        _say("the relayed link takes a detour through coturn, which forwards in user space")

        _step("Status of each node (what `ipop-trio status` shows)")
        fmt = _formatter()
        for node in nodes:
            print(f"\n[{node.name}]")
            print(fmt(overlay.status(node)), flush=True)

        _step(f"Cleaning up lab {lab.id}: stopping coturn, server and nodes, deleting namespaces")
    _say("done: nothing left behind")
    return differ


def run_demo() -> int:
    """CLI entry point: run the demo; return an exit code."""
    with sigterm_raises():
        try:
            differ = demo()
        except IpopError as exc:
            print(f"\nipop-trio demo: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nipop-trio demo: interrupted; lab removed", file=sys.stderr)
            return 130
    if differ:
        print(
            f"\nipop-trio demo: note: ICE chose another path than predicted for "
            f"{', '.join(differ)} (the overlay works all the same; see above)",
            file=sys.stderr,
        )
    return 0
