"""`ipop-trio netcheck`: can this machine reach the servers its config names, and what does
its NAT do? (As `tailscale netcheck`; the same checks the demo makes.)

From one fresh UDP socket (not the node's: a running node keeps its port):
- a STUN Binding to every STUN server and every TURN server (coturn answers Binding on its
  TURN port): the round trip and the address each saw us as;
- the NAT's mapping, from those answers: one mapped address for every destination is an
  endpoint-independent mapping (direct paths work with most peers), a new one per destination
  is symmetric (direct paths only with a peer on the same LAN or behind an EIM NAT; otherwise
  the TURN relay carries the link); it takes two destinations to tell;
- an Allocate on every TURN server with the config's credentials (then freed): the relayed
  address, or the server's error (a wrong password is 401 with our realm);
- a TCP connect (and TLS handshake, for wss://) to the signalling server.
Nothing here runs under Trio: plain sockets and the sans-IO STUN/TURN cores, one check at a
time, each bounded by `timeout`.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from .config import NodeConfig, endpoint_text
from .errors import BadPacket
from .proto import stun, turn

Addr = tuple[str, int]
RTO, RTO_MAX = 0.25, 1.0


@dataclass(slots=True)
class Check:
    """One server's answer (or why there is none)."""

    kind: str  # "stun", "turn", "signalling"
    server: str
    ok: bool
    rtt_ms: float | None = None
    detail: str = ""
    mapped: Addr | None = None  # STUN: the address the server saw


@dataclass(slots=True)
class Report:
    local: Addr
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def nat(self) -> str:
        """The NAT's mapping behaviour, as far as the STUN answers tell."""
        mapped = {c.mapped for c in self.checks if c.kind == "stun" and c.mapped is not None}
        destinations = sum(1 for c in self.checks if c.kind == "stun" and c.mapped is not None)
        if not mapped:
            return "unknown: no STUN server answered (UDP blocked, or no server configured)"
        (first, *_) = mapped
        if len(mapped) > 1:
            return (
                "symmetric mapping (a new public address per destination): direct paths only "
                "with peers on this LAN or behind an endpoint-independent NAT; else the relay"
            )
        if first[0] == self.local[0] and first[1] == self.local[1]:
            return "no NAT: the servers see this machine's own address"
        preserved = ", port preserved" if first[1] == self.local[1] else ""
        if destinations < 2:
            return (
                f"behind a NAT ({_where(first)}{preserved}); "
                "one STUN destination cannot tell its mapping: configure two"
            )
        return (
            f"endpoint-independent mapping ({_where(first)} for every destination"
            f"{preserved}): direct paths work with most peers"
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "local": _where(self.local),
            "nat": self.nat,
            "ok": self.ok,
            "checks": [
                {
                    "kind": c.kind,
                    "server": c.server,
                    "ok": c.ok,
                    "rtt_ms": c.rtt_ms,
                    "detail": c.detail,
                    "mapped": None if c.mapped is None else _where(c.mapped),
                }
                for c in self.checks
            ],
        }

    def lines(self) -> list[str]:
        out = [f"netcheck from {_where(self.local)} (a fresh UDP socket)"]
        for c in self.checks:
            rtt = "" if c.rtt_ms is None else f"  {c.rtt_ms:.1f} ms"
            mark = "ok  " if c.ok else "FAIL"
            out.append(f"  {mark} {c.kind:<10} {c.server:<24} {c.detail}{rtt}")
        out.append(f"  NAT: {self.nat}")
        return out


def _where(addr: Addr) -> str:
    return endpoint_text(addr[0], addr[1])


def netcheck(cfg: NodeConfig, *, timeout: float = 3.0) -> Report:
    """Every check the config's servers allow, in order: STUN, TURN, signalling."""
    family = socket.AF_INET6 if ":" in cfg.listen.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
        report = Report(local=_local_address(sock, cfg))
        destinations = [e.sockaddr for e in cfg.ice.stun]
        destinations += [
            t.server.sockaddr for t in cfg.ice.turn if t.server.sockaddr not in destinations
        ]
        for server in destinations:
            report.checks.append(_stun(sock, server, timeout))
        for t in cfg.ice.turn:
            report.checks.append(_turn(sock, t.server.sockaddr, t.username, t.password, timeout))
    if cfg.signalling is not None:
        report.checks.append(_signalling(cfg.signalling.url, cfg.signalling.ca, timeout))
    return report


def _local_address(sock: socket.socket, cfg: NodeConfig) -> Addr:
    """Our address towards the first server (the kernel's route choice), with our port."""
    port = sock.getsockname()[1]
    servers = [e.sockaddr for e in cfg.ice.stun] + [t.server.sockaddr for t in cfg.ice.turn]
    if not servers:
        return (str(sock.getsockname()[0]), port)
    with socket.socket(sock.family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(servers[0])
            return (str(probe.getsockname()[0]), port)
        except OSError:
            return (str(sock.getsockname()[0]), port)


def _exchange(
    sock: socket.socket, server: Addr, request: bytes, accept: Any, timeout: float
) -> tuple[Any, float] | str:
    """Send `request` to `server` until `accept(datagram)` returns something (retransmitting
    from RTO, doubling): (that, seconds since the first send), or why not."""
    start = time.monotonic()
    deadline = start + timeout
    resend_at, rto = start, RTO
    while True:
        now = time.monotonic()
        if now >= deadline:
            return f"no answer in {timeout:.0f} s"
        if now >= resend_at:
            try:
                sock.sendto(request, server)
            except OSError as exc:
                return f"cannot send: {exc.strerror}"
            resend_at, rto = now + rto, min(rto * 2, RTO_MAX)
        ready, _, _ = select.select([sock], [], [], max(0.0, min(resend_at, deadline) - now))
        if not ready:
            continue
        try:
            data, source = sock.recvfrom(2048)
        except OSError as exc:  # ICMP unreachable, reported on the next receive
            return f"unreachable: {exc.strerror}"
        if source[:2] != server:
            continue
        result = accept(data)
        if result is not None:
            return result, time.monotonic() - start


def _stun(sock: socket.socket, server: Addr, timeout: float) -> Check:
    tid = stun.new_transaction_id(random.SystemRandom())
    request = stun.encode(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, tid))

    def accept(data: bytes) -> stun.Message | None:
        try:
            msg = stun.parse_untrusted(data)
        except BadPacket:
            return None
        return msg if msg.transaction_id == tid else None

    got = _exchange(sock, server, request, accept, timeout)
    if isinstance(got, str):
        return Check("stun", _where(server), False, detail=got)
    msg, seconds = got
    if msg.cls is stun.Class.ERROR:
        return Check("stun", _where(server), False, seconds * 1000, f"error {msg.error_code}")
    mapped = msg.xor_mapped_address
    if mapped is None:
        return Check("stun", _where(server), False, seconds * 1000, "answer without an address")
    return Check(
        "stun", _where(server), True, seconds * 1000, f"sees us as {_where(mapped)}", mapped
    )


def _turn(sock: socket.socket, server: Addr, user: str, password: str, timeout: float) -> Check:
    client = turn.TurnClient(server, user, password)
    start = time.monotonic()
    client.allocate(start)
    deadline = start + timeout
    while True:
        for datagram in client.datagrams_to_send():
            try:
                sock.sendto(datagram, server)
            except OSError as exc:
                return Check("turn", _where(server), False, detail=f"cannot send: {exc.strerror}")
        event = client.next_event()
        if isinstance(event, turn.Allocated):
            ms = (time.monotonic() - start) * 1000
            client.close(time.monotonic())  # lifetime 0: the relay is freed at once
            for datagram in client.datagrams_to_send():
                sock.sendto(datagram, server)
            detail = f"allocated: relays at {_where(event.relayed)}"
            return Check("turn", _where(server), True, ms, detail)
        if isinstance(event, turn.AllocationFailed | turn.AllocationLost):
            code = "" if event.code is None else f"{event.code} "
            return Check("turn", _where(server), False, detail=f"refused: {code}{event.reason}")
        if event is not None:
            continue
        now = time.monotonic()
        if now >= deadline:
            return Check("turn", _where(server), False, detail=f"no answer in {timeout:.0f} s")
        wake = min(deadline, client.next_deadline() or deadline)
        ready, _, _ = select.select([sock], [], [], max(0.0, wake - now))
        if ready:
            try:
                data, source = sock.recvfrom(2048)
            except OSError as exc:
                return Check("turn", _where(server), False, detail=f"unreachable: {exc.strerror}")
            if source[:2] == server:
                try:
                    client.receive_untrusted(data, time.monotonic())
                except BadPacket:
                    pass
        else:
            client.handle_timeout(time.monotonic())


def _signalling(url: str, ca: Any, timeout: float) -> Check:
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "wss" else 80)
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            detail = "TCP connect"
            if parts.scheme == "wss":
                context = ssl.create_default_context(cafile=None if ca is None else str(ca))
                with context.wrap_socket(conn, server_hostname=host):
                    detail = "TCP connect and TLS handshake"
    except ssl.SSLCertVerificationError as exc:
        return Check("signalling", url, False, detail=f"TLS: {exc.verify_message}")
    except (OSError, ssl.SSLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return Check("signalling", url, False, detail=f"cannot connect: {why}")
    return Check("signalling", url, True, (time.monotonic() - start) * 1000, detail)


__all__ = ["Check", "Report", "netcheck"]
