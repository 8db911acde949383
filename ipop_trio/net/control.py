"""The node's control socket: one JSON request line in, one JSON response line out.

    $ echo '{"cmd": "status"}' | socat - UNIX-CONNECT:/run/ipop-trio/ipop0.sock

Commands: `status` (node, peers, counters) and `stats` (per-stage timers only). Requests are
untrusted bytes from a local user with access to the socket (mode 0600, root by default):
bounded size, clear error replies, never a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from ..errors import IpopError

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


async def serve_control(
    path: Path,
    handlers: dict[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on a unix socket at `path` (replacing a stale one) until cancelled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    if path.is_socket():
        path.unlink()
    old = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handlers)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def _serve_one(stream: trio.abc.Stream, handlers: dict[str, Handler]) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            data = b""
            while b"\n" not in data and len(data) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
            reply = reply_to_request(data.split(b"\n", 1)[0], handlers)
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass


def reply_to_request(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    """The reply to one request line: the handler's, or an error object. Never raises."""
    if len(line) > MAX_REQUEST:
        return {"error": f"request longer than {MAX_REQUEST} bytes"}
    try:
        req = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):  # deep nesting: RecursionError
        return {"error": 'request is not JSON; send {"cmd": "status"}'}
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return {"error": 'request must be an object with a "cmd" string'}
    handler = handlers.get(req["cmd"])
    if handler is None:
        return {"error": f"unknown cmd {req['cmd']!r} (known: {', '.join(sorted(handlers))})"}
    return handler(req)


class ControlReplyError(IpopError):
    """The control socket answered with something other than one JSON object."""


def query(path: Path, cmd: str = "status", *, timeout: float = 5.0) -> dict[str, Any]:
    """The one client of the control socket (`status`, the lab, profiling): send one
    command, return the reply. Raises OSError when no node answers there (FileNotFoundError,
    ConnectionRefusedError, PermissionError, TimeoutError) and ControlReplyError when the
    reply is not a JSON object."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while b"\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    line = data.split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlReplyError(f"{path}: the reply is not JSON: {line[:200]!r}") from None
    if not isinstance(reply, dict):
        raise ControlReplyError(f"{path}: expected a JSON object, got {line[:200]!r}")
    return reply
