"""Certificate lifecycle: `ca sign` for an existing key (renewal), `ca show`, fingerprints, CA
bundles (trust anchors, config, `signal --ca`), expiry in `status` and in the log."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ipop_trio import cli, config, node, pki
from ipop_trio.errors import CertificateRefused, ConfigError, PkiError
from ipop_trio.proto.cert import TrustAnchor, encode_key
from ipop_trio.signalling.server import ServerCore
from ipop_trio.status import format_status

from .conftest import PKI_NOW, MakeCa, MakeNode

DAY = 86400
OPENSSL = "/usr/bin/openssl"


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca", "lab", "10.77.0.0/24", 3650)
    return tmp_path / "ca"


ADDRESSES = {"alpha": "10.77.0.1", "beta": "10.77.0.2", "gamma": "10.77.0.3"}


def sign(ca_dir: Path, out: Path, *extra: str, name: str = "alpha") -> int:
    address = ADDRESSES[name]  # one per name: the CA's record refuses a second key for one
    argv = ["ca", "sign", "--ca", str(ca_dir), "--name", name, "--address", address]
    return cli.main([*argv, "--out", str(out), *extra])


def anchor_of(ca_dir: Path) -> TrustAnchor:
    return pki.load_trust_anchor(ca_dir / "ca.crt")


def certified_key(path: Path) -> bytes:
    return (
        anchor_of(path.parent.parent / "ca")
        .verify_untrusted(pki.load_certificate_der(path), time.time())
        .public_key
    )


# ---------------------------------------------------------------------------------------------
# ca sign for an existing key


def test_renewal_is_one_command_and_keeps_the_old_certificate(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "alpha"
    assert sign(ca_dir, out, "--groups", "web") == 0
    key_before = (out / "alpha.key").read_bytes()
    first = (out / "alpha.crt").read_bytes()
    capsys.readouterr()

    # without --key the existing key is never overwritten, and the message names the fix
    assert sign(ca_dir, out, "--groups", "web") == 1
    err = capsys.readouterr().err
    assert "alpha.key already exists" in err and f"--key {out / 'alpha.key'}" in err

    assert sign(ca_dir, out, "--groups", "web,db", "--key", str(out / "alpha.key")) == 0
    printed = capsys.readouterr().out
    assert f"kept the old one as    {out / 'alpha.crt.old'}" in printed
    assert "wrote node key" not in printed
    assert (out / "alpha.key").read_bytes() == key_before
    assert (out / "alpha.crt.old").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["alpha.crt", "alpha.crt.old", "alpha.key"]
    der = pki.load_certificate_der(out / "alpha.crt")
    identity = anchor_of(ca_dir).verify_untrusted(der, time.time())
    assert identity.groups == {"web", "db"}
    assert identity.public_key == pki.public_key_of(pki.load_private_key(out / "alpha.key"))
    assert der != pki.load_certificate_der_bytes(first)


def test_renewal_refuses_a_certificate_for_another_key_unless_forced(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sign(ca_dir, tmp_path / "alpha") == 0
    assert sign(ca_dir, tmp_path / "beta", name="beta") == 0
    before = (tmp_path / "alpha" / "alpha.crt").read_bytes()
    capsys.readouterr()
    beta_key = str(tmp_path / "beta" / "beta.key")
    assert sign(ca_dir, tmp_path / "alpha", "--key", beta_key) == 1
    err = capsys.readouterr().err
    assert "alpha.crt exists and certifies another key" in err and "--force" in err
    assert (tmp_path / "alpha" / "alpha.crt").read_bytes() == before
    assert not (tmp_path / "alpha" / "alpha.crt.old").exists()

    # --force replaces the file; --replace, the CA's record of alpha as another key's
    assert sign(ca_dir, tmp_path / "alpha", "--key", beta_key, "--force") == 1
    assert "--replace" in capsys.readouterr().err
    assert sign(ca_dir, tmp_path / "alpha", "--key", beta_key, "--force", "--replace") == 0
    assert (tmp_path / "alpha" / "alpha.crt.old").read_bytes() == before
    assert certified_key(tmp_path / "alpha" / "alpha.crt") == pki.public_key_of(
        pki.load_private_key(Path(beta_key))
    )
    # --force only replaces certificates for a given key
    assert sign(ca_dir, tmp_path / "gamma", "--force", name="gamma") == 1
    assert "--force replaces a certificate for an existing key" in capsys.readouterr().err
    assert not (tmp_path / "gamma").exists()


@pytest.mark.parametrize(
    "form", ["private-pem", "private-der", "public-line", "raw", "base64", "cert", "argument"]
)
def test_public_key_accepts_what_an_operator_has(ca_dir: Path, tmp_path: Path, form: str) -> None:
    private = X25519PrivateKey.generate()
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    content = {
        "private-pem": private.private_bytes(serialization.Encoding.PEM, pkcs8, none),
        "private-der": private.private_bytes(serialization.Encoding.DER, pkcs8, none),
        "public-line": f'# from ca sign\npublic_key = "{encode_key(raw)}"\n'.encode(),
        "raw": raw,
        "base64": encode_key(raw).encode() + b"\n",
    }
    out = tmp_path / "out"
    if form == "argument":
        given = encode_key(raw)
    elif form == "cert":
        first = tmp_path / "first"
        assert sign(ca_dir, first, "--public-key", encode_key(raw)) == 0
        given = str(first / "alpha.crt")
    else:
        path = tmp_path / f"key.{form}"
        path.write_bytes(content[form])
        given = str(path)
    assert sign(ca_dir, out, "--public-key", given) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alpha.crt"]  # never a key
    assert certified_key(out / "alpha.crt") == raw
    # the private key is read, never copied: no file written holds it
    secret = private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, none
    )
    assert all(secret not in p.read_bytes() for p in out.iterdir())


@pytest.mark.parametrize(
    ("option", "which", "says"),
    [
        ("--public-key", "ca.key", "an Ed25519 private key (an overlay CA's key, ca.key?)"),
        ("--public-key", "ca.crt", "a CA certificate (lab), not a node's"),
        ("--public-key", "empty", "an empty file, not a node's X25519 public key"),
        ("--public-key", "garbage", "neither a key nor a certificate"),
        ("--key", "alpha.crt", "a node certificate (alpha), not a node's X25519 private key"),
        ("--key", "alpha.pub", "an X25519 public key, not a node's X25519 private key"),
        ("--key", "ca.key", "an Ed25519 private key (an overlay CA's key, ca.key?)"),
    ],
)
def test_a_wrong_key_file_is_named_with_what_to_give_instead(
    ca_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    which: str,
    says: str,
) -> None:
    assert sign(ca_dir, tmp_path / "alpha") == 0
    key = X25519PrivateKey.generate().public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    files = {
        "ca.key": ca_dir / "ca.key",
        "ca.crt": ca_dir / "ca.crt",
        "alpha.crt": tmp_path / "alpha" / "alpha.crt",
        "alpha.pub": tmp_path / "alpha.pub",
        "empty": tmp_path / "empty",
        "garbage": tmp_path / "garbage",
    }
    files["alpha.pub"].write_bytes(key.public_bytes(serialization.Encoding.PEM, spki))
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\x00\x01 not a key at all, longer than 32 bytes\n")
    capsys.readouterr()
    assert sign(ca_dir, tmp_path / "out", option, str(files[which])) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ipop-trio: {files[which]}: {says}"), err
    assert "give" in err  # ... and what to give instead
    if which in ("alpha.crt", "alpha.pub"):
        assert "give this file to --public-key" in err
    assert not (tmp_path / "out").exists()


def test_key_and_public_key_are_exclusive(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        sign(ca_dir, tmp_path, "--key", "a", "--public-key", "b")
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# fingerprints and ca show


def test_fingerprint_is_sha256_of_the_der_as_openssl_prints_it(
    tmp_path: Path, lab_ca: pki.CaBundle, make_node: MakeNode
) -> None:
    alice = make_node(lab_ca, "alice", "10.77.0.2")
    assert pki.fingerprint(alice.cert_der) == hashlib.sha256(alice.cert_der).hexdigest()
    path = tmp_path / "alice.crt"
    path.write_bytes(alice.cert_pem)
    shown = subprocess.run(
        [OPENSSL, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert shown.strip().split("=", 1)[1].replace(":", "").lower() == pki.fingerprint(
        alice.cert_der
    )


@pytest.mark.parametrize("encoding", ["pem", "der"])
def test_ca_show_a_node_certificate(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], encoding: str
) -> None:
    assert sign(ca_dir, tmp_path / "alpha", "--groups", "web,db", "--days", "30") == 0
    capsys.readouterr()
    der = pki.load_certificate_der(tmp_path / "alpha" / "alpha.crt")
    path = tmp_path / "alpha" / "alpha.crt"
    if encoding == "der":
        path = tmp_path / "alpha.der"
        path.write_bytes(der)
    key = pki.public_key_of(pki.load_private_key(tmp_path / "alpha" / "alpha.key"))
    identity = anchor_of(ca_dir).verify_untrusted(der, time.time())

    assert cli.main(["ca", "show", str(path), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "node"
    assert shown["name"] == "alpha" and shown["overlay"] == "lab"
    assert shown["addresses"] == ["10.77.0.1"]
    assert shown["groups"] == ["db", "web"]
    assert shown["public_key"] == encode_key(key)
    assert shown["mac"] == ":".join(f"{b:02x}" for b in identity.mac)
    assert shown["not_before"] == identity.not_before
    assert shown["not_after"] == identity.not_after
    assert 29.9 < shown["days_left"] <= 30 and shown["expired"] is False
    assert shown["fingerprint"] == pki.fingerprint(der)
    assert shown["issuer"] == "CN=lab"

    assert cli.main(["ca", "show", str(path), "--ca", str(ca_dir / "ca.crt")]) == 0
    text = capsys.readouterr().out
    assert "node       alpha in overlay lab" in text
    assert "groups     db, web" in text
    assert "(30 days left)" in text
    assert f"sha256     {pki.fingerprint(der)}" in text
    assert "verified   yes" in text
    assert f'public_key = "{encode_key(key)}"' in text


def test_ca_show_a_bundle_and_a_refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_ca: MakeCa, make_node: MakeNode
) -> None:
    old, new = make_ca(), make_ca()
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old.cert_pem + new.cert_pem)
    assert cli.main(["ca", "show", str(bundle), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [s["fingerprint"] for s in shown] == [
        pki.fingerprint(old.cert_der),
        pki.fingerprint(new.cert_der),
    ]
    assert all(s["kind"] == "ca" and s["addresses"] == ["10.77.0.0/24"] for s in shown)

    # a certificate of the old CA, checked against the new one alone: refused, exit 1
    alpha = tmp_path / "alpha.crt"
    alpha.write_bytes(make_node(old, "alpha", "10.77.0.1", now=PKI_NOW).cert_pem)
    new_only = tmp_path / "new.crt"
    new_only.write_bytes(new.cert_pem)
    assert cli.main(["ca", "show", str(alpha), "--ca", str(new_only)]) == 1
    assert "REFUSED    " in capsys.readouterr().out


def test_ca_show_an_expired_certificate_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lab_ca: pki.CaBundle, make_node: MakeNode
) -> None:
    path = tmp_path / "old.crt"
    path.write_bytes(make_node(lab_ca, "old", "10.77.0.5", days=1).cert_pem)  # 2026-01-01
    assert cli.main(["ca", "show", str(path)]) == 1
    assert "(expired " in capsys.readouterr().out


def test_ca_show_refuses_what_is_not_a_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], lab_ca: pki.CaBundle
) -> None:
    path = tmp_path / "ca.key"
    path.write_bytes(lab_ca.key_pem)
    assert cli.main(["ca", "show", str(path)]) == 1
    assert f"ipop-trio: {path}: not a PEM or DER certificate" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# CA bundles


def test_a_bundle_trusts_both_cas_and_refuses_a_third(make_ca: MakeCa, make_node: MakeNode) -> None:
    old, new, stranger = make_ca(), make_ca(), make_ca()  # three CAs named "lab"
    both = TrustAnchor.bundle([old.anchor, new.anchor])
    assert (both.name, str(both.network), len(both.cas)) == ("lab", "10.77.0.0/24", 2)
    for authority in (old, new):
        n = make_node(authority, "n", "10.77.0.9")
        assert both.verify_untrusted(n.cert_der, PKI_NOW).public_key == n.public_key
    outsider = make_node(stranger, "n", "10.77.0.9")
    with pytest.raises(CertificateRefused, match="not signed by any trusted CA of overlay 'lab'"):
        both.verify_untrusted(outsider.cert_der, PKI_NOW)
    # the same CA twice is one CA
    assert len(TrustAnchor(old.cert_der, old.cert_der).cas) == 1


def test_a_bundle_checks_the_validity_of_the_ca_that_signed(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    short = make_ca(days=30)
    long = make_ca()
    both = TrustAnchor.bundle([short.anchor, long.anchor])
    on_short = make_node(short, "a", "10.77.0.2", days=30)
    on_long = make_node(long, "b", "10.77.0.3", days=60)
    later = PKI_NOW + 40 * DAY  # the short CA has expired, the long one has not
    with pytest.raises(CertificateRefused):
        both.verify_untrusted(on_short.cert_der, later)
    assert both.verify_untrusted(on_long.cert_der, later).name == "b"


@pytest.mark.parametrize(("name", "network"), [("other", "10.77.0.0/24"), ("lab", "10.88.0.0/24")])
def test_a_bundle_of_two_overlays_is_refused(make_ca: MakeCa, name: str, network: str) -> None:
    with pytest.raises(PkiError, match="CA bundle mixes overlays"):
        TrustAnchor(make_ca().cert_der, make_ca(name, network).cert_der)


def test_bundle_files_and_lists(tmp_path: Path, make_ca: MakeCa) -> None:
    old, new, other = make_ca(), make_ca(), make_ca("other", "10.88.0.0/24")
    (tmp_path / "old.crt").write_bytes(old.cert_pem)
    (tmp_path / "new.crt").write_bytes(new.cert_pem)
    (tmp_path / "both.crt").write_bytes(old.cert_pem + new.cert_pem)
    (tmp_path / "mixed.crt").write_bytes(old.cert_pem + other.cert_pem)
    (tmp_path / "other.crt").write_bytes(other.cert_pem)
    assert len(pki.load_trust_anchor(tmp_path / "both.crt").cas) == 2
    listed = pki.load_trust_anchors([tmp_path / "old.crt", tmp_path / "new.crt"])
    assert [c.der for c in listed.cas] == [old.cert_der, new.cert_der]
    with pytest.raises(PkiError, match=r"mixed\.crt: CA bundle mixes overlays"):
        pki.load_trust_anchor(tmp_path / "mixed.crt")
    with pytest.raises(PkiError, match=r"other\.crt: CA of overlay 'other' \(10\.88\.0\.0/24\)"):
        pki.load_trust_anchors([tmp_path / "old.crt", tmp_path / "other.crt"])


def _config(tmp_path: Path, ca_line: str) -> Path:
    for name in ("a.crt", "a.key", "old.crt", "new.crt"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\ncert = "a.crt"\nkey = "a.key"\n{ca_line}\n')
    return path


def test_config_ca_is_a_file_or_a_list(tmp_path: Path) -> None:
    one = config.load(_config(tmp_path, 'ca = "old.crt"'))
    assert one.ca == (tmp_path / "old.crt",)
    two = config.load(_config(tmp_path, 'ca = ["old.crt", "new.crt"]'))
    assert two.ca == (tmp_path / "old.crt", tmp_path / "new.crt")
    with pytest.raises(ConfigError, match=r"node\.ca: an empty list"):
        config.load(_config(tmp_path, "ca = []"))
    with pytest.raises(ConfigError, match=r"node\.ca\[1\]: .*gone\.crt does not exist"):
        config.load(_config(tmp_path, 'ca = ["old.crt", "gone.crt"]'))
    with pytest.raises(ConfigError, match=r"node\.ca\[0\]: must be a path"):
        config.load(_config(tmp_path, 'ca = [3, "new.crt"]'))


def test_signal_trusts_two_cas_of_one_overlay(tmp_path: Path, make_ca: MakeCa) -> None:
    old, new, other = make_ca(), make_ca(), make_ca("other", "10.88.0.0/24")
    clash = make_ca("lab", "10.99.0.0/24")
    for name, ca in (("old", old), ("new", new), ("other", other), ("clash", clash)):
        (tmp_path / f"{name}.crt").write_bytes(ca.cert_pem)
    anchors = cli.signal_anchors([tmp_path / f"{n}.crt" for n in ("old", "other", "new")])
    assert [(a.name, len(a.cas)) for a in anchors] == [("lab", 2), ("other", 1)]
    with pytest.raises(ConfigError, match=r"--ca\[1\]: .*another --ca gives it 10\.77\.0\.0/24"):
        cli.signal_anchors([tmp_path / "old.crt", tmp_path / "clash.crt"])
    # the core merges them too: one overlay with both CAs
    core = ServerCore([old.anchor, other.anchor, new.anchor])
    assert sorted(core.overlays) == ["lab", "other"]
    assert len(core.overlays["lab"].anchor.cas) == 2


# ---------------------------------------------------------------------------------------------
# Expiry: status and the log


def _setup(tmp_path: Path, days_left: float, ca_days: int = 3650) -> node.Setup:
    """A node's Setup whose certificate has `days_left` (its config: real, files dummy)."""
    now = time.time()
    ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=now, days=ca_days)
    alpha = pki.issue_node_bundle(ca, "alpha", "10.77.0.1", ("web",), now=now)
    for name in ("alpha.crt", "alpha.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    cfg = config.parse(
        {"node": {"cert": "alpha.crt", "key": "alpha.key", "ca": "ca.crt"}}, tmp_path / "n.toml"
    )
    identity = dataclasses.replace(alpha.identity, not_after=now + days_left * DAY)
    assert alpha.private_key is not None
    return node.Setup(cfg, ca.anchor, alpha.private_key, identity, ())


def test_expiry_warnings_from_30_days_before(tmp_path: Path) -> None:
    now = time.time()
    assert node.expiry_warnings(_setup(tmp_path, 31), now) == []
    (warning,) = node.expiry_warnings(_setup(tmp_path, 29.5), now)
    assert warning.startswith(f"certificate {tmp_path / 'alpha.crt'} expires in 30 days")
    assert (
        "ipop-trio ca sign --ca CA_DIR --name alpha --address 10.77.0.1 --groups web "
        f"--key {tmp_path / 'alpha.key'} --out {tmp_path}`, then SIGHUP"
    ) in warning
    (expired,) = node.expiry_warnings(_setup(tmp_path, -1), now)
    assert "expired at" in expired and "peers refuse it" in expired
    ca_warning = node.expiry_warnings(_setup(tmp_path, 100, ca_days=10), now)
    assert len(ca_warning) == 1 and ca_warning[0].startswith("overlay CA 'lab' (")
    assert "expires in 10 days" in ca_warning[0] and "rotate it" in ca_warning[0]


def test_status_shows_expiry_of_ours_the_cas_and_each_peer() -> None:
    now = 1_800_000_000.0
    status = {
        "node": {
            "name": "alpha",
            "cert": {"fingerprint": "ab" * 32, "not_after": now + 12 * DAY + 60},
            "ca": [
                {"fingerprint": "cd" * 32, "not_after": now + 400 * DAY},
                {"fingerprint": "ef" * 32, "not_after": now + 5 * 3600},
            ],
        },
        "peers": [
            {"name": "beta", "state": "established", "cert": {"not_after": now + 3 * DAY}},
            {"name": "gamma", "state": "idle", "cert": {"not_after": now - 1}},
            {"name": "delta", "state": "idle", "cert": None},
        ],
    }
    lines = format_status(status, now).splitlines()
    assert (
        f"certificate {'ab' * 8} expires 2027-01-27 (12d)  CAs {'cd' * 8} (400d), {'ef' * 8} (5h)"
        in lines
    )
    header = next(line for line in lines if line.startswith("PEER"))
    assert header.split()[-1] == "CERT"
    rows = {
        line.split()[0]: line.split()[-1]
        for line in lines
        if line.split()[0] in ("beta", "gamma", "delta")
    }
    assert rows == {"beta": "3d", "gamma": "expired", "delta": "-"}
