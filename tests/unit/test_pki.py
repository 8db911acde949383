"""pki.py: issuing the overlay CA and node certificates, key and certificate files."""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ipop_trio import pki
from ipop_trio.errors import PkiError
from ipop_trio.proto.cert import TrustAnchor, decode_key, encode_key

from .conftest import PKI_NOW, MakeCa, MakeNode

OPENSSL = "/usr/bin/openssl"
DAY = 86400


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------------
# new_ca


def test_new_ca_pems() -> None:
    key_pem, cert_pem = pki.new_ca("lab", "10.77.0.0/24", 30, PKI_NOW)
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, Ed25519PrivateKey)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    anchor = TrustAnchor(cert.public_bytes(serialization.Encoding.DER))
    assert anchor.name == "lab"
    assert anchor.network == ipaddress.ip_network("10.77.0.0/24")
    assert anchor.not_before == PKI_NOW - pki.CLOCK_SKEW
    assert anchor.not_after == PKI_NOW - pki.CLOCK_SKEW + 30 * DAY


@pytest.mark.parametrize(
    ("name", "network", "days"),
    [
        ("", "10.77.0.0/24", 10),
        ("bad name", "10.77.0.0/24", 10),
        ("x" * 64, "10.77.0.0/24", 10),
        ("lab", "10.77.0.1/24", 10),  # host bits set
        ("lab", "not-a-network", 10),
        ("lab", "10.77.0.0/31", 10),  # no room for nodes
        ("lab", "10.77.0.0/24", 0),
        ("lab", "10.77.0.0/24", -5),
        ("lab", "10.77.0.0/24", 10**9),
    ],
)
def test_new_ca_refuses_bad_arguments(name: str, network: str, days: int) -> None:
    with pytest.raises(PkiError):
        pki.new_ca(name, network, days, PKI_NOW)


# ---------------------------------------------------------------------------------------------
# issue_node


def test_issue_node_generates_key(lab_ca: pki.CaBundle) -> None:
    key_pem, cert_pem = pki.issue_node(
        lab_ca.key_pem, lab_ca.cert_pem, "n1", "10.77.0.2", ["b", "a"], 10, PKI_NOW
    )
    assert key_pem is not None
    private = pki.load_private_key_bytes(key_pem)
    cert = x509.load_pem_x509_certificate(cert_pem)
    identity = lab_ca.anchor.verify_untrusted(
        cert.public_bytes(serialization.Encoding.DER), PKI_NOW
    )
    assert identity.public_key == pki.public_key_of(private)
    assert identity.groups == {"a", "b"}
    ous = [a.value for a in cert.subject if a.oid == x509.NameOID.ORGANIZATIONAL_UNIT_NAME]
    assert ous == ["a", "b"]  # sorted
    assert cert.issuer == x509.load_der_x509_certificate(lab_ca.cert_der).subject
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and not basic.value.ca


def test_issue_node_for_given_public_key(lab_ca: pki.CaBundle) -> None:
    public = X25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key_pem, cert_pem = pki.issue_node(
        lab_ca.key_pem, lab_ca.cert_pem, "n1", "10.77.0.2", [], 10, PKI_NOW, public_key=raw
    )
    assert key_pem is None
    der = pki.load_certificate_der_bytes(cert_pem)
    assert lab_ca.anchor.verify_untrusted(der, PKI_NOW).public_key == raw


def test_serials_are_random(make_ca: MakeCa, make_node: MakeNode) -> None:
    ca = make_ca()
    serials = {
        x509.load_der_x509_certificate(
            make_node(ca, f"n{i}", f"10.77.0.{i}").cert_der
        ).serial_number
        for i in range(2, 6)
    }
    assert len(serials) == 4


@pytest.mark.parametrize(
    ("name", "address", "groups", "days"),
    [
        ("n1", "10.78.0.2", (), 10),  # outside the network
        ("n1", "10.77.0.0", (), 10),  # network address
        ("n1", "10.77.0.255", (), 10),  # broadcast address
        ("n1", "fd00::2", (), 10),
        ("n1", "not-an-ip", (), 10),
        ("", "10.77.0.2", (), 10),
        ("n 1", "10.77.0.2", (), 10),
        ("../n1", "10.77.0.2", (), 10),
        ("n1", "10.77.0.2", ("ok", "not ok"), 10),
        ("n1", "10.77.0.2", ("",), 10),
        ("n1", "10.77.0.2", "eng", 10),  # a string, not a collection of names
        ("n1", "10.77.0.2", (), 0),
        ("n1", "10.77.0.2", (), -1),
    ],
)
def test_issue_node_refuses_bad_arguments(
    lab_ca: pki.CaBundle, name: str, address: str, groups: tuple[str, ...], days: int
) -> None:
    with pytest.raises(PkiError):
        pki.issue_node(lab_ca.key_pem, lab_ca.cert_pem, name, address, groups, days, PKI_NOW)


def test_issue_node_refuses_bad_public_key(lab_ca: pki.CaBundle) -> None:
    with pytest.raises(PkiError, match="32 bytes"):
        pki.issue_node(
            lab_ca.key_pem, lab_ca.cert_pem, "n1", "10.77.0.2", [], 10, PKI_NOW, b"\x01" * 31
        )


def test_issue_node_refuses_mismatched_ca(make_ca: MakeCa) -> None:
    one, two = make_ca(), make_ca()
    with pytest.raises(PkiError, match="does not match"):
        pki.issue_node(one.key_pem, two.cert_pem, "n1", "10.77.0.2", [], 10, PKI_NOW)
    with pytest.raises(PkiError):
        pki.issue_node(b"garbage", one.cert_pem, "n1", "10.77.0.2", [], 10, PKI_NOW)


def test_issue_node_refuses_expired_ca(make_ca: MakeCa) -> None:
    ca = make_ca(days=1)
    with pytest.raises(PkiError, match="expired"):
        pki.issue_node(ca.key_pem, ca.cert_pem, "n1", "10.77.0.2", [], 10, PKI_NOW + 2 * DAY)


# ---------------------------------------------------------------------------------------------
# openssl sees what we mean


def test_openssl_shows_name_groups_key_and_address(
    tmp_path: Path, make_ca: MakeCa, make_node: MakeNode
) -> None:
    ca = make_ca()
    node = make_node(ca, "alice", "10.77.0.42", groups=("eng", "ops"))
    cert_path, ca_path = tmp_path / "alice.crt", tmp_path / "ca.crt"
    cert_path.write_bytes(node.cert_pem)
    ca_path.write_bytes(ca.cert_pem)
    text = subprocess.run(
        [OPENSSL, "x509", "-in", str(cert_path), "-text", "-noout"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "CN = alice" in text or "CN=alice" in text
    assert "OU = eng" in text or "OU=eng" in text
    assert "OU = ops" in text or "OU=ops" in text
    assert "X25519" in text
    assert "IP Address:10.77.0.42" in text
    assert "CA:FALSE" in text
    # And a stock X.509 implementation accepts the chain (name constraint included).
    subprocess.run(
        [OPENSSL, "verify", "-attime", str(int(PKI_NOW)), "-CAfile", str(ca_path), str(cert_path)],
        check=True,
        capture_output=True,
    )


def test_openssl_shows_ca_name_constraint(tmp_path: Path, lab_ca: pki.CaBundle) -> None:
    path = tmp_path / "ca.crt"
    path.write_bytes(lab_ca.cert_pem)
    text = subprocess.run(
        [OPENSSL, "x509", "-in", str(path), "-text", "-noout"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "CA:TRUE" in text
    assert "ED25519" in text
    assert "IP:10.77.0.0/255.255.255.0" in text


# ---------------------------------------------------------------------------------------------
# Keys and config values


def test_public_key_of_and_base64_helpers() -> None:
    private = X25519PrivateKey.generate()
    raw = pki._x25519_private_raw(private)
    public = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert pki.public_key_of(raw) == public
    text = encode_key(public)
    assert len(text) == 44
    assert decode_key(text) == public
    assert decode_key(f"  {text}\n") == public
    with pytest.raises(PkiError):
        pki.public_key_of(b"short")


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", "A" * 43, "A" * 44 + "=="])
def test_decode_key_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        decode_key(text)


def test_encode_key_refuses_wrong_length() -> None:
    with pytest.raises(ValueError):
        encode_key(b"\x00" * 31)


# ---------------------------------------------------------------------------------------------
# Files


def test_init_ca_writes_files_with_modes(tmp_path: Path) -> None:
    old_umask = os.umask(0o077)  # the modes are exact, whatever the umask
    try:
        key_path, cert_path = pki.init_ca(tmp_path / "ca", "lab", "10.77.0.0/24", 3650)
    finally:
        os.umask(old_umask)
    assert key_path == tmp_path / "ca" / "ca.key"
    assert cert_path == tmp_path / "ca" / "ca.crt"
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    anchor = pki.load_trust_anchor(cert_path)
    assert (anchor.name, str(anchor.network)) == ("lab", "10.77.0.0/24")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)


def test_init_ca_refuses_to_overwrite(tmp_path: Path) -> None:
    key_path, cert_path = pki.init_ca(tmp_path, "lab", "10.77.0.0/24", 10)
    before = key_path.read_bytes(), cert_path.read_bytes()
    with pytest.raises(PkiError, match=r"ca\.key"):
        pki.init_ca(tmp_path, "lab", "10.77.0.0/24", 10)
    assert (key_path.read_bytes(), cert_path.read_bytes()) == before


def test_init_ca_writes_nothing_when_one_file_exists(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_bytes(b"precious")
    with pytest.raises(PkiError, match=r"ca\.crt"):
        pki.init_ca(tmp_path, "lab", "10.77.0.0/24", 10)
    assert not (tmp_path / "ca.key").exists()
    assert (tmp_path / "ca.crt").read_bytes() == b"precious"


def test_init_ca_refuses_bad_arguments_before_writing(tmp_path: Path) -> None:
    with pytest.raises(PkiError):
        pki.init_ca(tmp_path / "ca", "lab", "10.77.0.0/33", 10)
    assert not (tmp_path / "ca").exists()


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca", "lab", "10.77.0.0/24", 3650)
    return tmp_path / "ca"


def test_sign_node_writes_key_and_cert(ca_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "nodes"
    key_path, cert_path = pki.sign_node(ca_dir, "n1", "10.77.0.2", ["eng"], 365, out)
    assert key_path == out / "n1.key"
    assert cert_path == out / "n1.crt"
    assert _mode(key_path) == 0o600
    assert _mode(cert_path) == 0o644
    anchor = pki.load_trust_anchor(ca_dir / "ca.crt")
    identity = anchor.verify_untrusted(pki.load_certificate_der(cert_path), time.time())
    assert identity.name == "n1"
    assert identity.groups == {"eng"}
    assert identity.public_key == pki.public_key_of(pki.load_private_key(key_path))


def test_sign_node_refuses_to_overwrite(ca_dir: Path, tmp_path: Path) -> None:
    pki.sign_node(ca_dir, "n1", "10.77.0.2", [], 365, tmp_path)
    key_before = (tmp_path / "n1.key").read_bytes()
    with pytest.raises(PkiError, match=r"n1\.key"):
        pki.sign_node(ca_dir, "n1", "10.77.0.3", [], 365, tmp_path)
    assert (tmp_path / "n1.key").read_bytes() == key_before
    # Only the certificate is left: still refused, and no new key is written beside it.
    (tmp_path / "n1.key").unlink()
    with pytest.raises(PkiError, match=r"n1\.crt"):
        pki.sign_node(ca_dir, "n1", "10.77.0.3", [], 365, tmp_path)
    assert not (tmp_path / "n1.key").exists()


@pytest.mark.parametrize("form", ["pem", "der", "base64"])
def test_sign_node_with_public_key_file(ca_dir: Path, tmp_path: Path, form: str) -> None:
    public = X25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    content = {
        "pem": public.public_bytes(serialization.Encoding.PEM, spki),
        "der": public.public_bytes(serialization.Encoding.DER, spki),
        "base64": encode_key(raw).encode() + b"\n",
    }[form]
    key_file = tmp_path / "n1.pub"
    key_file.write_bytes(content)
    out = tmp_path / "out"
    key_path, cert_path = pki.sign_node(ca_dir, "n1", "10.77.0.2", [], 30, out, key_file)
    assert key_path is None
    assert not (out / "n1.key").exists()
    identity = pki.load_trust_anchor(ca_dir / "ca.crt").verify_untrusted(
        pki.load_certificate_der(cert_path), time.time()
    )
    assert identity.public_key == raw


def test_sign_node_refuses_bad_public_key_file(ca_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_bytes(b"nonsense")
    with pytest.raises(PkiError, match=r"bad\.pub"):
        pki.sign_node(ca_dir, "n1", "10.77.0.2", [], 30, tmp_path, bad)
    ed = tmp_path / "ed.pub"
    ed.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(PkiError, match="X25519"):
        pki.sign_node(ca_dir, "n1", "10.77.0.2", [], 30, tmp_path, ed)


def test_sign_node_refuses_outside_address_and_missing_ca(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"10\.99\.0\.2"):
        pki.sign_node(ca_dir, "n1", "10.99.0.2", [], 30, tmp_path)
    with pytest.raises(PkiError, match=r"ca\.key"):
        pki.sign_node(tmp_path / "nowhere", "n1", "10.77.0.2", [], 30, tmp_path)
    assert list(tmp_path.glob("n1.*")) == []


def test_load_certificate_der_pem_and_der(tmp_path: Path, lab_ca: pki.CaBundle) -> None:
    pem, der = tmp_path / "ca.pem", tmp_path / "ca.der"
    pem.write_bytes(lab_ca.cert_pem)
    der.write_bytes(lab_ca.cert_der)
    assert pki.load_certificate_der(pem) == pki.load_certificate_der(der) == lab_ca.cert_der
    assert pki.load_trust_anchor(der).name == "lab"


def test_loaders_name_the_path(tmp_path: Path, lab_ca: pki.CaBundle) -> None:
    missing = tmp_path / "missing.crt"
    garbage = tmp_path / "garbage.crt"
    garbage.write_bytes(b"\x00garbage")
    for path in (missing, garbage):
        with pytest.raises(PkiError, match=re.escape(path.name)):
            pki.load_certificate_der(path)
        with pytest.raises(PkiError, match=re.escape(path.name)):
            pki.load_trust_anchor(path)
        with pytest.raises(PkiError, match=re.escape(path.name)):
            pki.load_private_key(path)
    ca_key = tmp_path / "ca.key"
    ca_key.write_bytes(lab_ca.key_pem)
    with pytest.raises(PkiError, match="X25519"):  # an Ed25519 key is not a link key
        pki.load_private_key(ca_key)


def test_load_private_key_forms(tmp_path: Path) -> None:
    private = X25519PrivateKey.generate()
    raw = pki._x25519_private_raw(private)
    pkcs8 = serialization.PrivateFormat.PKCS8
    none = serialization.NoEncryption()
    forms = {
        "pem": private.private_bytes(serialization.Encoding.PEM, pkcs8, none),
        "der": private.private_bytes(serialization.Encoding.DER, pkcs8, none),
        "base64": encode_key(raw).encode(),
    }
    for form, content in forms.items():
        path = tmp_path / f"key.{form}"
        path.write_bytes(content)
        assert pki.load_private_key(path) == raw
