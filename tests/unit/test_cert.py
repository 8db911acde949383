"""proto/cert.py: verifying node certificates against the overlay CA (the trust boundary)."""

from __future__ import annotations

import ast
import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipop_trio.proto.cert as cert_module
from ipop_trio import pki
from ipop_trio.errors import BadPacket, CertificateRefused, PkiError
from ipop_trio.proto.cert import TrustAnchor, mac_for_key, usable_address, valid_name

from .conftest import PKI_NOW, MakeCa, MakeNode

DAY = 86400


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)


def _forge(
    ca: pki.CaBundle,
    *,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
    public_key: object = None,
    san: Sequence[x509.GeneralName] | None = None,
    basic_ca: bool | None = False,
    signer: object = None,
    now: float = PKI_NOW,
) -> bytes:
    """A certificate built by hand (by default signed with the right CA key), for the cases
    `pki.build_node_certificate` cannot express. `san=[]` means no SAN extension."""
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forged")]))
        .issuer_name(issuer or x509.load_der_x509_certificate(ca.cert_der).subject)
        .public_key(public_key or X25519PrivateKey.generate().public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(now - 60))
        .not_valid_after(_utc(now + DAY))
    )
    if basic_ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=basic_ca, path_length=None), critical=True
        )
    if san is None:
        san = [x509.IPAddress(ipaddress.ip_address("10.77.0.9"))]
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    key = signer or ca_key
    algorithm = None if isinstance(key, Ed25519PrivateKey) else _sha256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


def _sha256() -> object:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _refused(ca: pki.CaBundle, der: bytes, now: float = PKI_NOW) -> str:
    with pytest.raises(CertificateRefused) as info:
        ca.anchor.verify_untrusted(der, now)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Purity


def test_cert_module_imports_no_io() -> None:
    tree = ast.parse(Path(cert_module.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"os", "time", "socket", "trio"}


# ---------------------------------------------------------------------------------------------
# MAC, names, addresses


def test_mac_for_key_is_locally_administered_unicast_and_stable() -> None:
    key = bytes(range(32))
    mac = mac_for_key(key)
    digest = hashlib.sha256(b"ipop-trio mac" + key).digest()
    assert len(mac) == 6
    assert mac[0] == (digest[0] & 0xFC) | 0x02
    assert mac[1:] == digest[1:6]
    assert mac[0] & 0x01 == 0  # unicast
    assert mac[0] & 0x02 == 0x02  # locally administered
    assert mac_for_key(key) == mac
    assert mac_for_key(bytes(32)) != mac


@given(st.binary(min_size=32, max_size=32))
def test_mac_bits_for_any_key(key: bytes) -> None:
    assert mac_for_key(key)[0] & 0x03 == 0x02


def test_identity_mac_matches_key(make_ca: MakeCa, make_node: MakeNode) -> None:
    node = make_node(make_ca(), "n1", "10.77.0.2")
    assert node.identity.mac == mac_for_key(node.public_key) == node.mac


@pytest.mark.parametrize("name", ["a", "node-1", "n.1_x", "A" * 63])
def test_valid_names(name: str) -> None:
    assert valid_name(name)


@pytest.mark.parametrize("name", ["", "a b", "a/b", "é", "x" * 64, "n1\n", None, b"n1"])
def test_invalid_names(name: object) -> None:
    assert not valid_name(name)


def test_usable_address() -> None:
    net = ipaddress.ip_network("10.77.0.0/24")
    assert usable_address(ipaddress.ip_address("10.77.0.1"), net)
    assert usable_address(ipaddress.ip_address("10.77.0.254"), net)
    assert not usable_address(ipaddress.ip_address("10.77.0.0"), net)
    assert not usable_address(ipaddress.ip_address("10.77.0.255"), net)
    assert not usable_address(ipaddress.ip_address("10.77.1.1"), net)
    assert not usable_address(ipaddress.ip_address("fd00::1"), net)


# ---------------------------------------------------------------------------------------------
# Round trip


def test_issue_then_verify(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca("lab", "10.77.0.0/24")
    node = make_node(ca, "alice", "10.77.0.2", groups=("eng", "admin", "eng"))
    identity = ca.anchor.verify_untrusted(node.cert_der, PKI_NOW)
    assert identity.name == "alice"
    assert identity.overlay == "lab"
    assert identity.address == ipaddress.ip_address("10.77.0.2")
    assert identity.network == ipaddress.ip_network("10.77.0.0/24")
    assert identity.groups == frozenset({"eng", "admin"})
    assert identity.public_key == node.public_key
    assert node.private_key is not None
    assert pki.public_key_of(node.private_key) == identity.public_key
    assert identity.der == node.cert_der
    assert identity.not_before == PKI_NOW - pki.CLOCK_SKEW
    assert identity.not_after == PKI_NOW - pki.CLOCK_SKEW + 365 * DAY


def test_ipv6_overlay(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca("six", "fd00:77::/64")
    node = make_node(ca, "n6", "fd00:77::2")
    identity = ca.anchor.verify_untrusted(node.cert_der, PKI_NOW)
    assert identity.address == ipaddress.ip_address("fd00:77::2")


def test_trust_anchor_reads_ca(make_ca: MakeCa) -> None:
    ca = make_ca("overlay-1", "10.9.0.0/16")
    anchor = TrustAnchor(ca.cert_der)
    assert anchor.name == "overlay-1"
    assert anchor.network == ipaddress.ip_network("10.9.0.0/16")
    assert anchor.der == ca.cert_der
    assert "overlay-1" in repr(anchor)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_wrong_ca_with_other_name_refused(make_ca: MakeCa, make_node: MakeNode) -> None:
    ours, theirs = make_ca("lab"), make_ca("other")
    node = make_node(theirs, "mallory", "10.77.0.66")
    assert "not issued by" in _refused(ours, node.cert_der)


def test_wrong_ca_with_same_name_refused(make_ca: MakeCa, make_node: MakeNode) -> None:
    ours, theirs = make_ca("lab"), make_ca("lab")
    node = make_node(theirs, "mallory", "10.77.0.66")
    assert "bad signature" in _refused(ours, node.cert_der)


def test_expired_and_not_yet_valid_refused(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca()
    node = make_node(ca, "n1", "10.77.0.2", days=30)
    identity = node.identity
    ca.anchor.verify_untrusted(node.cert_der, identity.not_before)  # bounds are inclusive
    ca.anchor.verify_untrusted(node.cert_der, identity.not_after)
    assert "expired" in _refused(ca, node.cert_der, identity.not_after + 1)
    assert "not yet valid" in _refused(ca, node.cert_der, identity.not_before - 1)


def test_node_certificate_never_outlives_ca(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca(days=10)
    node = make_node(ca, "n1", "10.77.0.2", days=365)
    assert node.identity.not_after == ca.anchor.not_after


def test_expired_ca_refused(make_ca: MakeCa) -> None:
    ca = make_ca(days=10)
    # Signed by the CA but valid longer than it: the CA's own expiry still applies.
    der = _forge(ca, now=PKI_NOW + 20 * DAY)
    assert "overlay CA" in _refused(ca, der, PKI_NOW + 20 * DAY)


def test_tampered_signature_refused(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca()
    der = bytearray(make_node(ca, "n1", "10.77.0.2").cert_der)
    der[-1] ^= 0x01  # the last byte is in the signature
    assert "bad signature" in _refused(ca, bytes(der))


def test_tampered_tbs_refused(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca()
    der = make_node(ca, "node1", "10.77.0.2").cert_der
    assert der.count(b"node1") == 1
    assert "bad signature" in _refused(ca, der.replace(b"node1", b"node2"))
    # The address inside the SAN: 10.77.0.2 -> 10.77.0.3.
    assert der.count(bytes([10, 77, 0, 2])) == 1
    assert "bad signature" in _refused(
        ca, der.replace(bytes([10, 77, 0, 2]), bytes([10, 77, 0, 3]))
    )


@pytest.mark.parametrize("address", ["10.78.0.5", "10.77.0.0", "10.77.0.255", "fd00::5"])
def test_address_outside_network_refused(make_ca: MakeCa, address: str) -> None:
    ca = make_ca()
    private = X25519PrivateKey.generate()
    der = pki.build_node_certificate(
        ca.key_pem,
        ca.cert_pem,
        "forged",
        ipaddress.ip_address(address),
        [],
        private.public_key(),
        PKI_NOW - 60,
        PKI_NOW + DAY,
    )
    why = _refused(ca, der)
    # an IPv6 address under an IPv4-only CA: no network of its family at all
    assert ("has no IPv6 network" if ":" in address else "outside overlay network") in why


@pytest.mark.parametrize(
    "key",
    [
        Ed25519PrivateKey.generate().public_key(),
        ec.generate_private_key(ec.SECP256R1()).public_key(),
    ],
    ids=["ed25519", "p256"],
)
def test_non_x25519_key_refused(make_ca: MakeCa, key: CertificatePublicKeyTypes) -> None:
    ca = make_ca()
    der = pki.build_node_certificate(
        ca.key_pem,
        ca.cert_pem,
        "n1",
        ipaddress.ip_address("10.77.0.2"),
        [],
        key,
        PKI_NOW - 60,
        PKI_NOW + DAY,
    )
    assert "not X25519" in _refused(ca, der)


def test_ca_certificate_refused_as_node(make_ca: MakeCa) -> None:
    ca = make_ca()
    der = pki.build_node_certificate(
        ca.key_pem,
        ca.cert_pem,
        "n1",
        ipaddress.ip_address("10.77.0.2"),
        [],
        X25519PrivateKey.generate().public_key(),
        PKI_NOW - 60,
        PKI_NOW + DAY,
        is_ca=True,
    )
    assert "CA certificate" in _refused(ca, der)
    # The CA's own certificate is not a node certificate either.
    _refused(ca, ca.cert_der)


def test_forged_baseline_is_accepted(make_ca: MakeCa) -> None:
    """`_forge` with no overrides makes a valid certificate: the refusals below are real."""
    ca = make_ca()
    identity = ca.anchor.verify_untrusted(_forge(ca), PKI_NOW)
    assert identity.name == "forged"


def test_missing_san_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    assert "no SAN IP" in _refused(ca, _forge(ca, san=[]))
    assert "no SAN IP" in _refused(ca, _forge(ca, san=[x509.DNSName("n1.example")]))


def test_two_san_ips_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    two = [
        x509.IPAddress(ipaddress.ip_address("10.77.0.2")),
        x509.IPAddress(ipaddress.ip_address("10.77.0.3")),
    ]
    assert "two SAN IP addresses of one family" in _refused(ca, _forge(ca, san=two))


def _ip(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(text))


def test_dual_stack_certificate(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca("lab", ["fd00:77::/64", "10.77.0.0/24"])  # given in any order, kept v4 first
    assert ca.anchor.networks == (
        ipaddress.ip_network("10.77.0.0/24"),
        ipaddress.ip_network("fd00:77::/64"),
    )
    node = make_node(ca, "alice", ["fd00:77::2", "10.77.0.2"])
    identity = ca.anchor.verify_untrusted(node.cert_der, PKI_NOW)
    assert identity.address == ipaddress.ip_address("10.77.0.2")
    assert identity.ip4 == ipaddress.ip_address("10.77.0.2")
    assert identity.ip6 == ipaddress.ip_address("fd00:77::2")
    assert [str(i) for i in identity.interfaces] == ["10.77.0.2/24", "fd00:77::2/64"]
    # A v4-only certificate under a dual-stack CA is fine; it just has no IPv6 address.
    v4 = ca.anchor.verify_untrusted(make_node(ca, "bob", "10.77.0.3").cert_der, PKI_NOW)
    assert v4.ip6 is None and v4.addresses == (ipaddress.ip_address("10.77.0.3"),)
    assert ca.anchor.network_for(ipaddress.ip_address("fd00:77::9")) == ca.anchor.networks[1]


def test_dual_stack_forgeries_refused(make_ca: MakeCa) -> None:
    ca = make_ca("lab", ["10.77.0.0/24", "fd00:77::/64"])
    assert _forge(ca, san=[_ip("10.77.0.2"), _ip("fd00:77::2")])  # the baseline is accepted
    ca.anchor.verify_untrusted(_forge(ca, san=[_ip("10.77.0.2"), _ip("fd00:77::2")]), PKI_NOW)
    three = [_ip("10.77.0.2"), _ip("fd00:77::2"), _ip("fd00:77::3")]
    assert "SAN IP" in _refused(ca, _forge(ca, san=three))
    assert "outside" in _refused(ca, _forge(ca, san=[_ip("10.77.0.2"), _ip("fd00:78::2")]))
    v4_only = make_ca("lab")
    assert "has no IPv6 network" in _refused(
        v4_only, _forge(v4_only, san=[_ip("10.77.0.2"), _ip("fd00:77::2")])
    )


@pytest.mark.parametrize(
    "networks",
    [["10.77.0.0/24", "10.78.0.0/24"], ["fd00:1::/64", "fd00:2::/64"], []],
)
def test_ca_networks_one_per_family(networks: list[str]) -> None:
    with pytest.raises(PkiError):
        pki.new_ca_bundle("lab", networks, now=PKI_NOW)


def test_node_addresses_one_per_family(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca("lab", ["10.77.0.0/24", "fd00:77::/64"])
    with pytest.raises(PkiError, match="one"):
        make_node(ca, "alice", ["10.77.0.2", "10.77.0.3"])
    with pytest.raises(PkiError, match="IPv6"):
        make_node(make_ca(), "bob", ["10.77.0.2", "fd00:77::2"])


def test_san_network_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    der = _forge(ca, san=[x509.IPAddress(ipaddress.ip_network("10.77.0.0/24"))])
    assert "network" in _refused(ca, der)


def test_bad_subject_names_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    cn = NameOID.COMMON_NAME
    ou = NameOID.ORGANIZATIONAL_UNIT_NAME
    for subject in [
        x509.Name([x509.NameAttribute(cn, "bad name")]),
        x509.Name([x509.NameAttribute(ou, "eng")]),
        x509.Name([x509.NameAttribute(cn, "a"), x509.NameAttribute(cn, "b")]),
    ]:
        assert "CN" in _refused(ca, _forge(ca, subject=subject))
    bad_group = x509.Name([x509.NameAttribute(cn, "n1"), x509.NameAttribute(ou, "no way")])
    assert "group" in _refused(ca, _forge(ca, subject=bad_group))


def test_issuer_mismatch_refused_even_if_signed_by_ca_key(make_ca: MakeCa) -> None:
    ca = make_ca()
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "elsewhere")])
    assert "not issued by" in _refused(ca, _forge(ca, issuer=issuer))


def test_non_ed25519_signature_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    der = _forge(ca, signer=ec.generate_private_key(ec.SECP256R1()))
    assert "not Ed25519" in _refused(ca, der)


@pytest.mark.parametrize("garbage", [b"", b"\x30", b"hello", b"\x30\x03\x02\x01\x00"])
def test_garbage_refused(make_ca: MakeCa, garbage: bytes) -> None:
    assert "malformed" in _refused(make_ca(), garbage)


def test_not_bytes_and_oversized_refused(make_ca: MakeCa) -> None:
    ca = make_ca()
    _refused(ca, "not bytes")  # type: ignore[arg-type]
    assert "too large" in _refused(ca, b"\x30" * 100_000)


def test_refusal_is_a_bad_packet() -> None:
    assert issubclass(CertificateRefused, BadPacket)


# ---------------------------------------------------------------------------------------------
# TrustAnchor: operator input, PkiError


def _self_signed(key: object, extensions: list[x509.ExtensionType], name: str = "lab") -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(1)
        .not_valid_before(_utc(PKI_NOW))
        .not_valid_after(_utc(PKI_NOW + DAY))
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=True)
    algorithm = None if isinstance(key, Ed25519PrivateKey) else _sha256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


_BASIC_CA = x509.BasicConstraints(ca=True, path_length=0)
_CONSTRAINT = x509.NameConstraints(
    permitted_subtrees=[x509.IPAddress(ipaddress.ip_network("10.77.0.0/24"))],
    excluded_subtrees=None,
)


def test_trust_anchor_accepts_minimal_overlay_ca() -> None:
    anchor = TrustAnchor(_self_signed(Ed25519PrivateKey.generate(), [_BASIC_CA, _CONSTRAINT]))
    assert anchor.network == ipaddress.ip_network("10.77.0.0/24")


@pytest.mark.parametrize(
    ("key", "extensions"),
    [
        (Ed25519PrivateKey.generate(), [_BASIC_CA]),
        (Ed25519PrivateKey.generate(), [_CONSTRAINT]),
        (Ed25519PrivateKey.generate(), [x509.BasicConstraints(ca=False, path_length=None)]),
        (ec.generate_private_key(ec.SECP256R1()), [_BASIC_CA, _CONSTRAINT]),
    ],
    ids=["no-constraint", "no-basic", "not-ca", "ecdsa"],
)
def test_trust_anchor_refuses_unusable_ca(key: object, extensions: list) -> None:
    with pytest.raises(PkiError):
        TrustAnchor(_self_signed(key, extensions))


def test_trust_anchor_refuses_node_cert_garbage_and_tampering(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    ca = make_ca()
    with pytest.raises(PkiError):
        TrustAnchor(make_node(ca, "n1", "10.77.0.2").cert_der)
    with pytest.raises(PkiError):
        TrustAnchor(b"not a certificate")
    tampered = bytearray(ca.cert_der)
    tampered[-1] ^= 0x01
    with pytest.raises(PkiError, match="self-signature"):
        TrustAnchor(bytes(tampered))


# ---------------------------------------------------------------------------------------------
# Property tests: network input raises only CertificateRefused


@pytest.fixture(scope="module")
def fuzz_material() -> tuple[TrustAnchor, bytes]:
    ca = pki.new_ca_bundle(now=PKI_NOW)
    node = pki.issue_node_bundle(ca, "n1", "10.77.0.2", ["a", "b"], now=PKI_NOW)
    return ca.anchor, node.cert_der


_fuzz_settings = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_fuzz_settings
@given(data=st.binary(max_size=2048), now=st.floats(allow_nan=True, allow_infinity=True))
def test_random_bytes_only_refused(
    fuzz_material: tuple[TrustAnchor, bytes], data: bytes, now: float
) -> None:
    anchor, _ = fuzz_material
    with pytest.raises(CertificateRefused):
        anchor.verify_untrusted(data, now)


@_fuzz_settings
@given(st.data())
def test_mutated_certificates_only_refused(
    fuzz_material: tuple[TrustAnchor, bytes], data: st.DataObject
) -> None:
    anchor, der = fuzz_material
    mutated = bytearray(der)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        position = data.draw(st.integers(0, max(len(mutated) - 1, 0)), label="position")
        if kind == "flip" and mutated:
            mutated[position] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and mutated:
            mutated[position] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del mutated[position:]
        elif kind == "insert":
            mutated[position:position] = data.draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and mutated:
            del mutated[position]
    if bytes(mutated) == der:
        return
    with pytest.raises(CertificateRefused):
        anchor.verify_untrusted(bytes(mutated), PKI_NOW)


@_fuzz_settings
@given(position=st.integers(0, 10_000), bit=st.integers(0, 7))
def test_every_single_bit_flip_refused(
    fuzz_material: tuple[TrustAnchor, bytes], position: int, bit: int
) -> None:
    anchor, der = fuzz_material
    mutated = bytearray(der)
    mutated[position % len(der)] ^= 1 << bit
    with pytest.raises(CertificateRefused):
        anchor.verify_untrusted(bytes(mutated), PKI_NOW)
