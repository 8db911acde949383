"""examples/ runs: the signalling command of examples/README.md and two nodes on copies of
examples/node.toml (only the server's address and the node's file names changed), with
certificates from `ipop-trio ca`, find each other, carry a ping, and allocate a relay on a
coturn that has the example's user and realm. The nodes keep every default a user would:
the control socket too, so `status` with no argument is what finds them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.measure import ping_rtts
from ipop_trio.lab.nat import add_turn
from ipop_trio.lab.netns import Host, Lab

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IPOP = str(Path(sys.executable).parent / "ipop-trio")
EXAMPLE_SERVER = "192.0.2.1"  # where examples/node.toml expects the servers
TIMEOUT = 30.0


def signal_command() -> list[str]:
    [line] = [
        line
        for line in (EXAMPLES / "README.md").read_text().splitlines()
        if line.startswith("ipop-trio signal ") and "--tls-cert" not in line
    ]
    return [IPOP, *line.split()[1:]]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as built:
        yield built


def status(host: Host) -> dict[str, Any]:
    done = host.run([IPOP, "status", "--json"], capture_output=True, text=True, timeout=30)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def test_the_examples_run(lab: Lab) -> None:
    switch = lab.add_switch("net")
    hosts = {name: lab.add_host(name) for name in ("server", "alpha", "beta")}
    for host in hosts.values():
        lab.attach(host, switch)
    server = hosts["server"].address
    etc = lab.workdir / "etc"
    for argv in (
        ["ca", "init", "--dir", str(etc), "--name", "lab", "--network", "10.77.0.0/24"],
        *(
            ["ca", "sign", "--ca", str(etc), "--name", n, "--address", a, "--out", str(etc)]
            for n, a in (("alpha", "10.77.0.1"), ("beta", "10.77.0.2"))
        ),
    ):
        subprocess.run([IPOP, *argv], check=True, capture_output=True)

    add_turn(lab, hosts["server"], users={"alpha": "change-me"}, realm="overlay")
    signal = hosts["server"].popen(
        signal_command(), cwd=etc, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert signal.stdout is not None
    while "ipop-trio signal: listening" not in (line := signal.stdout.readline()):
        assert line, "the signalling server exited"

    example = (EXAMPLES / "node.toml").read_text().replace(EXAMPLE_SERVER, server)
    for name in ("alpha", "beta"):
        config = etc / f"{name}.toml"
        config.write_text(example.replace('"alpha.', f'"{name}.'))
        with (etc / f"{name}.log").open("w") as log:  # the node keeps its own copy
            hosts[name].popen(
                [IPOP, "run", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = status(hosts["alpha"])
            peers = {p["name"]: p for p in reply.get("peers", [])}
            turn = (reply.get("ice") or {}).get("turn") or [{}]
            if (
                peers.get("beta", {}).get("state") == "established"
                and turn[0].get("state") == "allocated"
            ):
                break
            assert time.monotonic() < deadline, (reply, (etc / "alpha.log").read_text())
            time.sleep(0.2)
        assert reply["node"]["control"] == f"/run/ipop-trio/ipop0@{hosts['alpha'].ns}.sock"
        assert len(ping_rtts(hosts["alpha"], "10.77.0.2", count=3, interval=0.2)) == 3
        assert status(hosts["beta"])["node"]["name"] == "beta"
    finally:
        lab.close()
        for name in ("alpha", "beta"):
            Path(f"/run/ipop-trio/ipop0@{hosts[name].ns}.sock").unlink(missing_ok=True)
