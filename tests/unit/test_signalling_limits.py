"""ServerCore's limits before admission (per source, overall) and on admissions per key."""

from __future__ import annotations

import argparse

import pytest

from ipop_trio import cli, pki
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.server import Close, Limits, Send, ServerCore, source_of

from .conftest import PKI_NOW, MakeNode

NOW = PKI_NOW + 60


def decode(text: str) -> sig.Message:
    return sig.decode_untrusted(text, max_size=sig.MAX_SERVER_MESSAGE)


def refused(core: ServerCore, conn: int) -> bool:
    return any(isinstance(a, Close) and a.conn == conn for a in core.actions())


def admit(core: ServerCore, node: pki.NodeBundle, peer: str, now: float = NOW) -> tuple[int, list]:
    """Connect and run hello / challenge / auth; returns the id and the actions after auth."""
    conn = core.open(peer, now)
    core.actions()
    core.receive(conn, sig.encode(sig.Hello(node.cert_der)), now)
    (send,) = core.actions()
    assert isinstance(send, Send)
    challenge = decode(send.text)
    assert isinstance(challenge, sig.Challenge), challenge
    assert node.private_key is not None
    answer = sig.answer_challenge(node.private_key, node.cert_der, challenge)
    core.receive(conn, sig.encode(answer), now)
    return conn, core.actions()


def test_source_is_the_address_or_the_ipv6_64() -> None:
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("::ffff:192.0.2.1") == "192.0.2.1"
    assert source_of("2001:db8:1:2::1") == source_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert source_of("2001:db8:1:3::1") != source_of("2001:db8:1:2::1")
    core = ServerCore([pki.new_ca_bundle("lab", "10.77.0.0/24", now=PKI_NOW).anchor])
    core.open("[2001:db8::1]:4000", NOW)
    core.open("192.0.2.1:4000", NOW)
    assert core.preauth_per_source == {"2001:db8::/64": 1, "192.0.2.1": 1}


def test_preauth_cap_per_source(lab_ca: pki.CaBundle, make_node: MakeNode) -> None:
    core = ServerCore([lab_ca.anchor])  # the defaults: 16 per source
    conns = [core.open(f"192.0.2.1:{4000 + i}", NOW) for i in range(16)]
    assert not refused(core, conns[-1])
    extra = core.open("192.0.2.1:5000", NOW)
    assert refused(core, extra)
    assert core.counters["refused_preauth_source"] == 1
    other = core.open("198.51.100.7:4000", NOW)
    assert not refused(core, other)
    core.closed(extra)  # a refused connection held no slot
    assert core.preauth_per_source["192.0.2.1"] == 16
    # One of the 16 is admitted: its slot is free.
    holder = conns[0]
    node = make_node(lab_ca, "n1", "10.77.0.2")
    core.closed(holder)
    _, _ = admit(core, node, "192.0.2.1:6000")
    assert core.preauth_per_source["192.0.2.1"] == 15
    assert not refused(core, core.open("192.0.2.1:6001", NOW))
    assert refused(core, core.open("192.0.2.1:6002", NOW))
    # One closes: a new one gets in.
    core.closed(conns[1])
    assert not refused(core, core.open("192.0.2.1:6003", NOW))


def test_preauth_cap_overall(lab_ca: pki.CaBundle, make_node: MakeNode) -> None:
    core = ServerCore([lab_ca.anchor], Limits(max_preauth=4))
    conns = [core.open(f"192.0.2.{i + 1}:4000", NOW) for i in range(4)]
    assert not refused(core, conns[-1])
    assert refused(core, core.open("203.0.113.9:4000", NOW))
    assert core.counters["refused_preauth"] == 1
    core.closed(conns[0])
    _conn, _ = admit(core, make_node(lab_ca, "n1", "10.77.0.2"), "203.0.113.9:4001")
    assert core.stats()["overlays"] == {"lab": 1} and core.preauth == 3
    assert not refused(core, core.open("203.0.113.10:4000", NOW))


def test_total_cap_per_source(lab_ca: pki.CaBundle, make_node: MakeNode) -> None:
    core = ServerCore([lab_ca.anchor], Limits(max_clients_per_source=3))
    for i in range(3):
        _conn, after = admit(core, make_node(lab_ca, f"n{i}", f"10.77.0.{i + 2}"), f"192.0.2.1:{i}")
        assert not any(isinstance(a, Close) for a in after)
    assert refused(core, core.open("192.0.2.1:99", NOW))
    assert core.counters["refused_source"] == 1
    assert not refused(core, core.open("192.0.2.2:99", NOW))


def test_admissions_of_one_key_are_rate_limited(lab_ca: pki.CaBundle, make_node: MakeNode) -> None:
    lim = Limits()
    core = ServerCore([lab_ca.anchor], lim)
    member_conn, _ = admit(core, make_node(lab_ca, "member", "10.77.0.2"), "198.51.100.1:1")
    loop = make_node(lab_ca, "loop", "10.77.0.3")
    now = NOW
    for _ in range(int(lim.admit_burst)):
        conn, after = admit(core, loop, "192.0.2.1:1", now)
        assert any(isinstance(a, Send) and a.conn == member_conn for a in after)  # the join
        core.closed(conn)
        core.actions()  # the leave
    conn, after = admit(core, loop, "192.0.2.1:1", now)
    errors = [decode(a.text) for a in after if isinstance(a, Send) and a.conn == conn]
    assert errors == [sig.Error("rate_limited", "admitted too often: try again later")]
    assert any(isinstance(a, Close) and a.conn == conn and a.code == 1013 for a in after)
    assert not any(a.conn == member_conn for a in after)  # nothing announced
    assert core.counters["refused_admit_rate"] == 1
    core.closed(conn)
    assert core.actions() == []
    # Time passes: one more admission.
    now += 1 / lim.admit_rate
    conn, after = admit(core, loop, "192.0.2.1:1", now)
    assert any(isinstance(a, Send) and a.conn == member_conn for a in after)
    assert core.stats()["overlays"] == {"lab": 2}


def test_refused_admission_leaves_the_connected_one_alone(
    lab_ca: pki.CaBundle, make_node: MakeNode
) -> None:
    core = ServerCore([lab_ca.anchor], Limits(admit_burst=1))
    node = make_node(lab_ca, "n1", "10.77.0.2")
    first, _ = admit(core, node, "192.0.2.1:1")
    _second, after = admit(core, node, "192.0.2.1:2")
    assert not any(a.conn == first for a in after)  # not replaced
    assert core.overlays["lab"].members[node.public_key] is core.conns[first]


def test_the_admission_table_stays_bounded(lab_ca: pki.CaBundle, make_node: MakeNode) -> None:
    lim = Limits(max_admit_keys=8)
    core = ServerCore([lab_ca.anchor], lim)
    for i in range(20):
        conn, _ = admit(core, make_node(lab_ca, f"n{i}", f"10.77.0.{i + 2}"), f"192.0.2.{i}:1")
        core.closed(conn)
        core.actions()
        assert len(core.admissions) <= 8
    # Once their buckets are full again they are forgotten: only the newest remains.
    later = NOW + lim.admit_burst / lim.admit_rate + 1
    admit(core, make_node(lab_ca, "late", "10.77.0.99"), "192.0.2.99:1", later)
    assert len(core.admissions) == 1


def test_signal_cli_limits_match_the_defaults() -> None:
    defaults = Limits()
    for flag, name, _kind, shown, _text in cli.SIGNAL_LIMITS:
        assert getattr(defaults, name) == shown, flag
    parser = cli.build_parser()
    args = parser.parse_args(["signal", "--ca", "x", "--max-preauth-per-source", "3"])
    assert cli.signal_limits(args) == Limits(max_preauth_per_source=3)
    assert cli.signal_limits(parser.parse_args(["signal", "--ca", "x"])) == defaults
    with pytest.raises(cli.ConfigError):
        cli.signal_limits(argparse.Namespace(admit_rate=0.0))
