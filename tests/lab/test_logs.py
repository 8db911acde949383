"""`log_format = "json"`: two nodes and the signalling server log one JSON object per line,
and the lines an operator needs are there at INFO: the server's admissions and leaves, each
link's first session."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay

from .conftest import failed, print_logs

pytestmark = pytest.mark.lab

READY_LINE = "ipop-trio signal: listening"  # the server's readiness line, on stdout: not a log


def records(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith(READY_LINE):
            continue
        record = json.loads(line)  # every line, or the test fails here
        assert isinstance(record, dict) and set(record) >= {"time", "level", "logger", "message"}
        assert record["time"].endswith("Z"), record
        out.append(record)
    return out


@pytest.fixture
def overlay(request: pytest.FixtureRequest) -> Iterator[Overlay]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        hosts = [lab.add_host(name) for name in ("sig", "a", "b")]
        for host in hosts:
            lab.attach(host, switch)
        built = Overlay(lab, log_format="json")
        try:
            built.start_signalling(hosts[0])
            for name, host in zip(("alpha", "beta"), hosts[1:], strict=True):
                built.add_node(name, host, signalling=True)
            built.start()
            yield built
        finally:
            if failed(request):
                print_logs(built)


def test_json_logs_parse_line_by_line(overlay: Overlay) -> None:
    alpha, beta = overlay.nodes["alpha"], overlay.nodes["beta"]
    overlay.wait_established(alpha, beta)
    assert overlay.stop(beta) == 0
    assert overlay.signal is not None
    server_log = overlay.signal.log
    overlay.stop_signalling()

    node = records(alpha.log)
    established = [r for r in node if "session" in r["message"] and "established" in r["message"]]
    assert established and established[0]["level"] == "info", node
    assert any(r["message"].startswith("node alpha up:") for r in node)

    server = [r["message"] for r in records(server_log) if r["level"] == "info"]
    for name in ("alpha", "beta"):
        assert any(m.startswith(f"admitted {name} (") for m in server), server
    assert any(m.startswith("beta left overlay lab (") for m in server), server
