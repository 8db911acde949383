"""The signalling server on loopback: admission, membership order, relay, isolation, limits.

Real trio-websocket connections to a real `SignallingServer` on 127.0.0.1 (no root). Test
clients speak the protocol by hand with `proto.signalling`, so a test can also misbehave.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from ipop_trio import pki
from ipop_trio.proto import signalling as sig
from ipop_trio.proto.cert import TrustAnchor
from ipop_trio.signalling.client import open_connection
from ipop_trio.signalling.server import Limits, SignallingServer

NOW = time.time()


@dataclass(frozen=True)
class NodeId:
    bundle: pki.NodeBundle

    @property
    def key(self) -> bytes:
        return self.bundle.public_key

    @property
    def private(self) -> bytes:
        assert self.bundle.private_key is not None
        return self.bundle.private_key


@pytest.fixture(scope="module")
def lab_ca() -> pki.CaBundle:
    return pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)


@pytest.fixture(scope="module")
def other_ca() -> pki.CaBundle:
    return pki.new_ca_bundle("other", "10.88.0.0/24", now=NOW)


@pytest.fixture(scope="module")
def nodes(lab_ca: pki.CaBundle) -> list[NodeId]:
    return [
        NodeId(pki.issue_node_bundle(lab_ca, f"n{i}", f"10.77.0.{i + 2}", now=NOW))
        for i in range(50)
    ]


@asynccontextmanager
async def running(
    *anchors: pki.CaBundle, limits: Limits | None = None, revoked: Iterable[str] = ()
) -> AsyncIterator[tuple[SignallingServer, str]]:
    server = SignallingServer([a.anchor for a in anchors], limits, revoked=revoked)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        yield server, f"ws://127.0.0.1:{port}/"
        nursery.cancel_scope.cancel()


async def receive(ws: WebSocketConnection, timeout: float = 5.0) -> sig.Message:
    with trio.fail_after(timeout):
        return sig.decode_untrusted(await ws.get_message(), max_size=sig.MAX_SERVER_MESSAGE)


async def admit(ws: WebSocketConnection, node: NodeId) -> sig.Welcome:
    await ws.send_message(sig.encode(sig.Hello(node.bundle.cert_der)))
    challenge = await receive(ws)
    assert isinstance(challenge, sig.Challenge), challenge
    answer = sig.answer_challenge(node.private, node.bundle.cert_der, challenge)
    await ws.send_message(sig.encode(answer))
    welcome = await receive(ws)
    assert isinstance(welcome, sig.Welcome), welcome
    return welcome


@asynccontextmanager
async def admitted(ws: WebSocketConnection, node: NodeId) -> AsyncIterator[sig.Welcome]:
    yield await admit(ws, node)


async def closed_code(ws: WebSocketConnection, timeout: float = 10.0) -> int | None:
    """Read until the server closes the connection; return its close code."""
    with trio.fail_after(timeout):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return None if exc.reason is None else exc.reason.code


def con_req(src: NodeId, dst: NodeId, overlay: str = "lab") -> sig.ConReq:
    return sig.ConReq(
        sender=src.key,
        to=dst.key,
        overlay=overlay,
        request_id=secrets.token_hex(4),
        candidates=(sig.Candidate("host", "192.0.2.1", 4600),),
        cert=src.bundle.cert_der,
        groups=(),
        policy="always",
    )


async def test_fifty_clients_join_and_leave_and_see_membership_in_order(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    async with running(lab_ca) as (server, url), trio.open_nursery() as nursery:
        # Each client joins in turn, then records every event until told to stop.
        seen: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(nodes))}
        news = {i: trio.Event() for i in range(len(nodes))}  # set when seen[i] grows
        welcomes: dict[int, sig.Welcome] = {}
        leave_now = {i: trio.Event() for i in range(len(nodes))}
        left = {i: trio.Event() for i in range(len(nodes))}

        async def client(i: int, *, task_status: trio.TaskStatus[None]) -> None:
            async with open_connection(url) as ws:
                welcomes[i] = await admit(ws, nodes[i])
                task_status.started()
                async with trio.open_nursery() as inner:

                    async def record() -> None:
                        while True:
                            msg = await ws.get_message()
                            ev = sig.decode_untrusted(msg, max_size=sig.MAX_SERVER_MESSAGE)
                            if isinstance(ev, sig.Join):
                                seen[i].append(("join", ev.member.name))
                            elif isinstance(ev, sig.Leave):
                                seen[i].append(("leave", ev.name))
                            news[i].set()
                            news[i] = trio.Event()

                    inner.start_soon(record)
                    await leave_now[i].wait()
                    inner.cancel_scope.cancel()
            left[i].set()

        for i in range(len(nodes)):
            await nursery.start(client, i)
        assert server.core.stats()["overlays"] == {"lab": 50}
        for i, welcome in welcomes.items():
            assert [m.name for m in welcome.members] == [f"n{j}" for j in range(i)]
            assert welcome.you.key == nodes[i].key and welcome.overlay == "lab"

        # The first 25 leave, one after the other.
        for i in range(25):
            leave_now[i].set()
            await left[i].wait()
        # Every survivor saw exactly: the later joins, then the leaves, in server order.
        for i in range(25, 50):
            expected = [("join", f"n{j}") for j in range(i + 1, 50)]
            expected += [("leave", f"n{j}") for j in range(25)]
            with trio.fail_after(5):
                while len(seen[i]) < len(expected):
                    await news[i].wait()
            assert seen[i] == expected, i
        for i in range(25, 50):
            leave_now[i].set()
        with trio.fail_after(5):
            for i in range(25, 50):
                await left[i].wait()
        # Nothing signals the server's tables, and real sockets cannot run on an autojumping
        # MockClock (its timeouts would fire while the kernel still carries data): poll.
        with trio.fail_after(5):
            while server.core.stats()["overlays"] != {"lab": 0}:
                await trio.sleep(0.01)
        assert server.core.stats()["connections"] == 0


async def test_con_req_and_con_resp_are_relayed_within_an_overlay_only(
    lab_ca: pki.CaBundle, other_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    stranger = NodeId(pki.issue_node_bundle(other_ca, "stranger", "10.88.0.2", now=NOW))
    async with (
        running(lab_ca, other_ca) as (_, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as wx,
    ):
        a, b = nodes[0], nodes[1]
        await admit(wa, a)
        await admit(wb, b)
        welcome_x = await admit(wx, stranger)
        assert welcome_x.overlay == "other" and welcome_x.members == ()
        assert await receive(wa) == sig.Join(sig.Member(b.key, "n1", "10.77.0.3"))

        req = con_req(a, b)
        await wa.send_message(sig.encode(req))
        assert await receive(wb) == req
        req = con_req(b, a)
        resp = sig.ConResp(**{f.name: getattr(req, f.name) for f in dataclasses.fields(req)})
        await wb.send_message(sig.encode(resp))
        assert await receive(wa) == resp

        # Across overlays: the server answers "unknown_peer" and relays nothing.
        cross = con_req(stranger, a, overlay="other")
        await wx.send_message(sig.encode(cross))
        err = await receive(wx)
        assert isinstance(err, sig.Error) and err.code == "unknown_peer"
        assert err.request_id == cross.request_id
        # A client cannot speak for someone else: the connection is cut.
        forged = con_req(a, b)
        await wx.send_message(sig.encode(forged))
        assert await closed_code(wx) == 1008
        # a and b still work.
        await wa.send_message(sig.encode(sig.Ping(7)))
        assert await receive(wa) == sig.Pong(7)


async def test_a_certificate_from_another_ca_is_refused(lab_ca: pki.CaBundle) -> None:
    # Another CA with the same overlay name and network: only the signature tells them apart.
    impostor = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    foreign = NodeId(pki.issue_node_bundle(impostor, "mallory", "10.77.0.66", now=NOW))
    async with running(lab_ca) as (server, url), open_connection(url) as ws:
        await ws.send_message(sig.encode(sig.Hello(foreign.bundle.cert_der)))
        err = await receive(ws)
        assert isinstance(err, sig.Error) and err.code == "certificate_refused", err
        assert await closed_code(ws) == 1008
        assert server.core.counters.get("refused_certificate") == 1
        assert server.core.stats()["overlays"] == {"lab": 0}


async def test_two_cas_of_one_overlay_admit_both_during_a_rotation(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    """`signal --ca old --ca new`: nodes on either CA join ONE overlay and reach each other;
    a third CA of the same name is still refused."""
    new_ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    renewed = NodeId(pki.issue_node_bundle(new_ca, "renewed", "10.77.0.70", now=NOW))
    impostor = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    mallory = NodeId(pki.issue_node_bundle(impostor, "mallory", "10.77.0.66", now=NOW))
    async with (
        running(lab_ca, new_ca) as (server, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as wm,
    ):
        old = nodes[0]
        await admit(wa, old)
        welcome = await admit(wb, renewed)
        assert welcome.overlay == "lab"
        assert welcome.members == (sig.Member(old.key, "n0", "10.77.0.2"),)
        assert await receive(wa) == sig.Join(sig.Member(renewed.key, "renewed", "10.77.0.70"))
        req = con_req(renewed, old)
        await wb.send_message(sig.encode(req))
        assert await receive(wa) == req
        assert server.core.stats()["overlays"] == {"lab": 2}

        await wm.send_message(sig.encode(sig.Hello(mallory.bundle.cert_der)))
        err = await receive(wm)
        assert isinstance(err, sig.Error) and err.code == "certificate_refused", err
        assert "not signed by any trusted CA of overlay 'lab'" in err.reason


async def test_removing_the_old_ca_on_reload_drops_its_members_only(
    lab_ca: pki.CaBundle, other_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    """The end of a rotation without a restart (SIGHUP re-reads --ca): a member on the CA
    just removed is told why and dropped, its leave announced; one on the new CA stays, and
    an overlay no longer served loses its members."""
    new_ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    renewed = NodeId(pki.issue_node_bundle(new_ca, "renewed", "10.77.0.70", now=NOW))
    elsewhere = NodeId(pki.issue_node_bundle(other_ca, "far", "10.88.0.9", now=NOW))
    async with (
        running(lab_ca, new_ca, other_ca) as (server, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as wc,
    ):
        old = nodes[0]
        await admit(wa, old)
        await admit(wb, renewed)
        assert await receive(wa) == sig.Join(sig.Member(renewed.key, "renewed", "10.77.0.70"))
        await admit(wc, elsewhere)
        dropped = server.set_anchors([TrustAnchor.bundle([new_ca.anchor])])
        assert sorted(dropped) == ["far", "n0"]
        for ws in (wa, wc):
            err = await receive(ws)
            assert isinstance(err, sig.Error) and err.code == "certificate_refused", err
        assert "not signed by" in err.reason or "not served here" in err.reason
        assert await receive(wb) == sig.Leave(old.key, "n0")
        assert server.core.stats()["overlays"] == {"lab": 1}
        # The old CA's nodes are refused from now on; the new CA's still get in.
        async with open_connection(url) as again:
            await again.send_message(sig.encode(sig.Hello(old.bundle.cert_der)))
            err = await receive(again)
            assert isinstance(err, sig.Error) and err.code == "certificate_refused", err


@pytest.mark.parametrize("wrong", ["random proof", "someone else's key"])
async def test_a_wrong_challenge_answer_is_refused(
    lab_ca: pki.CaBundle, nodes: list[NodeId], wrong: str
) -> None:
    victim, thief = nodes[0], nodes[1]
    async with running(lab_ca) as (server, url), open_connection(url) as ws:
        # The thief presents the victim's (public) certificate but holds only its own key.
        await ws.send_message(sig.encode(sig.Hello(victim.bundle.cert_der)))
        challenge = await receive(ws)
        assert isinstance(challenge, sig.Challenge)
        if wrong == "random proof":
            answer = sig.Auth(secrets.token_bytes(32))
        else:
            answer = sig.answer_challenge(thief.private, victim.bundle.cert_der, challenge)
        await ws.send_message(sig.encode(answer))
        err = await receive(ws)
        assert isinstance(err, sig.Error) and err.code == "auth_failed"
        assert await closed_code(ws) == 1008
        assert server.core.stats()["overlays"] == {"lab": 0}


async def _pair_still_works(
    wa: WebSocketConnection, wb: WebSocketConnection, a: NodeId, b: NodeId
) -> None:
    """a's con_req reaches b (past whatever else b still has to read from earlier steps)."""
    req = con_req(a, b)
    await wa.send_message(sig.encode(req))
    with trio.fail_after(10):
        while (msg := await receive(wb)) != req:
            assert not isinstance(msg, sig.ConReq) or msg.sender != a.key, msg


async def test_a_flooding_client_is_cut_off_and_the_others_keep_working(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    a, b, flooder = nodes[0], nodes[1], nodes[2]
    async with (
        running(lab_ca) as (server, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as wf,
    ):
        await admit(wa, a)
        await admit(wb, b)
        await admit(wf, flooder)
        sent = 0
        with trio.move_on_after(10):
            try:
                while True:  # as fast as the socket takes them, far above the rate limit
                    await wf.send_message(sig.encode(con_req(flooder, a)))
                    sent += 1
            except ConnectionClosed:
                pass
        assert await closed_code(wf) == 1008
        assert server.core.counters.get("closed_rate") == 1
        assert sent > server.limits.burst
        # a got at most the burst of the flood, then the flooder's leave; the pair works.
        await _pair_still_works(wa, wb, a, b)
        await _pair_still_works(wb, wa, b, a)


async def test_a_ten_megabyte_frame_is_cut_off_and_the_others_keep_working(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    a, b, big = nodes[0], nodes[1], nodes[2]
    async with (
        running(lab_ca) as (server, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as wbig,
    ):
        await admit(wa, a)
        await admit(wb, b)
        await admit(wbig, big)
        with trio.move_on_after(10), pytest.raises(ConnectionClosed):
            await wbig.send_message("x" * (10 * 1024 * 1024))
            await wbig.get_message()  # (if the whole frame went out: wait for the close)
        assert wbig.closed is not None and wbig.closed.code == 1009
        with trio.fail_after(5):
            while server.core.stats()["overlays"] != {"lab": 2}:
                await trio.sleep(0.01)
        assert server.core.counters.get("closed_too_big") == 1
        await _pair_still_works(wa, wb, a, b)


async def test_a_client_that_never_authenticates_is_dropped(lab_ca: pki.CaBundle) -> None:
    limits = Limits(auth_timeout=0.5)
    async with running(lab_ca, limits=limits) as (_, url), open_connection(url) as ws:
        assert await closed_code(ws, timeout=5) == 1008


async def test_a_client_that_stops_reading_is_disconnected_without_stalling_others(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    # Small queue, quick send timeout, no rate limit: the senders push far more than the
    # socket buffers hold towards a client whose library queue (1 message) is never read.
    limits = Limits(max_queued_bytes=64 * 1024, send_timeout=0.5, rate=1e6, burst=1e6)
    a, b, slow = nodes[0], nodes[1], nodes[2]
    async with (
        running(lab_ca, limits=limits) as (server, url),
        open_connection(url) as wa,
        open_connection(url) as wb,
        open_connection(url) as ws,
    ):
        await admit(wa, a)
        await admit(wb, b)
        await admit(ws, slow)
        with trio.fail_after(30):
            while server.core.stats()["overlays"]["lab"] == 3:
                for _ in range(200):
                    await wa.send_message(sig.encode(con_req(a, slow)))
                await trio.sleep(0)
        counters = server.core.counters
        assert counters.get("closed_slow", 0) + counters.get("closed_send_timeout", 0) == 1
        await _pair_still_works(wb, wa, b, a)


async def test_unauthenticated_holders_are_capped_per_source_and_admitted_nodes_free_slots(
    lab_ca: pki.CaBundle, nodes: list[NodeId]
) -> None:
    # Loopback is one source: with 2 pre-auth slots per source, a third connection that has
    # not authenticated is refused at once (its socket closed before any WebSocket opening).
    limits = Limits(max_preauth_per_source=2)
    async with running(lab_ca, limits=limits) as (server, url):
        async with open_connection(url) as h1, open_connection(url) as h2:
            # (trio-websocket's client does not notice the server's EOF during the opening
            # handshake: it waits for its connect timeout, then the real client backs off.)
            refused = (OSError, ConnectionClosed, HandshakeError, trio.TooSlowError)
            with pytest.raises(refused):
                async with open_connection(url, connect_timeout=1) as h3:
                    await h3.get_message()
            assert server.core.counters.get("refused_preauth_source") == 1
            del h1, h2
        with trio.fail_after(5):
            while server.core.preauth:
                await trio.sleep(0.01)
        # Admitted nodes hold no pre-auth slot: three members, and still room for two more.
        async with (
            open_connection(url) as wa,
            admitted(wa, nodes[0]),
            open_connection(url) as wb,
            admitted(wb, nodes[1]),
            open_connection(url) as wc,
            admitted(wc, nodes[2]),
            open_connection(url) as h1,
            open_connection(url) as h2,
        ):
            await admit(h2, nodes[3])
            assert server.core.stats()["overlays"] == {"lab": 4}
            del h1
        assert server.core.counters.get("refused_preauth_source") == 1
