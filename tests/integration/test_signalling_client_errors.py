"""What the signalling client says and does when it cannot get in: the cause of a failed
connect, and a refusal another try cannot fix retried only every few minutes, at WARNING."""

from __future__ import annotations

import logging
import random
import re
import socket
import time

import pytest
import trio

from ipop_trio import pki
from ipop_trio.proto.signalling import ClientEvent
from ipop_trio.signalling.client import (
    BACKOFF_MAX,
    BACKOFF_MIN,
    REFUSED_DELAY,
    ClientState,
    SignallingClient,
    backoff_delay,
)
from ipop_trio.signalling.server import SignallingServer

NOW = time.time()


def client(url: str, node: pki.NodeBundle) -> SignallingClient:
    assert node.private_key is not None
    send, _ = trio.open_memory_channel[ClientEvent](16)
    return SignallingClient(url, node.private_key, node.cert_der, send, rng=random.Random(1))


def test_backoff_doubles_from_half_a_second_to_thirty() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(BACKOFF_MAX, BACKOFF_MIN * 2**attempt)
        delays = [backoff_delay(attempt, rng) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap


async def test_a_refused_connect_names_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    node = pki.issue_node_bundle(pki.new_ca_bundle(now=NOW), "n1", "10.77.0.2", now=NOW)
    c = client(f"ws://127.0.0.1:{port}/", node)
    with caplog.at_level(logging.INFO, "ipop_trio.signalling.client"):
        async with trio.open_nursery() as nursery:
            await nursery.start(c.serve)
            with trio.fail_after(5):
                while c.last_error is None:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert c.last_error == (
        f"cannot connect: all attempts to connect to 127.0.0.1:{port} failed: Connection refused"
    ), c.last_error
    assert any("reconnecting in" in r.getMessage() for r in caplog.records)


async def test_a_refused_certificate_backs_off_to_minutes_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lab, other = pki.new_ca_bundle("lab", now=NOW), pki.new_ca_bundle("other", now=NOW)
    stranger = pki.issue_node_bundle(other, "n1", "10.77.0.2", now=NOW)
    server = SignallingServer([lab.anchor])
    with caplog.at_level(logging.INFO, "ipop_trio.signalling.client"):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve, "127.0.0.1", 0)
            c = client(f"ws://127.0.0.1:{port}/", stranger)
            await nursery.start(c.serve)
            with trio.fail_after(5):
                while c.state is not ClientState.BACKOFF:
                    await trio.sleep(0.01)
            # Several ordinary backoffs would fit here; a permanent refusal waits minutes.
            with trio.move_on_after(2.0):
                while server.core.counters.get("refused_certificate", 0) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert server.core.counters.get("refused_certificate") == 1
    assert c.refused == "certificate_refused" and c.status()["refused"] == "certificate_refused"
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    text = warned[0].getMessage()
    assert "refused: certificate_refused" in text and "another try will not change this" in text
    low, high = round(0.9 * REFUSED_DELAY / 60), round(1.1 * REFUSED_DELAY / 60)
    minutes = int(re.search(r"next try in (\d+) min", text).group(1))  # type: ignore[union-attr]
    assert low <= minutes <= high, text
