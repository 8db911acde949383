"""Node certificates as the link protocol sees them: parse, verify against the overlay CA.

Pure (no file, socket or clock access): `now` comes in as Unix seconds. File handling and
the `ca` commands live in `ipop_trio/pki.py`.

A node certificate is X.509, signed by the overlay CA (Ed25519), with
  * subject CN = node name, one OU per group (readable in `openssl x509 -text`),
  * the node's X25519 link key as its subject public key,
  * SAN IP = the node's overlay address: one, or one of each family (IPv4 and IPv6),
  * BasicConstraints CA=false.
The CA certificate carries the overlay name (subject CN) and the overlay network as a
NameConstraints permitted IP subtree, or two (one IPv4 and one IPv6 network: a dual-stack
overlay); every node address must lie inside the network of its family.

`TrustAnchor.verify_untrusted` is the trust boundary: certificates arrive from peers and the
signalling server, so every failure (including any exception from `cryptography`) becomes
`CertificateRefused`, never anything else.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import ipaddress
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.x509.oid import NameOID, SignatureAlgorithmOID

from ipop_trio.errors import CertificateRefused, PkiError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Node, overlay and group names: short, printable, safe in logs, file names and JSON.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,63}")
# A node certificate is ~400 bytes; refuse absurd sizes before parsing anything.
MAX_CERT_SIZE = 8192

_RAW = serialization.Encoding.Raw
_RAW_PUB = serialization.PublicFormat.Raw


def valid_name(name: object) -> TypeGuard[str]:
    """True when `name` is usable as a node, overlay or group name ([A-Za-z0-9._-], 1..63)."""
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


def by_family(items: Sequence[IPNetwork], what: str) -> tuple[IPNetwork, ...]:
    """`items` (1 or 2, at most one per IP family) in order IPv4 first; `ValueError` naming
    `what` otherwise."""
    if not 1 <= len(items) <= 2:
        raise ValueError(f"{what}: one, or one IPv4 and one IPv6, not {len(items)}")
    if len({item.version for item in items}) != len(items):
        raise ValueError(f"{what}: two of one family ({', '.join(map(str, items))})")
    return tuple(sorted(items, key=lambda item: item.version))


def usable_address(address: IPAddress, network: IPNetwork) -> bool:
    """True when `address` may be a node's overlay address in `network`.

    Inside the network, and neither its network address nor (IPv4) its broadcast address."""
    if address.version != network.version or address not in network:
        return False
    if address == network.network_address:
        return False
    return not (isinstance(network, ipaddress.IPv4Network) and address == network.broadcast_address)


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified node certificate says.

    `addresses` are its overlay addresses, IPv4 first (one, or one of each family), and
    `networks` the overlay network of each (from the CA), index for index. `address` and
    `network` are the first of them: the IPv4 ones on an IPv4 or dual-stack node."""

    name: str
    overlay: str  # the CA's subject CN
    addresses: tuple[IPAddress, ...]
    networks: tuple[IPNetwork, ...]
    groups: frozenset[str]
    public_key: bytes  # raw 32-byte X25519 key
    not_before: float  # Unix seconds
    not_after: float
    der: bytes = field(repr=False)

    @property
    def mac(self) -> bytes:
        return mac_for_key(self.public_key)

    @property
    def address(self) -> IPAddress:
        return self.addresses[0]

    @property
    def network(self) -> IPNetwork:
        return self.networks[0]

    @property
    def ip4(self) -> ipaddress.IPv4Address | None:
        return next((a for a in self.addresses if isinstance(a, ipaddress.IPv4Address)), None)

    @property
    def ip6(self) -> ipaddress.IPv6Address | None:
        return next((a for a in self.addresses if isinstance(a, ipaddress.IPv6Address)), None)

    @property
    def interfaces(self) -> tuple[ipaddress.IPv4Interface | ipaddress.IPv6Interface, ...]:
        """Each address with its network's prefix: what the TAP gets."""
        return tuple(
            ipaddress.ip_interface(f"{a}/{n.prefixlen}")
            for a, n in zip(self.addresses, self.networks, strict=True)
        )

    def address_text(self) -> str:
        """Its addresses as a user reads them: `10.77.0.2` or `10.77.0.2, fd77::2`."""
        return ", ".join(map(str, self.addresses))


def mac_for_key(public_key: bytes) -> bytes:
    """The TAP MAC of the node owning `public_key`: stable, computable by every peer.

    Locally administered, unicast: the first byte is 0x02 | (hash bits & 0xfc)."""
    digest = hashlib.sha256(b"ipop-trio mac" + bytes(public_key)).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


_KEY_SIZE = 32  # a raw X25519 key


def encode_key(raw: bytes) -> str:
    """A raw 32-byte key as the base64 text used in config files (`public_key = "..."`)."""
    if len(raw) != _KEY_SIZE:
        raise ValueError(f"a key is {_KEY_SIZE} bytes, not {len(raw)}")
    return base64.b64encode(bytes(raw)).decode("ascii")


def decode_key(text: str) -> bytes:
    """The raw 32-byte key in a config value; `ValueError` when it is not exactly that."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError, AttributeError) as exc:
        raise ValueError(f"not base64: {exc}") from exc
    if len(raw) != _KEY_SIZE:
        raise ValueError(f"a key is {_KEY_SIZE} bytes, not {len(raw)}")
    return raw


def format_mac(mac: bytes) -> str:
    """aa:bb:cc:dd:ee:ff, as ip(8) and netlink write it."""
    return ":".join(f"{b:02x}" for b in mac)


def certified_name(cert_der: bytes) -> str | None:
    """The node name a certificate claims (its CN), unverified: for telling nodes apart
    locally (`status`), never for trusting one."""
    try:
        return _single_cn(x509.load_der_x509_certificate(cert_der).subject)
    except ValueError:
        return None


def _single_cn(name: x509.Name) -> str | None:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        return None
    return cns[0].value


def _timestamp(moment: datetime.datetime) -> float:
    return moment.timestamp()


_ED25519_SIGNATURE_PREFIX = b"\x03\x41\x00"


class CaCertificate:
    """One overlay CA certificate, parsed and checked (operator input: `PkiError`).

    Ed25519, self-signed, BasicConstraints CA=true, one CN (the overlay's name) and exactly
    one permitted IP subtree (the overlay's network), or one IPv4 and one IPv6 subtree (a
    dual-stack overlay): `networks`, IPv4 first; `network` is the first."""

    name: str
    networks: tuple[IPNetwork, ...]
    der: bytes
    not_before: float
    not_after: float

    def __init__(self, ca_der: bytes) -> None:
        try:
            cert = x509.load_der_x509_certificate(bytes(ca_der))
            public = cert.public_key()
        except Exception as exc:
            raise PkiError(f"not a CA certificate (DER): {exc}") from exc
        if not isinstance(public, Ed25519PublicKey):
            raise PkiError("CA certificate key is not Ed25519")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        except x509.ExtensionNotFound as exc:
            raise PkiError(f"not an overlay CA certificate: {exc}") from exc
        except Exception as exc:
            raise PkiError(f"CA certificate has malformed extensions: {exc}") from exc
        if not basic.ca:
            raise PkiError("CA certificate does not have BasicConstraints CA=true")
        networks = [
            general.value
            for general in constraints.permitted_subtrees or ()
            if isinstance(general, x509.IPAddress)
            and isinstance(general.value, ipaddress.IPv4Network | ipaddress.IPv6Network)
        ]
        try:
            ordered = by_family(networks, "CA certificate's permitted IP subtrees")
        except ValueError as exc:
            raise PkiError(f"{exc} (the overlay networks)") from exc
        name = _single_cn(cert.subject)
        if name is None or not valid_name(name):
            raise PkiError("CA certificate subject must be one CN naming the overlay")
        if cert.issuer != cert.subject:
            raise PkiError("CA certificate is not self-signed")
        try:
            public.verify(cert.signature, cert.tbs_certificate_bytes)
        except InvalidSignature as exc:
            raise PkiError("CA certificate self-signature is invalid") from exc

        self.public = public
        self.subject = cert.subject
        self.name = name
        self.networks = ordered
        self.der = bytes(ca_der)
        self.not_before = _timestamp(cert.not_valid_before_utc)
        self.not_after = _timestamp(cert.not_valid_after_utc)

    @property
    def network(self) -> IPNetwork:
        return self.networks[0]

    def __repr__(self) -> str:
        return f"CaCertificate(name={self.name!r}, networks={networks_text(self.networks)})"

    def signed(self, cert: x509.Certificate) -> bool:
        """True when this CA issued and signed `cert` (an Ed25519-signed certificate)."""
        if cert.issuer != self.subject:
            return False
        try:
            self.public.verify(cert.signature, cert.tbs_certificate_bytes)
        except InvalidSignature:
            return False
        return True


class TrustAnchor:
    """The overlay's CA, or CAs: verifies node certificates.

    `TrustAnchor(ca_der, *more_ders)` raises `PkiError` when one of them is not a usable
    overlay CA certificate (operator input, not network input). Several CA certificates are
    a bundle, trusted at once while a CA is rotated: a node certificate issued by any of
    them is accepted. They must all name the same overlay with the same networks, since that
    pair is the overlay's identity (the handshake binds the name, every address lies in the
    network of its family); a bundle that mixes overlays is refused. `name`, `networks` and
    `network` (the first of them) are theirs;
    `der`, `not_before` and `not_after` are those of the first CA (a bundle's others are in
    `cas`)."""

    name: str
    networks: tuple[IPNetwork, ...]
    cas: tuple[CaCertificate, ...]

    def __init__(self, ca_der: bytes, *more_ders: bytes) -> None:
        cas: list[CaCertificate] = []
        for der in (ca_der, *more_ders):
            ca = CaCertificate(der)
            if all(ca.der != known.der for known in cas):  # the same CA twice is once
                cas.append(ca)
        first = cas[0]
        for ca in cas[1:]:
            if (ca.name, ca.networks) != (first.name, first.networks):
                raise PkiError(
                    f"CA bundle mixes overlays: {first.name!r} ({networks_text(first.networks)})"
                    f" and {ca.name!r} ({networks_text(ca.networks)}); the CAs trusted at once "
                    "must name the same overlay and networks (a CA rotation keeps both)"
                )
        self.cas = tuple(cas)
        self.name = first.name
        self.networks = first.networks

    @property
    def network(self) -> IPNetwork:
        return self.networks[0]

    def network_for(self, address: IPAddress) -> IPNetwork | None:
        """The overlay network of `address`'s family, None when the overlay has none."""
        return next((n for n in self.networks if n.version == address.version), None)

    @classmethod
    def bundle(cls, anchors: Sequence[TrustAnchor]) -> TrustAnchor:
        """One anchor trusting every CA of `anchors` (`PkiError` if they mix overlays)."""
        ders = [ca.der for anchor in anchors for ca in anchor.cas]
        if not ders:
            raise PkiError("no CA certificate")
        return cls(*ders)

    @property
    def der(self) -> bytes:
        return self.cas[0].der

    @property
    def not_before(self) -> float:
        return self.cas[0].not_before

    @property
    def not_after(self) -> float:
        return self.cas[0].not_after

    def __repr__(self) -> str:
        more = f", cas={len(self.cas)}" if len(self.cas) > 1 else ""
        return f"TrustAnchor(name={self.name!r}, networks={networks_text(self.networks)}{more})"

    def verify_untrusted(self, cert_der: bytes, now: float) -> Identity:
        """Verify a certificate received from the network.

        Raises only `CertificateRefused` (a `BadPacket`), with a reason a user can read:
        malformed, not signed by this CA, not yet valid / expired, key not X25519, address
        missing or outside the overlay network."""
        try:
            return self._verify(cert_der, now)
        except CertificateRefused:
            raise
        except Exception as exc:
            # Network input: whatever cryptography (or a malformed field) throws is a refusal.
            raise CertificateRefused(f"malformed certificate: {exc}") from exc

    def _verify(self, cert_der: bytes, now: float) -> Identity:
        if not isinstance(cert_der, bytes | bytearray | memoryview):
            raise CertificateRefused("certificate is not bytes")
        der = bytes(cert_der)
        if len(der) > MAX_CERT_SIZE:
            raise CertificateRefused(f"certificate too large ({len(der)} bytes)")
        try:
            # A parser warning (e.g. a non-positive serial) is a refusal, not log noise a
            # peer could make us print.
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                cert = x509.load_der_x509_certificate(der)
        except Exception as exc:
            raise CertificateRefused(f"malformed certificate: {exc}") from exc

        # Chain: issued by one of our CAs, signature valid (Ed25519 over the TBS bytes).
        issued = [ca for ca in self.cas if cert.issuer == ca.subject]
        if not issued:
            raise CertificateRefused(
                f"not issued by overlay CA {self.name!r} (issuer {cert.issuer.rfc4514_string()})"
            )
        if cert.signature_algorithm_oid != SignatureAlgorithmOID.ED25519:
            raise CertificateRefused("certificate signature algorithm is not Ed25519")
        # The DER must end in the signature BIT STRING exactly (tag, length 65, 0 unused
        # bits): the parser ignores the unused-bits count, which would make one byte of an
        # accepted certificate malleable (found by the single-bit-flip property test).
        if der[-67:-64] != _ED25519_SIGNATURE_PREFIX:
            raise CertificateRefused("malformed certificate: signature is not a plain BIT STRING")
        # The CAs of one overlay share their subject (CN = the overlay's name): the signature
        # tells which one issued it (one Ed25519 check per CA of a bundle: a handful).
        signers = [ca for ca in issued if ca.signed(cert)]
        if not signers:
            which = "any trusted CA of overlay" if len(self.cas) > 1 else "overlay CA"
            raise CertificateRefused(
                f"bad signature: not signed by {which} {self.name!r} (by another CA of that "
                "name: one not trusted here, or rotated out?)"
            )

        # Time: the certificate and the CA that signed it must both be valid now.
        not_before = _timestamp(cert.not_valid_before_utc)
        not_after = _timestamp(cert.not_valid_after_utc)
        if now < not_before:
            raise CertificateRefused(f"certificate not yet valid (from {_iso(not_before)})")
        if now > not_after:
            raise CertificateRefused(f"certificate expired (at {_iso(not_after)})")
        if not any(ca.not_before <= now <= ca.not_after for ca in signers):
            raise CertificateRefused(f"overlay CA {self.name!r} is not valid now")

        # A node certificate, never a CA.
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            basic = None
        if basic is not None and basic.ca:
            raise CertificateRefused("a CA certificate cannot be a node certificate")

        # Key: the node's X25519 link key.
        try:
            public = cert.public_key()
        except Exception as exc:
            raise CertificateRefused(f"certificate public key is not X25519: {exc}") from exc
        if not isinstance(public, X25519PublicKey):
            raise CertificateRefused(
                f"certificate public key is not X25519 ({type(public).__name__})"
            )
        public_raw = public.public_bytes(_RAW, _RAW_PUB)

        # Addresses: one SAN IP, or one of each family, each a usable address of the
        # overlay network of its family.
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise CertificateRefused("certificate has no SAN IP address") from exc
        addresses = san.get_values_for_type(x509.IPAddress)
        if not addresses:
            raise CertificateRefused("certificate has no SAN IP address")
        if len(addresses) > 2:
            raise CertificateRefused(f"certificate has {len(addresses)} SAN IP addresses")
        found: list[IPAddress] = []
        networks: list[IPNetwork] = []
        for address in addresses:
            if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise CertificateRefused("certificate SAN IP is a network, not an address")
            network = self.network_for(address)
            if network is None:
                raise CertificateRefused(
                    f"certificate address {address} is IPv{address.version}, but overlay "
                    f"{self.name!r} has no IPv{address.version} network"
                )
            if not usable_address(address, network):
                raise CertificateRefused(
                    f"certificate address {address} is outside overlay network {network}"
                )
            found.append(address)
            networks.append(network)
        if len({a.version for a in found}) != len(found):
            raise CertificateRefused(
                f"certificate has two SAN IP addresses of one family ({', '.join(map(str, found))})"
            )
        order = sorted(range(len(found)), key=lambda i: found[i].version)

        # Names: CN = node name, OU = groups.
        name = _single_cn(cert.subject)
        if name is None or not valid_name(name):
            raise CertificateRefused("certificate subject must be one CN with a valid node name")
        groups: set[str] = set()
        for attribute in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME):
            group = attribute.value
            if not valid_name(group):
                raise CertificateRefused("certificate has an invalid group (OU) name")
            groups.add(group)

        return Identity(
            name=name,
            overlay=self.name,
            addresses=tuple(found[i] for i in order),
            networks=tuple(networks[i] for i in order),
            groups=frozenset(groups),
            public_key=public_raw,
            not_before=not_before,
            not_after=not_after,
            der=der,
        )


def networks_text(networks: Sequence[IPNetwork]) -> str:
    """`10.77.0.0/24` or `10.77.0.0/24 + fd77::/64`."""
    return " + ".join(map(str, networks))


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC).isoformat()
