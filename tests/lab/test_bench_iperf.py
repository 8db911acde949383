"""The bench's second try of an iperf3 run the server refused: what counts as refused, and
waiting until the server is done with its last client."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ipop_trio.errors import LabError
from ipop_trio.lab.measure import iperf3_server_refused, wait_tcp_idle

from .conftest import TwoHosts

pytestmark = pytest.mark.lab

PORT = 5299
SERVER = f"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT}))
s.listen()
print("listening", flush=True)
c, _ = s.accept()
print("accepted", flush=True)
sys.stdin.read()
c.close()
print("closed", flush=True)
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
print("up", flush=True)
sys.stdin.read()
"""


def test_only_a_refusal_on_the_control_connection_is_tried_again() -> None:
    assert iperf3_server_refused(
        LabError("iperf3 to 10.79.0.2 failed: unable to receive control message: Connection reset")
    )
    assert iperf3_server_refused(
        LabError("iperf3 to 10.1.0.2 failed: the server is busy running a test. try again later")
    )
    assert not iperf3_server_refused(LabError("iperf3 to 10.1.0.2 failed: unable to connect"))
    assert not iperf3_server_refused(LabError("iperf3 to 10.1.0.2 did not finish"))


def test_wait_tcp_idle_returns_only_when_the_server_has_closed(two_hosts: TwoHosts) -> None:
    a, b, link = two_hosts.a, two_hosts.b, two_hosts.link
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    server = b.popen([sys.executable, "-c", SERVER], **pipes)
    assert server.stdout is not None and server.stdin is not None
    assert server.stdout.readline() == "listening\n"
    wait_tcp_idle(b, PORT, timeout=1.0)  # listening only: idle
    client = a.popen([sys.executable, "-c", CLIENT, b.address_on(link), str(PORT)], **pipes)
    assert client.stdout is not None and client.stdin is not None
    assert client.stdout.readline() == "up\n"
    assert server.stdout.readline() == "accepted\n"
    with pytest.raises(LabError, match="still has connections"):
        wait_tcp_idle(b, PORT, timeout=0.3)
    server.stdin.close()  # the server closes its side: FIN-WAIT only
    assert server.stdout.readline() == "closed\n"
    wait_tcp_idle(b, PORT, timeout=5.0)
    client.stdin.close()
    assert client.wait(timeout=10) == 0 and server.wait(timeout=10) == 0
