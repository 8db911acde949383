"""One node, one socket, one port: two nodes with the same TAP name in two network namespaces
each get their own default control socket, `status` finds the node of the namespace it runs
in, and a second node on a live control socket or a taken UDP port exits 2 saying why."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipop_trio import pki
from ipop_trio.config import default_control
from ipop_trio.lab.netns import Host, Lab

IPOP = str(Path(sys.executable).parent / "ipop-trio")
READY_TIMEOUT = 20.0
TAP = "ipop0"  # the same name in both namespaces, as two users' defaults would be


class Nodes:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.hosts = {"alpha": lab.add_host("a"), "beta": lab.add_host("b")}
        now = time.time()
        ca_key, ca_cert = pki.new_ca("lab", "10.78.0.0/24", 30, now)
        self.etc = lab.workdir / "etc"
        self.etc.mkdir()
        (self.etc / "ca.crt").write_bytes(ca_cert)
        for i, name in enumerate(self.hosts, 1):
            key_pem, cert_pem = pki.issue_node(ca_key, ca_cert, name, f"10.78.0.{i}", [], 30, now)
            assert key_pem is not None
            (self.etc / f"{name}.crt").write_bytes(cert_pem)
            key = self.etc / f"{name}.key"
            key.write_bytes(key_pem)
            key.chmod(0o600)
            self.config(name, name, tap=TAP)

    def config(self, file: str, name: str, *, tap: str) -> Path:
        """A config with every default a user would keep: no control, port 4600."""
        path = self.etc / f"{file}.toml"
        path.write_text(
            f'[node]\ncert = "{name}.crt"\nkey = "{name}.key"\nca = "ca.crt"\n'
            f'[tap]\nname = "{tap}"\n'
        )
        return path

    def start(self, host: Host, config: str) -> subprocess.Popen[str]:
        return host.popen(
            [IPOP, "run", "-c", str(self.etc / f"{config}.toml")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, host: Host, config: str) -> subprocess.CompletedProcess[str]:
        """`ipop-trio run` of `config` to its end (for a node that must refuse to start)."""
        argv = [IPOP, "run", "-c", str(self.etc / f"{config}.toml")]
        return host.run(argv, capture_output=True, text=True, timeout=30)

    def status(self, host: Host, *args: str) -> subprocess.CompletedProcess[str]:
        return host.run([IPOP, "status", *args], capture_output=True, text=True, timeout=30)

    def wait_ready(self, host: Host, proc: subprocess.Popen[str], name: str) -> dict:  # type: ignore[type-arg]
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            done = self.status(host, "--json")
            if done.returncode == 0:
                reply: dict = json.loads(done.stdout)  # type: ignore[type-arg]
                assert reply["node"]["name"] == name
                return reply
            assert time.monotonic() < deadline, f"{name} never answered `status`: {done.stderr}"
            time.sleep(0.1)


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    with Lab() as lab:
        made = Nodes(lab)
        sockets = [default_control(TAP, Path(f"/run/netns/{h.ns}")) for h in made.hosts.values()]
        assert len(set(sockets)) == 2 and all("@" in p.name for p in sockets)
        try:
            yield made
        finally:
            lab.close()  # stops the nodes; a node killed outright leaves its socket behind
            for host in made.hosts.values():  # any TAP's: a test may start more nodes
                for path in sockets[0].parent.glob(f"*@{host.ns}.sock"):
                    path.unlink()


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    return out


def test_two_namespaces_two_sockets_and_status_finds_its_own(nodes: Nodes) -> None:
    a, b = nodes.hosts["alpha"], nodes.hosts["beta"]
    alpha, beta = nodes.start(a, "alpha"), nodes.start(b, "beta")
    ra, rb = nodes.wait_ready(a, alpha, "alpha"), nodes.wait_ready(b, beta, "beta")
    assert ra["node"]["control"] == f"/run/ipop-trio/{TAP}@{a.ns}.sock"
    assert rb["node"]["control"] == f"/run/ipop-trio/{TAP}@{b.ns}.sock"

    # -c finds the socket of the namespace it runs in, and says so when that is another node's.
    assert "node alpha" in nodes.status(a, "-c", str(nodes.etc / "alpha.toml")).stdout
    wrong = nodes.status(b, "-c", str(nodes.etc / "alpha.toml"))
    assert wrong.returncode == 1 and "is node beta's, not alpha's" in wrong.stderr, wrong

    # beta stops: alpha's socket is untouched and alpha still answers.
    stop(beta)
    assert Path(ra["node"]["control"]).is_socket()
    assert nodes.status(a, "--json").returncode == 0
    gone = nodes.status(b)
    assert gone.returncode == 1 and "no node answers" in gone.stderr, gone
    stop(alpha)
    assert not Path(ra["node"]["control"]).exists()


def test_a_second_node_on_a_live_socket_or_a_taken_port_exits_2(nodes: Nodes) -> None:
    a = nodes.hosts["alpha"]
    alpha = nodes.start(a, "alpha")
    nodes.wait_ready(a, alpha, "alpha")

    # The same config again: its control socket is alpha's, served by a live node.
    again = nodes.run(a, "alpha")
    assert again.returncode == 2, again
    assert again.stderr.splitlines() == [
        f"ipop-trio: config error: node.control: /run/ipop-trio/{TAP}@{a.ns}.sock is served by "
        f"a live node (node alpha, pid {alpha.pid}): stop it, or give this node its own "
        "node.control or tap.name"
    ], again.stderr

    # Another TAP (so its own socket), but the same default UDP port.
    nodes.config("beta-here", "beta", tap="ipop1")
    port = nodes.run(a, "beta-here")
    assert port.returncode == 2, port
    assert port.stderr.splitlines() == [
        "ipop-trio: config error: node.listen: cannot bind UDP 0.0.0.0:4600: Address already "
        "in use (another node or program holds this port: stop it, or set node.listen)"
    ], port.stderr
    assert "ipop1" not in a.check(["ip", "-br", "link"])  # refused before its TAP was made

    # alpha never noticed: still up, on its own socket.
    assert nodes.status(a, "--json").returncode == 0
    stop(alpha)
