"""`ipop-trio demo` as a user runs it: a subprocess that must succeed, show the path ICE
nominated for every pair (a relay between the symmetric and the EIM NAT), and leave nothing
behind, also when it is stopped with SIGTERM halfway."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ipop_trio.lab.netns import REGISTRY_DIR

from .conftest import processes_mentioning
from .test_lab import leftovers, netns_names

pytestmark = pytest.mark.lab

DEMO = [sys.executable, "-m", "ipop_trio", "demo"]
DEMO_TIMEOUT = 180.0
LAB_ID = re.compile(r"^==> Building lab (\w+):", re.MULTILINE)

# (a, b, the path types the demo's explanation predicts)
PAIRS = [
    ("alpha", "beta", {"srflx", "prflx"}),
    ("alpha", "gamma", {"host", "srflx", "prflx"}),
    ("beta", "gamma", {"relay"}),
]


def demo_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("IPOP_LAB_KEEP", None)  # the test checks that the workdir goes too
    return env


def assert_nothing_left(lab_id: str) -> None:
    assert not [ns for ns in netns_names() if ns.startswith(f"{lab_id}-")], "ip netns list"
    assert not leftovers(lab_id)  # namespaces and root-namespace veths
    assert not processes_mentioning(f"/{lab_id}-")  # nodes, signalling server, coturn
    assert not (REGISTRY_DIR / f"{lab_id}.json").exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"{lab_id}-*")), "the lab's workdir"


def test_demo_shows_each_pairs_path_and_leaves_nothing() -> None:
    started = time.monotonic()
    done = subprocess.run(
        DEMO, capture_output=True, text=True, timeout=DEMO_TIMEOUT, env=demo_env()
    )
    took = time.monotonic() - started
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    match = LAB_ID.search(out)
    assert match, out
    for a, b, expected in PAIRS:
        line = re.search(
            rf"^\s*{a} <-> {b}: {a} reports (\w+), {b} reports (\w+); (.*)$", out, re.M
        )
        assert line, f"no path line for {a} <-> {b}:\n{out}"
        assert {line.group(1), line.group(2)} <= expected, line.group(0)
        assert line.group(3).endswith(": as expected"), line.group(0)
    relayed = re.search(r"^\s*beta <-> gamma: beta reports .*$", out, re.M)
    assert relayed and "relay" in relayed.group(0)
    assert re.search(r"^\s*beta -> gamma \(relay\): [\d.]+ Mbit/s", out, re.M), out
    assert "DIFFERS" not in out and not done.stderr.strip(), done.stderr
    assert "done: nothing left behind" in out
    assert took < 60, f"the demo took {took:.0f}s"
    assert_nothing_left(match.group(1))


def test_demo_stopped_by_sigterm_cleans_up() -> None:
    proc = subprocess.Popen(
        DEMO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=demo_env(),
        start_new_session=True,
    )
    assert proc.stdout is not None
    out = b""
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT
        # Halfway: lab, coturn, signalling server and nodes all running.
        while b"==> Waiting for the full mesh" not in out:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, left))
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                pytest.fail(f"demo did not get to the mesh step: {out.decode(errors='replace')}")
            out += chunk
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 128 + signal.SIGTERM, text
    match = LAB_ID.search(text)
    assert match, text
    assert_nothing_left(match.group(1))
