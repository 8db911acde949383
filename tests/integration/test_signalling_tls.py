"""Signalling over wss:// on loopback: admission and membership through TLS, and refusals.

A throwaway TLS CA and a server certificate for IP 127.0.0.1 are written to `tmp_path`. The
server's context is built as `ipop-trio signal --tls-cert/--tls-key` builds it (cli.py), a
node's as `[signalling] ca` makes `node._run_signalling` build it; the nodes are real
`SignallingClient`s. No root, no namespaces.
"""

from __future__ import annotations

import datetime
import ipaddress
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ipop_trio import pki
from ipop_trio.proto import signalling as sig
from ipop_trio.proto.signalling import ClientEvent, Connected
from ipop_trio.signalling.client import CONNECT_TIMEOUT, ClientState, SignallingClient
from ipop_trio.signalling.server import SignallingServer

NOW = time.time()
DEADLINE = 10.0  # for every wait that should succeed (connect + admission take milliseconds)


# --- A throwaway TLS PKI (unrelated to the overlay CAs: it only authenticates the server) --


@dataclass(frozen=True)
class TlsFiles:
    ca: Path  # the root a client trusts (PEM)
    cert: Path  # the server's certificate chain (PEM)
    key: Path  # the server's private key (PEM)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def make_tls_files(directory: Path, label: str) -> TlsFiles:
    """A CA and, under it, a server certificate whose SAN is IP 127.0.0.1."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name(f"{label} test TLS CA"))
        .issuer_name(_name(f"{label} test TLS CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(pki.CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = TlsFiles(
        directory / f"{label}-ca.pem", directory / f"{label}.crt", directory / f"{label}.key"
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path, "server")


@pytest.fixture
def stranger_tls(tmp_path: Path) -> TlsFiles:
    return make_tls_files(tmp_path, "stranger")


def server_context(files: TlsFiles) -> ssl.SSLContext:
    # As cli.cmd_signal builds it from --tls-cert/--tls-key (it has no helper to call).
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    return context


def node_context(cafile: Path | None) -> ssl.SSLContext:
    # As node._run_signalling builds it from `[signalling] ca` (None: the system's roots).
    return ssl.create_default_context(cafile=None if cafile is None else str(cafile))


# --- The overlay: its CA and nodes ------------------------------------------------------------


@pytest.fixture(scope="module")
def lab_ca() -> pki.CaBundle:
    return pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)


@pytest.fixture(scope="module")
def nodes(lab_ca: pki.CaBundle) -> list[pki.NodeBundle]:
    return [pki.issue_node_bundle(lab_ca, f"n{i}", f"10.77.0.{i + 2}", now=NOW) for i in range(3)]


@asynccontextmanager
async def running_tls(
    lab_ca: pki.CaBundle, files: TlsFiles | None
) -> AsyncIterator[tuple[SignallingServer, int]]:
    """The server on 127.0.0.1, wss:// with `files`, plain ws:// without."""
    server = SignallingServer([lab_ca.anchor])
    context = None if files is None else server_context(files)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(server.serve, "127.0.0.1", 0, ssl_context=context))
        yield server, port
        nursery.cancel_scope.cancel()


@dataclass
class Node:
    client: SignallingClient
    events: trio.MemoryReceiveChannel[ClientEvent]

    async def next_event(self) -> ClientEvent:
        with trio.fail_after(DEADLINE):
            return await self.events.receive()


async def start_client(
    nursery: trio.Nursery, url: str, node: pki.NodeBundle, context: ssl.SSLContext | None
) -> Node:
    assert node.private_key is not None
    send, receive = trio.open_memory_channel[ClientEvent](16)
    client = SignallingClient(
        url, node.private_key, node.cert_der, send, ssl_context=context, rng=random.Random(1)
    )
    await nursery.start(client.serve)
    return Node(client, receive)


async def eventually(condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Wait for a condition nothing signals (a client's state, the server's tables)."""
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)


def member(node: pki.NodeBundle) -> sig.Member:
    return sig.Member(node.public_key, node.name, str(node.address))


# --- Tests ----------------------------------------------------------------------------------


async def test_nodes_are_admitted_and_see_each_other_over_wss(
    lab_ca: pki.CaBundle, nodes: list[pki.NodeBundle], tls: TlsFiles
) -> None:
    async with running_tls(lab_ca, tls) as (server, port), trio.open_nursery() as nursery:
        url = f"wss://127.0.0.1:{port}/"
        a = await start_client(nursery, url, nodes[0], node_context(tls.ca))
        first = await a.next_event()
        assert isinstance(first, Connected), first
        assert first.welcome == sig.Welcome("lab", member(nodes[0]), ())
        assert first.local == "127.0.0.1"
        assert a.client.state is ClientState.CONNECTED and a.client.overlay == "lab"

        b = await start_client(nursery, url, nodes[1], node_context(tls.ca))
        second = await b.next_event()
        assert isinstance(second, Connected), second
        assert second.welcome == sig.Welcome("lab", member(nodes[1]), (member(nodes[0]),))
        assert await a.next_event() == sig.Join(member(nodes[1]))
        assert server.core.stats()["overlays"] == {"lab": 2}

        # And back: the relay works through TLS in both directions.
        req = sig.ConReq(
            sender=nodes[1].public_key,
            to=nodes[0].public_key,
            overlay="lab",
            request_id="tls1",
            candidates=(sig.Candidate("host", "127.0.0.1", 4600),),
            cert=nodes[1].cert_der,
            groups=(),
            policy="always",
        )
        assert b.client.send(req)
        assert await a.next_event() == req
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("trust", ["system roots", "another CA"])
async def test_a_node_that_does_not_trust_the_server_certificate_is_never_admitted(
    lab_ca: pki.CaBundle,
    nodes: list[pki.NodeBundle],
    tls: TlsFiles,
    stranger_tls: TlsFiles,
    trust: str,
) -> None:
    context = node_context(None if trust == "system roots" else stranger_tls.ca)
    async with running_tls(lab_ca, tls) as (server, port), trio.open_nursery() as nursery:
        url = f"wss://127.0.0.1:{port}/"
        node = await start_client(nursery, url, nodes[0], context)
        # The client keeps trying (backoff) and says why it cannot get in.
        await eventually(lambda: node.client.last_error is not None)
        assert node.client.state in (ClientState.BACKOFF, ClientState.CONNECTING)
        assert "certificate verify failed" in (node.client.last_error or "").lower(), (
            node.client.status()
        )
        with trio.move_on_after(1.0):  # a few more attempts (backoff starts at 0.25-0.5 s)
            event = await node.events.receive()
            pytest.fail(f"an untrusting client got {event!r}")
        assert node.client.connects == 0
        stats = server.core.stats()
        assert stats["overlays"] == {"lab": 0}
        assert "admitted" not in server.core.counters
        nursery.cancel_scope.cancel()


async def test_a_plain_ws_client_is_not_admitted_on_the_tls_port(
    lab_ca: pki.CaBundle, nodes: list[pki.NodeBundle], tls: TlsFiles
) -> None:
    async with running_tls(lab_ca, tls) as (server, port), trio.open_nursery() as nursery:
        plain = await start_client(nursery, f"ws://127.0.0.1:{port}/", nodes[0], None)
        # While the plain client is stuck in its handshake the server serves others: a TLS
        # node gets in, and only it.
        good = await start_client(
            nursery, f"wss://127.0.0.1:{port}/", nodes[1], node_context(tls.ca)
        )
        welcome = await good.next_event()
        assert isinstance(welcome, Connected), welcome
        assert welcome.welcome == sig.Welcome("lab", member(nodes[1]), ())
        # The plain client gives up on its own (the server never answers its HTTP upgrade).
        await eventually(lambda: plain.client.last_error is not None, CONNECT_TIMEOUT + 5)
        assert (plain.client.last_error or "").startswith("cannot connect"), plain.client.status()
        assert plain.client.connects == 0
        assert plain.events.statistics().current_buffer_used == 0
        assert server.core.stats()["overlays"] == {"lab": 1}
        assert server.core.counters == {"admitted": 1}
        nursery.cancel_scope.cancel()


async def test_a_wss_client_against_a_plain_ws_server_keeps_retrying(
    lab_ca: pki.CaBundle, nodes: list[pki.NodeBundle], tls: TlsFiles
) -> None:
    # The other misconfiguration: the node says wss://, the server runs without --tls-cert.
    async with running_tls(lab_ca, None) as (server, port), trio.open_nursery() as nursery:
        node = await start_client(
            nursery, f"wss://127.0.0.1:{port}/", nodes[0], node_context(tls.ca)
        )
        await eventually(lambda: node.client.last_error is not None)
        assert (node.client.last_error or "").startswith("cannot connect"), node.client.status()
        with trio.move_on_after(1.0):  # a few more attempts, none admitted
            event = await node.events.receive()
            pytest.fail(f"a wss client got {event!r} from a ws server")
        assert node.client.connects == 0
        assert server.core.stats()["overlays"] == {"lab": 0}
        nursery.cancel_scope.cancel()
