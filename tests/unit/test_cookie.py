"""Handshakes under load (proto/cookie.py): XChaCha20-Poly1305 against the draft's vectors,
the responder's guard and the initiator's Link in pairs, with time as a float."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.errors import BadPacket
from ipop_trio.proto import cookie
from ipop_trio.proto import handshake as hs
from ipop_trio.proto.cookie import (
    COOKIE_LIFETIME,
    COOKIE_REPLY_SIZE,
    COOKIE_SECRET_LIFETIME,
    INIT_BURST_PER_SOURCE,
    INIT_BURST_TOTAL,
    UNDER_LOAD_TIME,
    Admission,
    CookieGuard,
    Verdict,
    consume_cookie_reply_untrusted,
    hchacha20,
    xchacha20poly1305_open,
    xchacha20poly1305_seal,
)
from ipop_trio.proto.link import Link, LinkState, SessionEstablished
from ipop_trio.proto.session import REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, Cipher

from ._lab_identities import NOW, alice, bob

QUEUE = 64
BUSY = QUEUE  # a full handshake queue: under load
SRC = ("198.51.100.20", 4600)
OTHER_SRC = ("198.51.100.21", 4600)


# --- XChaCha20-Poly1305 (draft-irtf-cfrg-xchacha-03) ---------------------------------------


def test_hchacha20_vector() -> None:
    # §2.2.1
    key = bytes(range(32))
    nonce = bytes.fromhex("000000090000004a0000000031415927")
    expect = "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"
    assert hchacha20(key, nonce).hex() == expect


def test_xchacha20poly1305_vector() -> None:
    # §A.3.1
    plaintext = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    key = bytes(range(0x80, 0xA0))
    nonce = bytes(range(0x40, 0x58))
    sealed = xchacha20poly1305_seal(key, nonce, plaintext, ad)
    assert sealed[:16].hex() == "bd6d179d3e83d43b9576579493c0e939"
    assert sealed[-16:].hex() == "c0875924c1c7987947deafd8780acf49"
    assert xchacha20poly1305_open(key, nonce, sealed, ad) == plaintext


# --- the pair: an initiator's Link and a responder's guard ---------------------------------


def guard(seed: int = 1) -> CookieGuard:
    rng = random.Random(seed)
    b = bob()
    return CookieGuard(
        b.public_key, hs.mac1_key(b.public_key), queue_size=QUEUE, random_bytes=rng.randbytes
    )


def initiator() -> Link:
    counter = itertools.count(100)
    link = Link(alice().local, bob().public_key, allocate_index=lambda: next(counter))
    link.wall_offset = NOW
    return link


def initiation(link: Link, now: float) -> bytes:
    """Start (or retransmit) and return the initiation the link sends."""
    if link.handshaking:
        link.handle_timeout(now)
    else:
        link.connect(now)
    (out,) = link.datagrams_to_send()
    assert out[0] == 0xA1
    return out


def test_not_under_load_initiations_are_queued_and_junk_is_refused() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    assert g.admit_untrusted(init, SRC, 0.0, queued=0) == Admission(Verdict.QUEUE)
    assert init[-16:] == bytes(16)  # no cookie yet: mac2 is zero
    forged = bytearray(init)
    forged[50] ^= 1
    assert g.admit_untrusted(bytes(forged), SRC, 0.0, 0).verdict is Verdict.MAC1_BAD
    assert g.admit_untrusted(init[:40], SRC, 0.0, 0).verdict is Verdict.MAC1_BAD
    # Meant for someone else (mac1 keyed by another public key).
    carol_guard = CookieGuard(b"\x07" * 32, hs.mac1_key(b"\x07" * 32), queue_size=QUEUE)
    assert carol_guard.admit_untrusted(init, SRC, 0.0, 0).verdict is Verdict.MAC1_BAD
    assert not g.under_load(0.0)


def test_under_load_a_cookie_then_mac2_gets_the_initiation_through() -> None:
    g, link = guard(), initiator()
    first = initiation(link, 0.0)
    got = g.admit_untrusted(first, SRC, 0.0, queued=BUSY)
    assert got.verdict is Verdict.COOKIE and got.reply is not None
    assert len(got.reply) == COOKIE_REPLY_SIZE < len(first)  # never an amplifier
    assert g.under_load(0.0)
    link.receive_cookie_reply_untrusted(got.reply, 0.01)
    assert link.has_cookie
    # No initiation at once: the next one goes at the regular retransmission.
    assert link.datagrams_to_send() == []
    deadline = link.next_deadline()
    assert deadline is not None and REKEY_TIMEOUT <= deadline <= REKEY_TIMEOUT + 0.34
    second = initiation(link, deadline)
    assert second[-16:] != bytes(16)
    assert g.admit_untrusted(second, SRC, deadline, BUSY).verdict is Verdict.QUEUE_PROVEN
    # mac2 is bound to the source address: the same datagram from elsewhere gets a cookie.
    assert g.admit_untrusted(second, OTHER_SRC, deadline, BUSY).verdict is Verdict.COOKIE
    assert g.admit_untrusted(second, (SRC[0], 4601), deadline, BUSY).verdict is Verdict.COOKIE


def test_the_whole_handshake_completes_under_load_within_the_attempt_time() -> None:
    g, link = guard(), initiator()
    b = bob()
    now = 0.0
    responder = Link(b.local, alice().public_key, allocate_index=lambda: 7)
    init = initiation(link, now)
    while True:
        got = g.admit_untrusted(init, SRC, now, BUSY)
        if got.verdict is Verdict.QUEUE_PROVEN:
            break
        assert got.reply is not None
        link.receive_cookie_reply_untrusted(got.reply, now)
        deadline = link.next_deadline()
        assert deadline is not None
        now = deadline
        init = initiation(link, now)
    state = hs.consume_initiation_untrusted(b.local, init, Cipher.AES_256_GCM, NOW + now)
    responder.wall_offset = NOW
    responder.receive_initiation(state, now)
    (response,) = responder.datagrams_to_send()
    link.receive_response_untrusted(response, now)
    assert link.state is LinkState.ESTABLISHED
    assert any(isinstance(e, SessionEstablished) for e in iter(link.next_event, None))
    assert now < REKEY_ATTEMPT_TIME


def test_a_cookie_reply_opens_only_for_the_initiation_it_answers() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    reply = g.admit_untrusted(init, SRC, 0.0, BUSY).reply
    assert reply is not None
    # Someone who did not send that initiation does not know its mac1.
    with pytest.raises(BadPacket, match="does not open"):
        consume_cookie_reply_untrusted(reply, bob().public_key, bytes(16))
    # A tampered reply is refused, and so is one for another index.
    tampered = bytearray(reply)
    tampered[-1] ^= 1
    with pytest.raises(BadPacket):
        link.receive_cookie_reply_untrusted(bytes(tampered), 0.0)
    other_index = reply[:4] + (12345).to_bytes(4, "little") + reply[8:]
    with pytest.raises(BadPacket, match="another initiation"):
        link.receive_cookie_reply_untrusted(other_index, 0.0)
    link.receive_cookie_reply_untrusted(reply, 0.0)
    with pytest.raises(BadPacket):  # the same reply again
        link.receive_cookie_reply_untrusted(reply, 0.0)
    idle = initiator()
    with pytest.raises(BadPacket, match="no handshake pending"):
        idle.receive_cookie_reply_untrusted(reply, 0.0)


def test_under_load_proven_sources_are_rate_limited_each() -> None:
    g = guard()
    tau = g.cookie(SRC, 0.0)
    link = initiator()
    init = initiation(link, 0.0)
    proven = init[:-16] + hs.mac2(tau, init[:-16])
    verdicts = [g.admit_untrusted(proven, SRC, 0.0, BUSY).verdict for _ in range(30)]
    assert verdicts.count(Verdict.QUEUE_PROVEN) == INIT_BURST_PER_SOURCE
    assert verdicts.count(Verdict.RATE_LIMITED) == 30 - INIT_BURST_PER_SOURCE
    # Another proven source has its own budget.
    other = init[:-16] + hs.mac2(g.cookie(OTHER_SRC, 0.0), init[:-16])
    assert g.admit_untrusted(other, OTHER_SRC, 0.0, BUSY).verdict is Verdict.QUEUE_PROVEN


def test_the_total_budget_running_out_is_load_and_load_ends() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    verdicts = [g.admit_untrusted(init, SRC, 0.0, 0).verdict for _ in range(500)]
    assert verdicts.count(Verdict.QUEUE) == INIT_BURST_TOTAL
    assert verdicts[int(INIT_BURST_TOTAL)] is Verdict.COOKIE and g.under_load(0.0)
    assert set(verdicts[int(INIT_BURST_TOTAL) :]) == {Verdict.COOKIE}
    # Quiet for UNDER_LOAD_TIME: not under load any more, the budget refilled meanwhile.
    later = UNDER_LOAD_TIME + 1.0
    assert not g.under_load(later)
    assert g.admit_untrusted(init, SRC, later, 0).verdict is Verdict.QUEUE


def test_cookies_outlive_one_secret_rotation_but_not_two() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    tau = g.cookie(SRC, 0.0)
    proven = init[:-16] + hs.mac2(tau, init[:-16])
    assert g.admit_untrusted(proven, SRC, 1.0, BUSY).verdict is Verdict.QUEUE_PROVEN
    one = COOKIE_SECRET_LIFETIME + 1.0
    assert g.admit_untrusted(proven, SRC, one, BUSY).verdict is Verdict.QUEUE_PROVEN
    assert g.cookie(SRC, one) != tau
    two = 2 * COOKIE_SECRET_LIFETIME + 2.0
    assert g.admit_untrusted(proven, SRC, two, BUSY).verdict is Verdict.COOKIE


def test_the_initiator_forgets_its_cookie_after_its_lifetime() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    reply = g.admit_untrusted(init, SRC, 0.0, BUSY).reply
    assert reply is not None
    link.receive_cookie_reply_untrusted(reply, 0.0)
    link.close()
    link.datagrams_to_send()
    fresh = initiation(link, COOKIE_LIFETIME - 1.0)
    assert fresh[-16:] != bytes(16)
    link.close()
    stale = initiation(link, COOKIE_LIFETIME + 1.0)
    assert stale[-16:] == bytes(16) and not link.has_cookie


def test_ipv6_and_odd_sources_get_cookies_of_their_own() -> None:
    g, link = guard(), initiator()
    init = initiation(link, 0.0)
    sources = [("2001:db8::5", 4600), ("fe80::1%eth0", 4600), ("not-an-ip", 1)]
    taus = {g.cookie(src, 0.0) for src in sources}
    assert len(taus) == len(sources)
    for src in sources:
        got = g.admit_untrusted(init, src, 0.0, BUSY)
        assert got.verdict is Verdict.COOKIE and got.reply is not None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=700), first=st.sampled_from([0xA1, 0xA3, 0]))
def test_garbage_is_a_verdict_or_bad_packet(data: bytes, first: int) -> None:
    if first and data:
        data = bytes([first]) + b"\x00\x00\x00" + data[4:]
    g = guard()
    for queued in (0, BUSY):
        assert g.admit_untrusted(data, SRC, 0.0, queued).verdict is Verdict.MAC1_BAD
    try:
        cookie.consume_cookie_reply_untrusted(data, bob().public_key, bytes(16))
    except BadPacket:
        pass
