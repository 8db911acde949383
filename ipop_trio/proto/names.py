"""The overlay's names: answers DNS queries for NAME.DOMAIN. from certified identities.

Sans-IO: `answer_untrusted(query bytes, zone, tcp=...)` gives the reply bytes or raises
`QueryDropped` (a `BadPacket`) saying why the query gets no answer at all; the Trio driver
(net/names.py) owns the sockets and counts. The zone is made per query (`Zone.of`) from the
identities the node holds *verified*: its own certificate and its peers' (configured with a
certificate, or proven in a link handshake, or verified in a con_req / con_resp). It never
comes from what signalling says about members without a certificate: a hostile signalling
server must not be able to point a name anywhere.

What is answered (RFC 1035 §4.1, RFC 2308 for negative answers):

    NAME.DOMAIN.  A / AAAA / ANY   the member's certified addresses (NODATA when none of the
                                   asked family: certificates carry IPv4 today)
    DOMAIN.       SOA              the zone's SOA (also in the authority section of every
                                   NXDOMAIN and NODATA, so resolvers cache them NEGATIVE_TTL)
    other name in DOMAIN.          NXDOMAIN (NODATA for a name that only has members below it)
    outside DOMAIN., class not IN, zone transfers
                                   REFUSED: this is no recursive resolver
    a response, an opcode other than QUERY, not exactly one question, bytes that do not
    parse                          dropped (QueryDropped.reason), never answered: a node must
                                   not be made to talk to itself or to answer garbage

Names compare case-insensitively (RFC 4343), and the reply keeps the case the question had
(resolvers that randomise case check it). Answers are authoritative (AA), recursion is not
available (RA = 0). The header is read before anything else, so most garbage costs one
`struct` unpack:

     0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |                      ID                       |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |QR|   Opcode  |AA|TC|RD|RA|   Z    |   RCODE   |
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+
    |        QDCOUNT  |  ANCOUNT  |  NSCOUNT  |  ARCOUNT    (u16 each)
    +--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+--+

dnspython does the rest of the wire format: a strict, maintained parser (compression
pointers, label and name limits, EDNS) that raises its own `DNSException` on what it refuses,
and typed. This module is the only place it is used.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.SOA
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from ..errors import BadPacket
from .cert import Identity, IPAddress
from .domain import PORT, check_domain

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_QR = 0x8000
_OPCODE_SHIFT, _OPCODE_MASK = 11, 0xF
_OPCODE_QUERY = 0

# Membership changes (a member leaves, a certificate is re-issued): keep what resolvers cache
# short. NXDOMAIN shorter still, so a member that just joined resolves almost at once.
TTL = 30
NEGATIVE_TTL = 5
UDP_MIN = 512  # RFC 1035 §4.2.1: a UDP reply without EDNS
UDP_PAYLOAD = 1232  # the EDNS payload we offer and cap UDP replies at (DNS flag day 2020)
TCP_MAX = 65535  # RFC 1035 §4.2.2: a TCP message's 2-byte length
_TRANSFERS = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR})


class Drop(enum.Enum):
    """Why a datagram gets no reply at all (counted as `dns_<value>`)."""

    MALFORMED = "malformed"  # shorter than a header, or dnspython refused it
    RESPONSE = "response"  # QR set: never answer an answer (loops, reflection)
    OPCODE = "opcode"  # not a standard QUERY (NOTIFY, UPDATE, ...)
    QUESTIONS = "questions"  # not exactly one question


class Outcome(enum.Enum):
    """What a reply says (counted as `dns_<value>`)."""

    ANSWER = "answer"
    NODATA = "nodata"
    NXDOMAIN = "nxdomain"
    REFUSED = "refused"
    BADVERS = "badvers"  # EDNS version above 0 (RFC 6891 §6.1.3)


class QueryDropped(BadPacket):
    """Bytes on the DNS port that get no reply; `reason` says which check refused them."""

    def __init__(self, reason: Drop, detail: str = "") -> None:
        super().__init__(f"DNS query dropped: {reason.value}{': ' if detail else ''}{detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reply:
    wire: bytes
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Zone:
    """The names the node answers for: each member's name as labels below `domain`."""

    domain: dns.name.Name  # absolute
    members: tuple[tuple[tuple[bytes, ...], IPAddress], ...]  # (lower-case labels, address)

    @classmethod
    def of(cls, domain: str, identities: Iterable[Identity], now: float) -> Zone:
        """The zone of `domain` (as `check_domain` gives it) from verified identities; those
        not valid at `now` (Unix seconds) are left out. A name that is no DNS name (an empty
        label: "a..b") can never be asked for, so it is left out too."""
        members: list[tuple[tuple[bytes, ...], IPAddress]] = []
        for ident in identities:
            if not ident.not_before <= now <= ident.not_after:
                continue
            labels = tuple(ident.name.lower().encode("ascii").split(b"."))
            if all(labels):
                members.extend((labels, address) for address in ident.addresses)
        return cls(dns.name.from_text(domain), tuple(members))

    def soa(self) -> dns.rrset.RRset:
        soa = dns.rdtypes.ANY.SOA.SOA(
            dns.rdataclass.IN,
            dns.rdatatype.SOA,
            mname=self.domain,
            rname=dns.name.Name((b"hostmaster", *self.domain.labels)),
            serial=1,
            refresh=3600,
            retry=600,
            expire=86400,
            minimum=NEGATIVE_TTL,
        )
        return dns.rrset.from_rdata(self.domain, NEGATIVE_TTL, soa)


def _header_untrusted(data: bytes) -> None:
    if len(data) < HEADER.size:
        raise QueryDropped(Drop.MALFORMED, f"{len(data)} bytes, shorter than a header")
    _, flags, qdcount, _, _, _ = HEADER.unpack_from(data)
    if flags & _QR:
        raise QueryDropped(Drop.RESPONSE)
    if (flags >> _OPCODE_SHIFT) & _OPCODE_MASK != _OPCODE_QUERY:
        raise QueryDropped(Drop.OPCODE, f"opcode {(flags >> _OPCODE_SHIFT) & _OPCODE_MASK}")
    if qdcount != 1:
        raise QueryDropped(Drop.QUESTIONS, f"{qdcount} questions")


def parse_query_untrusted(data: bytes) -> dns.message.Message:
    """One standard query with one question, or `QueryDropped`."""
    _header_untrusted(data)
    try:
        query = dns.message.from_wire(data)
    except dns.exception.DNSException as exc:
        raise QueryDropped(Drop.MALFORMED, type(exc).__name__) from None
    except (ValueError, IndexError, UnicodeError) as exc:  # what a library bug would raise
        raise QueryDropped(Drop.MALFORMED, type(exc).__name__) from None
    if len(query.question) != 1:  # an UPDATE-style section count mismatch, defensively
        raise QueryDropped(Drop.QUESTIONS, f"{len(query.question)} questions")
    return query


def answer_untrusted(data: bytes, zone: Zone, *, tcp: bool = False) -> Reply:
    """The reply to the DNS query in `data`. Over UDP it is at most 512 bytes, or what the
    query's EDNS allows up to UDP_PAYLOAD; a longer one is cut with TC set (the resolver
    retries over TCP).

    Raises only `QueryDropped`: those bytes get no reply."""
    query = parse_query_untrusted(data)
    response = dns.message.make_response(query, our_payload=UDP_PAYLOAD)
    if query.edns > 0:
        response.set_rcode(dns.rcode.BADVERS)
        return Reply(response.to_wire(), Outcome.BADVERS)
    if tcp:
        max_size = TCP_MAX
    elif query.edns == 0:  # the resolver said how much it takes
        max_size = min(max(query.payload, UDP_MIN), UDP_PAYLOAD)
    else:
        max_size = UDP_MIN
    outcome = _fill(response, query.question[0], zone)
    wire = response.to_wire(max_size=max_size, prefer_truncation=True)
    return Reply(wire, outcome)


def _fill(response: dns.message.Message, question: dns.rrset.RRset, zone: Zone) -> Outcome:
    qname, qtype = question.name, question.rdtype
    if (
        question.rdclass != dns.rdataclass.IN
        or qtype in _TRANSFERS
        or not qname.is_subdomain(zone.domain)
    ):
        response.set_rcode(dns.rcode.REFUSED)
        return Outcome.REFUSED
    response.flags |= dns.flags.AA  # the zone is ours: every answer in it is authoritative
    relative = tuple(label.lower() for label in qname.relativize(zone.domain).labels)
    if not relative:  # the apex: only its SOA
        if qtype in (dns.rdatatype.SOA, dns.rdatatype.ANY):
            response.answer.append(zone.soa())
            return Outcome.ANSWER
        response.authority.append(zone.soa())
        return Outcome.NODATA
    addresses = sorted({addr for labels, addr in zone.members if labels == relative}, key=str)
    if addresses:
        v4 = [a for a in addresses if isinstance(a, ipaddress.IPv4Address)]
        v6 = [a for a in addresses if isinstance(a, ipaddress.IPv6Address)]
        any_ = qtype == dns.rdatatype.ANY
        if v4 and (qtype == dns.rdatatype.A or any_):
            rdatas = [dns.rdtypes.IN.A.A(dns.rdataclass.IN, dns.rdatatype.A, str(a)) for a in v4]
            response.answer.append(dns.rrset.from_rdata_list(qname, TTL, rdatas))
        if v6 and (qtype == dns.rdatatype.AAAA or any_):
            rdatas6 = [
                dns.rdtypes.IN.AAAA.AAAA(dns.rdataclass.IN, dns.rdatatype.AAAA, str(a)) for a in v6
            ]
            response.answer.append(dns.rrset.from_rdata_list(qname, TTL, rdatas6))
        if response.answer:
            return Outcome.ANSWER
        response.authority.append(zone.soa())
        return Outcome.NODATA
    response.authority.append(zone.soa())
    n = len(relative)
    if any(len(labels) > n and labels[-n:] == relative for labels, _ in zone.members):
        return Outcome.NODATA  # an empty non-terminal: "b.lab." when "a.b" is a member
    response.set_rcode(dns.rcode.NXDOMAIN)
    return Outcome.NXDOMAIN


__all__ = [
    "PORT",
    "TCP_MAX",
    "TTL",
    "UDP_MIN",
    "Drop",
    "Outcome",
    "QueryDropped",
    "Reply",
    "Zone",
    "answer_untrusted",
    "check_domain",
    "parse_query_untrusted",
]
