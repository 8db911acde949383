"""examples/systemd/ipop-trio@.service: its commands, run with exactly the capabilities the unit
grants (setpriv, as systemd would), bring a node up and down; without them a user gets one
line saying why, not a traceback."""

from __future__ import annotations

import configparser
import os
import pwd
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipop_trio import pki
from ipop_trio.lab.netns import Host, Lab
from ipop_trio.net.control import query

UNIT = Path(__file__).resolve().parents[2] / "examples/systemd/ipop-trio@.service"
INSTALLED = "/opt/ipop-trio/bin/ipop-trio"  # where the unit expects the package
READY_TIMEOUT = 20.0
NOBODY = pwd.getpwnam("nobody")


def _service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(UNIT.read_text())
    return unit["Service"]


def _command(line: str, instance: str, etc: Path) -> list[str]:
    """A unit's command line for instance `instance`, pointed at this checkout and `etc`."""
    argv = shlex.split(line.replace("%i", instance).replace("/etc/ipop-trio", str(etc)))
    assert argv[0] == INSTALLED
    return [str(Path(sys.executable).parent / "ipop-trio"), *argv[1:]]


def _setpriv(caps: list[str], user: list[str] = []) -> list[str]:  # noqa: B006 (not mutated)
    """Run with only `caps` (systemd's CapabilityBoundingSet + AmbientCapabilities), as uid 0
    unless `user` gives setpriv's --reuid/--regid options."""
    names = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    return [
        "setpriv",
        *user,
        f"--inh-caps={names}",
        f"--ambient-caps={names}",
        f"--bounding-set={names}",
        "--no-new-privs",
    ]


@pytest.fixture
def node_files() -> Iterator[tuple[Host, Path]]:
    with Lab() as lab:
        host = lab.add_host("svc")
        etc = lab.workdir / "etc"
        etc.mkdir()
        now = time.time()
        ca_key, ca_cert = pki.new_ca("lab", "10.77.0.0/24", 30, now)
        key_pem, cert_pem = pki.issue_node(ca_key, ca_cert, "alpha", "10.77.0.1", [], 30, now)
        assert key_pem is not None
        (etc / "ca.crt").write_bytes(ca_cert)
        (etc / "alpha.crt").write_bytes(cert_pem)
        key = etc / "alpha.key"
        key.write_bytes(key_pem)
        key.chmod(0o600)
        (etc / "alpha.toml").write_text(
            '[node]\ncert = "alpha.crt"\nkey = "alpha.key"\nca = "ca.crt"\n'
            f'control = "{etc / "alpha.sock"}"\n[tap]\nname = "ipsvc0"\n'
        )
        yield host, etc


def test_the_unit_runs_a_node_with_only_its_capabilities(node_files: tuple[Host, Path]) -> None:
    host, etc = node_files
    service = _service()
    caps = service["CapabilityBoundingSet"].split()
    assert caps == ["CAP_NET_ADMIN"] and service["AmbientCapabilities"].split() == caps
    wrap = _setpriv(caps)

    check = host.run(
        wrap + _command(service["ExecStartPre"], "alpha", etc), capture_output=True, text=True
    )
    assert check.returncode == 0 and "ok (node alpha" in check.stdout, check

    proc = host.popen(
        wrap + _command(service["ExecStart"], "alpha", etc),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + READY_TIMEOUT
    status = None
    while status is None:
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the node never answered on its control socket"
        try:
            status = query(etc / "alpha.sock", timeout=1.0)
        except OSError:
            time.sleep(0.05)
    assert status["node"]["address"] == "10.77.0.1/24"
    assert "ipsvc0" in host.check(["ip", "-br", "link"])
    caps_line = next(
        line
        # `ip netns exec` and setpriv each exec the next, so proc.pid is the node itself.
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        if line.startswith("CapEff:")
    )
    assert int(caps_line.split()[1], 16) == 1 << 12  # CAP_NET_ADMIN alone

    proc.terminate()  # what `systemctl stop` sends
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out
    assert "ipsvc0" not in host.check(["ip", "-br", "link"])


def test_without_root_one_line_says_why(node_files: tuple[Host, Path]) -> None:
    """An ordinary user (nobody, no capabilities) gets one line naming what it needs."""
    host, etc = node_files
    os.chmod(etc.parent, 0o755)  # the lab's workdir is root's 0700: let nobody reach etc/
    for path in (etc, *etc.iterdir()):
        os.chown(path, NOBODY.pw_uid, NOBODY.pw_gid)
    user = [f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]
    done = host.run(
        [*_setpriv([], user), *_command(_service()["ExecStart"], "alpha", etc)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done
    lines = done.stderr.splitlines()
    # Where /dev/net/tun is 0600 the open fails, where it is 0666 the TAP ioctl does.
    assert len(lines) == 1 and lines[0].startswith("ipop-trio: cannot "), done.stderr
    assert "needs root" in lines[0] and "CAP_NET_ADMIN" in lines[0], done.stderr
