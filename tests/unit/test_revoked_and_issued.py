"""pki.py's revocation lists (`fingerprint`, `parse_revoked`, `load_revoked`), the CA's record
of what it issued (`ca sign` refusing a duplicate name or address, `--replace`), and
`[node] revoked` in the config and `prepare`."""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import pytest

from ipop_trio import cli, config, pki
from ipop_trio.errors import ConfigError, PkiError
from ipop_trio.node import prepare
from ipop_trio.proto.cert import encode_key

OPENSSL = "/usr/bin/openssl"
FP = "ab" * 32


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path / "ca", "lab", "10.77.0.0/24", 3650)
    return tmp_path / "ca"


def sign(ca_dir: Path, name: str, address: str, out: Path, **kw: object) -> pki.SignedNode:
    return pki.sign_node_files(ca_dir, name, address, [], 30, out, **kw)  # type: ignore[arg-type]


# --- fingerprints and the revocation list ------------------------------------------------


def test_the_fingerprint_is_what_openssl_prints_for_the_der(ca_dir: Path, tmp_path: Path) -> None:
    signed = sign(ca_dir, "n1", "10.77.0.2", tmp_path / "n1")
    got = subprocess.run(
        [OPENSSL, "x509", "-noout", "-fingerprint", "-sha256", "-in", str(signed.cert_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fp = pki.fingerprint(signed.identity.der)
    assert len(fp) == 64 and fp == fp.lower()
    assert got.strip().split("=", 1)[1].replace(":", "").lower() == fp
    # ... so openssl's line, pasted as it is, is a valid entry too
    assert pki.parse_revoked(got) == {fp}


def test_the_list_takes_comments_blanks_case_and_colons() -> None:
    colons = ":".join(FP[i : i + 2] for i in range(0, 64, 2)).upper()
    text = f"# revoked by ops\n\n{FP}  # beta, lost laptop\n   {colons}\n{'cd' * 32}\n"
    assert pki.parse_revoked(text) == {FP, "cd" * 32}
    assert pki.parse_revoked("") == frozenset()
    assert pki.parse_revoked("# nothing yet\n") == frozenset()


def test_every_bad_line_is_named() -> None:
    text = f"{FP}\nnot-a-fingerprint\n{FP[:-1]}\n\n{FP}zz # too long\n"
    with pytest.raises(PkiError) as info:
        pki.parse_revoked(text)
    message = str(info.value)
    assert "line 2: 'not-a-fingerprint'" in message
    assert "line 3:" in message and "line 5:" in message
    assert "line 1" not in message and "line 4" not in message
    assert "SHA-256" in message and "64 hex digits" in message


def test_load_revoked_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "revoked.txt"
    path.write_text(f"{FP}\nbeta\n")
    with pytest.raises(PkiError, match=r"revoked\.txt: line 2: 'beta'"):
        pki.load_revoked(path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(PkiError, match=r"revoked\.txt: not UTF-8"):
        pki.load_revoked(path)
    with pytest.raises(PkiError, match=r"cannot read revocation list .*gone\.txt"):
        pki.load_revoked(tmp_path / "gone.txt")
    path.write_text(FP)
    assert pki.load_revoked(path) == {FP}


# --- `ca sign`: the record of what was issued ----------------------------------------------


def test_a_duplicate_address_or_name_is_refused_naming_the_earlier_certificate(
    ca_dir: Path, tmp_path: Path
) -> None:
    first = sign(ca_dir, "beta", "10.77.0.2", tmp_path / "beta")
    fp = pki.fingerprint(first.identity.der)
    with pytest.raises(PkiError) as info:
        sign(ca_dir, "gamma", "10.77.0.2", tmp_path / "gamma")
    message = str(info.value)
    assert "address 10.77.0.2 is already certified to beta" in message
    assert fp in message and "--replace" in message
    with pytest.raises(PkiError, match=r"name 'beta' is already certified to beta \(10\.77\.0\.2"):
        sign(ca_dir, "beta", "10.77.0.9", tmp_path / "beta2")
    # Refused means nothing written: no key, no certificate, no record entry.
    assert not (tmp_path / "gamma").exists() and not (tmp_path / "beta2").exists()
    assert [r.name for r in pki.load_issued(ca_dir)] == ["beta"]
    # Another name and address is fine.
    sign(ca_dir, "gamma", "10.77.0.3", tmp_path / "gamma")
    assert [r.name for r in pki.load_issued(ca_dir)] == ["beta", "gamma"]


def test_replace_issues_it_and_marks_the_earlier_one_replaced(ca_dir: Path, tmp_path: Path) -> None:
    first = sign(ca_dir, "beta", "10.77.0.2", tmp_path / "old")
    second = sign(ca_dir, "beta2", "10.77.0.2", tmp_path / "new", replace=True)
    [old, new] = pki.load_issued(ca_dir)
    assert old.fingerprint == pki.fingerprint(first.identity.der)
    assert old.replaced_by == pki.fingerprint(second.identity.der) and not old.live(time.time())
    assert new.name == "beta2" and new.addresses == ("10.77.0.2",) and new.live(time.time())
    assert second.replaced[0].fingerprint == old.fingerprint
    # The replaced certificate no longer holds its name: "beta" can be issued again.
    sign(ca_dir, "beta", "10.77.0.5", tmp_path / "again")


def test_the_same_key_renewed_needs_no_replace(ca_dir: Path, tmp_path: Path) -> None:
    first = sign(ca_dir, "beta", "10.77.0.2", tmp_path / "v1")
    pub = tmp_path / "beta.pub"
    pub.write_text(encode_key(first.identity.public_key))
    renewed = sign(ca_dir, "beta", "10.77.0.2", tmp_path / "v2", public_key_file=pub)
    assert [r.fingerprint for r in renewed.replaced] == [pki.fingerprint(first.identity.der)]
    assert [r.live(time.time()) for r in pki.load_issued(ca_dir)] == [False, True]


def test_the_record_is_json_with_what_was_issued(ca_dir: Path, tmp_path: Path) -> None:
    signed = sign(ca_dir, "beta", "10.77.0.2", tmp_path / "beta")
    [entry] = json.loads((ca_dir / pki.ISSUED_FILE).read_text())["issued"]
    assert entry["name"] == "beta" and entry["address"] == "10.77.0.2"
    assert entry["fingerprint"] == pki.fingerprint(signed.identity.der)
    assert entry["not_after"] == int(signed.identity.not_after)
    assert entry["public_key"] == encode_key(signed.identity.public_key)
    assert entry["replaced_by"] is None and entry["expires"].startswith("20")


def test_a_broken_record_is_a_clear_error(ca_dir: Path, tmp_path: Path) -> None:
    (ca_dir / pki.ISSUED_FILE).write_text("{not json")
    with pytest.raises(PkiError, match=r"issued\.json: not a record of issued certificates"):
        sign(ca_dir, "beta", "10.77.0.2", tmp_path / "beta")
    (ca_dir / pki.ISSUED_FILE).write_text('{"issued": [{"name": "x"}]}')
    with pytest.raises(PkiError, match=r"move it away to start a new record"):
        sign(ca_dir, "beta", "10.77.0.2", tmp_path / "beta")
    assert not (tmp_path / "beta").exists()


def test_a_dual_stack_record_and_an_older_single_address_one_both_load(
    tmp_path: Path,
) -> None:
    pki.init_ca(tmp_path / "ca", "lab", ["10.77.0.0/24", "fd00:77::/64"], 3650)
    ca_dir = tmp_path / "ca"
    sign(ca_dir, "beta", ["fd00:77::2", "10.77.0.2"], tmp_path / "beta")
    [entry] = json.loads((ca_dir / pki.ISSUED_FILE).read_text())["issued"]
    assert entry["addresses"] == ["10.77.0.2", "fd00:77::2"] and entry["address"] == "10.77.0.2"
    # The IPv6 address is held too: another name cannot take it.
    with pytest.raises(PkiError, match="fd00:77::2"):
        sign(ca_dir, "gamma", ["10.77.0.3", "fd00:77::2"], tmp_path / "gamma")
    # A record written before dual-stack has only "address".
    del entry["addresses"]
    (ca_dir / pki.ISSUED_FILE).write_text(json.dumps({"issued": [entry]}))
    [record] = pki.load_issued(ca_dir)
    assert record.name == "beta" and record.addresses == ("10.77.0.2",)


def test_cmd_ca_sign_refuses_a_duplicate_and_replace_works(
    ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def args(name: str, out: str, replace: bool) -> argparse.Namespace:
        return argparse.Namespace(
            ca=str(ca_dir), name=name, address="10.77.0.2", groups=None, days=None,
            out=str(tmp_path / out), public_key=None, replace=replace,
        )  # fmt: skip

    assert cli.cmd_ca_sign(args("beta", "a", False)) == 0
    first = capsys.readouterr().out
    fp = pki.fingerprint(pki.load_certificate_der(tmp_path / "a" / "beta.crt"))
    assert f"sha256     {fp}" in first
    assert cli.main(["ca", "sign", "--ca", str(ca_dir), "--name", "mallory",
                     "--address", "10.77.0.2", "--out", str(tmp_path / "b")]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "already certified to beta" in err and fp in err
    assert cli.cmd_ca_sign(args("mallory", "b", True)) == 0
    out = capsys.readouterr().out
    assert f"replaces   beta (10.77.0.2) sha256 {fp}" in out and "revoked" in out


# --- [node] revoked ----------------------------------------------------------------------


def node_files(tmp_path: Path, revoked: str) -> Path:
    ca = pki.new_ca_bundle(now=time.time())
    node = pki.issue_node_bundle(ca, "alpha", "10.77.0.2", now=time.time())
    assert node.key_pem is not None
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    (tmp_path / "alpha.crt").write_bytes(node.cert_pem)
    (tmp_path / "alpha.key").write_bytes(node.key_pem)
    (tmp_path / "alpha.key").chmod(0o600)
    (tmp_path / "revoked.txt").write_text(revoked)
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\ncert = "alpha.crt"\nkey = "alpha.key"\nca = "ca.crt"\nrevoked = "revoked.txt"\n'
    )
    return path


def test_node_revoked_is_loaded_by_prepare(tmp_path: Path) -> None:
    path = node_files(tmp_path, f"# ops\n{FP}\n")
    cfg = config.load(path)
    assert cfg.revoked == tmp_path / "revoked.txt"
    assert prepare(cfg).revoked == {FP}


def test_a_bad_node_revoked_names_the_field_and_the_line(tmp_path: Path) -> None:
    path = node_files(tmp_path, f"{FP}\nbeta\n")
    with pytest.raises(ConfigError) as info:
        prepare(config.load(path))
    assert info.value.field == "node.revoked"
    assert "revoked.txt: line 2: 'beta'" in str(info.value)
    (tmp_path / "revoked.txt").unlink()
    with pytest.raises(ConfigError, match=r"node\.revoked.*does not exist"):
        config.load(path)
