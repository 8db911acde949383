"""[firewall] in the node config: rules parsed into proto/firewall.py's types, every mistake
reported in one pass, unknown keys with "did you mean"."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from ipop_trio import config
from ipop_trio.errors import ConfigError, ConfigErrors
from ipop_trio.proto.firewall import CONNTRACK_MAX, Action, FirewallRules, Rule

BASE = """
[node]
cert = "a.crt"
key = "a.key"
ca = "ca.crt"
"""


def load(tmp_path: Path, text: str) -> config.NodeConfig:
    for name in ("a.crt", "a.key", "ca.crt"):
        (tmp_path / name).write_text("x")
    path = tmp_path / "node.toml"
    path.write_text(BASE + text)
    return config.load(path)


def errors(tmp_path: Path, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    exc = info.value
    found = exc.errors if isinstance(exc, ConfigErrors) else [exc]
    return {e.field: e.why for e in found}


def test_no_section_or_no_rules_is_no_firewall(tmp_path: Path) -> None:
    assert load(tmp_path, "").firewall is None
    assert load(tmp_path, "[firewall]\nconntrack_max = 10\n").firewall is None


def test_rules_parse(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        """
[firewall]
conntrack_max = 1000
[[firewall.inbound]]
proto = "tcp"
port = 22
groups = ["ops", "admin"]
[[firewall.inbound]]
proto = "UDP"
port = "8000-8100"
host = "beta"
cidr = "10.77.0.0/24"
action = "deny"
[[firewall.inbound]]
proto = "icmp"
host = "any"
[[firewall.outbound]]
proto = "any"
cidr = "10.77.0.9"
""",
    )
    assert cfg.firewall == FirewallRules(
        inbound=(
            Rule(proto=6, ports=(22, 22), groups=frozenset({"ops", "admin"})),
            Rule(
                proto=17,
                ports=(8000, 8100),
                host="beta",
                cidr=ipaddress.IPv4Network("10.77.0.0/24"),
                action=Action.DENY,
            ),
            Rule(proto=1),
        ),
        outbound=(Rule(proto=None, cidr=ipaddress.IPv4Network("10.77.0.9/32")),),
        conntrack_max=1000,
    )
    assert load(tmp_path, '[[firewall.outbound]]\nproto = "tcp"\nport = "any"\nhost = "any"\n')
    fw = load(tmp_path, '[[firewall.outbound]]\nproto="tcp"\nport="any"\nhost="any"\n').firewall
    assert fw is not None and fw.outbound[0].ports is None
    assert fw.conntrack_max == CONNTRACK_MAX


def test_every_mistake_in_one_pass_with_did_you_mean(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        """
[firewall]
conntrack = 5
[[firewall.inbound]]
proto = "tcp"
ports = 22
group = ["web"]
[[firewall.inbound]]
proto = "icmp"
port = 7
host = "any"
[[firewall.inbound]]
port = "100-20"
host = "b c"
[[firewall.outbound]]
proto = "sctp"
cidr = "10.77.0.5/24"
action = "drop"
[[firewall.outbound]]
proto = "udp"
cidr = "fd00::/64"
port = 70000
""",
    )
    assert "did you mean 'conntrack_max'?" in found["firewall.conntrack"]
    assert "did you mean 'port'?" in found["firewall.inbound[0].ports"]
    assert "did you mean 'groups'?" in found["firewall.inbound[0].group"]
    assert "names no peer" in found["firewall.inbound[0]"]
    assert "needs proto" in found["firewall.inbound[1].port"]
    assert "missing" in found["firewall.inbound[2].proto"]
    assert "backwards" in found["firewall.inbound[2].port"]
    assert "firewall.inbound[2].host" in found
    assert "not one of" in found["firewall.outbound[0].proto"]
    assert "host bits" in found["firewall.outbound[0].cidr"]
    assert "not one of" in found["firewall.outbound[0].action"]
    assert "IPv4" in found["firewall.outbound[1].cidr"]
    assert "1..65535" in found["firewall.outbound[1].port"]


def test_rules_must_be_arrays_of_tables(tmp_path: Path) -> None:
    found = errors(tmp_path, '[firewall]\ninbound = "allow all"\n')
    assert "[[firewall.inbound]]" in found["firewall.inbound"]
    found = errors(tmp_path, "[firewall]\nconntrack_max = 0\n")
    assert "firewall.conntrack_max" in found


def test_the_readme_example_parses(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Firewall") :]
    start = section.index("```toml") + len("```toml")
    fw = load(tmp_path, section[start : section.index("```", start)]).firewall
    assert fw is not None and len(fw.inbound) == 4 and len(fw.outbound) == 1
    assert fw.inbound[1].action is Action.DENY
