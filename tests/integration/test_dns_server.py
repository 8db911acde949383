"""The [dns] server driver (net/names.py) over loopback sockets: UDP and TCP answers, counted
drops, and clients that misbehave (garbage, stalls, too many connections) never end it."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator

import dns.message
import dns.rcode
import pytest
import trio
import trio.testing

from ipop_trio.net.names import TCP_CLIENTS, TCP_IDLE, DnsSockets, serve_dns
from ipop_trio.proto import names
from ipop_trio.stats import Stats
from tests.unit.conftest import PKI_NOW

from ..unit import _lab_identities as ids

Server = tuple[DnsSockets, Stats]


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    zone = names.Zone.of("lab", [ids.alice().bundle.identity, ids.bob().bundle.identity], PKI_NOW)
    socks = DnsSockets("127.0.0.1", 0)
    stats = Stats()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                serve_dns, socks, lambda d, tcp: names.answer_untrusted(d, zone, tcp=tcp), stats
            )
            yield socks, stats
            nursery.cancel_scope.cancel()
    finally:
        socks.close()


def query(name: str, qid: int = 7) -> bytes:
    return dns.message.make_query(name, "A", id=qid).to_wire()


async def udp_ask(port: int, data: bytes) -> dns.message.Message:
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", port))
        await sock.send(data)
        with trio.fail_after(5):
            return dns.message.from_wire(await sock.recv(65535))


async def tcp_exchange(stream: trio.SocketStream, data: bytes) -> dns.message.Message | None:
    await stream.send_all(struct.pack("!H", len(data)) + data)
    buf = b""
    with trio.fail_after(5):
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None  # the server closed the connection
            buf += chunk
    return dns.message.from_wire(buf[2:])


async def test_udp_answers_and_counts(server: Server) -> None:
    socks, stats = server
    reply = await udp_ask(socks.port, query("bob.lab."))
    assert [rd.to_text() for rd in reply.answer[0]] == ["10.77.0.3"]
    assert (await udp_ask(socks.port, query("nobody.lab."))).rcode() == dns.rcode.NXDOMAIN
    assert (await udp_ask(socks.port, query("example.com."))).rcode() == dns.rcode.REFUSED
    assert stats.events == {"dns_answer": 1, "dns_nxdomain": 1, "dns_refused": 1}


async def test_garbage_and_responses_are_counted_drops_and_the_server_goes_on(
    server: Server,
) -> None:
    socks, stats = server
    response = dns.message.make_response(dns.message.make_query("bob.lab.", "A")).to_wire()
    with trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM) as sock:
        await sock.connect(("127.0.0.1", socks.port))
        for junk in (b"", b"\xff" * 3, response, bytes(range(256)) * 4):
            await sock.send(junk)
        await sock.send(query("alice.lab.", qid=99))
        with trio.fail_after(5):
            reply = dns.message.from_wire(await sock.recv(65535))
    assert reply.id == 99  # the only reply: nothing was sent back to the four before it
    assert stats.drops == {"dns_malformed": 2, "dns_response": 1, "dns_questions": 1}


async def test_tcp_carries_several_queries_and_a_bad_one_closes_it(server: Server) -> None:
    socks, stats = server
    stream = await trio.open_tcp_stream("127.0.0.1", socks.port)
    async with stream:
        first = await tcp_exchange(stream, query("alice.lab.", qid=1))
        second = await tcp_exchange(stream, query("bob.lab.", qid=2))
        assert first is not None and first.id == 1 and second is not None and second.id == 2
        assert await tcp_exchange(stream, b"\x00\x01garbage") is None
    assert stats.drops == {"dns_malformed": 1}


async def test_a_stalled_tcp_client_is_closed_after_the_idle_time(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    socks, _ = server
    stream = await trio.open_tcp_stream("127.0.0.1", socks.port)
    async with stream:
        await stream.send_all(b"\x00")  # half a length prefix, then nothing
        start = trio.current_time()
        with trio.fail_after(TCP_IDLE * 3):
            assert await stream.receive_some(10) == b""
        assert trio.current_time() - start >= TCP_IDLE


async def test_tcp_clients_beyond_the_cap_are_closed_at_once(server: Server) -> None:
    socks, stats = server
    held = [await trio.open_tcp_stream("127.0.0.1", socks.port) for _ in range(TCP_CLIENTS)]
    try:
        # a query on each proves the server has taken them all
        for i, stream in enumerate(held):
            assert await tcp_exchange(stream, query("bob.lab.", qid=i)) is not None
        extra = await trio.open_tcp_stream("127.0.0.1", socks.port)
        async with extra:
            with trio.fail_after(5):
                assert await extra.receive_some(10) == b""
        assert stats.drops == {"dns_tcp_busy": 1}
    finally:
        for stream in held:
            await stream.aclose()
    # the slots come back: a new client is served
    with trio.fail_after(5):
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", socks.port)
            async with stream:
                try:
                    if await tcp_exchange(stream, query("bob.lab.")) is not None:
                        break
                except trio.BrokenResourceError:  # still refused: reset while we sent
                    pass


def test_an_address_in_use_says_which_socket() -> None:
    first = DnsSockets("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=rf"cannot bind UDP 127.0.0.1:{first.port}: "):
            DnsSockets("127.0.0.1", first.port)
    finally:
        first.close()
