"""[dns] configuration: the section's keys, the defaults the node derives from its
certificate (`node.dns_plan`), and what `ipop-trio status` shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipop_trio import config, node
from ipop_trio.errors import ConfigError, ConfigErrors
from ipop_trio.status import format_status

from .conftest import MakeCa, MakeNode

BASE = """
[node]
cert = "a.crt"
key = "a.key"
ca = "ca.crt"
"""


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("a.crt", "a.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    return tmp_path


def parse(files: Path, text: str) -> config.NodeConfig:
    path = files / "node.toml"
    path.write_text(BASE + text)
    return config.load(path)


def test_dns_is_off_without_the_section_and_on_with_an_empty_one(files: Path) -> None:
    assert parse(files, "").dns is None
    assert parse(files, "[dns]\n").dns == config.DnsConfig(listen=None, domain=None)


def test_dns_section_parses(files: Path) -> None:
    cfg = parse(files, '[dns]\nlisten = "127.0.0.1:5353"\ndomain = "Corp.Internal."\n')
    assert cfg.dns == config.DnsConfig(config.Endpoint("127.0.0.1", 5353), "corp.internal")


def test_dns_errors_are_all_reported_with_did_you_mean(files: Path) -> None:
    with pytest.raises(ConfigErrors) as caught:
        parse(files, '[dns]\nlisten = "nowhere"\ndomian = "x"\ndomain = "a..b"\n')
    fields = {e.field: e.why for e in caught.value.errors}
    assert set(fields) == {"dns.listen", "dns.domian", "dns.domain"}
    assert "did you mean 'domain'?" in fields["dns.domian"]
    with pytest.raises(ConfigError, match=r"dns.listen: port 0"):
        parse(files, '[dns]\nlisten = "127.0.0.1:0"\n')
    (files / "top.toml").write_text('dns = "on"\n' + BASE)
    with pytest.raises(ConfigError, match=r"^dns: must be a \[dns\] table"):
        config.load(files / "top.toml")


def test_the_default_is_our_overlay_address_and_the_overlay_name(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    ident = make_node(make_ca("Lab"), "alpha", "10.77.0.1").identity
    listen, domain = node.dns_plan(config.DnsConfig(), ident)
    assert listen == config.Endpoint("10.77.0.1", 53) and domain == "lab"
    override = config.DnsConfig(config.Endpoint("0.0.0.0", 5353), "corp.internal")
    assert node.dns_plan(override, ident) == (override.listen, "corp.internal")


def test_an_overlay_name_that_is_no_domain_needs_an_override(
    make_ca: MakeCa, make_node: MakeNode
) -> None:
    ident = make_node(make_ca("lab..x"), "alpha", "10.77.0.1").identity
    with pytest.raises(ConfigError, match=r"^dns.domain: the overlay's name: .*set a domain"):
        node.dns_plan(config.DnsConfig(), ident)
    assert node.dns_plan(config.DnsConfig(domain="lab"), ident)[1] == "lab"


def test_status_says_where_dns_answers() -> None:
    shown = format_status({"node": {}, "dns": {"listen": "10.77.0.1:53", "domain": "lab."}})
    assert "dns lab. on 10.77.0.1:53" in shown.splitlines()
    assert not any(line.startswith("dns ") for line in format_status({"node": {}}).splitlines())
