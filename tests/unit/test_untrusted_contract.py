"""The one contract of `*_untrusted`: whatever bytes come in, only BadPacket comes out.

Every function and method the package names `*_untrusted` is listed in ENTRY_POINTS (the
first test fails when one is added without being listed here), and each is fed random bytes
and valid-looking prefixes of every datagram kind. One that never raises is not named
`*_untrusted` but for what it returns (`IceAgent.receive`, `ServerCore.receive`, ...).
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket
from ipop_trio.net import httpd
from ipop_trio.proto import cookie, handshake, names, probe, signalling, stun, turn
from ipop_trio.proto.ice import Candidate, SrflxGatherer, host_candidate
from ipop_trio.proto.link import Link
from ipop_trio.proto.offload import Reassembler
from ipop_trio.proto.session import Cipher, Session

from . import _lab_identities as ids

PKG = Path(__file__).resolve().parents[2] / "ipop_trio"
NOW = ids.NOW
SERVER = ("192.0.2.99", 3478)


def _declared() -> set[str]:
    """module.[Class.]name of every `def *_untrusted` in the package."""
    found: set[str] = set()
    for path in PKG.rglob("*.py"):
        module = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text())
        for node in tree.body:
            scopes = [(node, "")]
            if isinstance(node, ast.ClassDef):
                scopes = [(n, f"{node.name}.") for n in node.body]
            for fn, prefix in scopes:
                if isinstance(fn, ast.FunctionDef) and fn.name.endswith("_untrusted"):
                    found.add(f"{module}.{prefix}{fn.name}")
    return found


def _session() -> Session:
    return Session(
        send_key=bytes(32),
        recv_key=bytes(range(32)),
        local_index=7,
        remote_index=9,
        cipher=Cipher.AES_256_GCM,
        secure=True,
        created=0.0,
    )


def _entry_points() -> dict[str, Callable[[bytes], object]]:
    alice, bob = ids.alice(), ids.bob()
    _, initiator = handshake.create_initiation(
        alice.local, bob.public_key, 5, Cipher.AES_256_GCM, {}, NOW
    )
    link = Link(alice.local, bob.public_key, allocate_index=lambda: random.getrandbits(32))
    link.connect(0.0)
    client = turn.TurnClient(SERVER, "user", "secret", rng=random.Random(1))
    client.allocate(0.0)
    gatherer = SrflxGatherer(rng=random.Random(2))
    host = host_candidate(("192.0.2.1", 4600))
    gatherer.add(host, SERVER, 0.0)
    anchor = ids.ca().anchor
    hs = "ipop_trio.proto.handshake."
    ck = "ipop_trio.proto.cookie."
    guard = cookie.CookieGuard(bob.public_key, handshake.mac1_key(bob.public_key), queue_size=64)
    return {
        "ipop_trio.proto.stun.header_untrusted": stun.header_untrusted,
        "ipop_trio.proto.stun.parse_untrusted": stun.parse_untrusted,
        "ipop_trio.proto.turn.parse_channel_data_untrusted": turn.parse_channel_data_untrusted,
        "ipop_trio.proto.turn.TurnClient.unwrap_untrusted": client.unwrap_untrusted,
        "ipop_trio.proto.turn.TurnClient.receive_untrusted": lambda d: client.receive_untrusted(
            d, 1.0
        ),
        "ipop_trio.proto.signalling.decode_untrusted": signalling.decode_untrusted,
        "ipop_trio.proto.probe.parse_untrusted": probe.parse_untrusted,
        hs + "decode_payload_untrusted": handshake.decode_payload_untrusted,
        hs + "_verify_peer_untrusted": lambda d: handshake._verify_peer_untrusted(
            anchor, d, bob.public_key, NOW
        ),
        hs + "_check_mac1_untrusted": lambda d: handshake._check_mac1_untrusted(
            bob.public_key, d, -16
        ),
        hs + "check_response_mac1_untrusted": lambda d: handshake.check_response_mac1_untrusted(
            alice.local, d
        ),
        ck + "cookie_reply_receiver_index_untrusted": cookie.cookie_reply_receiver_index_untrusted,
        ck + "consume_cookie_reply_untrusted": lambda d: cookie.consume_cookie_reply_untrusted(
            d, bob.public_key, bytes(16)
        ),
        ck + "CookieGuard.admit_untrusted": lambda d: guard.admit_untrusted(
            d, ("192.0.2.9", 4600), 1.0, 64
        ),
        "ipop_trio.proto.link.Link.receive_cookie_reply_untrusted": (
            lambda d: link.receive_cookie_reply_untrusted(d, 1.0)
        ),
        hs + "check_initiation_mac1_untrusted": lambda d: handshake.check_initiation_mac1_untrusted(
            bob.local, d
        ),
        hs + "consume_initiation_untrusted": lambda d: handshake.consume_initiation_untrusted(
            bob.local, d, Cipher.AES_256_GCM, NOW
        ),
        hs + "response_receiver_index_untrusted": handshake.response_receiver_index_untrusted,
        hs + "consume_response_untrusted": lambda d: handshake.consume_response_untrusted(
            initiator, d, NOW
        ),
        "ipop_trio.proto.link.Link.receive_response_untrusted": (
            lambda d: link.receive_response_untrusted(d, 1.0)
        ),
        "ipop_trio.proto.cert.TrustAnchor.verify_untrusted": lambda d: anchor.verify_untrusted(
            d, NOW
        ),
        "ipop_trio.proto.ice.Candidate.from_sdp_untrusted": lambda d: Candidate.from_sdp_untrusted(
            d.decode("latin-1")
        ),
        "ipop_trio.proto.ice.SrflxGatherer.receive_untrusted": (
            lambda d: gatherer.receive_untrusted(d, host.addr, SERVER, 0.1)
        ),
        "ipop_trio.proto.offload.Reassembler.push_untrusted": (
            lambda d: Reassembler().push_untrusted(d, [])
        ),
        "ipop_trio.proto.session.Session.open_untrusted": lambda d: _session().open_untrusted(d),
        "ipop_trio.proto.session.Session.open_into_untrusted": (
            lambda d: _session().open_into_untrusted(d, bytearray(2048))
        ),
        "ipop_trio.net.httpd.parse_request_untrusted": httpd.parse_request_untrusted,
        "ipop_trio.proto.names._header_untrusted": names._header_untrusted,
        "ipop_trio.proto.names.parse_query_untrusted": names.parse_query_untrusted,
        "ipop_trio.proto.names.answer_untrusted": lambda d: names.answer_untrusted(
            d, names.Zone.of("lab", [ids.alice().bundle.identity], NOW)
        ),
    }


ENTRY_POINTS = _entry_points()


def test_every_untrusted_function_is_listed_here() -> None:
    assert _declared() == set(ENTRY_POINTS)


# Random bytes, and bytes that start like each kind of datagram (so the parsers get past
# their first check): STUN with the magic cookie, ChannelData, handshakes, data, JSON, DER.
PREFIXES = [
    b"",
    b"\x00\x01\x00\x00\x21\x12\xa4\x42",
    b"\x01\x01\x00\x08\x21\x12\xa4\x42",
    b"\x40\x00\x00\x04",
    b"\xa1\x00\x00\x00",
    b"\xa2\x00\x00\x00\x05\x00\x00\x00",
    b"\xa4\x00\x00\x00\x07\x00\x00\x00",
    b'{"type": "con_req", ',
    b"\x30\x82\x01\x00",
    b"1 1 UDP 2130706431 192.0.2.1 4600 typ ",
    b"GET /metrics HTTP/1.",
    b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",  # a DNS query's header
]


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.sampled_from(sorted(ENTRY_POINTS)),
    st.sampled_from(PREFIXES),
    st.binary(max_size=300),
)
def test_only_bad_packet_leaves_an_untrusted_function(
    name: str, prefix: bytes, tail: bytes
) -> None:
    try:
        ENTRY_POINTS[name](prefix + tail)
    except BadPacket:
        pass
