"""`ipop-trio signal` re-reads its --ca files on SIGHUP: the end of a CA rotation needs no
restart. A member on a CA no longer listed is told why and dropped; a broken file keeps the
CAs in force."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ipop_trio import pki
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.client import open_connection

from .test_signalling_server import NodeId, admit, receive

NOW = time.time()


def wait_log(path: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := path.read_text()):
        assert time.monotonic() < deadline, f"{needle!r} not logged:\n{text}"
        time.sleep(0.05)
    return text


async def test_sighup_rereads_the_cas(tmp_path: Path) -> None:
    old_ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    new_ca = pki.new_ca_bundle("lab", "10.77.0.0/24", now=NOW)
    old = NodeId(pki.issue_node_bundle(old_ca, "n0", "10.77.0.2", now=NOW))
    renewed = NodeId(pki.issue_node_bundle(new_ca, "n1", "10.77.0.3", now=NOW))
    ca = tmp_path / "ca.crt"
    ca.write_bytes(old_ca.cert_pem + new_ca.cert_pem)  # the rotation's bundle
    log = tmp_path / "signal.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ipop_trio",
                "signal",
                "--listen",
                "127.0.0.1:0",
                "--ca",
                str(ca),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (line, log.read_text())
        url = f"ws://127.0.0.1:{int(line.rsplit(':', 1)[1])}/"
        async with open_connection(url) as wa, open_connection(url) as wb:
            await admit(wa, old)
            await admit(wb, renewed)
            assert await receive(wa) == sig.Join(sig.Member(renewed.key, "n1", "10.77.0.3"))
            ca.write_bytes(new_ca.cert_pem)  # the old CA goes
            proc.send_signal(signal.SIGHUP)
            err_msg = await receive(wa)
            assert isinstance(err_msg, sig.Error) and err_msg.code == "certificate_refused"
            assert await receive(wb) == sig.Leave(old.key, "n0")
        wait_log(log, "SIGHUP: CAs re-read: lab (1 CA); dropped n0")

        ca.write_text("not a certificate")
        proc.send_signal(signal.SIGHUP)
        wait_log(log, "SIGHUP: keeping the CAs in force")
        async with open_connection(url) as wc:  # still served, with the CA in force
            await admit(wc, renewed)
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
