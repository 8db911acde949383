"""examples/: the commented node config loads, and the signalling commands parse."""

from __future__ import annotations

import shlex
from pathlib import Path

from ipop_trio import cli, config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_node_config_is_valid(tmp_path: Path) -> None:
    node = tmp_path / "node.toml"
    node.write_text((EXAMPLES / "node.toml").read_text())
    for name in ("alpha.crt", "alpha.key", "ca.crt"):  # the files it names, as ca sign writes them
        (tmp_path / name).write_text("x")
    cfg = config.load(node)
    assert cfg.cert == tmp_path / "alpha.crt" and cfg.tap.name == "ipop0"
    assert cfg.signalling is not None and cfg.signalling.url.startswith("ws://")
    assert cfg.ice.stun and cfg.ice.turn


def test_example_signal_commands_parse() -> None:
    commands = [
        line
        for line in (EXAMPLES / "README.md").read_text().splitlines()
        if line.startswith("ipop-trio signal ")
    ]
    assert len(commands) == 2
    parser = cli.build_parser()
    for line in commands:
        args = parser.parse_args(shlex.split(line)[1:])
        assert args.listen == "0.0.0.0:8765" and args.ca
