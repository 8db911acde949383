"""The namespace lab itself: hosts, veth links, addresses, and teardown that always happens."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipop_trio.errors import LabError
from ipop_trio.lab.netns import REGISTRY_DIR, Host, Lab, cleanup_stale

from .conftest import TwoHosts

pytestmark = pytest.mark.lab


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    return [link["ifname"] for link in json.loads(out.stdout)]


def leftovers(lab_id: str) -> list[str]:
    """Every namespace or root-namespace interface that still carries `lab_id`."""
    return [n for n in netns_names() + root_links() if n.startswith(f"{lab_id}-")]


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its parent does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line from the child's stdout, or fail after `timeout` (no blocking forever)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            pytest.fail(f"no line from child within {timeout}s (got {buf!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            pytest.fail(f"child exited with {proc.wait()} before a line (got {buf!r})")
        buf += chunk
    return buf.decode().strip()


def ping_ok(host: Host, address: str) -> bool:
    done = host.run(
        ["ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", address],
        capture_output=True,
        timeout=30,
    )
    return done.returncode == 0


# A lab owned by a child process; it prints "<lab id> <pid of a process in the lab>" and waits.
CHILD = """
import signal, subprocess, sys
from ipop_trio.lab.netns import Lab, sigterm_raises

prefix, stray_root_veth = sys.argv[1], sys.argv[2] == "1"
# Ctrl-C as a terminal gives it, even when this test runs under a shell that started it in
# the background (which leaves SIGINT ignored, and Python then keeps it ignored).
signal.signal(signal.SIGINT, signal.default_int_handler)
with sigterm_raises():
    with Lab(prefix=prefix) as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        lab.connect(a, b)
        proc = a.popen(["sleep", "300"])
        if stray_root_veth:  # as if killed between creating a veth and moving it
            subprocess.run(["ip", "link", "add", lab.id + "-9a", "type", "veth",
                            "peer", "name", lab.id + "-9b"], check=True)
        print(lab.id, proc.pid, flush=True)
        while True:
            signal.pause()
"""


def start_child(prefix: str, stray_root_veth: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, prefix, "1" if stray_root_veth else "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )


def finish_child(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)
    assert proc.stdout is not None
    proc.stdout.close()


def test_two_hosts_ping_across_the_veth(two_hosts: TwoHosts) -> None:
    lab, a, b, link = two_hosts.lab, two_hosts.a, two_hosts.b, two_hosts.link
    assert a.address_on(link) == "10.199.0.1"
    assert b.address_on(link) == "10.199.0.2"
    assert ping_ok(a, b.address_on(link))
    assert ping_ok(b, a.address_on(link))
    assert ping_ok(a, "127.0.0.1"), "lo must be up in every namespace"
    for host, end in zip((a, b), link.ends, strict=True):
        assert host.ns == f"{lab.id}-{host.name}"
        assert end.ifname.startswith(f"{lab.id}-")
        assert end.ifname in host.link_names()
        shown = host.check(["ip", "-j", "link", "show", "dev", end.ifname])
        assert json.loads(shown)[0]["mtu"] == 1500


def test_links_get_their_own_subnets(lab: Lab) -> None:
    a, b, c = lab.add_host("a"), lab.add_host("b"), lab.add_host("c")
    ab = lab.connect(a, b)
    bc = lab.connect(b, c)
    ca = lab.connect(c, a, "192.168.77.0/30")
    assert (b.address_on(ab), b.address_on(bc)) == ("10.199.0.2", "10.199.1.1")
    assert (c.address_on(ca), a.address_on(ca)) == ("192.168.77.1", "192.168.77.2")
    assert ping_ok(c, b.address_on(bc))
    assert ping_ok(a, c.address_on(ca))
    assert not ping_ok(a, c.address_on(bc)), "no routing between links unless asked"
    with pytest.raises(LabError):
        lab.add_host("a")


def test_a_host_routes_through_another(lab: Lab) -> None:
    a, router, c = lab.add_host("a"), lab.add_host("router"), lab.add_host("c")
    left, right = lab.connect(a, router), lab.connect(router, c)
    router.check(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    a.add_route("default", router.address_on(left))
    c.add_route(str(left.subnet), right.end(router).address.ip.compressed)
    assert right.other(c).host is router
    assert ping_ok(a, c.address_on(right))


def test_parallel_labs_do_not_collide() -> None:
    with Lab() as one, Lab() as two:
        assert one.id != two.id
        hosts = [(lab, lab.add_host("a"), lab.add_host("b")) for lab in (one, two)]
        links = [lab.connect(a, b) for lab, a, b in hosts]
        for (_, a, b), link in zip(hosts, links, strict=True):
            assert ping_ok(a, b.address_on(link))
    assert leftovers(one.id) == [] and leftovers(two.id) == []


def test_teardown_removes_everything_even_when_the_body_raises() -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), Lab() as lab:
        a, b, c = lab.add_host("a"), lab.add_host("b"), lab.add_host("c")
        lab.connect(a, b)
        lab.connect(b, c)
        tracked = a.popen(["sleep", "300"])
        # A process the lab did not start itself (daemonised, reparented): still removed.
        c.check(["sh", "-c", "sleep 300 >/dev/null 2>&1 &"])
        strays = c.pids()
        assert strays and len(leftovers(lab.id)) == 3
        raise Boom
    assert leftovers(lab.id) == []
    assert tracked.returncode is not None
    assert not any(alive(pid) for pid in strays)
    assert not lab.workdir.exists()
    assert not (REGISTRY_DIR / f"{lab.id}.json").exists()
    lab.close()  # idempotent
    with pytest.raises(LabError):
        lab.add_host("late")


def test_a_process_that_ignores_sigterm_is_killed() -> None:
    with Lab() as lab:
        a = lab.add_host("a")
        stubborn = a.popen(
            ["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 1; done"],
            stdout=subprocess.PIPE,
        )
        assert read_line(stubborn, 10) == "ready"
    assert stubborn.returncode == -signal.SIGKILL
    assert leftovers(lab.id) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_lab_process_tears_down(sig: signal.Signals) -> None:
    child = start_child("iptsg")
    try:
        lab_id, pid = read_line(child, 30).split()
        assert len(leftovers(lab_id)) == 2 and alive(int(pid))
        child.send_signal(sig)
        code = child.wait(timeout=30)
        # SIGTERM → SystemExit(143) via sigterm_raises; SIGINT → KeyboardInterrupt, which
        # Python turns into death by SIGINT once the lab is gone.
        assert code == (143 if sig == signal.SIGTERM else -signal.SIGINT)
        assert leftovers(lab_id) == []
        assert not alive(int(pid))
    finally:
        finish_child(child)
        cleanup_stale("iptsg")


def test_cleanup_stale_removes_labs_whose_owner_died() -> None:
    child = start_child("iptcs", stray_root_veth=True)
    try:
        with Lab(prefix="iptcs") as live:
            live_host = live.add_host("x")
            stale_id, pid = read_line(child, 30).split()
            child.kill()  # no teardown: the lab is now stale
            child.wait(timeout=30)
            assert len(leftovers(stale_id)) == 4  # two namespaces, the half-made veth pair
            removed = cleanup_stale("iptcs")
            assert set(removed) >= {f"{stale_id}-a", f"{stale_id}-b"}
            assert {f"{stale_id}-9a", f"{stale_id}-9b"} & set(removed)  # one end takes both
            assert leftovers(stale_id) == []
            assert not alive(int(pid))
            assert not (REGISTRY_DIR / f"{stale_id}.json").exists()
            # A lab whose owner (this process) is alive is left alone.
            assert live_host.ns in netns_names()
            assert cleanup_stale("iptcs") == []
        assert leftovers(live.id) == []
    finally:
        finish_child(child)
        cleanup_stale("iptcs")
