"""The metrics HTTP server (ipop_trio/net/httpd.py) over real loopback TCP: what it answers,
and that garbage, slow, silent and too many clients end their own connection only while the
server keeps serving.

Real sockets cannot run on an autojumping MockClock (its timeouts would fire while the kernel
still carries data), so the timeouts are shortened for these tests and conditions are polled
with a deadline.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from ipop_trio.errors import BadPacket
from ipop_trio.net import httpd

SHORT = 0.3  # READ_TIMEOUT / WRITE_TIMEOUT here
DEADLINE = 5.0  # for anything these tests wait on


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(httpd, "READ_TIMEOUT", SHORT)
    monkeypatch.setattr(httpd, "WRITE_TIMEOUT", SHORT)


def _ok() -> tuple[str, bytes]:
    return "text/plain; version=0.0.4", b"ipop_trio_up 1\n"


@asynccontextmanager
async def serving(
    pages: dict[str, Callable[[], tuple[str, bytes]]] | None = None, *, max_connections: int = 8
) -> AsyncIterator[int]:
    listeners = await httpd.open_listeners("127.0.0.1", 0)
    port = httpd.bound_port(listeners)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: httpd.serve_http(
                listeners,
                pages or {"/metrics": _ok},
                max_connections=max_connections,
                task_status=task_status,
            )
        )
        yield port
        nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data`, read until the server closes."""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            return await read_to_close(stream)


async def read_to_close(stream: trio.SocketStream) -> bytes:
    out = b""
    with trio.fail_after(DEADLINE):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset is a close too
                return out
            if not chunk:
                return out
            out += chunk


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


async def get(port: int, path: str = "/metrics") -> bytes:
    return await exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


async def test_get_metrics_and_the_other_answers() -> None:
    async with serving() as port:
        reply = await get(port)
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Length: 15\r\n" in head and b"Connection: close" in head
        assert body == b"ipop_trio_up 1\n"
        assert (await get(port, "/metrics?x=1")).endswith(b"ipop_trio_up 1\n")
        assert await exchange(port, b"GET /metrics HTTP/1.0\n\n") == reply  # bare LFs too
        head_only = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        assert status_of(head_only) == 200 and head_only.endswith(b"\r\n\r\n")
        assert status_of(await get(port, "/")) == 404
        assert status_of(await get(port, "/metrics/../etc")) == 404
        assert status_of(await exchange(port, b"POST /metrics HTTP/1.1\r\n\r\n")) == 405


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # TLS hello
        b"hello\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",  # not origin-form
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /m\xffetrics HTTP/1.1\r\n\r\n",
        b"\r\n\r\n",
    ],
)
async def test_garbage_gets_400_and_the_server_still_serves(garbage: bytes) -> None:
    async with serving() as port:
        assert status_of(await exchange(port, garbage)) == 400
        assert status_of(await get(port)) == 200


async def test_an_oversized_head_gets_431_without_being_read_to_its_end() -> None:
    async with serving() as port:
        big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (4 * httpd.MAX_HEAD)
        with trio.fail_after(DEADLINE):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                try:
                    await stream.send_all(big)
                except trio.BrokenResourceError:
                    pass  # it may close while we still send: what matters is the answer
                reply = await read_to_close(stream)
        assert reply == b"" or status_of(reply) == 431
        assert status_of(await get(port)) == 200


async def test_a_silent_client_is_closed_after_the_read_timeout() -> None:
    async with serving() as port:
        with trio.fail_after(DEADLINE):
            silent = await trio.open_tcp_stream("127.0.0.1", port)
            partial = await trio.open_tcp_stream("127.0.0.1", port)
            await partial.send_all(b"GET /metrics HTTP/1.1\r\nHost:")  # never finished
            started = trio.current_time()
            # Served meanwhile: the two hold a slot each, not the server.
            assert status_of(await get(port)) == 200
            assert await read_to_close(silent) == b""
            assert await read_to_close(partial) == b""
            assert trio.current_time() - started >= SHORT * 0.9
            await silent.aclose()
            await partial.aclose()


async def test_beyond_max_connections_a_client_is_closed_at_once_and_slots_come_back() -> None:
    async with serving(max_connections=2) as port:
        with trio.fail_after(DEADLINE):
            holders = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            # Both slots are taken once the server accepted them: a third is closed unanswered
            # (poll: the accepts happen in the server's tasks).
            while True:
                reply = await get(port)
                if reply == b"":
                    break
                await trio.sleep(0.01)
            for h in holders:  # they time out and give their slots back
                assert await read_to_close(h) == b""
                await h.aclose()
            assert status_of(await get(port)) == 200


async def test_a_client_that_does_not_read_a_large_reply_is_cut_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(httpd, "WRITE_TIMEOUT", 1.0)  # time for the reader that does read
    body = b"x" * (16 * 1024 * 1024)  # more than the socket buffers of both ends hold

    async with serving({"/metrics": lambda: ("text/plain", body)}, max_connections=1) as port:
        with trio.fail_after(DEADLINE):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
            # It never reads; the server gives up after WRITE_TIMEOUT and frees the one slot.
            while True:
                try:
                    with trio.fail_after(1.0):
                        reply = await get(port)
                except trio.TooSlowError:
                    continue
                if reply:
                    break
                await trio.sleep(0.01)
            assert status_of(reply) == 200 and len(reply) > len(body)
            sock.close()


async def test_a_page_that_fails_is_a_500_and_the_server_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = {"n": 0}

    def flaky() -> tuple[str, bytes]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyError("status changed shape")
        return _ok()

    async with serving({"/metrics": flaky}) as port:
        assert status_of(await get(port)) == 500
        assert status_of(await get(port)) == 200
    assert "rendering /metrics failed" in caplog.text


async def test_a_taken_port_is_an_oserror_for_the_caller_to_name() -> None:
    listeners = await httpd.open_listeners("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            await httpd.open_listeners("127.0.0.1", httpd.bound_port(listeners))
    finally:
        for listener in listeners:
            await listener.aclose()


def test_request_lines() -> None:
    assert httpd.parse_request_untrusted(b"GET /metrics?a=b HTTP/1.1\r\nHost: x") == (
        httpd.Request("GET", "/metrics", "1.1")
    )
    for bad in (b"", b"GET", b"GET /metrics", b"get /metrics HTTP/1.1", b"GET  / HTTP/1.1"):
        with pytest.raises(BadPacket):
            httpd.parse_request_untrusted(bad)
