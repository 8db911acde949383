"""cli.py: the `ipop-trio ca init | sign` commands (what they write and print, their errors) and
`status` finding a node's socket."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from ipop_trio import cli, pki
from ipop_trio.errors import PkiError
from ipop_trio.proto.cert import format_mac, mac_for_key

DAY = 86400


def test_cmd_ca_init_and_sign(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    init = argparse.Namespace(dir=str(ca), name="lab", network="10.77.0.0/24", days=3650)
    assert cli.cmd_ca_init(init) == 0
    out = capsys.readouterr().out
    assert str(ca / "ca.key") in out and str(ca / "ca.crt") in out
    assert "10.77.0.0/24" in out

    sign = argparse.Namespace(
        ca=str(ca),
        name="n1",
        address="10.77.0.7",
        groups="eng, ops,",
        days=365,
        out=str(tmp_path / "out"),
        public_key=None,
    )
    assert cli.cmd_ca_sign(sign) == 0
    out = capsys.readouterr().out
    key = pki.load_private_key(tmp_path / "out" / "n1.key")
    mac = format_mac(mac_for_key(pki.public_key_of(key)))
    assert str(tmp_path / "out" / "n1.key") in out
    assert str(tmp_path / "out" / "n1.crt") in out
    assert mac in out
    assert "10.77.0.7" in out
    assert "eng, ops" in out
    assert "expires" in out
    identity = pki.load_trust_anchor(ca / "ca.crt").verify_untrusted(
        pki.load_certificate_der(tmp_path / "out" / "n1.crt"), time.time()
    )
    assert identity.groups == {"eng", "ops"}


def test_cmd_ca_sign_defaults_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    cli.cmd_ca_init(argparse.Namespace(dir=str(ca), name="lab", network="10.77.0.0/24", days=None))
    args = argparse.Namespace(
        ca=str(ca), name="n2", address="10.77.0.8", groups=None, days=None, out=str(tmp_path)
    )
    assert cli.cmd_ca_sign(args) == 0
    assert "(none)" in capsys.readouterr().out
    anchor = pki.load_trust_anchor(ca / "ca.crt")
    identity = anchor.verify_untrusted(pki.load_certificate_der(tmp_path / "n2.crt"), time.time())
    assert identity.groups == frozenset()
    assert identity.not_after - identity.not_before == pki.DEFAULT_NODE_DAYS * DAY
    with pytest.raises(PkiError):
        cli.cmd_ca_sign(args)  # files exist
    with pytest.raises(PkiError):
        cli.cmd_ca_init(
            argparse.Namespace(dir=str(ca), name="lab", network="10.77.0.0/24", days=10)
        )


def test_parse_groups() -> None:
    assert cli.parse_groups(None) == []
    assert cli.parse_groups("") == []
    assert cli.parse_groups("a, b ,,c") == ["a", "b", "c"]


def test_status_of_a_config_with_errors_still_finds_its_socket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config broken since its node started still says where that node's socket is."""
    cfg = tmp_path / "node.toml"
    cfg.write_text('[node]\ncert = "gone.crt"\ncontrol = "here.sock"\nlisten = "nowhere"\n')
    assert cli.main(["status", "-c", str(cfg)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert any("warning" in line and "node.listen" in line for line in err), err
    assert (
        err[-1] == f"ipop-trio: no node is listening on {tmp_path / 'here.sock'} (is it running?)"
    )


def test_ca_init_and_sign_dual_stack_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, out = tmp_path / "ca", tmp_path / "out"
    argv = ["ca", "init", "--dir", str(ca), "--name", "lab"]
    assert cli.main([*argv, "--network", "10.77.0.0/24", "--network", "fd00:77::/64"]) == 0
    assert "10.77.0.0/24 + fd00:77::/64" in capsys.readouterr().out
    sign = ["ca", "sign", "--ca", str(ca), "--name", "n1", "--out", str(out)]
    assert cli.main([*sign, "--address", "10.77.0.7", "--address", "fd00:77::7"]) == 0
    assert "10.77.0.7/24, fd00:77::7/64" in capsys.readouterr().out
    identity = pki.load_trust_anchor(ca / "ca.crt").verify_untrusted(
        pki.load_certificate_der(out / "n1.crt"), time.time()
    )
    assert identity.ip6 is not None and str(identity.ip6) == "fd00:77::7"
    # One family twice is a clear error, and nothing is written.
    two = ["--address", "10.77.0.8", "--address", "10.77.0.9"]
    assert cli.main(["ca", "sign", "--ca", str(ca), "--name", "n2", "--out", str(out), *two]) != 0
    assert "once per family" in capsys.readouterr().err
    assert not (out / "n2.key").exists()
