"""logs.py: one JSON object per line, whatever the message holds; config's log_format."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from ipop_trio import config
from ipop_trio.errors import ConfigError
from ipop_trio.logs import JsonFormatter


def record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("ipop_trio.x", logging.WARNING, __file__, 1, msg, args, info)


def test_a_record_is_one_json_line() -> None:
    out = JsonFormatter().format(record("peer %s said %s", "beta", "a\nforged line\x1b[2J"))
    assert "\n" not in out
    parsed = json.loads(out)
    assert parsed["level"] == "warning" and parsed["logger"] == "ipop_trio.x"
    assert parsed["message"] == "peer beta said a\nforged line\x1b[2J"
    assert parsed["time"].endswith("Z") and "T" in parsed["time"]


def test_an_exception_travels_in_its_own_field() -> None:
    parsed = json.loads(JsonFormatter().format(record("failed", exc=True)))
    assert parsed["message"] == "failed"
    assert "ValueError: boom" in parsed["exception"]


def test_log_format_is_checked(tmp_path: Path) -> None:
    for name in ("a.crt", "a.key", "ca.crt"):
        (tmp_path / name).write_text("")
    head = '[node]\ncert = "a.crt"\nkey = "a.key"\nca = "ca.crt"\n'
    (tmp_path / "good.toml").write_text(head + 'log_format = "json"\n')
    assert config.load(tmp_path / "good.toml").log_format == "json"
    (tmp_path / "bad.toml").write_text(head + 'log_format = "xml"\n')
    with pytest.raises(ConfigError, match=r"node.log_format: 'xml' is not one of: text, json"):
        config.load(tmp_path / "bad.toml")
