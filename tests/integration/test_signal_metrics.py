"""`ipop-trio signal --metrics`: a live server process on loopback, scraped over HTTP while
real clients are admitted, refused and relayed; and a taken metrics port is one line, exit 2."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ipop_trio import cli, pki
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.client import open_connection

from .test_signalling_server import NodeId, admit, con_req, receive

NOW = time.time()
POLL_DEADLINE = 10.0


@dataclass
class Live:
    proc: subprocess.Popen[str]
    url: str
    metrics_port: int
    ca: pki.CaBundle


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Live]:
    ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    argv = ["signal", "--listen", "127.0.0.1:0", "--ca", str(tmp_path / "ca.crt")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipop_trio", *argv, "--metrics", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        metrics_line = proc.stdout.readline()  # "...: metrics on http://127.0.0.1:PORT/metrics"
        listening = proc.stdout.readline()  # "...: listening on 127.0.0.1:PORT"
        assert "metrics on http://127.0.0.1:" in metrics_line, (metrics_line, proc.poll())
        assert "listening on" in listening, (listening, proc.poll())
        metrics_port = int(metrics_line.rsplit(":", 1)[1].split("/", 1)[0])
        url = f"ws://127.0.0.1:{int(listening.rsplit(':', 1)[1])}/"
        yield Live(proc, url, metrics_port, ca)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


async def scrape(port: int) -> dict[str, float]:
    """`name{labels}` -> value from one GET /metrics."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def wait_for(port: int, want: dict[str, float]) -> dict[str, float]:
    """Scrape until every series in `want` has its value (the server counts in its own task)."""
    deadline = trio.current_time() + POLL_DEADLINE
    while True:
        got = await scrape(port)
        if all(got.get(k) == v for k, v in want.items()):
            return got
        if trio.current_time() > deadline:
            raise AssertionError({k: got.get(k) for k in want})
        await trio.sleep(0.05)


async def test_members_admissions_refusals_relays_and_clients(live: Live) -> None:
    base = await scrape(live.metrics_port)
    assert base['ipop_trio_signal_members{overlay="lab"}'] == 0
    assert base["ipop_trio_signal_connections"] == 0

    a, b = (
        NodeId(pki.issue_node_bundle(live.ca, name, address, now=NOW))
        for name, address in (("a", "10.77.0.2"), ("b", "10.77.0.3"))
    )
    stranger_ca = pki.new_ca_bundle("other", "10.88.0.0/24", now=NOW)
    stranger = NodeId(pki.issue_node_bundle(stranger_ca, "s", "10.88.0.2", now=NOW))
    async with open_connection(live.url) as wa, open_connection(live.url) as wb:
        await admit(wa, a)
        await admit(wb, b)
        assert isinstance(await receive(wa), sig.Join)
        req = con_req(a, b)
        await wa.send_message(sig.encode(req))
        assert isinstance(await receive(wb), sig.ConReq)
        back = con_req(b, a)
        fields = {f.name: getattr(back, f.name) for f in dataclasses.fields(back)}
        resp = sig.ConResp(**(fields | {"request_id": req.request_id}))
        await wb.send_message(sig.encode(resp))
        assert isinstance(await receive(wa), sig.ConResp)
        async with open_connection(live.url) as ws:
            await ws.send_message(sig.encode(sig.Hello(stranger.bundle.cert_der)))
            refused = await receive(ws)
            assert isinstance(refused, sig.Error) and refused.code == "certificate_refused"

        got = await wait_for(
            live.metrics_port,
            {
                'ipop_trio_signal_members{overlay="lab"}': 2,
                "ipop_trio_signal_connections": 2,
                "ipop_trio_signal_admissions_total": 2,
                'ipop_trio_signal_refusals_total{reason="certificate"}': 1,
                'ipop_trio_signal_relays_total{type="con_req"}': 1,
                'ipop_trio_signal_relays_total{type="con_resp"}': 1,
            },
        )
        assert got["ipop_trio_signal_preauth_connections"] == 0
        assert got['ipop_trio_signal_refusals_total{reason="proof"}'] == 0

    # Both gone: the members leave, the counters stay.
    got = await wait_for(
        live.metrics_port,
        {'ipop_trio_signal_members{overlay="lab"}': 0, "ipop_trio_signal_connections": 0},
    )
    assert got["ipop_trio_signal_admissions_total"] == 2
    assert live.proc.poll() is None


def test_a_taken_metrics_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "ipop_trio", "signal", "--listen", "127.0.0.1:0"),
                *("--ca", str(tmp_path / "ca.crt"), "--metrics", f"127.0.0.1:{port}"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"ipop-trio: config error: --metrics: cannot listen on 127.0.0.1:{port}: "
    ), done.stderr
    assert "listening on" not in done.stdout


def test_signal_help_names_the_metrics_option() -> None:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices  # type: ignore[union-attr]
    text = sub["signal"].format_help()  # type: ignore[index]
    assert "--metrics ADDR:PORT" in text and "refusals by reason" in " ".join(text.split())
