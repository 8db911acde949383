"""`ipop-trio ping PEER`: one probe through a link and back, with the path it took.

As `tailscale ping`, the probe measures the overlay itself (node to node, through the link's
session and its current path, relay or direct), not an application: the peer's node answers,
its TAP and kernel never see the probe (proto/probe.py). The control socket's `ping` command
sends one probe and answers when its pong arrives or its time is up; the CLI repeats it.

A pong counts only from the port the ping went to and for an id still waited for: a peer
cannot answer for another, and a late or repeated pong is ignored (counted).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import trio

from ..datapath.outbound import Outbound
from ..datapath.switch import ZERO_VNET, PeerPort, Switch
from ..errors import BadPacket
from ..proto import probe
from ..stats import Stats
from .links import LinkManager

DEFAULT_TIMEOUT = 2.0
MAX_TIMEOUT = 30.0
MAX_WAITING = 64  # probes in flight at once (each holds a control-socket connection)


class _Waiting:
    __slots__ = ("event", "port", "rtt", "sent")

    def __init__(self, port: PeerPort, sent: float) -> None:
        self.port = port
        self.sent = sent
        self.rtt: float | None = None
        self.event = trio.Event()


class Prober:
    def __init__(
        self,
        switch: Switch,
        outbound: Outbound,
        links: LinkManager,
        stats: Stats,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.switch = switch
        self.outbound = outbound
        self.links = links
        self.stats = stats
        self.clock = clock
        self.waiting: dict[int, _Waiting] = {}
        switch.on_probe = self.on_probe

    def on_probe(self, port: PeerPort, body: bytes) -> None:
        """A probe frame from `port`'s peer (its source already checked by the switch)."""
        try:
            kind, probe_id = probe.parse_untrusted(body)
        except BadPacket:
            self.stats.drop("bad_probe")
            return
        if kind is probe.ProbeKind.PING:
            self.stats.count("probe_answered")
            self._send(port, probe.ProbeKind.PONG, probe_id)
            return
        waiting = self.waiting.get(probe_id)
        if waiting is None or waiting.port is not port or waiting.rtt is not None:
            self.stats.drop("probe_unexpected_pong")
            return
        waiting.rtt = self.clock() - waiting.sent
        waiting.event.set()

    def _send(self, port: PeerPort, kind: probe.ProbeKind, probe_id: int) -> None:
        frame = ZERO_VNET + probe.build(port.mac, self.switch.own_mac, kind, probe_id)
        self.outbound.send(port, [frame], self.clock())

    async def ping(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's `ping`: {"peer": NAME, "timeout": S} → {"rtt_ms", path...}
        or {"error"}; never raises."""
        name = request.get("peer")
        timeout = request.get("wait", DEFAULT_TIMEOUT)
        if not isinstance(name, str):
            return {"error": 'ping needs "peer": a peer name'}
        if not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT:
            return {"error": f'"timeout" must be a number of seconds in (0, {MAX_TIMEOUT:.0f}]'}
        rt = next((rt for rt in self.links.peers if rt.name == name), None)
        if rt is None:
            known = ", ".join(sorted(rt.name for rt in self.links.peers)) or "none"
            return {"error": f"no link to {name!r} (peers: {known})"}
        if not rt.established or rt.port.session is None:
            return {"error": f"no session with {name} yet (link {rt.link.state.value})"}
        if len(self.waiting) >= MAX_WAITING:
            return {"error": f"{MAX_WAITING} probes in flight already: try again"}
        probe_id = secrets.randbits(64)
        waiting = _Waiting(rt.port, self.clock())
        self.waiting[probe_id] = waiting
        try:
            self._send(rt.port, probe.ProbeKind.PING, probe_id)
            with trio.move_on_after(timeout):
                await waiting.event.wait()
        finally:
            del self.waiting[probe_id]
        entry = next((p for p in self.links.status() if p["name"] == name), {})
        where = {k: entry.get(k) for k in ("address", "mode", "endpoint", "via", "path")}
        if waiting.rtt is None:
            return {"peer": name, "timeout": timeout, **where}
        return {"peer": name, "rtt_ms": round(waiting.rtt * 1000, 3), **where}


__all__ = ["Prober"]
