"""[dns]: the answering core (proto/names.py): answers, negative answers, drops.

Queries are built and replies read with dnspython's own message classes, so each test reads
like what a resolver sends and sees."""

from __future__ import annotations

import random
import struct

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.proto import names

from .conftest import PKI_NOW, MakeCa, MakeNode


@pytest.fixture
def zone(make_ca: MakeCa, make_node: MakeNode) -> names.Zone:
    ca = make_ca("lab")
    alpha = make_node(ca, "alpha", "10.77.0.1")
    beta = make_node(ca, "Beta", "10.77.0.2")
    dotted = make_node(ca, "web.eu", "10.77.0.9")  # a name with a dot: two labels
    return names.Zone.of("lab", [alpha.identity, beta.identity, dotted.identity], PKI_NOW)


def ask(
    zone: names.Zone, qname: str, qtype: str = "A", *, tcp: bool = False, **query_kw: object
) -> tuple[dns.message.Message, names.Outcome]:
    query = dns.message.make_query(qname, qtype, **query_kw)  # type: ignore[arg-type]
    reply = names.answer_untrusted(query.to_wire(), zone, tcp=tcp)
    msg = dns.message.from_wire(reply.wire)
    assert msg.id == query.id and msg.flags & dns.flags.QR
    assert not msg.flags & dns.flags.RA  # no recursion here
    return msg, reply.outcome


def addresses(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


# --- answers ---------------------------------------------------------------------------------


def test_a_member_gets_its_certified_address_authoritatively(zone: names.Zone) -> None:
    msg, outcome = ask(zone, "beta.lab.")
    assert outcome is names.Outcome.ANSWER and msg.rcode() == dns.rcode.NOERROR
    assert addresses(msg) == ["10.77.0.2"]
    assert msg.flags & dns.flags.AA
    assert msg.answer[0].ttl == names.TTL <= 60


def test_names_compare_case_insensitively_and_keep_the_question_case(zone: names.Zone) -> None:
    msg, _ = ask(zone, "bEtA.LaB.")
    assert addresses(msg) == ["10.77.0.2"]
    assert msg.answer[0].name.to_text() == "bEtA.LaB."  # 0x20-randomising resolvers check it
    assert addresses(ask(zone, "ALPHA.lab.")[0]) == ["10.77.0.1"]


def test_a_dotted_member_name_is_two_labels(zone: names.Zone) -> None:
    assert addresses(ask(zone, "web.eu.lab.")[0]) == ["10.77.0.9"]
    msg, outcome = ask(zone, "eu.lab.")  # only a member below it: exists, has no address
    assert outcome is names.Outcome.NODATA and msg.rcode() == dns.rcode.NOERROR


def test_an_unknown_name_in_the_domain_is_nxdomain_with_the_soa(zone: names.Zone) -> None:
    for qname in ("gamma.lab.", "x.beta.lab.", "alpha.eu.lab."):
        msg, outcome = ask(zone, qname)
        assert outcome is names.Outcome.NXDOMAIN and msg.rcode() == dns.rcode.NXDOMAIN
        assert msg.flags & dns.flags.AA and not msg.answer
        (soa,) = msg.authority  # RFC 2308: negative answers are cached for the SOA minimum
        assert soa.rdtype == dns.rdatatype.SOA and soa.ttl <= names.TTL
        assert soa[0].minimum == soa.ttl


def test_outside_the_domain_is_refused_and_not_authoritative(zone: names.Zone) -> None:
    for qname in ("example.com.", "lab.example.", "beta.", "."):
        msg, outcome = ask(zone, qname)
        assert outcome is names.Outcome.REFUSED and msg.rcode() == dns.rcode.REFUSED
        assert not msg.flags & dns.flags.AA and not msg.answer


def test_other_classes_and_zone_transfers_are_refused(zone: names.Zone) -> None:
    assert ask(zone, "beta.lab.", "A", rdclass="CH")[1] is names.Outcome.REFUSED
    assert ask(zone, "lab.", "AXFR", tcp=True)[1] is names.Outcome.REFUSED


def test_aaaa_of_an_ipv4_member_is_nodata(zone: names.Zone) -> None:
    msg, outcome = ask(zone, "beta.lab.", "AAAA")
    assert outcome is names.Outcome.NODATA and msg.rcode() == dns.rcode.NOERROR
    assert not msg.answer and msg.authority[0].rdtype == dns.rdatatype.SOA
    assert ask(zone, "beta.lab.", "MX")[1] is names.Outcome.NODATA
    assert addresses(ask(zone, "beta.lab.", "ANY")[0]) == ["10.77.0.2"]


def test_an_ipv6_member_gets_aaaa(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca("six", "fd00:77::/64")
    six = make_node(ca, "six", "fd00:77::5")
    zone6 = names.Zone.of("six", [six.identity], PKI_NOW)
    assert addresses(ask(zone6, "six.six.", "AAAA")[0]) == ["fd00:77::5"]
    assert ask(zone6, "six.six.", "A")[1] is names.Outcome.NODATA


def test_the_apex_has_only_its_soa(zone: names.Zone) -> None:
    msg, outcome = ask(zone, "LAB.", "SOA")
    assert outcome is names.Outcome.ANSWER and msg.answer[0].rdtype == dns.rdatatype.SOA
    assert ask(zone, "lab.", "A")[1] is names.Outcome.NODATA


def test_a_member_whose_certificate_is_not_valid_now_is_not_answered(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    ca = make_ca()
    old = make_node(ca, "old", "10.77.0.7", days=1)
    assert names.Zone.of("lab", [old.identity], PKI_NOW).members
    later = names.Zone.of("lab", [old.identity], PKI_NOW + 3 * 86400)
    assert ask(later, "old.lab.")[1] is names.Outcome.NXDOMAIN


def test_two_certificates_of_one_name_give_both_addresses(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    ca = make_ca()
    a, b = make_node(ca, "db", "10.77.0.5"), make_node(ca, "DB", "10.77.0.6")
    twice = names.Zone.of("lab", [a.identity, b.identity, a.identity], PKI_NOW)
    assert sorted(addresses(ask(twice, "db.lab.")[0])) == ["10.77.0.5", "10.77.0.6"]


def test_a_domain_override_of_several_labels(make_ca: MakeCa, make_node: MakeNode) -> None:
    beta = make_node(make_ca("lab"), "beta", "10.77.0.2")
    other = names.Zone.of("corp.internal", [beta.identity], PKI_NOW)
    assert addresses(ask(other, "beta.CORP.internal.")[0]) == ["10.77.0.2"]
    assert ask(other, "beta.lab.")[1] is names.Outcome.REFUSED


def test_edns_is_answered_with_edns_and_a_newer_version_with_badvers(zone: names.Zone) -> None:
    msg, _ = ask(zone, "beta.lab.", use_edns=0, payload=4096)
    assert msg.edns == 0 and msg.payload == names.UDP_PAYLOAD
    msg, outcome = ask(zone, "beta.lab.", use_edns=1)
    assert outcome is names.Outcome.BADVERS and msg.rcode() == dns.rcode.BADVERS


def test_a_udp_reply_too_big_for_the_query_is_truncated(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    # 40 certificates of one name: 40 A records (16 bytes each) do not fit 512 bytes.
    ca = make_ca("lab", "10.77.0.0/16")
    many = [make_node(ca, "svc", f"10.77.1.{i}").identity for i in range(1, 41)]
    big = names.Zone.of("lab", many, PKI_NOW)
    udp, _ = ask(big, "svc.lab.")
    assert udp.flags & dns.flags.TC
    wire = dns.message.make_query("svc.lab.", "A").to_wire()
    assert len(names.answer_untrusted(wire, big).wire) <= names.UDP_MIN
    tcp, _ = ask(big, "svc.lab.", tcp=True)
    assert not tcp.flags & dns.flags.TC and len(addresses(tcp)) == 40
    edns, _ = ask(big, "svc.lab.", use_edns=0, payload=4096)
    assert not edns.flags & dns.flags.TC and len(addresses(edns)) == 40


# --- drops -----------------------------------------------------------------------------------


def _dropped(data: bytes, zone: names.Zone) -> names.Drop:
    with pytest.raises(names.QueryDropped) as caught:
        names.answer_untrusted(data, zone)
    return caught.value.reason


def test_a_response_is_never_answered(zone: names.Zone) -> None:
    query = dns.message.make_query("beta.lab.", "A")
    response = dns.message.make_response(query).to_wire()
    assert _dropped(response, zone) is names.Drop.RESPONSE


@pytest.mark.parametrize(
    "opcode", [dns.opcode.IQUERY, dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE]
)
def test_other_opcodes_are_dropped(zone: names.Zone, opcode: dns.opcode.Opcode) -> None:
    query = dns.message.make_query("beta.lab.", "A")
    query.set_opcode(opcode)
    assert _dropped(query.to_wire(), zone) is names.Drop.OPCODE


def test_not_exactly_one_question_is_dropped(zone: names.Zone) -> None:
    wire = bytearray(dns.message.make_query("beta.lab.", "A").to_wire())
    for count in (0, 2):
        struct.pack_into("!H", wire, 4, count)
        assert _dropped(bytes(wire), zone) is names.Drop.QUESTIONS


def test_truncated_queries_are_malformed(zone: names.Zone) -> None:
    wire = dns.message.make_query("beta.lab.", "A").to_wire()
    for cut in range(len(wire)):
        assert _dropped(wire[:cut], zone) is names.Drop.MALFORMED
    assert _dropped(wire + b"\0", zone) is names.Drop.MALFORMED  # trailing junk


def test_huge_names_and_pointer_loops_are_malformed(zone: names.Zone) -> None:
    header = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0)
    too_long = b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\0"  # 320 bytes of name
    assert _dropped(header + too_long + b"\0\1\0\1", zone) is names.Drop.MALFORMED
    loop = b"\xc0\x0c"  # a compression pointer to itself
    assert _dropped(header + loop + b"\0\1\0\1", zone) is names.Drop.MALFORMED
    label_64 = b"\x40" + b"a" * 64 + b"\0"  # 0x40: a reserved label type
    assert _dropped(header + label_64 + b"\0\1\0\1", zone) is names.Drop.MALFORMED


def test_random_bytes_are_dropped_or_answered_never_raised(zone: names.Zone) -> None:
    rng = random.Random(19)
    seeds = [
        dns.message.make_query(q, t, use_edns=e).to_wire()
        for q in ("beta.lab.", "web.eu.lab.", "gamma.lab.", "example.com.")
        for t in ("A", "AAAA")
        for e in (None, 0)
    ]
    seen: set[names.Drop | names.Outcome] = set()
    for i in range(3000):
        if i % 2:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 80)))
        try:
            reply = names.answer_untrusted(bytes(data), zone, tcp=bool(i % 3))
        except names.QueryDropped as exc:
            seen.add(exc.reason)
        else:
            seen.add(reply.outcome)
            assert dns.message.from_wire(reply.wire).flags & dns.flags.QR
    assert names.Drop.MALFORMED in seen and names.Outcome.ANSWER in seen


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600))
def test_any_bytes_leave_only_as_query_dropped(data: bytes) -> None:
    zone = names.Zone.of("lab", [], PKI_NOW)
    try:
        names.answer_untrusted(data, zone)
    except names.QueryDropped:
        pass


# --- the domain ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "domain"),
    [("lab", "lab"), ("Lab.Internal.", "lab.internal"), ("a_b-c.d", "a_b-c.d")],
)
def test_check_domain_normalises(text: str, domain: str) -> None:
    assert names.check_domain(text) == domain


@pytest.mark.parametrize("text", ["", ".", "a..b", ".lab", "la b", "x" * 64, "é.lab", "a." * 101])
def test_check_domain_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="domain"):
        names.check_domain(text)


def test_the_domain_name_type() -> None:
    zone = names.Zone.of("corp.internal", [], PKI_NOW)
    assert zone.domain == dns.name.from_text("corp.internal.")
