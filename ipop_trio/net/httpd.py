"""A minimal HTTP/1.1 GET server on Trio, for the metrics endpoint (`[metrics] listen`).

prometheus_client ships its own HTTP server, but it runs in a thread and would read the
node's state while the Trio thread changes it. This one runs as a Trio task, so a page's
`render()` is an ordinary call in the Trio thread, between two data-path batches, and sees
a consistent state. It is meant for a scraper, not for browsers:

    request    one per connection: "GET /metrics HTTP/1.1" + headers, at most MAX_HEAD bytes
               in READ_TIMEOUT; the body (there is none for GET) and the headers are ignored
    response   200 with the page, 404 for another path, 405 for another method, 400 for what
               is not an HTTP request, 431 for a head over MAX_HEAD, 500 if `render` fails;
               always "Connection: close", the whole reply sent within WRITE_TIMEOUT
    clients    at most MAX_CONNECTIONS at once; one beyond is closed as soon as accepted

Whatever one connection sends, or however slowly it reads, ends that connection only, and
none of it reaches the node's nursery: a stranger who can reach the port can hold at most
MAX_CONNECTIONS slots for READ_TIMEOUT + WRITE_TIMEOUT each, which delays scrapes and
nothing else. This module must never parse more than MAX_HEAD bytes of a request, wait on a
client without a deadline, or let a client's error out of its connection.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import trio

from ..errors import BadPacket

log = logging.getLogger("ipop_trio.net.httpd")

MAX_HEAD = 8192  # request line and headers
MAX_CONNECTIONS = 8
READ_TIMEOUT = 5.0  # from the accept to the end of the request head
WRITE_TIMEOUT = 10.0  # the whole response

# A page: () -> (content type, body), called in the Trio thread for each request.
Page = Callable[[], tuple[str, bytes]]

# RFC 9112 §3: request-line = method SP request-target SP HTTP-version
_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[\x21-\x7e]{0,2047}) HTTP/1\.([01])")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str  # the target without its query string
    version: str  # "1.0" or "1.1"


def parse_request_untrusted(head: bytes) -> Request:
    """The request line of a request head (the bytes before the blank line). Raises only
    BadPacket: not an HTTP/1.x request line with an origin-form target."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        raise BadPacket("not an HTTP/1.x request line")
    path = m[2].split(b"?", 1)[0].decode("ascii")
    return Request(m[1].decode("ascii"), path, f"1.{m[3].decode('ascii')}")


def response(status: int, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    """A whole HTTP/1.1 response that closes the connection (`head`: without the body)."""
    lines = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return lines.encode("ascii") + (b"" if head else body)


def reply_to(head: bytes, pages: Mapping[str, Page]) -> bytes:
    """The response to one request head. Never raises: a failing page is a 500, logged."""
    try:
        req = parse_request_untrusted(head)
    except BadPacket:
        return _text(400, "not an HTTP/1.x request\n")
    if req.method not in ("GET", "HEAD"):
        return _text(405, "only GET\n")
    page = pages.get(req.path)
    if page is None:
        return _text(404, f"no such page; try {', '.join(sorted(pages))}\n")
    try:
        content_type, body = page()
    except Exception:  # a bug of the page: the node goes on, the scraper sees a 500
        log.exception("rendering %s failed", req.path)
        return _text(500, "rendering failed (see the node's log)\n")
    return response(200, body, content_type, head=req.method == "HEAD")


def _text(status: int, text: str) -> bytes:
    return response(status, text.encode(), "text/plain; charset=utf-8")


async def open_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the listening socket(s). Raises OSError (address taken, not ours) to the caller,
    which names the setting."""
    return await trio.open_tcp_listeners(port, host=host)


def bound_port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])


async def serve_http(
    listeners: list[trio.SocketListener],
    pages: Mapping[str, Page],
    *,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `pages` (path → page) on `listeners` until cancelled; closes them at the end.
    (trio.serve_listeners survives accept errors such as EMFILE by waiting.)"""
    slots = trio.Semaphore(max_connections)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:  # full: this one is closed at once, the others go on
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        try:
            await _serve_one(stream, pages)
        finally:
            slots.release()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, handle, listeners)
            task_status.started()
    finally:
        with trio.CancelScope(shield=True):
            for listener in listeners:
                await listener.aclose()


async def _serve_one(stream: trio.SocketStream, pages: Mapping[str, Page]) -> None:
    """One connection: read the head (bounded in size and time), answer, close."""
    try:
        head = b""
        reply: bytes | None = None
        with trio.move_on_after(READ_TIMEOUT):
            while True:
                chunk = await stream.receive_some(MAX_HEAD)
                if not chunk:
                    break  # closed before a whole head: nothing to answer
                head += chunk
                end = _end_of_head(head)
                if end is not None:
                    reply = reply_to(head[:end], pages)
                    break
                if len(head) > MAX_HEAD:
                    reply = _text(431, f"request head over {MAX_HEAD} bytes\n")
                    break
        if reply is not None:
            with trio.move_on_after(WRITE_TIMEOUT):
                await stream.send_all(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.debug("metrics client gone: %s", exc)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            await stream.aclose()


def _end_of_head(data: bytes) -> int | None:
    """Where the head ends (the blank line, CRLF or bare LF), if it has arrived."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0 and at <= MAX_HEAD:
            return at
    return None


__all__ = [
    "MAX_CONNECTIONS",
    "MAX_HEAD",
    "READ_TIMEOUT",
    "WRITE_TIMEOUT",
    "Page",
    "Request",
    "bound_port",
    "open_listeners",
    "parse_request_untrusted",
    "reply_to",
    "serve_http",
]
