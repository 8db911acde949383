"""Signalling messages (proto/signalling.py): round trips, the possession proof, and
`decode_untrusted` refusing garbage with only BadPacket / RemoteProtocolError."""

from __future__ import annotations

import dataclasses
import json
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket, RemoteProtocolError
from ipop_trio.proto import signalling as sig

from . import _lab_identities as ids

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))
CERT = b"\x30\x82" + secrets.token_bytes(400)
MEMBER = sig.Member(KEY, "alpha", "10.77.0.2")
CANDS = (sig.Candidate("host", "192.0.2.7", 4600), sig.Candidate("host", "2001:db8::1", 1))

MESSAGES: list[sig.Message] = [
    sig.Hello(CERT),
    sig.Challenge(KEY, KEY2),
    sig.Auth(KEY2),
    sig.Welcome("lab", MEMBER, (sig.Member(KEY2, "beta", "10.77.0.3"),)),
    sig.Welcome("lab", MEMBER, ()),
    sig.Join(MEMBER),
    sig.Leave(KEY, "alpha"),
    sig.ConReq(KEY, KEY2, "lab", "r-1", CANDS, CERT, ("db", "web"), "always"),
    sig.ConResp(KEY2, KEY, "lab", "r-1", (), CERT, (), "groups"),
    sig.Ping(0),
    sig.Pong(2**40),
    sig.Error("unknown_peer", "no such member", "r-1"),
    sig.Error("auth_failed", "wrong answer"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg: sig.Message) -> None:
    text = sig.encode(msg)
    assert sig.decode_untrusted(text, max_size=sig.MAX_SERVER_MESSAGE) == msg
    assert sig.decode_untrusted(text.encode(), max_size=sig.MAX_SERVER_MESSAGE) == msg


def test_con_req_wire_fields_are_the_documented_ones() -> None:
    obj = json.loads(sig.encode(MESSAGES[7]))
    assert set(obj) == {
        "type", "from", "to", "overlay", "request_id", "candidates", "cert", "groups", "policy"
    }  # fmt: skip
    assert obj["candidates"][0] == {"type": "host", "address": "192.0.2.7", "port": 4600}


def test_unknown_fields_are_ignored_for_later_versions() -> None:
    obj = json.loads(sig.encode(MESSAGES[7]))
    obj["future"] = {"anything": [1, 2]}
    obj["candidates"][0]["priority"] = 12345
    assert sig.decode_untrusted(json.dumps(obj)) == MESSAGES[7]


def test_ice_offer_round_trips() -> None:
    offer = sig.IceOffer(
        "abcd1234",
        "p" * 24,
        ("a1b2 1 UDP 2130706431 10.0.0.1 4600 typ host",),
    )
    msg = dataclasses.replace(MESSAGES[7], ice=offer)
    assert sig.decode_untrusted(sig.encode(msg)) == msg


@pytest.mark.parametrize(
    "ice",
    [
        {"ufrag": "x", "pwd": "y" * 24, "candidates": []},  # ufrag too short
        {"ufrag": "abcd", "pwd": "short", "candidates": []},
        {"ufrag": "ab:cd", "pwd": "y" * 24, "candidates": []},  # ':' separates USERNAME
        {"ufrag": "abcd", "pwd": "y" * 24, "candidates": [3]},
        {"ufrag": "abcd", "pwd": "y" * 24, "candidates": ["x" * 513]},
        {"ufrag": "abcd", "pwd": "y" * 24, "candidates": ["c"] * 17},
        {"ufrag": "abcd", "pwd": "y" * 24},
        "ice",
    ],
)
def test_bad_ice_offers_are_refused(ice: object) -> None:
    obj = json.loads(sig.encode(MESSAGES[7]))
    obj["ice"] = ice
    with pytest.raises(BadPacket):
        sig.decode_untrusted(json.dumps(obj))


def test_oversized_input_is_refused_before_parsing() -> None:
    with pytest.raises(BadPacket, match="exceeds the limit"):
        sig.decode_untrusted(" " * (sig.MAX_CLIENT_MESSAGE + 1))


@pytest.mark.parametrize(
    "data",
    [b"\xff\xfe", "not json", "[1, 2]", '"hello"', '{"type": 3}', '{"type": "nope"}', "{}"],
)
def test_what_is_not_a_message_is_bad_packet(data: str | bytes) -> None:
    with pytest.raises(BadPacket) as info:
        sig.decode_untrusted(data)
    assert not isinstance(info.value, RemoteProtocolError)


def _mutated(base: sig.Message, key: str, value: object) -> str:
    obj = json.loads(sig.encode(base))
    if value is ...:
        del obj[key]
    else:
        obj[key] = value
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("base", "key", "value"),
    [
        (MESSAGES[0], "cert", 5),
        (MESSAGES[0], "cert", "!!not base64!!"),
        (MESSAGES[0], "cert", "A" * 8000),
        (MESSAGES[0], "v", True),
        (MESSAGES[1], "server_key", "AAAA"),
        (MESSAGES[1], "nonce", ...),
        (MESSAGES[6], "name", "has space"),
        (MESSAGES[7], "from", None),
        (MESSAGES[7], "candidates", [{"type": "host", "address": "nope", "port": 1}]),
        (MESSAGES[7], "candidates", [{"type": "host", "address": "192.0.2.1", "port": 0}]),
        (MESSAGES[7], "candidates", [{"type": "mdns", "address": "192.0.2.1", "port": 1}]),
        (MESSAGES[7], "candidates", [{"type": "host", "address": "192.0.2.1", "port": 1}] * 17),
        (MESSAGES[7], "groups", ["ok", 3]),
        (MESSAGES[7], "policy", "sometimes"),
        (MESSAGES[7], "request_id", ""),
        (MESSAGES[7], "overlay", ...),
        (MESSAGES[9], "seq", -1),
        (MESSAGES[9], "seq", 1.5),
        (MESSAGES[11], "reason", "x" * 1000),
        (MESSAGES[3], "members", {"not": "a list"}),
    ],
)
def test_wrong_fields_are_remote_protocol_errors(
    base: sig.Message, key: str, value: object
) -> None:
    with pytest.raises(RemoteProtocolError):
        sig.decode_untrusted(_mutated(base, key, value), max_size=sig.MAX_SERVER_MESSAGE)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.text(max_size=2048))
def test_garbage_raises_only_bad_packet(data: bytes | str) -> None:
    try:
        sig.decode_untrusted(data)
    except BadPacket:
        pass


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from(MESSAGES),
    st.sampled_from(["drop", "replace", "add"]),
    st.integers(min_value=0, max_value=20),
    JSON,
)
def test_mutated_messages_raise_only_bad_packet(
    msg: sig.Message, how: str, which: int, value: object
) -> None:
    obj = json.loads(sig.encode(msg))
    keys = sorted(obj)
    key = keys[which % len(keys)]
    if how == "drop":
        del obj[key]
    elif how == "replace":
        obj[key] = value
    else:
        obj[f"x{which}"] = value
    try:
        sig.decode_untrusted(json.dumps(obj), max_size=sig.MAX_SERVER_MESSAGE)
    except BadPacket:
        pass


def test_deeply_nested_json_is_bad_packet() -> None:
    with pytest.raises(BadPacket):
        sig.decode_untrusted("[" * 5000 + "]" * 5000)


# --- the possession proof -------------------------------------------------------------------


def test_the_key_holder_passes_the_challenge() -> None:
    node = ids.alice()
    pending = sig.PendingChallenge()
    answer = sig.answer_challenge(
        node.local.static_private, node.bundle.cert_der, pending.challenge
    )
    assert pending.verify(node.public_key, node.bundle.cert_der, answer)


def test_another_key_a_replayed_answer_or_another_certificate_fails() -> None:
    alice, bob = ids.alice(), ids.bob()
    pending = sig.PendingChallenge()
    cert = alice.bundle.cert_der
    forged = sig.answer_challenge(bob.local.static_private, cert, pending.challenge)
    assert not pending.verify(alice.public_key, cert, forged)
    # An answer recorded on one connection is useless on the next (fresh key and nonce).
    good = sig.answer_challenge(alice.local.static_private, cert, pending.challenge)
    assert not sig.PendingChallenge().verify(alice.public_key, cert, good)
    # The transcript binds the certificate.
    assert not pending.verify(alice.public_key, bob.bundle.cert_der, good)


def test_a_low_order_server_key_is_refused_by_the_node() -> None:
    with pytest.raises(RemoteProtocolError):
        sig.answer_challenge(ids.alice().local.static_private, CERT, sig.Challenge(bytes(32), KEY))
