"""Fuzz targets: plain `def name(data: bytes) -> None` functions that atheris (fuzz/run.py)
and pytest (tests/unit/test_fuzz_targets.py) both call.

Each target asserts the contract of what it drives: an `*_untrusted` function raises only
BadPacket (or its documented subclass), never anything else; a refused datagram does not
move the replay window; the batched and the one-at-a-time session paths agree; the
signalling server core never raises and keeps its membership consistent. Anything else
escaping a target is a finding.

`SEEDS[name]()` gives the valid inputs a target's corpus starts from (a real sealed
datagram, STUN binding request, handshake initiation, hello, ...).
"""

from __future__ import annotations

import functools
import ipaddress
import random
import struct
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ipop_trio import pki
from ipop_trio.datapath.inbound import Inbound
from ipop_trio.datapath.sessions import SessionEntry, SessionTable
from ipop_trio.datapath.switch import VNET, PeerPort, Switch
from ipop_trio.errors import BadPacket
from ipop_trio.net import httpd
from ipop_trio.proto import cookie, handshake, names, stun, turn
from ipop_trio.proto import signalling as sig
from ipop_trio.proto.cert import CertificateRefused
from ipop_trio.proto.firewall import Action, Firewall, FirewallRules, Rule
from ipop_trio.proto.ice import Candidate, SrflxGatherer, host_candidate
from ipop_trio.proto.link import Link
from ipop_trio.proto.offload import OffloadError, Reassembler
from ipop_trio.proto.session import Cipher, Session
from ipop_trio.signalling.server import Close, ConnState, Limits, Send, ServerCore
from ipop_trio.stats import Stats

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z: every certificate is issued then
SERVER = ("192.0.2.99", 3478)
PEER = ("192.0.2.9", 4600)


# --- identities (built once per process, as tests/unit/_lab_identities.py does) ------------


@functools.cache
def _ca() -> pki.CaBundle:
    return pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)


@functools.cache
def _node(name: str, address: str) -> tuple[pki.NodeBundle, handshake.LocalIdentity]:
    private = X25519PrivateKey.generate().private_bytes_raw()
    bundle = pki.issue_node_bundle(
        _ca(), name, address, ("eng",), now=NOW, public_key=pki.public_key_of(private)
    )
    return bundle, handshake.LocalIdentity(private, bundle.cert_der, _ca().anchor)


def _alice() -> handshake.LocalIdentity:
    return _node("alice", "10.77.0.2")[1]


def _bob() -> handshake.LocalIdentity:
    return _node("bob", "10.77.0.3")[1]


def _split(data: bytes) -> Iterator[bytes]:
    """Length-prefixed (u16 big-endian) chunks; a short tail is the last chunk."""
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            yield data[i:]
            return
        (n,) = struct.unpack_from(">H", data, i)
        yield data[i + 2 : i + 2 + n]
        i += 2 + n


def _join(chunks: list[bytes]) -> bytes:
    return b"".join(struct.pack(">H", len(c)) + c for c in chunks)


def _expect(fn: Callable[[], object], allowed: type[BaseException] = BadPacket) -> bool:
    """Call fn; True if it returned, False if it raised `allowed`; anything else escapes."""
    try:
        fn()
    except allowed:
        return False
    return True


# --- stateless parsers ---------------------------------------------------------------------


def stun_header(data: bytes) -> None:
    _expect(lambda: stun.header_untrusted(data))


def stun_parse(data: bytes) -> None:
    if _expect(lambda: stun.parse_untrusted(data)):
        # what parses also has a header
        stun.header_untrusted(data)


def turn_channel_data(data: bytes) -> None:
    _expect(lambda: turn.parse_channel_data_untrusted(data))


def signalling_decode(data: bytes) -> None:
    # bytes, and (from the same input) text: a WebSocket message may be either
    _expect(lambda: sig.decode_untrusted(data))
    _expect(lambda: sig.decode_untrusted(data.decode("utf-8", "replace")))


def handshake_payload(data: bytes) -> None:
    _expect(lambda: handshake.decode_payload_untrusted(data))


def handshake_indices(data: bytes) -> None:
    _expect(lambda: handshake.response_receiver_index_untrusted(data))
    _expect(lambda: cookie.cookie_reply_receiver_index_untrusted(data))


def http_request(data: bytes) -> None:
    # the metrics endpoint: the request line, and the whole reply to a head (never raises)
    _expect(lambda: httpd.parse_request_untrusted(data))
    reply = httpd.reply_to(data, {"/metrics": lambda: ("text/plain", b"x 1\n")})
    assert reply.startswith(b"HTTP/1.1 ")


def ice_candidate(data: bytes) -> None:
    _expect(lambda: Candidate.from_sdp_untrusted(data.decode("utf-8", "replace")))


def dns_answer(data: bytes) -> None:
    """A query to the [dns] server, over UDP and over TCP: a reply that is a response to
    it (same id), within the UDP size limit, or QueryDropped."""
    for tcp in (False, True):
        try:
            reply = names.answer_untrusted(data, _zone(), tcp=tcp)
        except names.QueryDropped:
            return
        assert reply.wire[:2] == data[:2] and reply.wire[2] & 0x80, "not a response to it"
        assert tcp or len(reply.wire) <= names.UDP_PAYLOAD, "a UDP reply over the limit"


@functools.cache
def _zone() -> names.Zone:
    members = [_node("alice", "10.77.0.2")[0].identity, _node("bob", "10.77.0.3")[0].identity]
    return names.Zone.of("lab", members, NOW)


def cert_verify(data: bytes) -> None:
    # CertificateRefused is the BadPacket subclass verify_untrusted documents
    _expect(lambda: _ca().anchor.verify_untrusted(data, NOW), CertificateRefused)


# --- handshake and link ---------------------------------------------------------------------


def handshake_initiation(data: bytes) -> None:
    bob = _bob()
    _expect(lambda: handshake.check_initiation_mac1_untrusted(bob, data))
    _expect(lambda: handshake.consume_initiation_untrusted(bob, data, Cipher.AES_256_GCM, NOW))


@functools.cache
def _initiation() -> tuple[bytes, handshake.InitiatorState]:
    """One initiation alice → bob, and alice's state waiting for the response."""
    return handshake.create_initiation(_alice(), _bob().public_key, 5, Cipher.AES_256_GCM, {}, NOW)


def handshake_response(data: bytes) -> None:
    alice = _alice()
    initiator = _initiation()[1]
    _expect(lambda: handshake.check_response_mac1_untrusted(alice, data))
    _expect(lambda: handshake.consume_response_untrusted(initiator, data, NOW))


def cookie_reply(data: bytes) -> None:
    bob = _bob()
    _expect(lambda: cookie.consume_cookie_reply_untrusted(data, bob.public_key, bytes(16)))


def cookie_admit(data: bytes) -> None:
    bob = _bob()
    guard = cookie.CookieGuard(bob.public_key, handshake.mac1_key(bob.public_key), queue_size=64)
    for i, chunk in enumerate(_split(data)):
        _expect(partial(guard.admit_untrusted, chunk, PEER, 1.0 + i, 64))


def link_receive(data: bytes) -> None:
    """A connecting link fed a sequence of responses / cookie replies (the first byte of each
    chunk picks which)."""
    alice, bob = _alice(), _bob()
    rng = random.Random(len(data))
    link = Link(alice, bob.public_key, allocate_index=lambda: rng.getrandbits(32))
    link.connect(0.0)
    for i, chunk in enumerate(_split(data)):
        now = 1.0 + i
        if chunk[:1] == b"\x03":
            _expect(partial(link.receive_cookie_reply_untrusted, chunk, now))
        else:
            _expect(partial(link.receive_response_untrusted, chunk, now))


# --- STUN / TURN clients --------------------------------------------------------------------


def turn_client(data: bytes) -> None:
    client = turn.TurnClient(SERVER, "user", "secret", rng=random.Random(1))
    client.allocate(0.0)
    for i, chunk in enumerate(_split(data)):
        _expect(partial(client.unwrap_untrusted, chunk))
        _expect(partial(client.receive_untrusted, chunk, 1.0 + i))


def srflx_gatherer(data: bytes) -> None:
    gatherer = SrflxGatherer(rng=random.Random(2))
    host = host_candidate(("192.0.2.1", 4600))
    gatherer.add(host, SERVER, 0.0)
    for i, chunk in enumerate(_split(data)):
        _expect(partial(gatherer.receive_untrusted, chunk, host.addr, SERVER, 0.1 * (i + 1)))


# --- data path ------------------------------------------------------------------------------

_SEND_KEY, _RECV_KEY = bytes(32), bytes(range(32))


def _session(*, sender: bool = False) -> Session:
    if sender:  # the peer of the receiving session: seals what it opens
        return Session(
            send_key=_RECV_KEY, recv_key=_SEND_KEY, local_index=9, remote_index=7,
            cipher=Cipher.AES_256_GCM, secure=True, created=0.0,
        )  # fmt: skip
    return Session(
        send_key=_SEND_KEY, recv_key=_RECV_KEY, local_index=7, remote_index=9,
        cipher=Cipher.AES_256_GCM, secure=True, created=0.0,
    )  # fmt: skip


def session_open(data: bytes) -> None:
    """A sequence of datagrams through open_untrusted, open_into_untrusted and open_batch:
    a refused datagram never moves the window, and the three paths agree."""
    datagrams = list(_split(data))
    one, into = _session(), _session()
    opened: list[bytes] = []
    buf = bytearray(2048)
    for d in datagrams:
        before = one.recv_highest
        try:
            payload = one.open_untrusted(d)
        except BadPacket:
            assert one.recv_highest == before, "a refused datagram moved the window"
            payload = None
        try:
            n = into.open_into_untrusted(d, buf)
            got = bytes(buf[:n])
        except BadPacket:
            got = None
        assert got == payload, "open_into_untrusted and open_untrusted disagree"
        if payload is not None:
            opened.append(payload)
    batch, start = _session(), 0
    payloads: list[bytes] = []
    while start < len(datagrams):
        start = batch.open_batch(datagrams, start, payloads)
        if start < len(datagrams):  # not a data datagram of this session: the caller's
            start += 1
    assert payloads == opened, "open_batch and open_untrusted disagree"


def reassembler(data: bytes) -> None:
    """Opened inner payloads in sequence: only OffloadError, and a refused piece leaves the
    pending frame as it was."""
    r = Reassembler()

    def pending() -> tuple[object, ...]:
        return (r._fid, r._have, r._key, r._headers, r._tail, tuple(r._chunks))

    for chunk in _split(data):
        before = pending()
        out: list[bytes] = []
        if not _expect(partial(r.push_untrusted, chunk, out), OffloadError):
            assert not out, "a refused piece produced TAP writes"
            assert pending() == before, "a refused piece changed the pending frame"


_PEER_MAC, _OWN_MAC = bytes.fromhex("02aabbccdd01"), bytes.fromhex("02aabbccdd02")


def inbound(data: bytes) -> None:
    """The Python data path's Inbound.process over one receive call's datagrams, from the
    peer's address (even chunks count) or another (odd): it never raises, and a TAP write
    comes only from a datagram that opened under the session, and carries the peer's MAC."""
    stats = Stats()
    switch = Switch(_OWN_MAC, stats)
    port = PeerPort("peer", _PEER_MAC, None)
    port.endpoint = PEER
    switch.add(port)
    table: SessionTable[Any] = SessionTable()
    rx = _session()
    table.entries[rx.local_index] = SessionEntry(rx, port, None)
    handshakes: list[bytes] = []
    stage = Inbound(switch, stats, table, on_handshake=lambda d, a, v: handshakes.append(d))
    chunks = list(_split(data))
    for i in range(0, len(chunks), 4):
        out: list[bytes] = []
        before = rx.recv_highest
        addr = PEER if i % 8 == 0 else ("198.51.100.7", 1)
        stage.process(chunks[i : i + 4], addr, 1.0 + i, out)
        for w in out:
            assert rx.recv_highest != before or stage.pending, "a TAP write from nothing opened"
            assert w[VNET + 6 : VNET + 12] == _PEER_MAC, "a TAP write not from the peer's MAC"
    out = []
    stage.flush_pending(out, 1.0)


# --- signalling server core -----------------------------------------------------------------


_FW_US, _FW_PEER = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def _firewall_rules() -> FirewallRules:
    web = frozenset({"web"})
    return FirewallRules(
        inbound=(
            Rule(proto=6, ports=(22, 22), groups=web),
            Rule(proto=6, ports=(80, 90), action=Action.DENY),
            Rule(proto=1, cidr=ipaddress.IPv4Network("10.77.0.0/25")),
        ),
        outbound=(Rule(proto=17), Rule(proto=6, host="beta")),
        conntrack_max=8,  # small: eviction runs
    )


def firewall(data: bytes) -> None:
    """Frames from a peer and from our TAP (the first byte of each chunk: direction and how
    far the clock moves) through a peer's filter: a verdict for every one, never an
    exception, and the state table within its bound."""
    fw = Firewall(_firewall_rules())
    peer = fw.peer(1, "beta", frozenset({"web"}))
    now = 0.0
    for chunk in _split(data):
        if not chunk:
            continue
        now += chunk[0] >> 1
        frame = bytes(VNET) + (_FW_US + _FW_PEER if chunk[0] & 1 else _FW_PEER + _FW_US)
        frame += chunk[1:]
        verdict = (peer.inbound if chunk[0] & 1 else peer.outbound)(frame, now)
        assert verdict in (True, False)
        assert len(fw.flows) <= fw.rules.conntrack_max
    fw.sweep(now + 1e6)
    assert not fw.flows and fw.status(now)


def signalling_server(data: bytes) -> None:
    """Events decoded from the input: connect, message (bytes or text), a valid hello or
    auth (so admission is reachable), close, time out, time advance. Nothing raises; every
    action is for a connection the core knows; every member is an admitted open connection."""
    core = ServerCore([_ca().anchor], Limits(max_clients=8))
    nodes = [_node("alice", "10.77.0.2"), _node("bob", "10.77.0.3")]
    now = NOW
    conns: list[int] = []
    challenges: dict[int, sig.Challenge] = {}
    i = 0
    while i < len(data):
        op, i = data[i] % 8, i + 1
        arg = data[i] if i < len(data) else 0
        cid = conns[arg % len(conns)] if conns else 0
        if op == 0:
            conns.append(core.open(f"192.0.2.{arg}:4600", now))
            i += 1
        elif op in (1, 2):  # a message: u16 length, then that many bytes
            n = int.from_bytes(data[i + 1 : i + 3], "big")
            body = data[i + 3 : i + 3 + n]
            i += 3 + n
            core.receive(cid, body if op == 1 else body.decode("utf-8", "replace"), now)
        elif op == 3:
            core.receive(cid, sig.encode(sig.Hello(nodes[arg & 1][0].cert_der)), now)
            i += 1
        elif op == 4 and cid in challenges:
            bundle, local = nodes[arg & 1]
            proof = sig.answer_challenge(local.static_private, bundle.cert_der, challenges[cid])
            core.receive(cid, sig.encode(proof), now)
            i += 1
        elif op == 5:
            core.closed(cid)
            i += 1
        elif op == 6:
            core.timed_out(cid)
            i += 1
        else:
            now += arg / 4
            i += 1
        for action in core.actions():
            assert isinstance(action, Send | Close)
            assert action.conn in conns, "an action for a connection never opened"
            if isinstance(action, Send):
                msg = sig.decode_untrusted(action.text, max_size=sig.MAX_SERVER_MESSAGE)
                if isinstance(msg, sig.Challenge):
                    challenges[action.conn] = msg
        for overlay in core.overlays.values():
            for member in overlay.members.values():
                assert member.state is ConnState.MEMBER, "a member that is not admitted"
                assert core.conns.get(member.id) is member, "a member whose connection is gone"


TARGETS: dict[str, Callable[[bytes], None]] = {
    f.__name__: f
    for f in (
        stun_header, stun_parse, turn_channel_data, signalling_decode, handshake_payload,
        handshake_indices, http_request, ice_candidate, cert_verify, handshake_initiation,
        handshake_response, cookie_reply, cookie_admit, link_receive, turn_client,
        srflx_gatherer, session_open, reassembler, inbound, signalling_server, dns_answer,
        firewall,
    )
}  # fmt: skip


# --- seed corpora ---------------------------------------------------------------------------


def _binding_request() -> bytes:
    tid = stun.new_transaction_id(random.Random(3))
    return stun.encode(stun.Message(stun.Method.BINDING, stun.Class.REQUEST, tid))


def _binding_response() -> bytes:
    tid = stun.new_transaction_id(random.Random(3))
    msg = stun.Message(
        stun.Method.BINDING, stun.Class.SUCCESS, tid, xor_mapped_address=("198.51.100.7", 4600)
    )
    return stun.encode(msg)


def _response() -> bytes:
    bob = _bob()
    responder = handshake.consume_initiation_untrusted(
        bob, _initiation()[0], Cipher.AES_256_GCM, NOW
    )
    return handshake.create_response(responder, 11, {})[0]


def _sealed() -> list[bytes]:
    tx = _session(sender=True)
    return [tx.seal(bytes(range(i * 20))) for i in range(4)]


def _pieces() -> list[bytes]:
    from ipop_trio.proto.offload import VNET_HDR_LEN, encode_outbound
    from tests.unit.test_offload import build_read, small_frame

    plain = bytes(VNET_HDR_LEN) + small_frame(60)
    return encode_outbound(build_read(3000), 7) + encode_outbound(plain, 8)


def _hello() -> bytes:
    return sig.encode(sig.Hello(_node("alice", "10.77.0.2")[0].cert_der)).encode()


def _server_script() -> bytes:
    ping = sig.encode(sig.Ping(1)).encode()
    msg = bytes([1, 0]) + len(ping).to_bytes(2, "big") + ping
    # open, hello, auth (alice); open, hello, auth (bob); ping; time; close
    return bytes([0, 1, 3, 0, 4, 0, 0, 2, 3, 1, 4, 1]) + msg + bytes([7, 40, 5, 0, 6, 1])


def _inbound_datagrams() -> list[bytes]:
    tx = _session(sender=True)
    return [tx.seal(p) for p in _pieces()] + [_binding_request(), _initiation()[0]]


def _dns_queries() -> list[bytes]:
    import dns.message  # what a resolver sends: dnspython builds it, as proto/names.py reads it

    queries = [
        dns.message.make_query(name, rdtype, use_edns=edns, id=7)
        for name, rdtype, edns in (
            ("alice.lab.", "A", None),
            ("BOB.lab.", "AAAA", 0),
            ("nobody.lab.", "A", 0),
            ("lab.", "SOA", None),
            ("example.com.", "A", None),
        )
    ]
    return [q.to_wire() for q in queries]


def _firewall_frames() -> list[bytes]:
    """A TCP handshake to port 22, its reply, a UDP datagram out, an ICMP echo in (direction
    byte first: odd inbound); the Ethernet addresses come from the target."""

    def ipv4(src: int, dst: int, proto: int, l4: bytes) -> bytes:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
                           bytes([10, 77, 0, src]), bytes([10, 77, 0, dst]))  # fmt: skip
        return b"\x08\x00" + head + l4

    syn = struct.pack("!HHIIBBHHH", 40000, 22, 0, 0, 0x50, 0x02, 65535, 0, 0)
    synack = struct.pack("!HHIIBBHHH", 22, 40000, 0, 1, 0x50, 0x12, 65535, 0, 0)
    udp = struct.pack("!HHHH", 5000, 53, 8, 0)
    echo = struct.pack("!BBHHH", 8, 0, 0, 7, 1)
    return [
        b"\x03" + ipv4(2, 1, 6, syn),
        b"\x02" + ipv4(1, 2, 6, synack),
        b"\x04" + ipv4(1, 2, 17, udp),
        b"\x05" + ipv4(2, 1, 1, echo),
    ]


def _seed_lists() -> dict[str, list[bytes]]:
    stun_seeds = [_binding_request(), _binding_response()]
    init, resp = _initiation()[0], _response()
    sealed = _sealed()
    return {
        "stun_header": stun_seeds,
        "stun_parse": stun_seeds,
        "turn_channel_data": [b"\x40\x00\x00\x04abcd", b"\x7f\xff\x00\x01x\x00\x00\x00"],
        "signalling_decode": [_hello(), sig.encode(sig.Ping(7)).encode()],
        "handshake_payload": [handshake.encode_payload(_alice().cert_der, {"x": 1})],
        "handshake_indices": [resp],
        "http_request": [b"GET /metrics HTTP/1.1\r\nHost: 192.0.2.1:9464\r\n"],
        "ice_candidate": [host_candidate(("192.0.2.1", 4600)).to_sdp().encode()],
        "cert_verify": [_alice().cert_der],
        "handshake_initiation": [init],
        "handshake_response": [resp],
        "cookie_reply": [resp[:64]],
        "cookie_admit": [_join([init, init, init])],
        "link_receive": [_join([resp])],
        "turn_client": [_join(stun_seeds)],
        "srflx_gatherer": [_join(stun_seeds)],
        "session_open": [_join(sealed), _join(sealed[::-1] + sealed)],
        "reassembler": [_join(_pieces())],
        "inbound": [_join(_inbound_datagrams())],
        "signalling_server": [_server_script()],
        "dns_answer": _dns_queries(),
        "firewall": [_join(_firewall_frames())],
    }


def seeds(name: str) -> list[bytes]:
    """The seed corpus of target `name`: valid inputs of what it parses."""
    return _seed_lists()[name]
