from pathlib import Path

import pytest

from ipop_trio import config
from ipop_trio.errors import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("a.crt", "a.key", "ca.crt", "b.crt"):
        (tmp_path / name).write_text("x")
    return tmp_path


def write(tmp: Path, text: str) -> Path:
    p = tmp / "node.toml"
    p.write_text(text)
    return p


GOOD = """
[node]
cert = "a.crt"
key = "a.key"
ca = "ca.crt"
listen = "0.0.0.0:4700"
[tap]
name = "ipop7"
mtu = 1380
[[peer]]
name = "b"
cert = "b.crt"
endpoint = "192.0.2.7:4600"
"""


def test_good_config_parses_with_paths_relative_to_the_file(files: Path) -> None:
    cfg = config.load(write(files, GOOD))
    assert cfg.cert == files / "a.crt" and cfg.listen == config.Endpoint("0.0.0.0", 4700)
    assert cfg.tap == config.TapConfig("ipop7", 1380)
    assert cfg.peers[0].endpoint == config.Endpoint("192.0.2.7", 4600)
    assert cfg.control == Path("/run/ipop-trio/ipop7.sock")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (('cert = "a.crt"', 'cert = "missing.crt"'), "node.cert"),
        (('listen = "0.0.0.0:4700"', 'listen = "0.0.0.0:99999"'), "node.listen"),
        (('listen = "0.0.0.0:4700"', 'listen = "example.org:1"'), "node.listen"),
        (("mtu = 1380", "mtu = 9000"), "tap.mtu"),
        (("mtu = 1380", 'mtu = "big"'), "tap.mtu"),
        (('name = "ipop7"', 'name = "a-very-long-interface-name"'), "tap.name"),
        (('endpoint = "192.0.2.7:4600"', 'endpoint = "0.0.0.0:4600"'), "peer[0].endpoint"),
        (('name = "b"', 'name = "b c"'), "peer[0].name"),
        (('cert = "b.crt"', 'public_key = "not base64!"'), "peer[0].public_key"),
        (("[tap]", "[tap]\ncolour = 1"), "tap.colour"),
        (('ca = "ca.crt"', 'ca = "ca.crt"\ncipher = "rot13"'), "node.cipher"),
    ],
)
def test_each_error_names_its_field(files: Path, change: tuple[str, str], field: str) -> None:
    text = GOOD.replace(*change)
    assert text != GOOD
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, text))
    assert exc.value.field == field, exc.value


def test_peer_needs_exactly_one_key_source(files: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        config.load(write(files, GOOD.replace('cert = "b.crt"\n', "")))


def test_not_toml_and_missing_file(files: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(files, "[node"))
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(files / "nope.toml")
