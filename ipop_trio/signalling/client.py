"""The node's signalling client: stays connected to the server, passes events on.

    serve()  ── connect ── hello / challenge / auth ── welcome ──► Connected
       ▲                                                 │
       │                            join, leave, con_req, con_resp, error ──► events
       │                                                 │
       └── backoff (exponential, equal jitter) ◄── lost ─┴──► Disconnected

The client never decides anything: it turns the server's messages into events on a bounded
channel for the controller (full: the client waits — the control path applies back-pressure
to the server, whose limits then decide) and sends what the controller hands it with `send`
(never waits: while disconnected or when the outbox is full the message is dropped and
`send` returns False; the controller retries on its own timers).

Links never depend on it: while the server is away the client only retries, and the node's
links keep running. Each connection pings every PING_INTERVAL; no message at all from the
server for PING_TIMEOUT counts as lost. trio-websocket is used only in this package.
"""

from __future__ import annotations

import enum
import logging
import os
import random
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio
from trio_websocket import (
    ConnectionClosed,
    Endpoint,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from ..errors import BadPacket
from ..proto import signalling as sig

log = logging.getLogger("ipop_trio.signalling.client")

PING_INTERVAL = 15.0
PING_TIMEOUT = 40.0
BACKOFF_MIN, BACKOFF_MAX = 0.5, 30.0
OUTBOX_SIZE = 256  # messages the controller may queue while a send is in flight
CONNECT_TIMEOUT = 10.0
STABLE_AFTER = 10.0  # a connection that lasted this long resets the backoff
# Refusals that another try soon cannot fix (our certificate, our key; or our address or name
# held by another node's key, until it leaves): the operator must act, so the node asks again
# only every few minutes, and says so at WARNING with the server's reason and what to look at.
PERMANENT_REFUSALS = frozenset(
    {"certificate_refused", "auth_failed", "certificate_revoked", "address_in_use", "name_in_use"}
)
REFUSAL_HINTS = {
    "certificate_revoked": "the server's revocation list names this node's certificate",
    "address_in_use": "another node's certificate has this node's address",
    "name_in_use": "another node's certificate has this node's name",
}
REFUSAL_HINT = "the node's certificate and key, the server's --ca"
REFUSED_DELAY = 300.0


class ClientState(enum.Enum):
    CONNECTING = "connecting"  # opening the WebSocket, proving our key
    CONNECTED = "connected"  # admitted: events flow
    BACKOFF = "backoff"  # lost or refused: waiting before the next attempt


class AdmissionRefused(Exception):
    """The server refused us (`code`, `reason`): our certificate or proof, or a rate limit."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Equal jitter: uniform in [cap/2, cap] with cap = min(MAX, MIN * 2**attempt), so the
    delays grow as the README says (0.5 s doubling to 30 s) and nodes that lost the server
    together do not come back together."""
    cap = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** min(attempt, 30))
    return rng.uniform(cap / 2, cap)


def describe_connect_error(exc: BaseException) -> str:
    """Why connecting failed, in the words of the failing step: trio reports a refused or
    unreachable address as "all attempts to connect to H:P failed", with the reasons in
    its cause; TLS failures arrive as a broken stream caused by the ssl error."""
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {CONNECT_TIMEOUT:.0f} s"
    cause = exc.__cause__
    if isinstance(exc, OSError) and isinstance(cause, BaseExceptionGroup):
        whys = []
        for leaf in _leaves(cause):
            # trio's own text repeats the address: the errno's words say it all
            errno = leaf.errno if isinstance(leaf, OSError) else None
            why = os.strerror(errno) if errno else str(leaf)
            if why not in whys:
                whys.append(why)
        return f"{exc}: {'; '.join(whys)}"
    if isinstance(exc, trio.BrokenResourceError) and cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {cause.verify_message}"
        return f"TLS: {getattr(cause, 'reason', None) or cause}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


@asynccontextmanager
async def open_connection(
    url: str,
    ssl_context: ssl.SSLContext | None = None,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    max_message_size: int = sig.MAX_SERVER_MESSAGE,
    message_queue_size: int = 1,
) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client connection whose TCP stream is closed however it ends.

    (trio-websocket 0.12's `open_websocket_url` leaves the socket open when the *server*
    closes first: its reader stops on EOF without closing the stream.)
    Connecting (TCP, TLS, the HTTP upgrade) raises OSError, HandshakeError or
    trio.TooSlowError after `connect_timeout`, unwrapped; what the body raises comes out of
    the connection's nursery (an ExceptionGroup)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
    try:
        with trio.fail_after(connect_timeout):
            stream = await trio.open_tcp_stream(parts.hostname, port)
            if parts.scheme == "wss":
                context = ssl_context or ssl.create_default_context()
                stream = trio.SSLStream(stream, context, server_hostname=parts.hostname)
                await stream.do_handshake()
        async with trio.open_nursery() as nursery:
            failure: BaseException | None = None
            try:
                with trio.fail_after(connect_timeout):
                    ws = await wrap_client_stream(
                        nursery,
                        stream,
                        parts.netloc,
                        resource,
                        max_message_size=max_message_size,
                        message_queue_size=message_queue_size,
                    )
            except (HandshakeError, ConnectionClosed, trio.TooSlowError, OSError) as exc:
                failure = exc
                nursery.cancel_scope.cancel()
            if failure is None:
                try:
                    yield ws
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2.0):
                        await ws.aclose()
                    nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
    finally:
        if stream is not None:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)


class SignallingClient:
    def __init__(
        self,
        url: str,
        static_private: bytes,
        cert_der: bytes,
        events: trio.MemorySendChannel[sig.ClientEvent],
        *,
        ssl_context: ssl.SSLContext | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.url = url
        self._private = static_private
        self._cert = cert_der
        self.events = events
        self.ssl_context = ssl_context
        self._rng = rng or random.Random()
        self._clock = clock
        self.state = ClientState.CONNECTING
        self.connected_since: float | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.overlay: str | None = None
        self.refused: str | None = None  # the code of a refusal another try cannot fix
        self._outbox: trio.MemorySendChannel[str] | None = None

    def set_identity(self, static_private: bytes, cert_der: bytes) -> None:
        """A renewed certificate (SIGHUP): presented from the next admission on; the
        current one stays (the server checked the certificate when it admitted us)."""
        self._private, self._cert = static_private, cert_der

    def send(self, msg: sig.Message) -> bool:
        """Queue `msg` for the server. Never waits: False when not connected or full."""
        if self._outbox is None:
            return False
        try:
            self._outbox.send_nowait(sig.encode(msg))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def status(self) -> dict[str, object]:
        return {
            "url": self.url,
            "state": self.state.value,
            "overlay": self.overlay,
            "connects": self.connects,
            "last_error": self.last_error,
            "refused": self.refused,
        }

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect, until cancelled. Ready at once: the node does not wait for
        the server (it may be down; links configured statically come up regardless)."""
        task_status.started()
        attempt = 0
        while True:
            self.state = ClientState.CONNECTING
            started = trio.current_time()
            reason = await self._session()
            self._outbox = None
            self.last_error = reason
            if self.state is ClientState.CONNECTED:
                await self.events.send(sig.Disconnected(reason))
            if trio.current_time() - started >= STABLE_AFTER:
                attempt = 0
            self.state = ClientState.BACKOFF
            if self.refused is not None:
                delay = self._rng.uniform(0.9, 1.1) * REFUSED_DELAY
                log.warning(
                    "signalling %s: %s; another try will not change this (%s): next try in "
                    "%.0f min",
                    self.url,
                    reason,
                    REFUSAL_HINTS.get(self.refused, REFUSAL_HINT),
                    delay / 60,
                )
            else:
                delay = backoff_delay(attempt, self._rng)
                attempt += 1
                log.info("signalling %s: %s; reconnecting in %.1f s", self.url, reason, delay)
            await trio.sleep(delay)

    async def _session(self) -> str:
        """One connection, from connect to loss; returns why it ended."""
        self.refused = None
        try:
            async with open_connection(self.url, self.ssl_context) as ws:
                return await self._connected(ws)
        except (
            HandshakeError,
            ConnectionClosed,
            OSError,
            trio.TooSlowError,
            # A failed TLS handshake (untrusted certificate, a wss:// URL for a ws:// server)
            # reaches us as a broken stream; it must end in a retry like any other
            # connection failure, never in the node's nursery.
            trio.BrokenResourceError,
        ) as exc:
            return f"cannot connect: {describe_connect_error(exc)}"

    async def _connected(self, ws: WebSocketConnection) -> str:
        """Admission, then the session; never raises (but Cancelled)."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                welcome = await self._admit(ws)
        except AdmissionRefused as exc:
            if exc.code in PERMANENT_REFUSALS:
                self._refuse(exc.code, f"refused: {exc}")
            return f"refused: {exc}"
        except BadPacket as exc:
            return f"bad message from the server: {exc}"
        except trio.TooSlowError:
            return "no answer from the server in time"
        except ConnectionClosed as exc:
            return f"closed by the server during admission: {exc.reason}"
        local = ws.local.address if isinstance(ws.local, Endpoint) else None
        self.state = ClientState.CONNECTED
        self.connects += 1
        self.overlay = welcome.overlay
        log.info(
            "signalling %s: admitted to overlay %s, %d other members",
            self.url,
            welcome.overlay,
            len(welcome.members),
        )
        # The outbox exists before the controller hears of the connection, so the con_reqs
        # it sends in answer to the welcome are queued, not dropped (and retried 2 s later).
        outbox_send, outbox_receive = trio.open_memory_channel[str](OUTBOX_SIZE)
        self._outbox = outbox_send
        await self.events.send(sig.Connected(welcome, None if local is None else str(local)))
        return await self._run(ws, outbox_send, outbox_receive)

    def _refuse(self, code: str, reason: str) -> str:
        """A permanent refusal: `status` shows the code and the server's reason together at
        once (closing the connection still takes a moment)."""
        self.refused, self.last_error = code, reason
        return reason

    async def _receive(self, ws: WebSocketConnection) -> sig.Message:
        return sig.decode_untrusted(await ws.get_message(), max_size=sig.MAX_SERVER_MESSAGE)

    async def _admit(self, ws: WebSocketConnection) -> sig.Welcome:
        await ws.send_message(sig.encode(sig.Hello(self._cert)))
        msg = await self._receive(ws)
        if isinstance(msg, sig.Error):
            raise AdmissionRefused(msg.code, msg.reason)
        if not isinstance(msg, sig.Challenge):
            raise BadPacket(f"expected a challenge, got {type(msg).__name__}")
        await ws.send_message(sig.encode(sig.answer_challenge(self._private, self._cert, msg)))
        msg = await self._receive(ws)
        if isinstance(msg, sig.Error):
            raise AdmissionRefused(msg.code, msg.reason)
        if not isinstance(msg, sig.Welcome):
            raise BadPacket(f"expected a welcome, got {type(msg).__name__}")
        return msg

    async def _run(
        self,
        ws: WebSocketConnection,
        outbox_send: trio.MemorySendChannel[str],
        outbox_receive: trio.MemoryReceiveChannel[str],
    ) -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, ws, outbox_receive, nursery.cancel_scope)
            try:
                reason = await self._read(ws)
            finally:
                outbox_send.close()
                nursery.cancel_scope.cancel()
        return reason

    async def _read(self, ws: WebSocketConnection) -> str:
        """Pass the server's messages on until the connection ends; return why it did."""
        try:
            while True:
                with trio.move_on_after(PING_TIMEOUT) as idle:
                    msg = await self._receive(ws)
                if idle.cancelled_caught:
                    return f"server silent for {PING_TIMEOUT:.0f} s"
                if isinstance(msg, sig.Pong):
                    continue
                if not isinstance(msg, sig.Join | sig.Leave | sig.ConReq | sig.ConResp | sig.Error):
                    return f"unexpected {type(msg).__name__} from the server"
                if isinstance(msg, sig.Error) and msg.code in PERMANENT_REFUSALS:
                    # Admitted, then refused (our certificate revoked by a reload): as at
                    # admission, the server closes next; we back off for minutes.
                    return self._refuse(msg.code, f"refused: {msg.code}: {msg.reason}")
                await self.events.send(msg)
        except BadPacket as exc:
            return f"bad message from the server: {exc}"
        except ConnectionClosed as exc:
            if exc.reason is None:
                return "connection lost"
            return f"closed by the server ({exc.reason.code} {exc.reason.reason or ''})".strip()

    async def _writer(
        self,
        ws: WebSocketConnection,
        outbox: trio.MemoryReceiveChannel[str],
        scope: trio.CancelScope,
    ) -> None:
        seq = 0
        try:
            while True:
                with trio.move_on_after(PING_INTERVAL):
                    text = await outbox.receive()
                    await ws.send_message(text)
                    continue
                seq += 1
                await ws.send_message(sig.encode(sig.Ping(seq)))
        except (ConnectionClosed, trio.EndOfChannel, trio.ClosedResourceError):
            scope.cancel()


__all__ = [
    "ClientState",
    "SignallingClient",
    "backoff_delay",
    "describe_connect_error",
]
