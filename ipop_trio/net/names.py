"""The node's DNS server ([dns]): a UDP socket and a TCP listener on one address and port.

Owns the sockets only; what a query gets is `respond(data, tcp)` (proto/names.py's
`answer_untrusted` over the node's current zone), which raises only `QueryDropped`: a
dropped query is counted as `dns_<reason>` and gets nothing back, an answered one is counted
as `dns_<outcome>`. Nothing a client sends can end the node: a send that fails is counted,
a TCP client that stalls is closed after TCP_IDLE, one beyond TCP_CLIENTS at once is closed
as soon as it is accepted.

TCP (RFC 7766 §8): each message has a 2-byte length prefix; several queries may follow on
one connection; a dropped one closes it.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import trio

from ..config import endpoint_text
from ..proto.names import TCP_MAX, QueryDropped, Reply
from ..stats import Stats

TCP_IDLE = 10.0  # seconds a TCP client may take to send its next query
TCP_CLIENTS = 16  # TCP connections served at once
TCP_BACKLOG = 16
_LENGTH = struct.Struct("!H")

Respond = Callable[[bytes, bool], Reply]  # (query, over TCP) -> reply; raises QueryDropped


class DnsSockets:
    """The bound, not yet served sockets: opened before the task tree starts, so an address
    in use or not ours is a configuration error, not a crash inside it."""

    def __init__(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.udp = socket.socket(family, socket.SOCK_DGRAM)
        self.tcp = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            for sock, kind in ((self.udp, "UDP"), (self.tcp, "TCP")):
                where = endpoint_text(host, port)
                try:
                    sock.bind((host, port))
                except OSError as exc:
                    why = f"cannot bind {kind} {where}: {exc.strerror}"
                    raise OSError(exc.errno, why) from None
                port = sock.getsockname()[1]  # port 0 (tests): TCP takes the port UDP got
            self.tcp.listen(TCP_BACKLOG)
        except OSError:
            self.close()
            raise
        self.local = where
        self.port = port

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


async def serve_dns(
    socks: DnsSockets,
    respond: Respond,
    stats: Stats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer on both sockets until cancelled (the caller closes `socks`)."""
    udp = trio.socket.from_stdlib_socket(socks.udp)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(socks.tcp))
    clients = [0]

    async def serve_client(stream: trio.SocketStream) -> None:
        if clients[0] >= TCP_CLIENTS:
            stats.drop("dns_tcp_busy")
            await stream.aclose()
            return
        clients[0] += 1
        try:
            await _serve_tcp(stream, respond, stats)
        finally:
            clients[0] -= 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_serve_udp, udp, respond, stats)
        await nursery.start(trio.serve_listeners, serve_client, [listener])
        task_status.started()


def _answer(respond: Respond, data: bytes, tcp: bool, stats: Stats) -> bytes | None:
    try:
        reply = respond(data, tcp)
    except QueryDropped as exc:
        stats.drop(f"dns_{exc.reason.value}")
        return None
    stats.count(f"dns_{reply.outcome.value}")
    return reply.wire


async def _serve_udp(udp: trio.socket.SocketType, respond: Respond, stats: Stats) -> None:
    while True:
        try:
            data, addr = await udp.recvfrom(TCP_MAX)
        except OSError:  # a pending ICMP error, reported once
            stats.drop("dns_recv_failed")
            continue
        wire = _answer(respond, data, False, stats)
        if wire is None:
            continue
        try:
            await udp.sendto(wire, addr)
        except OSError:
            stats.drop("dns_send_failed")


async def _serve_tcp(stream: trio.SocketStream, respond: Respond, stats: Stats) -> None:
    async with stream:
        try:
            while True:
                data = None
                with trio.move_on_after(TCP_IDLE):
                    head = await _receive_exactly(stream, _LENGTH.size)
                    if head is not None:
                        data = await _receive_exactly(stream, *_LENGTH.unpack(head))
                if data is None:  # end of stream, cut mid-message, or idle too long
                    return
                wire = _answer(respond, data, True, stats)
                if wire is None:
                    return
                await stream.send_all(_LENGTH.pack(len(wire)) + wire)
        except trio.BrokenResourceError:
            stats.drop("dns_tcp_broken")


async def _receive_exactly(stream: trio.SocketStream, n: int) -> bytes | None:
    """`n` bytes from `stream`, or None when it ends first."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
