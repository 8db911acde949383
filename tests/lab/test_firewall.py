"""The firewall in the lab: three nodes on one switch, a{web}, b{ops} and c{db}; only c has
rules (by group), on each data path:

    inbound  [0] deny  tcp 5001       groups web
             [1] allow tcp 5000-5001  any peer
             [2] allow icmp           groups ops
    outbound [0] allow tcp 6000       groups web

a connects to c:5000; a's SYNs to c:5001 never reach c's TAP (tcpdump there) and are counted
on inbound[0], while b (not web) connects to 5001; b's ping is answered, a's is not. c opens
a connection to a:6000 and its replies come back (no inbound rule allows them: the state
table does); c's connection to b:6000 is refused on the outbound default. A SIGHUP with new
rules applies them while a ping from b runs on undisturbed and no link is re-keyed.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ipop_trio.lab.netns import Host, Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode

from .capture import Capture, Lines
from .conftest import failed, print_logs

GROUPS = {"a": ("web",), "b": ("ops",), "c": ("db",)}
RULES = """
[[firewall.inbound]]
proto = "tcp"
port = 5001
groups = ["web"]
action = "deny"

[[firewall.inbound]]
proto = "tcp"
port = "5000-5001"
host = "any"

[[firewall.inbound]]
proto = "icmp"
groups = ["ops"]

[[firewall.outbound]]
proto = "tcp"
port = 6000
groups = ["web"]
"""
# After the SIGHUP: ICMP from web too, and port 5000 no longer open.
RELOADED = """
[[firewall.inbound]]
proto = "icmp"
groups = ["ops"]

[[firewall.inbound]]
proto = "icmp"
groups = ["web"]

[[firewall.inbound]]
proto = "tcp"
port = 5001
host = "any"

[[firewall.outbound]]
proto = "tcp"
port = 6000
groups = ["web"]
"""

# A TCP listener: one line per accepted connection, each echoes what it reads.
LISTENER = r"""
import select, socket, sys
socks = []
for port in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen()
    socks.append(s)
print("listening", flush=True)
while True:
    ready, _, _ = select.select(socks, [], [])
    for s in ready:
        conn, peer = s.accept()
        print("accepted", s.getsockname()[1], peer[0], flush=True)
        conn.settimeout(5)
        try:
            conn.sendall(conn.recv(100))
        except OSError:
            pass
        conn.close()
"""
# Connect, send a line, expect it back: "echoed" (exit 0), else why (exit 1).
CLIENT = r"""
import socket, sys
line = b"through the firewall\n"
try:
    where = (sys.argv[1], int(sys.argv[2]))
    with socket.create_connection(where, timeout=float(sys.argv[3])) as s:
        s.sendall(line)
        print("echoed" if s.recv(100) == line else "garbled")
except OSError as exc:
    print(type(exc).__name__)
    sys.exit(1)
"""
CONNECT_TIMEOUT = 2.0


@dataclass
class Trio:
    lab: Lab
    overlay: Overlay
    nodes: dict[str, OverlayNode]


def build(request: pytest.FixtureRequest, datapath: str) -> Iterator[Trio]:
    with Lab() as lab:
        switch = lab.add_switch("net")
        overlay = Overlay(lab)
        nodes = {}
        for name, groups in GROUPS.items():
            host = lab.add_host(name)
            lab.attach(host, switch)
            extra = RULES if name == "c" else ""
            nodes[name] = overlay.add_node(
                name, host, groups=groups, extra_config=extra, datapath=datapath
            )
        try:
            overlay.start()
            for x, y in (("a", "b"), ("a", "c"), ("b", "c")):
                overlay.wait_established(nodes[x], nodes[y], timeout=20)
            yield Trio(lab, overlay, nodes)
        finally:
            if failed(request):
                print_logs(overlay)


@pytest.fixture(params=["native", "python"])
def trio(request: pytest.FixtureRequest) -> Iterator[Trio]:
    yield from build(request, request.param)


@pytest.fixture
def trio_native(request: pytest.FixtureRequest) -> Iterator[Trio]:
    yield from build(request, "native")


class Listener:
    """LISTENER in a host's namespace; `accepted` reads the lines it printed so far."""

    def __init__(self, host: Host, *ports: int) -> None:
        self.proc = host.popen(
            [sys.executable, "-c", LISTENER, *map(str, ports)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        self.lines = Lines(self.proc.stdout)
        assert self.lines.next(10) == "listening"
        self.seen: list[str] = []

    def expect(self, line: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.seen:
            self.seen.append(self.lines.next(max(0.1, deadline - time.monotonic())))

    def stop(self) -> list[str]:
        self.proc.kill()
        self.proc.wait()
        assert self.proc.stdout is not None
        rest = self.lines.buf + self.proc.stdout.read()
        return self.seen + rest.decode().splitlines()


def connect(src: OverlayNode, dst: OverlayNode, port: int) -> str:
    done = src.host.run(
        [sys.executable, "-c", CLIENT, dst.address, str(port), str(CONNECT_TIMEOUT)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip() or done.stderr.strip()


def pings(src: OverlayNode, dst: OverlayNode, count: int = 3) -> int:
    """Replies to `count` pings (one second's wait for each)."""
    done = src.host.run(
        ["ping", "-n", "-c", str(count), "-i", "0.2", "-W", "1", dst.address],
        capture_output=True,
        text=True,
        timeout=30,
    )
    for line in done.stdout.splitlines():
        if "packets transmitted" in line:
            return int(line.split(",")[1].split()[0])
    raise AssertionError(done.stdout + done.stderr)


def firewall(t: Trio, name: str = "c") -> dict[str, Any]:
    fw = t.overlay.status(t.nodes[name])["firewall"]
    assert fw is not None
    return dict(fw)


def syns(pcap: bytes, src: str, dport: int) -> int:
    """TCP SYNs (not SYN-ACKs) from `src` to `dport` in a classic pcap of an Ethernet TAP."""
    want, n, off = bytes(int(x) for x in src.split(".")), 0, 24
    while off + 16 <= len(pcap):
        incl = struct.unpack_from("<I", pcap, off + 8)[0]
        f = pcap[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6 or f[26:30] != want:
            continue
        l4 = 14 + (f[14] & 0x0F) * 4
        if len(f) >= l4 + 14 and struct.unpack_from("!H", f, l4 + 2)[0] == dport:
            n += (f[l4 + 13] & 0x12) == 0x02
    return n


def test_rules_by_group_allow_deny_count_and_let_replies_pass(trio: Trio) -> None:
    t = trio
    a, b, c = t.nodes["a"], t.nodes["b"], t.nodes["c"]
    assert firewall(t)["inbound"]["default"] == "deny"
    assert t.overlay.status(a)["firewall"] is None  # no [firewall]: no firewall at all
    cap = Capture(c.host, c.tap, t.lab.workdir / "c-tap.pcap")
    server = Listener(c.host, 5000, 5001)
    try:
        assert connect(a, c, 5000) == "echoed"  # allowed by inbound[1], replies pass back
        server.expect(f"accepted 5000 {a.address}")
        assert connect(a, c, 5001) == "TimeoutError"  # web: denied by inbound[0]
        assert connect(b, c, 5001) == "echoed"  # ops: inbound[0] does not apply
        server.expect(f"accepted 5001 {b.address}")
        cap.wait_for(bytes(int(x) for x in b.address.split(".")))  # b's traffic is captured
    finally:
        pcap = cap.stop()
        seen = server.stop()
    assert syns(pcap, a.address, 5000) >= 1, "the capture missed a's allowed SYN"
    assert syns(pcap, a.address, 5001) == 0, "a denied SYN reached c's TAP"
    assert f"accepted 5001 {a.address}" not in seen
    fw = firewall(t)
    rules = fw["inbound"]["rules"]
    assert rules[0]["hits"] >= 1, rules  # a's SYN and its retransmissions
    assert rules[1]["hits"] >= 2, rules  # a's flow to 5000, b's to 5001
    assert rules[0]["rule"] == "deny tcp port 5001 groups=web"

    # ICMP by rule: b (ops) is answered, a (web) is refused on the inbound default.
    before = fw["inbound"]["refused"]["default"]
    assert pings(b, c) == 3
    assert pings(a, c, count=2) == 0
    fw = firewall(t)
    assert fw["inbound"]["rules"][2]["hits"] >= 1
    assert fw["inbound"]["refused"]["default"] >= before + 2

    # Outbound: c may open tcp 6000 to web members; the replies pass c's inbound rules,
    # which allow nothing from port 6000 (the state table does).
    on_a, on_b = Listener(a.host, 6000), Listener(b.host, 6000)
    try:
        assert connect(c, a, 6000) == "echoed"
        on_a.expect(f"accepted 6000 {c.address}")
        assert connect(c, b, 6000) == "TimeoutError"
    finally:
        on_a.stop()
        seen_b = on_b.stop()
    assert f"accepted 6000 {c.address}" not in seen_b
    fw = firewall(t)
    assert fw["outbound"]["rules"][0]["hits"] >= 1
    assert fw["outbound"]["refused"]["default"] >= 1
    assert fw["conntrack"]["entries"] >= 1
    drops = t.overlay.status(c)["stats"]["drops"]
    assert drops.get("firewall_inbound", 0) >= 3 and drops.get("firewall_outbound", 0) >= 1
    # nothing refused by a firewall anywhere else
    for other in (a, b):
        assert not {k for k in t.overlay.status(other)["stats"]["drops"] if "firewall" in k}


def test_sighup_applies_new_rules_without_touching_links(trio_native: Trio) -> None:
    t = trio_native
    a, b, c = t.nodes["a"], t.nodes["b"], t.nodes["c"]
    server = Listener(c.host, 5000, 5001)
    ping = b.host.popen(
        ["ping", "-n", "-i", "0.05", "-c", "200", c.address], stdout=subprocess.PIPE, text=True
    )
    try:
        assert connect(a, c, 5000) == "echoed"
        assert pings(a, c, count=2) == 0
        c.extra_config = RELOADED
        t.overlay.write_config(c)
        assert c.proc is not None
        c.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "firewall 3 in / 1 out rules" not in c.log.read_text(errors="replace"):
            assert time.monotonic() < deadline, t.overlay.log_tail(c)
            time.sleep(0.05)
        assert "0 link(s) re-keyed" in c.log.read_text(errors="replace")
        assert pings(a, c) == 3  # icmp from web: now allowed
        assert connect(a, c, 5000) == "TimeoutError"  # 5000: no longer
        assert connect(a, c, 5001) == "echoed"
        fw = firewall(t)
        assert [r["rule"] for r in fw["inbound"]["rules"]] == [
            "allow icmp groups=ops",
            "allow icmp groups=web",
            "allow tcp port 5001 host=any",
        ]
        assert fw["inbound"]["refused"]["default"] >= 1  # a's SYN to 5000
        out, _ = ping.communicate(timeout=60)
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()
        server.stop()
    summary = [line for line in out.splitlines() if "packet loss" in line]
    assert summary and " 0% packet loss" in summary[0], out[-500:]
    for x, y in (("c", "a"), ("c", "b")):
        entry = t.overlay.peer_status(t.nodes[x], t.nodes[y])
        assert entry is not None and entry["state"] == "established" and entry["failures"] == 0
    assert "link removed" not in c.log.read_text(errors="replace")
