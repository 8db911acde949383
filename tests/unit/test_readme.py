"""README.md stays true to the code: its config table names every key the parser accepts and
renders as one Markdown table, and its sample `status` output has the columns the tool prints."""

from __future__ import annotations

import re
from pathlib import Path

from ipop_trio import config
from ipop_trio.status import format_status

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> list[str]:
    lines = README.read_text().splitlines()
    start = lines.index(title)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1 : end]


def test_config_table_is_one_table_naming_every_key() -> None:
    body = _section("## Configuration reference")
    rows = [i for i, line in enumerate(body) if line.startswith("| `[")]
    assert rows, "no config table"
    # A blank (or any non-row) line inside the table ends it in Markdown: the rest is text.
    assert all(body[i].startswith("|") for i in range(rows[0], rows[-1] + 1))
    documented = {
        (m.group(1), m.group(2))
        for i in rows
        if (m := re.match(r"\| `\[{1,2}(\w+)\]{1,2} (\w+)`", body[i]))
    }
    wanted = {
        (section, key)
        for section, keys in config._KNOWN.items()
        if section and "." not in section  # ice.turn: the inner keys of one `turn` entry
        for key in keys
    }
    missing = wanted - documented
    assert not missing, f"README's config table lacks {sorted(missing)}"


def test_sample_status_has_the_columns_status_prints() -> None:
    printed = format_status({"node": {"name": "alpha"}, "peers": []}).splitlines()[-1].split()
    sample = next(
        line for line in _section("## Running an overlay by hand") if line.startswith("PEER ")
    )
    assert sample.split() == printed
