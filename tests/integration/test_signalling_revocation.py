"""The signalling server on loopback: revoked certificates and addresses or names another key
holds (issue 18 items 2 and 3).

Real trio-websocket connections to a real `SignallingServer` on 127.0.0.1; test clients speak
the protocol by hand (`proto.signalling`), and the node's own `SignallingClient` shows what a
refused node does and says.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterable
from contextlib import AbstractAsyncContextManager

import pytest
import trio
from trio_websocket import WebSocketConnection

from ipop_trio import pki
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.client import ClientState, SignallingClient, open_connection
from ipop_trio.signalling.server import CLOSE_POLICY, SignallingServer

from .test_signalling_server import closed_code, receive
from .test_signalling_server import running as serve_lab

NOW = time.time()
CA = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)


def issue(name: str, address: str, public_key: bytes | None = None) -> pki.NodeBundle:
    return pki.issue_node_bundle(CA, name, address, now=NOW, public_key=public_key)


def running(
    revoked: Iterable[str] = (),
) -> AbstractAsyncContextManager[tuple[SignallingServer, str]]:
    return serve_lab(CA, revoked=revoked)


async def try_admit(ws: WebSocketConnection, node: pki.NodeBundle) -> sig.Message:
    """hello, and auth if challenged: the welcome, or the error that refused us."""
    assert node.private_key is not None
    await ws.send_message(sig.encode(sig.Hello(node.cert_der)))
    msg = await receive(ws)
    if not isinstance(msg, sig.Challenge):
        return msg
    answer = sig.answer_challenge(node.private_key, node.cert_der, msg)
    await ws.send_message(sig.encode(answer))
    return await receive(ws)


async def test_a_second_key_for_a_held_address_is_refused_naming_the_holder() -> None:
    alpha, mallory = issue("alpha", "10.77.0.2"), issue("mallory", "10.77.0.2")
    async with running() as (server, url), open_connection(url) as a:
        assert isinstance(await try_admit(a, alpha), sig.Welcome)
        async with open_connection(url) as m:
            refused = await try_admit(m, mallory)
            assert isinstance(refused, sig.Error) and refused.code == "address_in_use", refused
            assert "10.77.0.2 is held by member alpha" in refused.reason
            assert await closed_code(m) == CLOSE_POLICY
        assert server.core.counters.get("refused_address_in_use") == 1
        assert server.core.stats()["overlays"] == {"lab": 1}
        await a.send_message(sig.encode(sig.Ping(1)))  # alpha heard no join: next is its pong
        assert await receive(a) == sig.Pong(1)
    # Once the holder has gone, the address is free again.
    async with running() as (server, url), open_connection(url) as m:
        assert isinstance(await try_admit(m, mallory), sig.Welcome)


async def test_a_held_ipv6_address_is_refused_though_the_ipv4_one_differs() -> None:
    dual = pki.new_ca_bundle("lab", ["10.77.0.0/24", "fd00:77::/64"], now=NOW)
    alpha = pki.issue_node_bundle(dual, "alpha", ["10.77.0.2", "fd00:77::2"], now=NOW)
    mallory = pki.issue_node_bundle(dual, "mallory", ["10.77.0.3", "fd00:77::2"], now=NOW)
    beta = pki.issue_node_bundle(dual, "beta", ["10.77.0.4", "fd00:77::4"], now=NOW)
    async with serve_lab(dual) as (server, url), open_connection(url) as a:
        assert isinstance(await try_admit(a, alpha), sig.Welcome)
        async with open_connection(url) as m:
            refused = await try_admit(m, mallory)
            assert isinstance(refused, sig.Error) and refused.code == "address_in_use", refused
            assert "fd00:77::2 is held by member alpha" in refused.reason
        async with open_connection(url) as b:
            assert isinstance(await try_admit(b, beta), sig.Welcome)
        assert server.core.counters.get("refused_address_in_use") == 1
    # alpha gone, both its addresses are free: mallory gets in.
    async with serve_lab(dual) as (server, url), open_connection(url) as m:
        assert isinstance(await try_admit(m, mallory), sig.Welcome)


async def test_a_second_key_for_a_held_name_is_refused_and_the_name_freed_on_leave() -> None:
    alpha, twin = issue("alpha", "10.77.0.2"), issue("alpha", "10.77.0.3")
    async with running() as (server, url):
        async with open_connection(url) as a:
            assert isinstance(await try_admit(a, alpha), sig.Welcome)
            async with open_connection(url) as t:
                refused = await try_admit(t, twin)
                assert isinstance(refused, sig.Error) and refused.code == "name_in_use", refused
                assert "name alpha is held by another key (the member at 10.77.0.2)" in (
                    refused.reason
                )
        assert server.core.counters.get("refused_name_in_use") == 1
        with trio.fail_after(5):  # alpha's leave is seen once its socket is gone
            while server.core.stats()["overlays"] != {"lab": 0}:
                await trio.sleep(0.01)
        async with open_connection(url) as t:
            assert isinstance(await try_admit(t, twin), sig.Welcome)


async def test_the_same_key_still_replaces_its_older_connection_and_frees_what_it_held() -> None:
    alpha = issue("alpha", "10.77.0.2")
    renewed = issue("alpha", "10.77.0.9", public_key=alpha.public_key)  # and moved
    moved = dataclasses.replace(renewed, private_key=alpha.private_key)
    newcomer = issue("beta", "10.77.0.2")
    async with running() as (_server, url), open_connection(url) as old:
        assert isinstance(await try_admit(old, alpha), sig.Welcome)
        async with open_connection(url) as new:
            assert isinstance(await try_admit(new, moved), sig.Welcome)
            assert await closed_code(old) == 1000  # "replaced by a newer connection"
            async with open_connection(url) as b:  # 10.77.0.2 is no longer held
                welcome = await try_admit(b, newcomer)
                assert isinstance(welcome, sig.Welcome), welcome
                assert [(m.name, m.address) for m in welcome.members] == [("alpha", "10.77.0.9")]


async def test_a_revoked_certificate_is_refused_at_hello() -> None:
    alpha, beta = issue("alpha", "10.77.0.2"), issue("beta", "10.77.0.3")
    fp = pki.fingerprint(beta.cert_der)
    async with running(revoked={fp}) as (server, url):
        async with open_connection(url) as b:
            refused = await try_admit(b, beta)
            assert isinstance(refused, sig.Error) and refused.code == "certificate_revoked"
            assert fp in refused.reason and "revoked" in refused.reason
            assert await closed_code(b) == CLOSE_POLICY
        async with open_connection(url) as a:  # the others are unaffected
            assert isinstance(await try_admit(a, alpha), sig.Welcome)
        assert server.core.counters.get("refused_revoked") == 1
        assert server.core.stats()["revoked"] == 1


async def test_an_admitted_certificate_is_dropped_when_a_reload_revokes_it() -> None:
    alpha, beta = issue("alpha", "10.77.0.2"), issue("beta", "10.77.0.3")
    async with running() as (server, url), open_connection(url) as a:
        assert isinstance(await try_admit(a, alpha), sig.Welcome)
        async with open_connection(url) as b:
            assert isinstance(await try_admit(b, beta), sig.Welcome)
            join = await receive(a)
            assert isinstance(join, sig.Join) and join.member.name == "beta"
            assert server.set_revoked({pki.fingerprint(beta.cert_der)}) == ["beta"]
            why = await receive(b)
            assert isinstance(why, sig.Error) and why.code == "certificate_revoked", why
            assert await closed_code(b) == CLOSE_POLICY
            leave = await receive(a)  # announced to the others
            assert isinstance(leave, sig.Leave) and leave.name == "beta"
        assert server.core.counters.get("closed_revoked") == 1
        async with open_connection(url) as b:  # and refused from then on
            refused = await try_admit(b, beta)
            assert isinstance(refused, sig.Error) and refused.code == "certificate_revoked"
        # A reload that no longer names it lets it in again.
        assert server.set_revoked(frozenset()) == []
        async with open_connection(url) as b:
            assert isinstance(await try_admit(b, beta), sig.Welcome)


def client(url: str, node: pki.NodeBundle) -> SignallingClient:
    assert node.private_key is not None
    send, _ = trio.open_memory_channel[sig.ClientEvent](64)  # never read: never full here
    return SignallingClient(url, node.private_key, node.cert_der, send, rng=random.Random(1))


async def test_the_node_learns_why_it_was_dropped_and_backs_off_for_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    beta = issue("beta", "10.77.0.3")
    with caplog.at_level(logging.INFO, "ipop_trio.signalling.client"):
        async with running() as (server, url), trio.open_nursery() as nursery:
            c = client(url, beta)
            await nursery.start(c.serve)
            with trio.fail_after(5):
                while c.state is not ClientState.CONNECTED:
                    await trio.sleep(0.01)
            server.set_revoked({pki.fingerprint(beta.cert_der)})
            with trio.fail_after(5):
                while c.state is not ClientState.BACKOFF:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    status = c.status()
    assert status["refused"] == "certificate_revoked"
    assert str(status["last_error"]).startswith("refused: certificate_revoked: certificate sha256")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "certificate_revoked" in warning and "revocation list" in warning
    assert "next try in" in warning and "min" in warning


async def test_a_node_whose_address_is_held_is_told_by_whom(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alpha, mallory = issue("alpha", "10.77.0.2"), issue("mallory", "10.77.0.2")
    with caplog.at_level(logging.INFO, "ipop_trio.signalling.client"):
        async with running() as (_server, url), open_connection(url) as a:
            assert isinstance(await try_admit(a, alpha), sig.Welcome)
            async with trio.open_nursery() as nursery:
                c = client(url, mallory)
                await nursery.start(c.serve)
                with trio.fail_after(5):
                    while c.state is not ClientState.BACKOFF:
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert c.refused == "address_in_use"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "held by member alpha" in warning and "next try in" in warning
