"""A live `ipop-trio signal` process on loopback against hostile clients.

Each test attacks the server over real TCP, then checks the server process is still running
and still admits and relays for honest nodes. Clients here speak WebSocket by hand where they
must misbehave below the library (raw frames: reserved bits, unknown opcodes, unmasked or
truncated frames, control frames too long, huge declared lengths).
"""

from __future__ import annotations

import base64
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, HandshakeError

from ipop_trio import pki
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.client import open_connection

from .test_signalling_server import NodeId, admit, con_req, receive

NOW = time.time()


@dataclass
class LiveServer:
    proc: subprocess.Popen[str]
    port: int
    ca: pki.CaBundle
    log: Path
    issued: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def node(self) -> NodeId:
        self.issued += 1
        n = self.issued
        address = f"10.77.{n // 250}.{n % 250 + 2}"
        return NodeId(pki.issue_node_bundle(self.ca, f"h{n}", address, now=NOW))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    ca = pki.new_ca_bundle("lab", "10.77.0.0/16", now=NOW)
    work: Path = tmp_path_factory.mktemp("hostile")
    (work / "ca.crt").write_bytes(ca.cert_pem)
    log = (work / "signal.log").open("w")
    argv = ["signal", "--listen", "127.0.0.1:0", "--ca", str(work / "ca.crt")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipop_trio", *argv, "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "ipop-trio signal: listening on 127.0.0.1:PORT"
        assert "listening on" in line, (line, proc.poll())
        yield LiveServer(proc, int(line.rsplit(":", 1)[1]), ca, work / "signal.log")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        log.close()


async def still_serves(live: LiveServer) -> None:
    """The server process runs, admits two fresh nodes and relays a con_req between them."""
    assert live.proc.poll() is None, live.log.read_text()[-3000:]
    a, b = live.node(), live.node()
    async with open_connection(live.url) as wa, open_connection(live.url) as wb:
        await admit(wa, a)
        await admit(wb, b)
        assert isinstance(await receive(wa), sig.Join)
        req = con_req(a, b)
        await wa.send_message(sig.encode(req))
        got = await receive(wb)
        assert isinstance(got, sig.ConReq) and got.request_id == req.request_id


async def test_a_bad_message_then_a_huge_one_closes_that_client_only(live: LiveServer) -> None:
    """The sequence that stopped the server: trio-websocket's reader task raised
    LocalProtocolError (a 1009 close while already closing) into the server's nursery."""
    for _ in range(3):
        with trio.move_on_after(10):
            try:
                async with open_connection(live.url) as ws:
                    await ws.send_message("this is not JSON")
                    await ws.send_message("x" * (10 * 1024 * 1024))
                    await ws.get_message()
            except* ConnectionClosed:
                pass
    await still_serves(live)


# --- raw frames (RFC 6455 §5.2) ------------------------------------------------------------


def ws_frame(opcode: int, payload: bytes, *, fin: bool, rsv: int, masked: bool) -> bytes:
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | opcode & 0xF])
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


HUGE_HEADER = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + os.urandom(4)

frames = st.one_of(
    st.builds(
        ws_frame,
        st.sampled_from([0, 1, 2, 3, 7, 8, 9, 10, 11, 15]),
        st.one_of(
            st.binary(max_size=300),
            st.sampled_from([b"{}", b'{"type": "hello"}', b"\xff\xfe", b"\x03\xe8bye"]),
        ),
        fin=st.booleans(),
        rsv=st.sampled_from([0, 0, 0, 1, 4, 7]),
        masked=st.booleans(),
    ),
    st.just(HUGE_HEADER),
    st.binary(min_size=1, max_size=40),  # not a frame at all
)


async def raw_session(live: LiveServer, chunks: list[bytes], cut: int) -> None:
    """Open the WebSocket by hand, send `chunks` (the last one cut short at `cut`), read
    what comes back for a moment, then drop the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", live.port)
    async with stream:
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (
                "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                f"Sec-WebSocket-Key: {key}\r\n\r\n"
            ).encode()
        )
        data = b"".join(chunks)
        data = data[: len(data) - cut] if cut < len(data) else data
        with trio.move_on_after(0.3):
            try:
                await stream.send_all(data)
                while await stream.receive_some(65536):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(frames, min_size=1, max_size=8), st.integers(0, 20))
async def test_random_frame_sequences_never_stop_the_server(
    live: LiveServer, chunks: list[bytes], cut: int
) -> None:
    await raw_session(live, chunks, cut)
    assert live.proc.poll() is None, live.log.read_text()[-3000:]


async def test_after_the_raw_frames_the_server_still_serves(live: LiveServer) -> None:
    await still_serves(live)


async def test_one_address_holds_at_most_16_unauthenticated_connections(live: LiveServer) -> None:
    """The real `ipop-trio signal` with its default limits: loopback is one source; the 17th
    connection that has not authenticated is refused, and once the holders are gone honest
    nodes from the same address are admitted again."""
    async with AsyncExitStack() as holders:
        for _ in range(16):
            await holders.enter_async_context(open_connection(live.url))
        refused = (OSError, ConnectionClosed, HandshakeError, trio.TooSlowError)
        with pytest.raises(refused):
            async with open_connection(live.url, connect_timeout=1) as ws:
                await ws.get_message()
    with trio.fail_after(10):
        while True:  # the server hears of the holders' closes asynchronously
            try:
                await still_serves(live)
                break
            except* refused:
                await trio.sleep(0.1)
