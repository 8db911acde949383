"""Overlay CA and node certificates: issue them, write and read them as files.

Two layers:
  * in memory, clock-free (`now` comes in as Unix seconds): `new_ca`, `issue_node`, and the
    `new_ca_bundle` / `issue_node_bundle` conveniences that tests and the lab use;
  * files: `init_ca`, `sign_node` (the only functions here that read the clock) and the
    `load_*` readers a node uses at start-up. The `ipop-trio ca init|sign` commands over
    them live in cli.py. `sign_node_files` keeps the CA directory's record of what it
    issued (issued.json) and refuses a second key for a name or address.

Certificates are named by `fingerprint` (SHA-256 of the DER) in revocation lists
(`parse_revoked`), which nodes and the signalling server read.

Verification lives in `ipop_trio/proto/cert.py` (`TrustAnchor.verify_untrusted`), which is the
trust boundary; this module is operator-side, so every failure is a `PkiError` saying what the
operator got wrong. Private key files are created 0600 with O_EXCL: never overwritten, never
briefly world-readable.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import ipaddress
import json
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.x509.oid import NameOID

from ipop_trio.errors import CertificateRefused, ConfigError, PkiError
from ipop_trio.proto.cert import (
    Identity,
    IPAddress,
    IPNetwork,
    TrustAnchor,
    by_family,
    decode_key,
    encode_key,
    format_mac,
    mac_for_key,
    networks_text,
    usable_address,
    valid_name,
)

T = TypeVar("T")

DEFAULT_CA_DAYS = 3650
DEFAULT_NODE_DAYS = 365
# Certificates start this long before `now`, so a freshly issued one is accepted by a peer
# whose clock is a little behind ours.
CLOCK_SKEW = 300
KEY_SIZE = 32  # raw X25519 key, private or public
MAX_DAYS = 100 * 366

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.crt"
ISSUED_FILE = "issued.json"  # what `ca sign` issued (sign_node_files), in the CA directory
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DAY = 86400

_PEM = serialization.Encoding.PEM
_DER = serialization.Encoding.DER
_RAW = serialization.Encoding.Raw


# ---------------------------------------------------------------------------------------------
# Keys


def public_key_of(private_raw: bytes) -> bytes:
    """The raw 32-byte X25519 public key of a raw 32-byte X25519 private key."""
    if len(private_raw) != KEY_SIZE:
        raise PkiError(f"an X25519 private key is {KEY_SIZE} bytes, not {len(private_raw)}")
    private = X25519PrivateKey.from_private_bytes(bytes(private_raw))
    return private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)


def _x25519_private_raw(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _private_pem(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


# ---------------------------------------------------------------------------------------------
# Fingerprints and revocation lists


def fingerprint(der: bytes) -> str:
    """A certificate's fingerprint: SHA-256 of its DER, 64 lower-case hex digits (what
    `openssl x509 -noout -fingerprint -sha256` prints, without the colons)."""
    return hashlib.sha256(der).hexdigest()


_HEX = frozenset(string.hexdigits)
MAX_REPORTED = 5  # bad lines a revocation list's error names


def parse_revoked(text: str) -> frozenset[str]:
    """A revocation list: one certificate `fingerprint` per line, `#` to the end of a line is
    a comment, blank lines are ignored. Upper case, colons and openssl's "SHA256
    Fingerprint=" prefix are accepted, so the output of `openssl x509 -fingerprint -sha256`
    can be pasted. `PkiError` names every bad line (the first few)."""
    found: set[str] = set()
    bad: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        digits = word.rsplit("=", 1)[-1].replace(":", "").strip().lower()
        if len(digits) == 64 and _HEX.issuperset(digits):
            found.add(digits)
        else:
            bad.append(f"line {number}: {word[:80]!r}")
    if bad:
        more = f" and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise PkiError(
            f"{'; '.join(bad[:MAX_REPORTED])}{more}: not a certificate fingerprint (SHA-256 of "
            "the DER, 64 hex digits, as `ipop-trio ca sign` prints it; # starts a comment)"
        )
    return frozenset(found)


def load_revoked(path: Path) -> frozenset[str]:
    """The revocation list in `path` (`parse_revoked`), the file named in a `PkiError`."""
    data = _read(Path(path), "revocation list")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PkiError(f"{path}: not UTF-8 text: {exc}") from exc
    try:
        return parse_revoked(text)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from exc


def revoked_setting(path: Path | None, field: str) -> frozenset[str]:
    """The revocation list a setting names (`[node] revoked`, `signal --revoked`), empty
    without one; a list that cannot be read is a ConfigError on `field`."""
    if path is None:
        return frozenset()
    try:
        return load_revoked(path)
    except PkiError as exc:
        raise ConfigError(field, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Validation of operator input


def _check_name(what: str, name: str) -> None:
    if not valid_name(name):
        raise PkiError(f"invalid {what} {name!r}: use 1..63 characters from [A-Za-z0-9._-]")


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or not 0 < days <= MAX_DAYS:
        raise PkiError(f"days must be a whole number from 1 to {MAX_DAYS}, not {days!r}")


def _listed(value: str | Sequence[str]) -> list[str]:
    """One address or network, or several (`--address` given once per family)."""
    return [value] if isinstance(value, str) else list(value)


def _parse_networks(networks: str | Sequence[str]) -> tuple[IPNetwork, ...]:
    """An overlay's networks: one, or one IPv4 and one IPv6; IPv4 first."""
    parsed: list[IPNetwork] = []
    for network in _listed(networks):
        try:
            net = ipaddress.ip_network(network, strict=True)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"invalid overlay network {network!r}: {exc}") from exc
        if net.max_prefixlen - net.prefixlen < 2:
            raise PkiError(f"overlay network {net} is too small for nodes")
        parsed.append(net)
    try:
        return by_family(parsed, "overlay networks (--network)")
    except ValueError as exc:
        raise PkiError(f"{exc}: give --network once per family") from exc


def _parse_addresses(addresses: str | Sequence[str], anchor: TrustAnchor) -> list[IPAddress]:
    """A node's addresses: one, or one of each family the overlay has a network for."""
    parsed: list[IPAddress] = []
    for address in _listed(addresses):
        try:
            ip = ipaddress.ip_address(address)
        except (ValueError, TypeError) as exc:
            raise PkiError(f"invalid node address {address!r}: {exc}") from exc
        network = anchor.network_for(ip)
        if network is None:
            raise PkiError(
                f"node address {ip} is IPv{ip.version}, but overlay {anchor.name!r} has no "
                f"IPv{ip.version} network (it has {networks_text(anchor.networks)})"
            )
        if not usable_address(ip, network):
            raise PkiError(
                f"node address {ip} is not a usable address of the overlay network {network}"
                " (outside it, or its network/broadcast address)"
            )
        same = [known for known in parsed if known.version == ip.version]
        if same:
            raise PkiError(
                f"two IPv{ip.version} addresses ({same[0]}, {ip}): a node has one address "
                "of each family (--address once per family)"
            )
        parsed.append(ip)
    if not parsed:
        raise PkiError("a node needs an address (--address)")
    return sorted(parsed, key=lambda ip: ip.version)


def _check_groups(groups: Iterable[str]) -> list[str]:
    if isinstance(groups, str):
        raise PkiError("groups must be a collection of names, not one string")
    unique = set(groups)
    for group in unique:
        _check_name("group name", group)
    return sorted(unique)


def _utc(timestamp: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(timestamp), tz=datetime.UTC)


def _load_ca(ca_key_pem: bytes, ca_cert_pem: bytes) -> tuple[Ed25519PrivateKey, x509.Certificate]:
    try:
        ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"CA key is not an unencrypted PEM private key: {exc}") from exc
    if not isinstance(ca_key, Ed25519PrivateKey):
        raise PkiError("CA key is not Ed25519")
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    except ValueError as exc:
        raise PkiError(f"CA certificate is not PEM: {exc}") from exc
    raw = serialization.PublicFormat.Raw
    if ca_key.public_key().public_bytes(_RAW, raw) != ca_cert.public_key().public_bytes(_RAW, raw):
        raise PkiError("CA key does not match the CA certificate")
    return ca_key, ca_cert


# ---------------------------------------------------------------------------------------------
# In memory, clock-free


# A CA certificate's KeyUsage: it signs certificates (and CRLs), nothing else.
CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def new_ca(name: str, network: str | Sequence[str], days: int, now: float) -> tuple[bytes, bytes]:
    """A new overlay CA: (private key PEM (PKCS8, unencrypted), self-signed certificate PEM).

    Ed25519 key; subject CN = `name`; BasicConstraints CA=true (critical); KeyUsage
    keyCertSign + cRLSign; NameConstraints permitting exactly the IP subtree `network`, or
    the two of a dual-stack overlay (one IPv4 and one IPv6 network)."""
    _check_name("overlay name", name)
    _check_days(days)
    nets = _parse_networks(network)
    key = Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = int(now) - CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(start + days * _DAY))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.IPAddress(net) for net in nets], excluded_subtrees=None
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, None)
    )
    return _private_pem(key), cert.public_bytes(_PEM)


def build_node_certificate(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    name: str,
    address: IPAddress | Sequence[IPAddress],
    groups: Iterable[str],
    public_key: CertificatePublicKeyTypes,
    not_before: float,
    not_after: float,
    *,
    is_ca: bool = False,
) -> bytes:
    """Build and sign a node certificate exactly as given, with NO checks; DER.

    `issue_node` is the checked way to make certificates. This is its last step, exposed so
    tests can build certificates the CA key really signed but `verify_untrusted` must refuse
    (address outside the network, wrong key type, CA=true, odd validity)."""
    ca_key, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    sans = list(address) if isinstance(address, Sequence) else [address]
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    attributes += [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, g) for g in groups]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(not_before))
        .not_valid_after(_utc(not_after))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(a) for a in sans]), critical=False
        )
    )
    if isinstance(public_key, X25519PublicKey):
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        pass
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    return builder.sign(ca_key, None).public_bytes(_DER)


def _issue(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    name: str,
    address: str | Sequence[str],
    groups: Iterable[str],
    days: int,
    now: float,
    public_key: bytes | None,
) -> tuple[bytes | None, bytes, Identity]:
    _check_name("node name", name)
    _check_days(days)
    group_list = _check_groups(groups)
    _, ca_cert = _load_ca(ca_key_pem, ca_cert_pem)
    anchor = TrustAnchor(ca_cert.public_bytes(_DER))
    node_addresses = _parse_addresses(address, anchor)
    if now > anchor.not_after:
        raise PkiError(f"the overlay CA {anchor.name!r} has expired")

    private_pem: bytes | None
    if public_key is None:
        private = X25519PrivateKey.generate()
        node_public = private.public_key()
        private_pem = _private_pem(private)
    else:
        if len(public_key) != KEY_SIZE:
            raise PkiError(f"an X25519 public key is {KEY_SIZE} bytes, not {len(public_key)}")
        node_public = X25519PublicKey.from_public_bytes(bytes(public_key))
        private_pem = None

    start = int(now) - CLOCK_SKEW
    # A node certificate never outlives its CA.
    end = min(start + days * _DAY, int(anchor.not_after))
    der = build_node_certificate(
        ca_key_pem, ca_cert_pem, name, node_addresses, group_list, node_public, start, end
    )
    try:
        identity = anchor.verify_untrusted(der, now)  # what we issue, we must accept
    except CertificateRefused as exc:
        raise PkiError(f"issued certificate does not verify: {exc}") from exc
    cert_pem = x509.load_der_x509_certificate(der).public_bytes(_PEM)
    return private_pem, cert_pem, identity


def issue_node(
    ca_key_pem: bytes,
    ca_cert_pem: bytes,
    name: str,
    address: str | Sequence[str],
    groups: Iterable[str],
    days: int,
    now: float,
    public_key: bytes | None = None,
) -> tuple[bytes | None, bytes]:
    """Issue a node certificate: (node X25519 private key PEM, or None when `public_key`
    (raw 32 bytes) was given; node certificate PEM).

    `address` is one address, or one of each family (a dual-stack overlay). Refuses
    (`PkiError`) invalid names or groups, `days <= 0`, and addresses that are not a usable
    host address of the CA's network of their family, or two of one family. The
    certificate starts `CLOCK_SKEW` seconds before `now` and never outlives the CA."""
    private_pem, cert_pem, _ = _issue(
        ca_key_pem, ca_cert_pem, name, address, groups, days, now, public_key
    )
    return private_pem, cert_pem


@dataclass(frozen=True, slots=True)
class CaBundle:
    """An overlay CA in memory (tests, the lab): its key and certificate in every form."""

    name: str
    network: IPNetwork  # the first of `networks`
    key_pem: bytes
    cert_pem: bytes
    cert_der: bytes
    anchor: TrustAnchor

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self.anchor.networks


@dataclass(frozen=True, slots=True)
class NodeBundle:
    """A node's key and certificate in memory (tests, the lab)."""

    name: str
    address: IPAddress  # the first of identity.addresses
    groups: frozenset[str]
    private_key: bytes | None  # raw 32-byte X25519; None when issued for a given public key
    key_pem: bytes | None
    public_key: bytes  # raw 32-byte X25519
    cert_pem: bytes
    cert_der: bytes
    identity: Identity

    @property
    def mac(self) -> bytes:
        return mac_for_key(self.public_key)


def new_ca_bundle(
    name: str = "lab",
    network: str | Sequence[str] = "10.77.0.0/24",
    *,
    now: float,
    days: int = DEFAULT_CA_DAYS,
) -> CaBundle:
    """`new_ca`, returned as a `CaBundle`."""
    key_pem, cert_pem = new_ca(name, network, days, now)
    cert_der = load_certificate_der_bytes(cert_pem)
    anchor = TrustAnchor(cert_der)
    return CaBundle(anchor.name, anchor.network, key_pem, cert_pem, cert_der, anchor)


def issue_node_bundle(
    ca: CaBundle,
    name: str,
    address: str | Sequence[str],
    groups: Iterable[str] = (),
    *,
    now: float,
    days: int = DEFAULT_NODE_DAYS,
    public_key: bytes | None = None,
) -> NodeBundle:
    """`issue_node` under `ca`, returned as a `NodeBundle`."""
    key_pem, cert_pem, identity = _issue(
        ca.key_pem, ca.cert_pem, name, address, groups, days, now, public_key
    )
    private_raw = None if key_pem is None else load_private_key_bytes(key_pem)
    return NodeBundle(
        name=identity.name,
        address=identity.address,
        groups=identity.groups,
        private_key=private_raw,
        key_pem=key_pem,
        public_key=identity.public_key,
        cert_pem=cert_pem,
        cert_der=identity.der,
        identity=identity,
    )


# ---------------------------------------------------------------------------------------------
# Parsing key and certificate bytes (PEM or DER)


def load_certificate_der_bytes(data: bytes) -> bytes:
    """A certificate in PEM (the first one) or DER, as DER. `PkiError` when it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data).public_bytes(_DER)
        x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"not a PEM or DER certificate: {exc}") from exc
    return bytes(data)


def load_private_key_bytes(data: bytes) -> bytes:
    """A node's X25519 private key (PKCS8 PEM or DER, or base64 of the raw key) as raw 32 bytes."""
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            try:
                return decode_key(data.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"not an unencrypted X25519 private key: {exc}") from exc
    if not isinstance(key, X25519PrivateKey):
        raise PkiError(f"not an X25519 private key ({type(key).__name__})")
    return _x25519_private_raw(key)


def load_public_key_bytes(data: bytes) -> bytes:
    """An X25519 public key (SubjectPublicKeyInfo PEM or DER, or base64 of the raw key, as in
    `public_key = "..."`) as raw 32 bytes."""
    key: object
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            try:
                return decode_key(data.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"not an X25519 public key: {exc}") from exc
    if not isinstance(key, X25519PublicKey):
        raise PkiError(f"not an X25519 public key ({type(key).__name__})")
    return key.public_bytes(_RAW, serialization.PublicFormat.Raw)


def load_certificates_der_bytes(data: bytes) -> list[bytes]:
    """Every certificate in PEM `data` (a bundle holds several), or the one DER certificate,
    as DER. `PkiError` when there is none."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return [c.public_bytes(_DER) for c in x509.load_pem_x509_certificates(data)]
        x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise PkiError(f"not a PEM or DER certificate: {exc}") from exc
    return [bytes(data)]


_PEM_LABEL = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
# `public_key = "..."`, as `ca sign` and `ca show` print it (a line pasted into a file)
_PUBLIC_KEY_LINE = re.compile(rb'^\s*public_key\s*=\s*"([A-Za-z0-9+/=]+)"\s*$', re.MULTILINE)


def _key_kind(key: object) -> str:
    if isinstance(key, X25519PrivateKey):
        return "a node's X25519 private key"
    if isinstance(key, X25519PublicKey):
        return "an X25519 public key"
    if isinstance(key, Ed25519PrivateKey):
        return "an Ed25519 private key (an overlay CA's key, ca.key?)"
    if isinstance(key, Ed25519PublicKey):
        return "an Ed25519 public key (an overlay CA's?)"
    return f"a {type(key).__name__.removeprefix('_')} key"


def _certificate_kind(cert: x509.Certificate) -> str:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = f" ({cns[0].value!s})" if cns else ""
    return f"a CA certificate{name}" if ca else f"a node certificate{name}"


def what_is(data: bytes) -> str:
    """What key or certificate material `data` holds, in words, for error messages that
    say what a file is before they say what to give instead."""
    if not data.strip():
        return "an empty file"
    labels = [m.group(1).decode() for m in _PEM_LABEL.finditer(data)]
    try:
        if labels:
            label = labels[0]
            if label == "CERTIFICATE":
                many = f" (and {len(labels) - 1} more)" if len(labels) > 1 else ""
                return _certificate_kind(x509.load_pem_x509_certificate(data)) + many
            if label == "PUBLIC KEY":
                return _key_kind(serialization.load_pem_public_key(data))
            if label == "PRIVATE KEY":
                return _key_kind(serialization.load_pem_private_key(data, password=None))
            if label == "ENCRYPTED PRIVATE KEY":
                return "an encrypted private key"
            return f"a PEM {label}"
    except (ValueError, TypeError):
        return f"a PEM {labels[0]} that does not parse"
    if _PUBLIC_KEY_LINE.search(data):
        return "a public_key line"
    for parse in (
        lambda: _certificate_kind(x509.load_der_x509_certificate(data)),
        lambda: _key_kind(serialization.load_der_private_key(data, password=None)),
        lambda: _key_kind(serialization.load_der_public_key(data)),
    ):
        try:
            return parse()
        except (ValueError, TypeError):
            continue
    return "neither a key nor a certificate"


_GIVE_PUBLIC = (
    "give the node's public key (the `public_key = ...` line `ca sign` printed, base64, or "
    "PEM), its key file, or its certificate"
)


def signing_public_key_bytes(data: bytes) -> bytes:
    """The node's X25519 public key that `ca sign --public-key` certifies, raw 32 bytes, from
    what an operator has at hand: a public key (PEM or DER SubjectPublicKeyInfo, base64 of the
    raw key, a `public_key = "..."` line as `ca sign` prints it, or the 32 raw bytes), the
    node's private key (only its public half is derived and used: the private key is never
    written anywhere), or the node's current certificate (its key). A wrong file gets a
    `PkiError` saying what it is."""
    stripped = data.strip()
    line = _PUBLIC_KEY_LINE.search(data)
    if line is not None:
        try:
            return decode_key(line.group(1).decode("ascii"))
        except ValueError as exc:
            raise PkiError(f"its public_key line is not a base64 X25519 key: {exc}") from exc
    label = _PEM_LABEL.match(stripped)
    if label is not None and label.group(1) == b"PRIVATE KEY":
        return _public_of_private(data)
    if label is not None and label.group(1) == b"CERTIFICATE":
        return _public_of_certificate(x509.load_pem_x509_certificate, data)
    if label is None and len(data) == KEY_SIZE:
        return bytes(data)  # the raw key
    try:
        return load_public_key_bytes(data)
    except PkiError:
        pass
    if label is None:
        for parse in (_public_of_private, _der_certificate_key):
            try:
                return parse(data)
            except PkiError:
                continue
    raise PkiError(f"{what_is(data)}, not a node's X25519 public key: {_GIVE_PUBLIC}")


def _public_of_private(data: bytes) -> bytes:
    try:
        return public_key_of(load_private_key_bytes(data))
    except PkiError as exc:
        raise PkiError(f"{what_is(data)}, not a node's X25519 key: {_GIVE_PUBLIC}") from exc


def _der_certificate_key(data: bytes) -> bytes:
    return _public_of_certificate(x509.load_der_x509_certificate, data)


def _public_of_certificate(load: Callable[[bytes], x509.Certificate], data: bytes) -> bytes:
    try:
        cert = load(data)
        key = cert.public_key()
    except ValueError as exc:
        raise PkiError(f"not a certificate: {exc}") from exc
    if not isinstance(key, X25519PublicKey):
        raise PkiError(f"{_certificate_kind(cert)}, not a node's: {_GIVE_PUBLIC}")
    return key.public_bytes(_RAW, serialization.PublicFormat.Raw)


def node_private_key_bytes(data: bytes) -> bytes:
    """`load_private_key_bytes`, with an error that says what the file is instead (for
    `ca sign --key`)."""
    try:
        return load_private_key_bytes(data)
    except PkiError:
        pass
    what = what_is(data)
    hint = "give the node's key file (NAME.key, from `ca sign`)"
    if "certificate" in what or "public" in what:
        hint += ", or give this file to --public-key"
    raise PkiError(f"{what}, not a node's X25519 private key: {hint}")


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a certificate says, unverified (`ca show`): a node's or an overlay CA's."""

    kind: str  # "node" or "ca"
    name: str | None  # subject CN: the node's name, or the overlay's for a CA
    overlay: str | None  # the overlay: the issuer's CN for a node, its own CN for a CA
    addresses: tuple[str, ...]  # a node's SAN IPs; a CA's permitted networks
    groups: tuple[str, ...]
    public_key: str | None  # a node's X25519 key, base64 (`public_key = "..."`)
    mac: str | None  # the TAP MAC peers compute from that key
    not_before: float
    not_after: float
    fingerprint: str  # SHA-256 of the DER
    issuer: str  # RFC 4514
    serial: str  # hex

    def days_left(self, now: float) -> float:
        return (self.not_after - now) / _DAY

    def as_json(self, now: float) -> dict[str, object]:
        out: dict[str, object] = {f: getattr(self, f) for f in self.__slots__}  # type: ignore[attr-defined]
        out["addresses"], out["groups"] = list(self.addresses), list(self.groups)
        out["days_left"] = round(self.days_left(now), 2)
        out["expired"] = now > self.not_after
        return out


def describe_certificate(der: bytes) -> CertificateInfo:
    """A node or CA certificate's fields, unverified (`PkiError` if it is not X.509)."""
    try:
        cert = x509.load_der_x509_certificate(bytes(der))
        key = cert.public_key()
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        addresses: list[str] = []
        if ca:
            try:
                nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
                subtrees = nc.permitted_subtrees or ()
                addresses = [str(g.value) for g in subtrees if isinstance(g, x509.IPAddress)]
            except x509.ExtensionNotFound:
                pass
        else:
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                addresses = [str(a) for a in san.get_values_for_type(x509.IPAddress)]
            except x509.ExtensionNotFound:
                pass
        subject_cn = [
            str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        issuer_cn = [str(a.value) for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
        groups = sorted(
            str(a.value)
            for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        )
        not_before = cert.not_valid_before_utc.timestamp()
        not_after = cert.not_valid_after_utc.timestamp()
    except ValueError as exc:
        raise PkiError(f"not a certificate: {exc}") from exc
    raw = (
        key.public_bytes(_RAW, serialization.PublicFormat.Raw)
        if isinstance(key, X25519PublicKey)
        else None
    )
    name = subject_cn[0] if subject_cn else None
    return CertificateInfo(
        kind="ca" if ca else "node",
        name=name,
        overlay=name if ca else (issuer_cn[0] if issuer_cn else None),
        addresses=tuple(addresses),
        groups=tuple(groups),
        public_key=None if raw is None else encode_key(raw),
        mac=None if raw is None else format_mac(mac_for_key(raw)),
        not_before=not_before,
        not_after=not_after,
        fingerprint=fingerprint(der),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
    )


# ---------------------------------------------------------------------------------------------
# Files


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc


def _parse(path: Path, parse: Callable[[bytes], T], data: bytes) -> T:
    """`parse(data)`, with the file named in its PkiError."""
    try:
        return parse(data)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from exc


def load_certificate_der(path: Path) -> bytes:
    """The certificate in `path` (PEM or DER) as DER."""
    return _parse(path, load_certificate_der_bytes, _read(path, "certificate"))


def load_certificates_der(path: Path) -> list[bytes]:
    """Every certificate in `path` (PEM, one or several; or DER), as DER."""
    return _parse(path, load_certificates_der_bytes, _read(path, "certificate"))


def load_trust_anchor(path: Path) -> TrustAnchor:
    """The overlay CA certificate in `path` (PEM or DER); a PEM file holding several CA
    certificates of one overlay is a bundle (a CA rotation: all are trusted)."""
    ders = load_certificates_der(path)
    try:
        return TrustAnchor(*ders)
    except PkiError as exc:
        raise PkiError(f"{path}: {exc}") from exc


def load_trust_anchors(paths: Iterable[Path]) -> TrustAnchor:
    """The CAs of every file in `paths` (each one CA or a bundle), trusted at once: they must
    be of one overlay (same name, same networks); a refusal names the file that differs."""
    anchors: list[TrustAnchor] = []
    for path in paths:
        anchor = load_trust_anchor(path)
        first = anchors[0] if anchors else anchor
        if (anchor.name, anchor.networks) != (first.name, first.networks):
            raise PkiError(
                f"{path}: CA of overlay {anchor.name!r} ({networks_text(anchor.networks)}), but "
                f"the first CA is of {first.name!r} ({networks_text(first.networks)}); CAs "
                "trusted at once must name the same overlay and networks (a CA rotation keeps "
                "both)"
            )
        anchors.append(anchor)
    return TrustAnchor.bundle(anchors)


def load_private_key(path: Path) -> bytes:
    """The node's X25519 private key in `path`, as raw 32 bytes."""
    return _parse(path, load_private_key_bytes, _read(path, "private key"))


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with exactly `mode` and write `data`; never overwrite."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as exc:
        raise PkiError(f"{path} already exists; refusing to overwrite it") from exc
    except OSError as exc:
        raise PkiError(f"cannot create {path}: {exc.strerror or exc}") from exc
    try:
        os.fchmod(fd, mode)  # exact mode, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)


def _write_pair(first: tuple[Path, bytes, int] | None, second: tuple[Path, bytes, int]) -> None:
    """Write two new files, or neither (checked up front, undone if the second one fails)."""
    items = [item for item in (first, second) if item is not None]
    for path, _, _ in items:
        if path.exists() or path.is_symlink():
            raise PkiError(f"{path} already exists; refusing to overwrite it")
    if first is not None:
        _write_new(*first)
    try:
        _write_new(*second)
    except PkiError:
        if first is not None:
            first[0].unlink(missing_ok=True)
        raise


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(f"cannot create directory {path}: {exc.strerror or exc}") from exc


def init_ca(out_dir: Path, name: str, network: str | Sequence[str], days: int) -> tuple[Path, Path]:
    """Make a new overlay CA in `out_dir`: (ca.key (0600), ca.crt (0644)). Never overwrites."""
    out_dir = Path(out_dir)
    key_pem, cert_pem = new_ca(name, network, days, time.time())
    _make_dir(out_dir)
    key_path, cert_path = out_dir / CA_KEY_FILE, out_dir / CA_CERT_FILE
    _write_pair((key_path, key_pem, _PRIVATE_MODE), (cert_path, cert_pem, _PUBLIC_MODE))
    return key_path, cert_path


@dataclass(frozen=True, slots=True)
class IssuedRecord:
    """One certificate `sign_node_files` issued, as the CA directory's issued.json keeps it:
    what a later `ca sign` checks a new name and addresses against."""

    name: str
    addresses: tuple[str, ...]  # one, or one of each family
    fingerprint: str  # `fingerprint` of the certificate
    not_after: int  # Unix seconds
    public_key: str  # base64 of the raw X25519 key, as in a config's public_key
    issued_at: int = 0
    replaced_by: str | None = None  # the fingerprint of the certificate issued in its place

    def live(self, now: float) -> bool:
        return self.replaced_by is None and now < self.not_after


def load_issued(ca_dir: Path) -> list[IssuedRecord]:
    """The record of what the CA in `ca_dir` issued (empty before its first `ca sign`)."""
    path = Path(ca_dir) / ISSUED_FILE
    if not path.exists():
        return []
    data = _read(path, "record of issued certificates")
    try:
        entries = json.loads(data)["issued"]
        return [
            IssuedRecord(
                name=str(e["name"]),
                addresses=_record_addresses(e),
                fingerprint=str(e["fingerprint"]),
                not_after=int(e["not_after"]),
                public_key=str(e["public_key"]),
                issued_at=int(e.get("issued_at", 0)),
                replaced_by=None if e.get("replaced_by") is None else str(e["replaced_by"]),
            )
            for e in entries
        ]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PkiError(
            f"{path}: not a record of issued certificates ({type(exc).__name__}: {exc}); "
            "fix it, or move it away to start a new record"
        ) from exc


def _record_addresses(entry: dict[str, object]) -> tuple[str, ...]:
    """An issued.json entry's addresses ("addresses"; before dual-stack, one "address")."""
    listed = entry.get("addresses")
    if listed is None:
        return (str(entry["address"]),)
    if not isinstance(listed, list) or not listed:
        raise ValueError(f"addresses is {listed!r}, not a list of addresses")
    return tuple(str(a) for a in listed)


def _write_issued(ca_dir: Path, records: list[IssuedRecord]) -> None:
    """Replace issued.json at once (a temporary file renamed over it)."""
    path = Path(ca_dir) / ISSUED_FILE
    tmp = path.with_name(f".{ISSUED_FILE}.tmp")
    entries = [
        {f: getattr(r, f) for f in IssuedRecord.__dataclass_fields__}
        | {"addresses": list(r.addresses), "address": r.addresses[0]}  # and for older readers
        | {"expires": _utc(r.not_after).isoformat()}  # for people; not read back
        for r in records
    ]
    try:
        tmp.write_text(json.dumps({"issued": entries}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _taken_by(records: list[IssuedRecord], identity: Identity, now: float) -> list[int]:
    """The live records whose name or one of whose addresses the new certificate takes."""
    addresses = {str(a) for a in identity.addresses}
    return [
        i
        for i, r in enumerate(records)
        if r.live(now) and (r.name == identity.name or addresses.intersection(r.addresses))
    ]


def _duplicate(record: IssuedRecord, identity: Identity) -> PkiError:
    shared = sorted({str(a) for a in identity.addresses}.intersection(record.addresses))
    what = f"address {shared[0]}" if shared else f"name {record.name!r}"
    return PkiError(
        f"{what} is already certified to {record.name} ({', '.join(record.addresses)}, "
        "another key): "
        f"certificate sha256 {record.fingerprint}, valid until {_utc(record.not_after):%Y-%m-%d}"
        f" (in {ISSUED_FILE}); give --replace to issue it anyway, and revoke the earlier "
        "certificate (its fingerprint into the revoked list) if it should stop working now"
    )


@dataclass(frozen=True, slots=True)
class SignedNode:
    """What `sign_node_files` wrote."""

    key_path: Path | None
    cert_path: Path
    identity: Identity
    old_cert_path: Path | None = None  # where the certificate it replaced was kept
    replaced: tuple[IssuedRecord, ...] = ()  # live certificates of the same name or address


OLD_SUFFIX = ".old"


def sign_node_files(
    ca_dir: Path,
    name: str,
    address: str | Sequence[str],
    groups: Iterable[str],
    days: int,
    out_dir: Path,
    public_key_file: Path | None = None,
    *,
    key_file: Path | None = None,
    force: bool = False,
    replace: bool = False,
) -> SignedNode:
    """`sign_node`, also returning the issued identity (for the `ca sign` report).

    With `key_file` (the node's existing private key) or `public_key_file`, the certificate
    is for that key and no key is written: re-issuing it (renewal, new groups) is this one
    call. An existing <name>.crt for the same key is then replaced, the old one kept as
    <name>.crt.old; one for another key (or not a certificate) is replaced only with `force`.
    The new certificate appears at once (written aside, renamed into place), so a node reading
    it on SIGHUP never sees half a file.

    The CA directory's issued.json records every certificate issued here; a name or
    address a live certificate for another key already holds is refused (`PkiError` naming
    that certificate) unless `replace`. The same key's earlier certificate (a renewal) is
    replaced without asking. Replaced records stay in the file, marked `replaced_by`."""
    ca_dir, out_dir = Path(ca_dir), Path(out_dir)
    public_key = _signing_key(public_key_file, key_file)
    if force and public_key is None:
        raise PkiError(
            "--force replaces a certificate for an existing key: give --key or --public-key"
        )
    ca_key_pem = _read(ca_dir / CA_KEY_FILE, "CA key")
    ca_cert_pem = _read(ca_dir / CA_CERT_FILE, "CA certificate")
    records = load_issued(ca_dir)
    now = time.time()
    key_pem, cert_pem, identity = _issue(
        ca_key_pem, ca_cert_pem, name, address, groups, days, now, public_key
    )
    key_path = out_dir / f"{name}.key" if key_pem is not None else None
    cert_path = out_dir / f"{name}.crt"
    renewing = public_key is not None and (cert_path.exists() or cert_path.is_symlink())
    # The files first: they are the likelier mistake.
    if key_path is not None and (key_path.exists() or key_path.is_symlink()):
        raise PkiError(
            f"{key_path} already exists; refusing to overwrite it (to re-issue the certificate "
            f"for this key, give --key {key_path})"
        )
    if not renewing and (cert_path.exists() or cert_path.is_symlink()):
        raise PkiError(f"{cert_path} already exists; refusing to overwrite it")
    if renewing:
        assert public_key is not None
        _check_renewal(cert_path, public_key, force)
    taken = _taken_by(records, identity, now)
    new_key = encode_key(identity.public_key)
    others = [records[i] for i in taken if records[i].public_key != new_key]
    if others and not replace:
        raise _duplicate(others[0], identity)
    _make_dir(out_dir)
    old = None
    if renewing:
        old = _renew(cert_path, cert_pem)
    else:
        key_item = (
            None if key_path is None or key_pem is None else (key_path, key_pem, _PRIVATE_MODE)
        )
        _write_pair(key_item, (cert_path, cert_pem, _PUBLIC_MODE))
    issued = fingerprint(identity.der)
    replaced = tuple(records[i] for i in taken)
    for i in taken:
        records[i] = dataclasses.replace(records[i], replaced_by=issued)
    records.append(
        IssuedRecord(
            name=identity.name,
            addresses=tuple(str(a) for a in identity.addresses),
            fingerprint=issued,
            not_after=int(identity.not_after),
            public_key=new_key,
            issued_at=int(now),
        )
    )
    _write_issued(ca_dir, records)
    return SignedNode(key_path, cert_path, identity, old, replaced)


def _signing_key(public_key_file: Path | None, key_file: Path | None) -> bytes | None:
    """The raw public key `ca sign` certifies: from --key (a private key, of which only the
    public half is kept) or --public-key (a file, or the base64 key itself); None: generate."""
    if public_key_file is not None and key_file is not None:
        raise PkiError("give --key (the node's private key) or --public-key, not both")
    if key_file is not None:
        data = _read(Path(key_file), "node key")
        return public_key_of(_parse(Path(key_file), node_private_key_bytes, data))
    if public_key_file is None:
        return None
    path = Path(public_key_file)
    if not path.exists():
        try:  # `--public-key KEY`: the base64 value itself, as `public_key =` lines hold it
            return decode_key(str(public_key_file))
        except ValueError:
            pass
    return _parse(path, signing_public_key_bytes, _read(path, "public key"))


def _check_renewal(cert_path: Path, public_key: bytes, force: bool) -> None:
    """Refuse (unless `force`) to replace `cert_path` when it is not a certificate for
    `public_key`."""
    old_path = cert_path.with_name(cert_path.name + OLD_SUFFIX)
    old_pem = _read(cert_path, "certificate")
    if not force:
        try:
            old_key = _public_of_certificate(
                x509.load_der_x509_certificate, load_certificate_der_bytes(old_pem)
            )
        except PkiError as exc:
            raise PkiError(
                f"{cert_path} exists and is not a node certificate ({exc}); refusing to "
                "overwrite it (--force replaces it, keeping it as "
                f"{old_path.name})"
            ) from exc
        if old_key != public_key:
            raise PkiError(
                f"{cert_path} exists and certifies another key; refusing to overwrite it "
                f"(a wrong --out? --force replaces it, keeping it as {old_path.name})"
            )


def _renew(cert_path: Path, cert_pem: bytes) -> Path:
    """Replace `cert_path` with `cert_pem`, keeping the old one as <path>.old."""
    old_path = cert_path.with_name(cert_path.name + OLD_SUFFIX)
    old_pem = _read(cert_path, "certificate")
    _replace(old_path, old_pem, _PUBLIC_MODE)
    _replace(cert_path, cert_pem, _PUBLIC_MODE)
    return old_path


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` at once: a new file beside it, renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    _write_new(tmp, data, mode)
    try:
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PkiError(f"cannot replace {path}: {exc.strerror or exc}") from exc


def sign_node(
    ca_dir: Path,
    name: str,
    address: str | Sequence[str],
    groups: Iterable[str],
    days: int,
    out_dir: Path,
    public_key_file: Path | None = None,
) -> tuple[Path | None, Path]:
    """Issue a node certificate with the CA in `ca_dir`; write <name>.key (0600, only when the
    key is generated here, i.e. no `public_key_file`) and <name>.crt (0644) in `out_dir`.
    Never overwrites a key; a certificate only to renew it for the same key; refuses a name or
    address already certified to another key (see
    `sign_node_files`). Returns (key path or None, certificate path)."""
    signed = sign_node_files(ca_dir, name, address, groups, days, out_dir, public_key_file)
    return signed.key_path, signed.cert_path
