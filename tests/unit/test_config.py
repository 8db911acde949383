from pathlib import Path

import pytest

from ipop_trio import cli, config, node
from ipop_trio.errors import ConfigError, ConfigErrors


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
    assert cfg.control is None  # the default: one socket per TAP and network namespace
    assert cfg.control_path() == config.default_control("ipop7")


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


# --- [ice] ---------------------------------------------------------------------------------

ICE = """
[ice]
stun = ["stun:198.51.100.1:3478"]
turn = [{url = "turn:198.51.100.2?transport=udp", username = "alice", password = "secret"}]
ignore_interfaces = ["docker0"]
"""


def test_ice_defaults_to_nothing(files: Path) -> None:
    assert config.load(write(files, GOOD)).ice == config.IceConfig((), (), ())
    assert config.load(write(files, GOOD + "[ice]\n")).ice == config.IceConfig()


def test_ice_section_parses(files: Path) -> None:
    ice = config.load(write(files, GOOD + ICE)).ice
    assert ice.stun == (config.Endpoint("198.51.100.1", 3478),)
    assert ice.turn == (
        config.TurnServerConfig(config.Endpoint("198.51.100.2", 3478), "alice", "secret"),
    )
    assert ice.ignore_interfaces == ("docker0",)
    assert "secret" not in repr(ice)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("stun:198.51.100.1", ("198.51.100.1", 3478)),
        ("stun:198.51.100.1:19302", ("198.51.100.1", 19302)),
        ("STUN:198.51.100.1:1", ("198.51.100.1", 1)),
        ("stun:[2001:db8::1]:3479", ("2001:db8::1", 3479)),
        ("stun:[2001:DB8:0::1]", ("2001:db8::1", 3478)),
        ("198.51.100.1:3478", ("198.51.100.1", 3478)),
        ("[2001:db8::1]:5000", ("2001:db8::1", 5000)),
    ],
)
def test_each_stun_url_form(files: Path, url: str, endpoint: tuple[str, int]) -> None:
    ice = config.load(write(files, GOOD + f'[ice]\nstun = ["{url}"]\n')).ice
    assert ice.stun == (config.Endpoint(*endpoint),)


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("turn:198.51.100.1", ("198.51.100.1", 3478)),
        ("turn:198.51.100.1:80", ("198.51.100.1", 80)),
        ("turn:198.51.100.1:80?transport=udp", ("198.51.100.1", 80)),
        ("turn:198.51.100.1?transport=UDP", ("198.51.100.1", 3478)),
        ("turn:[2001:db8::2]:3478?transport=udp", ("2001:db8::2", 3478)),
    ],
)
def test_each_turn_url_form(files: Path, url: str, endpoint: tuple[str, int]) -> None:
    turn = f'turn = [{{url = "{url}", username = "u", password = "p"}}]\n'
    ice = config.load(write(files, GOOD + "[ice]\n" + turn)).ice
    assert ice.turn == (config.TurnServerConfig(config.Endpoint(*endpoint), "u", "p"),)


@pytest.mark.parametrize(
    ("change", "field", "why"),
    [
        (('stun = ["stun:198.51.100.1:3478"]', 'stun = "stun:198.51.100.1"'), "ice.stun", "list"),
        (("stun:198.51.100.1:3478", "stun:stun.example.org:3478"), "ice.stun[0]", "DNS"),
        (("stun:198.51.100.1:3478", "stun.example.org:3478"), "ice.stun[0]", "DNS"),
        (("stun:198.51.100.1:3478", "stun:198.51.100.1:99999"), "ice.stun[0]", "range"),
        (("stun:198.51.100.1:3478", "stun:0.0.0.0:3478"), "ice.stun[0]", "reachable"),
        (("stun:198.51.100.1:3478", "stun:2001:db8::1"), "ice.stun[0]", "IPv6"),
        (("stun:198.51.100.1:3478", "stun:[fe80::1%eth0]:1"), "ice.stun[0]", "literal IP"),
        (("stun:198.51.100.1:3478", "stun:[198.51.100.1]:1"), "ice.stun[0]", "literal IP"),
        (("stun:198.51.100.1:3478", "198.51.100.1"), "ice.stun[0]", "needs a port"),
        (("stun:198.51.100.1:3478", "stuns:198.51.100.1"), "ice.stun[0]", "TLS"),
        (("stun:198.51.100.1:3478", "turn:198.51.100.1"), "ice.stun[0]", "stun: URL"),
        (("stun:198.51.100.1:3478", "stun:198.51.100.1?transport=udp"), "ice.stun[0]", "none"),
        (("stun:198.51.100.1:3478", "http://198.51.100.1/"), "ice.stun[0]", "is not like"),
        (('stun = ["stun:198.51.100.1:3478"]', "stun = [3478]"), "ice.stun[0]", "string"),
        (("turn:198.51.100.2?", "turns:198.51.100.2?"), "ice.turn[0].url", "TLS TURN"),
        (("transport=udp", "transport=tcp"), "ice.turn[0].url", "only UDP"),
        (("transport=udp", "proto=udp"), "ice.turn[0].url", "transport=udp"),
        (("turn:198.51.100.2?", "turn:turn.example.org?"), "ice.turn[0].url", "DNS"),
        (("turn:198.51.100.2?transport=udp", "198.51.100.2:3478"), "ice.turn[0].url", "turn:"),
        (('url = "turn:198.51.100.2?transport=udp", ', ""), "ice.turn[0].url", "missing"),
        ((' username = "alice",', ""), "ice.turn[0].username", "missing"),
        ((', password = "secret"', ""), "ice.turn[0].password", "missing"),
        (('username = "alice"', 'username = ""'), "ice.turn[0].username", "1-256"),
        (('username = "alice"', f'username = "{"a" * 257}"'), "ice.turn[0].username", "1-256"),
        (('password = "secret"', f'password = "{"p" * 257}"'), "ice.turn[0].password", "1-256"),
        (('password = "secret"', "password = 1234"), "ice.turn[0].password", "string"),
        (('password = "secret"', 'password = "a\\u0007b"'), "ice.turn[0].password", "SASLprep"),
        (('password = "secret"', 'password = "\\u00ad"'), "ice.turn[0].password", "empty after"),
        (('username = "alice"', 'username = "alice", realm = "x"'), "ice.turn[0].realm", "unknown"),
        (("turn = [{", "turn = ['x', {"), "ice.turn[0]", "table"),
        (('["docker0"]', '["docker0", "no spaces"]'), "ice.ignore_interfaces[1]", "interface"),
        (('["docker0"]', '"docker0"'), "ice.ignore_interfaces", "list"),
        (("[ice]", "[ice]\nlite = true"), "ice.lite", "unknown"),
    ],
)
def test_each_ice_error_names_its_field(
    files: Path, change: tuple[str, str], field: str, why: str
) -> None:
    text = (GOOD + ICE).replace(*change)
    assert text != GOOD + ICE
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, text))
    assert exc.value.field == field, exc.value
    assert why in exc.value.why, exc.value


def test_more_ice_servers_than_one_are_numbered(files: Path) -> None:
    text = GOOD + '[ice]\nstun = ["198.51.100.1:1", "stun:example.org"]\n'
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, text))
    assert exc.value.field == "ice.stun[1]"
    turn = '{url = "turn:198.51.100.2", username = "u", password = "p"}'
    bad = turn.replace(', password = "p"', "")
    text = GOOD + f"[ice]\nturn = [{turn}, {bad}]\n"
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, text))
    assert exc.value.field == "ice.turn[1].password"


@pytest.mark.parametrize("n", [8, 9])
def test_at_most_eight_servers_of_each_kind(files: Path, n: int) -> None:
    stun = ", ".join([f'"198.51.100.1:{port}"' for port in range(1, n + 1)])
    turn = ", ".join(['{url = "turn:198.51.100.2", username = "u", password = "p"}'] * n)
    for line, field in ((f"stun = [{stun}]", "ice.stun"), (f"turn = [{turn}]", "ice.turn")):
        path = write(files, f"{GOOD}[ice]\n{line}\n")
        if n == 8:
            assert len(getattr(config.load(path).ice, field[4:])) == 8
        else:
            with pytest.raises(ConfigError, match="up to 8") as exc:
                config.load(path)
            assert exc.value.field == field


@pytest.mark.parametrize(
    ("change", "field", "hint"),
    [
        (('listen = "0', 'lisen = "0'), "node.lisen", "did you mean 'listen'?"),
        (("mtu = 1380", "mut = 1380"), "tap.mut", "did you mean 'mtu'?"),
        (('endpoint = "192', 'endpiont = "192'), "peer[0].endpiont", "did you mean 'endpoint'?"),
        (("[tap]", "[tapp]"), "tapp", "did you mean 'tap'?"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean(
    files: Path, change: tuple[str, str], field: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, GOOD.replace(*change)))
    assert exc.value.field == field and hint in str(exc.value), exc.value


def test_an_unlike_key_gets_only_the_known_ones(files: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        config.load(write(files, GOOD.replace("[tap]", "[tap]\nzzzz = 1")))
    assert "did you mean" not in str(exc.value) and "known here: mtu, name, offload" in str(
        exc.value
    )


def test_every_error_is_reported_in_one_pass(files: Path) -> None:
    text = GOOD.replace('listen = "0.0.0.0:4700"', 'listen = "nowhere"\ncipher = "rot13"').replace(
        "mtu = 1380", "mtu = 9000\nmut = 1"
    ).replace('endpoint = "192.0.2.7:4600"', 'endpoint = "192.0.2.7"') + ICE.replace(
        '"docker0"', '"no spaces"'
    )
    with pytest.raises(ConfigErrors) as exc:
        config.load(write(files, text))
    fields = [e.field for e in exc.value.errors]
    assert fields == [
        "tap.mut",
        "node.listen",
        "tap.mtu",
        "node.cipher",
        "peer[0].endpoint",
        "ice.ignore_interfaces[0]",
    ]
    assert exc.value.field == "tap.mut" and str(exc.value).count("\n") == len(fields) - 1


def test_the_cli_prints_each_config_error(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(files, GOOD.replace("mtu = 1380", "mtu = 9000").replace("a.key", "gone.key"))
    assert cli.main(["run", "-c", str(path), "--check"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ")[2] for line in err] == ["node.key", "tap.mtu"], err


def test_errors_inside_a_section_are_all_reported(files: Path) -> None:
    text = (
        GOOD
        + '[signalling]\nurl = "http://x"\nmax_links = 0\nadvertise = ["0.0.0.0:1", "bad"]\n'
        + ICE.replace("3478", "99999").replace('"docker0"', '"no spaces"')
    )
    with pytest.raises(ConfigErrors) as exc:
        config.load(write(files, text))
    assert [e.field for e in exc.value.errors] == [
        "signalling.url",
        "signalling.max_links",
        "signalling.advertise[0]",
        "signalling.advertise[1]",
        "ice.stun[0]",
        "ice.ignore_interfaces[0]",
    ]


def test_every_unknown_key_of_a_section_is_reported(files: Path) -> None:
    with pytest.raises(ConfigErrors) as exc:
        config.load(write(files, GOOD.replace("mtu = 1380", "mut = 1380\nofload = true")))
    assert [e.field for e in exc.value.errors] == ["tap.mut", "tap.ofload"]
    assert "did you mean 'offload'?" in exc.value.errors[1].why


def test_a_bad_value_brings_no_second_error_about_its_neighbours(files: Path) -> None:
    # Two peers with bad names are not "listed twice"; a bad url does not make `ca` misplaced.
    two = GOOD.replace('name = "b"', 'name = "b b"') + GOOD[GOOD.index("[[peer]]") :].replace(
        'name = "b"', 'name = "c c"'
    )
    with pytest.raises(ConfigErrors) as exc:
        config.load(write(files, two + '[signalling]\nurl = "http://x"\nca = "ca.crt"\n'))
    assert [e.field for e in exc.value.errors] == [
        "peer[0].name",
        "peer[1].name",
        "signalling.url",
    ]


def test_metrics_is_off_unless_configured(files: Path) -> None:
    assert config.load(write(files, GOOD)).metrics is None


@pytest.mark.parametrize(
    ("listen", "endpoint"),
    [("127.0.0.1:9464", ("127.0.0.1", 9464)), ("[::1]:9464", ("::1", 9464))],
)
def test_metrics_listen_parses(files: Path, listen: str, endpoint: tuple[str, int]) -> None:
    cfg = config.load(write(files, GOOD + f'[metrics]\nlisten = "{listen}"\n'))
    assert cfg.metrics == config.MetricsConfig(config.Endpoint(*endpoint))


@pytest.mark.parametrize(
    ("section", "field", "why"),
    [
        ("[metrics]\n", "metrics.listen", "missing"),
        ('[metrics]\nlisten = "localhost:9464"\n', "metrics.listen", "host names are not"),
        ('[metrics]\nlisten = "127.0.0.1:0"\n', "metrics.listen", "needs a port"),
        ('[metrics]\nlisten = "127.0.0.1:70000"\n', "metrics.listen", "out of range"),
        ("[metrics]\nlisten = 9464\n", "metrics.listen", "must be a string"),
        ('metrics = "127.0.0.1:9464"\n', "metrics", "must be a [metrics] table"),
    ],
)
def test_each_metrics_error_names_its_field(
    files: Path, section: str, field: str, why: str
) -> None:
    text = section + GOOD if not section.startswith("[") else GOOD + section
    with pytest.raises(ConfigError) as err:
        config.load(write(files, text))
    assert err.value.field == field and why in err.value.why, err.value


def test_a_misspelt_metrics_key_gets_a_did_you_mean_with_the_other_errors(files: Path) -> None:
    text = GOOD.replace("mtu = 1380", "mtu = 9000") + '[metrics]\nlistn = "127.0.0.1:9464"\n'
    with pytest.raises(ConfigErrors) as err:
        config.load(write(files, text))
    got = [str(e) for e in err.value.errors]
    assert any(e.startswith("tap.mtu:") for e in got)
    assert "metrics.listn: unknown setting (did you mean 'listen'? known here: listen)" in got
    assert any(e.startswith("metrics.listen: missing") for e in got)


def test_a_host_name_endpoint_says_names_are_not_supported() -> None:
    with pytest.raises(config.ConfigError, match="host names are not supported, give its IP"):
        config.parse_endpoint("peer[0].endpoint", "beta.example.net:4600")
    with pytest.raises(config.ConfigError, match='is not "ADDRESS:PORT"'):
        config.parse_endpoint("peer[0].endpoint", "beta")


@pytest.mark.parametrize(
    ("underlay", "ipv6", "mtu"),
    [
        (1500, False, 1400),
        (1500, True, 1384),
        (1400, False, 1304),
        (1280, False, 1184),
        (1280, True, 1164),
        (9000, False, 1400),
        (600, False, config.MIN_MTU),
    ],
)
def test_the_tap_mtu_is_what_one_underlay_packet_carries(
    underlay: int, ipv6: bool, mtu: int
) -> None:
    assert config.tap_mtu_for(underlay, ipv6=ipv6) == mtu
    if config.MIN_MTU < mtu < config.DEFAULT_MTU:
        # a full-size piece: the IP packet, its Ethernet header and trailer, the data header
        # and tag, ChannelData, UDP and the underlay IP header make exactly one packet
        piece = mtu + 14 + 18
        assert piece + 32 + 4 + 8 + (40 if ipv6 else 20) == underlay


def test_an_unset_mtu_is_chosen_from_the_underlay_and_a_set_one_wins(files: Path) -> None:
    unset = config.load(write(files, GOOD.replace("mtu = 1380\n", "")))
    assert unset.tap.mtu is None
    assert node.choose_tap_mtu(config.load(write(files, GOOD))) == (1380, "set in the config")


def test_the_mtu_is_measured_towards_the_addresses_the_config_names(files: Path) -> None:
    text = GOOD + (
        '[signalling]\nurl = "ws://198.51.100.9:8765/"\n[ice]\nstun = ["stun:203.0.113.5:3478"]\n'
    )
    cfg = config.load(write(files, text))
    assert node._underlay_targets(cfg) == ["192.0.2.7", "198.51.100.9", "203.0.113.5"]
    named = config.load(write(files, text.replace("198.51.100.9", "signal.example.net")))
    assert node._underlay_targets(named) == ["192.0.2.7", "203.0.113.5"]  # names: not resolved


def test_endpoints_print_as_the_config_writes_them() -> None:
    assert config.endpoint_text("fd01::2", 4600) == "[fd01::2]:4600"
    assert config.endpoint_text("::", 4600) == "[::]:4600"
    assert config.endpoint_text("10.0.0.1", 4600) == "10.0.0.1:4600"
    for text in ("[fd01::2]:4600", "10.0.0.1:4600"):
        assert str(config.parse_endpoint("node.listen", text)) == text  # round trip
