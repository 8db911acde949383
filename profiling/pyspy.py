"""Running py-spy against a node process: start, know when it is attached, stop, explain.

One `py-spy record --format raw` per node, stopped with SIGINT when the measured interval ends
(py-spy then writes its file), so the samples cover the same interval as the stage timers.
py-spy tells us it is attached by printing ``Sampling process ...`` on stdout; we wait for
that line (or its exit) instead of sleeping. When it cannot attach, `attach_error` turns its
output into an explanation that names the cause: ptrace scope, missing CAP_SYS_PTRACE, not
root, no such process.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ProfileError

ATTACH_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
DEFAULT_RATE = 200
_ATTACHED = "Sampling process"
_SAMPLES = re.compile(r"Samples: (\d+) Errors: (\d+)")
PTRACE_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
CAP_SYS_PTRACE = 19


def find_pyspy() -> str:
    """The py-spy executable: beside our Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise ProfileError(
            "py-spy is not installed: `pip install py-spy` (it is a dependency of ipop-trio; "
            "`make venv` installs it)"
        )
    return found


def record_argv(
    pyspy: str,
    pid: int,
    raw_out: Path,
    *,
    rate: int = DEFAULT_RATE,
    native: bool = False,
    blocking: bool = False,
) -> list[str]:
    """py-spy's command line: raw collapsed stacks, one root frame per thread, frames
    aggregated by function, idle frames left out (no --idle).

    Non-blocking unless asked: py-spy then reads the stacks without pausing the node. Pausing
    gives exact stacks but costs the node ~1 ms per sample here, which at 200 Hz halved the
    lab's throughput and inflated every stage timer that a pause landed in. --native needs
    the pause (py-spy refuses to unwind native stacks of a running process)."""
    argv = [pyspy, "record", "--format", "raw", "--threads", "--function"]
    argv += ["--rate", str(rate), "--pid", str(pid), "--output", str(raw_out)]
    if native:
        argv.append("--native")
    elif not blocking:
        argv.append("--nonblocking")
    return argv


def _has_cap_sys_ptrace() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_PTRACE & 1)
    except (OSError, ValueError):
        pass
    return os.geteuid() == 0


def ptrace_scope() -> int | None:
    try:
        return int(PTRACE_SCOPE.read_text().strip())
    except (OSError, ValueError):
        return None


def attach_error(pid: int, output: str, returncode: int | None) -> str:
    """Why py-spy could not attach to `pid`, as one message that names the fix."""
    text = output.strip()
    low = text.lower()
    head = f"py-spy could not attach to pid {pid}"
    if not Path(f"/proc/{pid}").exists() or "no such process" in low:
        return f"{head}: no such process (has the node exited?)"
    denied = any(
        s in low
        for s in ("permission denied", "operation not permitted", "os error 1)", "os error 13)")
    )
    if denied:
        hints = []
        scope = ptrace_scope()
        if scope is not None and scope > 0:
            hints.append(
                f"kernel.yama.ptrace_scope is {scope} ({PTRACE_SCOPE}); "
                + (
                    "3 forbids ptrace until reboot"
                    if scope == 3
                    else "run as root, or `sysctl kernel.yama.ptrace_scope=0`"
                )
            )
        if not _has_cap_sys_ptrace():
            hints.append(
                "this process lacks CAP_SYS_PTRACE: run as root (`sudo`), or in a container "
                "add `--cap-add SYS_PTRACE`"
            )
        if os.geteuid() != 0:
            hints.append("the node runs as root: profile it as root")
        hint = "; ".join(hints) or "run as root with CAP_SYS_PTRACE"
        return f"{head}: permission denied — {hint}.\npy-spy said: {text[-500:]}"
    code = "" if returncode is None else f" (exit {returncode})"
    return f"{head}{code}: {text[-800:] or 'no output'}"


class Recorder:
    """One py-spy process recording one node. Use `start`, then `stop`; `kill` in finally."""

    def __init__(
        self,
        pid: int,
        raw_out: Path,
        *,
        rate: int = DEFAULT_RATE,
        native: bool = False,
        blocking: bool = False,
    ) -> None:
        self.pid = pid
        self.raw_out = raw_out
        self.rate = rate
        self.argv = record_argv(
            find_pyspy(), pid, raw_out, rate=rate, native=native, blocking=blocking
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = b""
        self.samples: int | None = None
        self.errors: int | None = None

    def start(self, timeout: float = ATTACH_TIMEOUT) -> None:
        """Start py-spy and return once it samples; ProfileError if it cannot attach."""
        self.raw_out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.raw_out.unlink()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop py-spy in order
        )
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while _ATTACHED.encode() not in self.output:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise ProfileError(
                    f"py-spy did not start sampling pid {self.pid} within {timeout:.0f}s: "
                    f"{self.output.decode(errors='replace')[-500:]}"
                )
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:  # py-spy exited before attaching
                    code = self.proc.wait()
                    raise ProfileError(
                        attach_error(self.pid, self.output.decode(errors="replace"), code)
                    )
                self.output += chunk

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict[str, Any]:
        """SIGINT py-spy, wait for it to write its file; return {samples, errors}."""
        if self.proc is None:
            raise ProfileError("py-spy was not started")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rest, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            self.kill()
            raise ProfileError(
                f"py-spy (pid {self.proc.pid}) did not stop in {timeout:.0f}s"
            ) from exc
        self.output += rest or b""
        text = self.output.decode(errors="replace")
        if not self.raw_out.exists():
            raise ProfileError(
                f"py-spy wrote no samples for pid {self.pid} (exit {self.proc.returncode}): "
                f"{text[-500:]}"
            )
        if m := _SAMPLES.search(text):
            self.samples, self.errors = int(m.group(1)), int(m.group(2))
        return {"samples": self.samples, "errors": self.errors, "rate": self.rate}

    def kill(self) -> None:
        """Make sure py-spy is gone (idempotent); used in `finally`."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


__all__ = ["DEFAULT_RATE", "Recorder", "attach_error", "find_pyspy", "record_argv"]
