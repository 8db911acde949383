"""The node's control socket: one JSON request line in, one JSON response line out.

    $ echo '{"cmd": "status"}' | socat - UNIX-CONNECT:/run/ipop-trio/ipop0.sock

Commands: `status` (node, peers, counters) and `stats` (per-stage timers only). Requests are
untrusted bytes from a local user with access to the socket (mode 0600, root by default):
bounded size, clear error replies, never a crash.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from ..errors import ConfigError, IpopError

log = logging.getLogger("ipop_trio.control_socket")

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0

# A handler answers at once, or (`ping`) after awaiting something; either way it never
# raises for a bad request: it answers {"error": ...}.
Handler = Callable[[dict[str, Any]], dict[str, Any] | Awaitable[dict[str, Any]]]


class ControlSocket:
    """The node's listening control socket, claimed before anything else is touched.

    A socket file a live process still answers on is refused (two nodes never share one, and
    the second does not take the first's away); a stale one left by a killed node is
    replaced. On close the file is removed only while it is still the one we bound."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            if not path.is_socket():
                raise ControlSocketTaken(
                    f"{path} exists and is not a socket: remove it, or set node.control"
                )
            owner = _live_owner(path)
            if owner is not None:
                raise ControlSocketTaken(
                    f"{path} is served by a live node ({owner}): stop it, or give this node "
                    "its own node.control or tap.name"
                )
            path.unlink(missing_ok=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(str(path))
        except OSError as exc:  # another node bound it since we looked
            self.sock.close()
            raise ControlSocketTaken(f"cannot bind {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        st = os.stat(path)
        self._ours = (st.st_dev, st.st_ino)
        self.sock.listen(16)

    def close(self) -> None:
        self.sock.close()
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._ours:
            self.path.unlink(missing_ok=True)


def _live_owner(path: Path) -> str | None:
    """Who answers on the socket at `path` ("node beta, pid 7"), or None when nobody does."""
    try:
        reply = query(path, timeout=2.0)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except (OSError, ControlReplyError):
        return "a process that is not an ipop-trio node"
    node = reply.get("node")
    if not isinstance(node, dict):
        return "a process that is not an ipop-trio node"
    return f"node {node.get('name')}, pid {node.get('pid')}"


async def serve_control(
    path_or_socket: Path | ControlSocket,
    handlers: dict[str, Handler],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer requests on the control socket until cancelled; then close and remove it."""
    control = (
        path_or_socket
        if isinstance(path_or_socket, ControlSocket)
        else ControlSocket(path_or_socket)
    )
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(control.sock))
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, handlers)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        control.close()


async def _serve_one(stream: trio.abc.Stream, handlers: dict[str, Handler]) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(REQUEST_TIMEOUT) as reading:
            while b"\n" not in data and len(data) <= MAX_REQUEST:
                chunk = await stream.receive_some(MAX_REQUEST)
                if not chunk:
                    break
                data += chunk
        if reading.cancelled_caught:
            return
        reply = reply_to_request(data.split(b"\n", 1)[0], handlers)
        if inspect.isawaitable(reply):  # bounded by the handler (ping: its timeout)
            try:
                reply = await reply
            except Exception:  # a bug in a handler ends this request, not the node
                log.exception("control request failed")
                reply = {"error": "internal error (logged by the node)"}
        with trio.move_on_after(REQUEST_TIMEOUT):
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except trio.BrokenResourceError:
                pass


def reply_to_request(
    line: bytes, handlers: dict[str, Handler]
) -> dict[str, Any] | Awaitable[dict[str, Any]]:
    """The reply to one request line (or, from an async handler, what to await for it): the
    handler's, or an error object. Never raises."""
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


class ControlSocketTaken(ConfigError):
    """The control socket is another node's (or not a socket): the node does not start."""

    def __init__(self, why: str) -> None:
        super().__init__("node.control", why)


def query(path: Path, cmd: str = "status", *, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    """The one client of the control socket (`status`, the lab, profiling): send one
    command, return the reply. Raises OSError when no node answers there (FileNotFoundError,
    ConnectionRefusedError, PermissionError, TimeoutError) and ControlReplyError when the
    reply is not a JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
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


def netns_inode(netns: Path = Path("/proc/self/ns/net")) -> int | None:
    """The inode naming a network namespace (ours by default); None if unreadable."""
    try:
        return os.stat(netns).st_ino
    except OSError:
        return None


def local_nodes(run_dir: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """The nodes of our network namespace answering on the sockets in `run_dir`, as (socket,
    status), and the sockets we may not open (not root). A node says which namespace it runs
    in, so this needs no naming convention: any socket there is asked, briefly."""
    ours = netns_inode()
    found: list[tuple[Path, dict[str, Any]]] = []
    denied: list[Path] = []
    try:
        paths = sorted(p for p in run_dir.iterdir() if p.is_socket())
    except OSError:
        return found, denied
    for path in paths:
        try:
            reply = query(path, timeout=1.0)
        except PermissionError:
            denied.append(path)
            continue
        except (OSError, ControlReplyError):
            continue  # stale, or not a node
        node = reply.get("node")
        if isinstance(node, dict) and node.get("netns") == ours:
            found.append((path, reply))
    return found, denied
