"""Packet captures in lab namespaces (tcpdump -w), shared by the lab tests."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ipop_trio.lab.netns import Host


class Lines:
    """Lines from a child's pipe, each awaited with a deadline (never blocks forever)."""

    def __init__(self, stream: Any) -> None:
        self.fd = stream.fileno()
        self.buf = b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"no line within {timeout}s (got {self.buf!r})")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                pytest.fail(f"pipe closed before a line (got {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode(errors="replace")


class Capture:
    """tcpdump -w in a host's namespace; stopped by `stop` (or by the lab's teardown)."""

    def __init__(self, host: Host, iface: str, path: Path) -> None:
        self.path = path
        # --immediate-mode: no block timeout before packets reach the file; -Z root: keep
        # the right to write into the lab's directory.
        argv = ["tcpdump", "--immediate-mode", "-U", "-Z", "root", "-n", "-s", "0"]
        self.proc = host.popen(
            [*argv, "-i", iface, "-w", str(path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        lines = Lines(self.proc.stderr)
        while "listening on" not in (line := lines.next(10)):
            assert "tcpdump" in line, line

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> None:
        """Poll the capture file until `needle` is in it: everything sent before is too."""
        deadline = time.monotonic() + timeout
        while needle not in self.path.read_bytes():
            if time.monotonic() >= deadline:
                pytest.fail(f"{needle!r} never showed up in {self.path}")
            time.sleep(0.05)

    def stop(self) -> bytes:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        return self.path.read_bytes()
