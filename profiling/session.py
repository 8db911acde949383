"""Taking a profile: pick the node processes, record them, write the artefacts.

Two ways in:
  * `profile_lab`: a two-node lab (ipop_trio.lab.netns: hosts a and b on one veth, nodes alpha and
    beta), iperf3 alpha -> beta for the duration while py-spy records both nodes; with
    `scalene` the nodes run under scalene and their profiles are written when they stop.
  * `profile_nodes`: attach to running nodes, given their control socket or pid, and record
    whatever traffic they carry for the duration.

Recording (`record`): py-spy attached to every node first (we wait for it to say so), then a
`stats` snapshot and the CPU counters of each node, then the traffic (or the wait), polling
the stats for gauges and drawing a progress bar; then the closing snapshot, and py-spy is
stopped, so samples, stage timings and CPU cover one interval. Every process started here is
stopped in `finally`; the lab removes its namespaces and processes itself.

Output (`write_artefacts`), under OUT:
    stages.json                     everything measured, per node (the notebooks read it)
    bench.json                      lab mode: one row in `ipop-trio bench --json`'s shape
    report.html                     the self-contained report (report.py)
    NODE/pyspy.raw                  py-spy's collapsed stacks
    NODE/flamegraph.svg             flame graph of those stacks
    NODE/profile.speedscope.json    the same samples for https://www.speedscope.app
    NODE/scalene.json, scalene.html with --scalene
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import ipop_trio
from ipop_trio.errors import IpopError, LabError
from ipop_trio.lab.measure import (
    IperfResult,
    cpu_seconds,
    iperf3,
    machine_info,
    peak_rss_mb,
    percentile,
    ping_rtts,
    start_iperf3_server,
)
from ipop_trio.lab.netns import Lab
from ipop_trio.lab.overlay import Overlay, OverlayNode
from ipop_trio.net.control import ControlReplyError, query

from . import calltree, stages
from .errors import ProfileError
from .flamegraph import render_svg
from .pyspy import DEFAULT_RATE, Recorder

POLL_INTERVAL = 0.25  # seconds between stats polls (gauges) and progress redraws
SCALENE_STOP_TIMEOUT = 60.0  # scalene writes its profile at exit; a big one takes a while
SCALENE_VIEW_TIMEOUT = 120.0
PING_COUNT = 50
_CLK_TCK = os.sysconf("SC_CLK_TCK")

Say = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Options:
    out: Path
    duration: float = 10.0
    rate: int = DEFAULT_RATE
    native: bool = False
    blocking: bool = False
    scalene: bool = False
    scalene_memory: bool = False
    cipher: str = "aes-256-gcm"
    streams: int = 1


@dataclass(slots=True)
class Target:
    """One node process being profiled."""

    name: str
    pid: int
    control: Path | None
    role: str  # "sender" | "receiver" | "node"
    dir: Path
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Recording:
    """What `record` measured for each target over one interval."""

    interval: float
    before: dict[str, dict[str, Any]]
    after: dict[str, dict[str, Any]]
    polls: dict[str, list[dict[str, Any]]]
    pyspy: dict[str, dict[str, Any]]
    traffic: Any = None


# ---------------------------------------------------------------------------------------------
# Process accounting


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    return out


def sched_times(pid: int) -> dict[int, tuple[float, float]]:
    """Per thread of `pid`: (seconds on a CPU, seconds runnable but waiting for a CPU), from
    /proc/PID/task/TID/schedstat (nanoseconds; finer than the clock ticks of /proc/PID/stat).
    Empty when the kernel has no schedstats."""
    out: dict[int, tuple[float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[0]) / 1e9, int(fields[1]) / 1e9)
    return out


def _query(path: Path, cmd: str, who: str) -> dict[str, Any]:
    """`cmd`'s reply from the control socket at `path`; ProfileError naming `who` and the
    socket when no node answers there or the reply is not a JSON object."""
    try:
        return query(path, cmd, timeout=5.0)
    except OSError as exc:
        raise ProfileError(f"{who}: control socket {path}: {exc}") from exc
    except ControlReplyError as exc:  # it names the socket
        raise ProfileError(f"{who}: control socket {exc}") from exc


def _stats(target: Target) -> dict[str, Any] | None:
    if target.control is None:
        return None
    reply = _query(target.control, "stats", f"node {target.name}")
    if "error" in reply:
        raise ProfileError(f"node {target.name}: stats: {reply['error']}")
    return reply


def _snapshot(target: Target) -> dict[str, Any]:
    try:
        cpu = cpu_seconds(target.pid)
    except OSError as exc:
        raise ProfileError(f"node {target.name} (pid {target.pid}) is gone: {exc}") from exc
    sched = sched_times(target.pid)
    return {
        "t": time.monotonic(),
        "cpu": cpu,
        "threads": thread_cpu(target.pid),
        "sched": sched,
        "stats": _stats(target),
    }


# ---------------------------------------------------------------------------------------------
# Progress


def progress_line(elapsed: float, duration: float, cpu: dict[str, float], width: int = 30) -> str:
    """``recording [#########.........]  1.8/3.0 s  alpha 64% beta 41% CPU``."""
    frac = min(1.0, max(0.0, elapsed / duration)) if duration > 0 else 1.0
    filled = round(frac * width)
    bar = "#" * filled + "." * (width - filled)
    load = " ".join(f"{name} {pct:.0f}%" for name, pct in cpu.items())
    return f"recording [{bar}] {elapsed:4.1f}/{duration:.1f} s" + (f"  {load} CPU" if load else "")


class Progress:
    """A progress bar redrawn in place on a terminal; on a pipe, one line per quarter."""

    def __init__(self, stream: TextIO, duration: float) -> None:
        self.stream = stream
        self.duration = duration
        self.tty = stream.isatty()
        self.quarter = -1

    def update(self, elapsed: float, cpu: dict[str, float]) -> None:
        line = progress_line(elapsed, self.duration, cpu)
        if self.tty:
            self.stream.write("\r" + line)
            self.stream.flush()
            return
        quarter = int(min(elapsed / self.duration, 1.0) * 4) if self.duration > 0 else 4
        if quarter > self.quarter:
            self.quarter = quarter
            self.stream.write(line + "\n")
            self.stream.flush()

    def done(self, elapsed: float, cpu: dict[str, float]) -> None:
        self.quarter = 3  # the last line is always written
        self.update(max(elapsed, self.duration), cpu)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------
# Recording


def record(
    targets: list[Target],
    duration: float,
    *,
    rate: int = DEFAULT_RATE,
    native: bool = False,
    blocking: bool = False,
    traffic: Callable[[], Any] | None = None,
    progress: TextIO | None = None,
) -> Recording:
    """py-spy on every target for one interval: `traffic()` runs in a thread and its end closes
    the interval; without it the interval is `duration` seconds."""
    recorders = {
        t.name: Recorder(t.pid, t.dir / "pyspy.raw", rate=rate, native=native, blocking=blocking)
        for t in targets
    }
    bar = Progress(progress or sys.stderr, duration)
    try:
        for rec in recorders.values():
            rec.start()
        before = {t.name: _snapshot(t) for t in targets}
        polls: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def drive() -> None:
            try:
                outcome["result"] = traffic() if traffic is not None else None
            except BaseException as exc:  # re-raised in the recording thread below
                outcome["error"] = exc
            finally:
                done.set()

        t0 = time.monotonic()
        last_cpu = {t.name: before[t.name]["cpu"] for t in targets}
        last_t = t0
        cpu_pct: dict[str, float] = {}
        driver = threading.Thread(target=drive, name="profile-traffic", daemon=True)
        if traffic is not None:
            driver.start()
        while True:
            # The interval ends when the traffic does (or after `duration` without traffic);
            # the timed waits only pace the progress bar and the gauge polls.
            end = done.wait(POLL_INTERVAL) if traffic is not None else None
            now = time.monotonic()
            if traffic is None and now - t0 >= duration:
                end = True
            for t in targets:
                with contextlib.suppress(ProfileError, OSError):
                    snap = _stats(t)
                    if snap is not None:
                        polls[t.name].append(snap)
                with contextlib.suppress(OSError):
                    cpu = cpu_seconds(t.pid)
                    if now > last_t:
                        cpu_pct[t.name] = (cpu - last_cpu[t.name]) / (now - last_t) * 100
                    last_cpu[t.name] = cpu
            last_t = now
            if end:
                break
            bar.update(now - t0, cpu_pct)
            if traffic is None:
                done.wait(min(POLL_INTERVAL, max(0.0, t0 + duration - time.monotonic())))
        after = {t.name: _snapshot(t) for t in targets}
        bar.done(time.monotonic() - t0, cpu_pct)
        if "error" in outcome:
            raise outcome["error"]
        pyspy = {name: rec.stop() for name, rec in recorders.items()}
    finally:
        for rec in recorders.values():
            rec.kill()
    interval = sum(after[n]["t"] - before[n]["t"] for n in after) / max(1, len(after))
    return Recording(interval, before, after, polls, pyspy, outcome.get("result"))


# ---------------------------------------------------------------------------------------------
# Lab mode


def _scalene_argv(node: OverlayNode, json_out: Path, memory: bool) -> list[str]:
    argv = [sys.executable, "-m", "scalene", "run"]
    if not memory:
        argv.append("--cpu-only")
    argv += ["-o", str(json_out), "--program-path", str(Path(ipop_trio.__file__).parent)]
    return [*argv, "-m", "ipop_trio", "---", "run", "-c", str(node.config)]


def require_scalene() -> None:
    if importlib.util.find_spec("scalene") is None:
        raise ProfileError(
            "--scalene: scalene is not installed (`pip install scalene`; it is a dependency "
            "of ipop-trio, `make venv` installs it)"
        )


def _start_under_scalene(overlay: Overlay, nodes: list[OverlayNode], opts: Options) -> None:
    """`Overlay.start`, with each node's Python run by scalene."""
    for node in nodes:
        overlay.write_config(node)
        with contextlib.suppress(FileNotFoundError):
            node.control.unlink()
        out = opts.out / node.name
        out.mkdir(parents=True, exist_ok=True)
        argv = _scalene_argv(node, (out / "scalene.json").resolve(), opts.scalene_memory)
        with open(node.log, "ab") as log:
            node.proc = node.host.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.dir,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
    for node in nodes:
        overlay.wait_ready(node, timeout=60.0)  # scalene's start-up is slow


def _stop_scalene_node(overlay: Overlay, node: OverlayNode, pid: int) -> None:
    """SIGTERM the node itself (scalene runs it in a child of the process we started), then
    wait for scalene to write its profile and exit."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    assert node.proc is not None
    try:
        node.proc.wait(timeout=SCALENE_STOP_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise ProfileError(
            f"node {node.name} under scalene did not exit {SCALENE_STOP_TIMEOUT:.0f}s after "
            "SIGTERM" + overlay.log_tail(node)
        ) from exc


def scalene_html(json_path: Path, html_path: Path) -> None:
    """Render scalene's JSON as one self-contained HTML page (`scalene view --standalone`
    writes scalene-profile.html into its working directory)."""
    workdir = json_path.parent
    done = subprocess.run(
        [sys.executable, "-m", "scalene", "view", "--standalone", str(json_path.resolve())],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=SCALENE_VIEW_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    made = workdir / "scalene-profile.html"
    if done.returncode != 0 or not made.exists():
        raise ProfileError(
            f"scalene view failed (exit {done.returncode}): {(done.stdout + done.stderr)[-500:]}"
        )
    made.replace(html_path)


def profile_lab(opts: Options, say: Say = print, progress: TextIO | None = None) -> dict[str, Any]:
    """Build the two-node lab, record it under iperf3, write the artefacts; return the
    profile (what stages.json holds)."""
    if opts.duration < 1:
        raise ProfileError("--duration must be at least 1 second (iperf3 counts whole seconds)")
    duration = float(round(opts.duration))
    if opts.scalene:
        require_scalene()
    opts.out.mkdir(parents=True, exist_ok=True)
    with Lab() as lab:
        a, b = lab.add_host("a"), lab.add_host("b")
        link = lab.connect(a, b)
        say(f"lab {lab.id}: {a.ns} {a.address_on(link)} <-> {b.ns} {b.address_on(link)}")
        overlay = Overlay(lab, name="profile", cipher=opts.cipher)
        alpha = overlay.add_node("alpha", a)
        beta = overlay.add_node("beta", b)
        if opts.scalene:
            say("starting alpha and beta under scalene (slow start, slower data path)")
            _start_under_scalene(overlay, [alpha, beta], opts)
        else:
            overlay.start()
        overlay.wait_established(alpha, beta, timeout=60.0 if opts.scalene else 20.0)
        pids = {n.name: int(overlay.status(n)["node"]["pid"]) for n in (alpha, beta)}
        say(
            f"overlay up: alpha {alpha.address} (pid {pids['alpha']}) -> beta {beta.address} "
            f"(pid {pids['beta']})"
        )
        start_iperf3_server(b)
        rtts = ping_rtts(a, beta.address, PING_COUNT)
        targets = [
            Target("alpha", pids["alpha"], alpha.control, "sender", opts.out / "alpha"),
            Target("beta", pids["beta"], beta.control, "receiver", opts.out / "beta"),
        ]
        say(
            f"recording {duration:g} s: iperf3 alpha -> beta ({opts.streams} stream(s)), "
            f"py-spy at {opts.rate} Hz on both nodes"
        )

        def traffic() -> IperfResult:
            return iperf3(a, beta.address, duration, streams=opts.streams)

        rec = record(
            targets,
            duration,
            rate=opts.rate,
            native=opts.native,
            blocking=opts.blocking,
            traffic=traffic,
            progress=progress,
        )
        entry = overlay.peer_status(alpha, beta) or {}
        for t in targets:
            with contextlib.suppress(OSError, LabError):
                t.meta["rss_mb_max"] = round(peak_rss_mb(t.pid), 1)
        if opts.scalene:
            for node in (alpha, beta):
                _stop_scalene_node(overlay, node, pids[node.name])
    result: IperfResult = rec.traffic
    traffic_info = {
        "tool": "iperf3",
        "from": "alpha",
        "to": "beta",
        "streams": opts.streams,
        "seconds": duration,
        "throughput_mbps": round(result.bits_per_second / 1e6, 1),
        "bytes": result.bytes,
        "retransmits": result.retransmits,
        "rtt_p50_ms": percentile(rtts, 50),
        "rtt_p99_ms": percentile(rtts, 99),
        "link_mode": entry.get("mode"),
        "cipher": opts.cipher,
    }
    if opts.scalene:
        for t in targets:
            json_path = t.dir / "scalene.json"
            if not json_path.exists() or json_path.stat().st_size == 0:
                raise ProfileError(f"scalene wrote no profile for {t.name} ({json_path})")
            scalene_html(json_path, t.dir / "scalene.html")
            t.meta["scalene"] = {"json": f"{t.name}/scalene.json", "html": f"{t.name}/scalene.html"}
    return write_artefacts(opts, "lab", targets, rec, traffic_info)


# ---------------------------------------------------------------------------------------------
# Attaching to running nodes


def _control_from_cmdline(pid: int) -> Path | None:
    """The control socket of a node started as ``... run -c CONFIG``: from its config."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None
    args = [a.decode(errors="replace") for a in argv if a]
    for i, arg in enumerate(args):
        value = None
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value:
            from ipop_trio import config

            try:
                return config.load(cwd / value).control_path(Path(f"/proc/{pid}/ns/net"))
            except (IpopError, OSError):
                return None
    return None


def resolve_target(spec: str, out: Path) -> Target:
    """A node given as its control socket (path) or its pid."""
    if spec.isdigit():
        pid = int(spec)
        if not Path(f"/proc/{pid}").exists():
            raise ProfileError(f"--node {spec}: no such process")
        control = _control_from_cmdline(pid)
        name = f"pid{pid}"
        if control is not None and control.exists():
            with contextlib.suppress(ProfileError):
                name = str(_query(control, "status", f"--node {spec}")["node"]["name"])
        else:
            control = None
        return Target(name, pid, control, "node", out / name)
    path = Path(spec)
    if not path.exists():
        raise ProfileError(f"--node {spec}: neither a pid nor an existing control socket")
    status = _query(path, "status", f"--node {spec}")
    node = status.get("node") or {}
    if "pid" not in node:
        raise ProfileError(f"--node {spec}: its status has no node pid: {shlex.quote(str(status))}")
    name = str(node.get("name") or f"pid{node['pid']}")
    return Target(name, int(node["pid"]), path, "node", out / name)


def profile_nodes(
    specs: list[str], opts: Options, say: Say = print, progress: TextIO | None = None
) -> dict[str, Any]:
    """Record running nodes for the duration, with whatever traffic they carry."""
    if opts.scalene:
        raise ProfileError(
            "--scalene needs --lab: scalene cannot attach to a running process. Start the node "
            "under it yourself: python -m scalene run -o scalene.json -m ipop_trio --- run -c "
            "node.toml"
        )
    if opts.duration <= 0:
        raise ProfileError("--duration must be positive")
    targets: list[Target] = []
    for spec in specs:
        t = resolve_target(spec, opts.out)
        if any(o.name == t.name for o in targets):
            t.name = f"{t.name}-{t.pid}"
            t.dir = opts.out / t.name
        targets.append(t)
        if t.control is None:
            say(f"{t.name}: no control socket found; stage timings unavailable (py-spy only)")
    say(
        f"recording {opts.duration:g} s of {', '.join(f'{t.name} (pid {t.pid})' for t in targets)}"
        f" with py-spy at {opts.rate} Hz"
    )
    rec = record(
        targets,
        opts.duration,
        rate=opts.rate,
        native=opts.native,
        blocking=opts.blocking,
        progress=progress,
    )
    for t in targets:
        with contextlib.suppress(OSError, LabError):
            t.meta["rss_mb_max"] = round(peak_rss_mb(t.pid), 1)
    return write_artefacts(opts, "node", targets, rec, None)


# ---------------------------------------------------------------------------------------------
# Artefacts


def _thread_names(stacks: list[tuple[calltree.Stack, int]]) -> dict[int, str]:
    names: dict[int, str] = {}
    for stack, _ in stacks:
        if stack:
            m = calltree._THREAD.match(stack[0])
            if m and m.group("tid").isdigit():
                names[int(m.group("tid"))] = m.group("name") or ""
    return names


def node_profile(target: Target, rec: Recording, opts: Options) -> dict[str, Any]:
    """Everything measured for one node, as JSON-able data (one entry of stages.json)."""
    b, a = rec.before[target.name], rec.after[target.name]
    interval = a["t"] - b["t"]
    cpu = a["cpu"] - b["cpu"]
    wait = None
    if a["sched"]:
        # schedstat is in ns (stat's CPU in 10 ms ticks): the finer CPU figure wins.
        on = [a["sched"][t][0] - b["sched"].get(t, (0.0, 0.0))[0] for t in a["sched"]]
        off = [a["sched"][t][1] - b["sched"].get(t, (0.0, 0.0))[1] for t in a["sched"]]
        cpu, wait = sum(on), sum(off)
    raw_path = target.dir / "pyspy.raw"
    stacks = calltree.parse_collapsed(raw_path.read_text()) if raw_path.exists() else []
    names = _thread_names(stacks)
    threads = [
        {
            "tid": tid,
            "name": names.get(tid, ""),
            "seconds": round(sec - b["threads"].get(tid, 0.0), 3),
        }
        for tid, sec in sorted(a["threads"].items())
    ]
    entry: dict[str, Any] = {
        "pid": target.pid,
        "role": target.role,
        "interval_s": interval,
        "cpu": {
            "seconds": cpu,
            "runqueue_wait_seconds": wait,
            "utilisation": cpu / interval if interval > 0 else None,
            "threads": [t for t in threads if t["seconds"] > 0],
            "rss_mb_max": target.meta.get("rss_mb_max"),
        },
        "stages": None,
        "stage_seconds": None,
        "consistency": None,
        "drops": None,
        "gauges": None,
        "channels": None,
        "missing": [],
    }
    if b["stats"] is not None and a["stats"] is not None:
        delta = stages.diff_snapshots(b["stats"], a["stats"])
        total = stages.total_seconds(delta)
        entry.update(
            stages=stages.stage_rows(delta),
            stage_seconds=total,
            consistency=stages.consistency(total, cpu, wait),
            drops=delta["drops"],
            gauges={
                "last": delta["gauges"],
                "polled": stages.gauge_summary(rec.polls.get(target.name, [])),
            },
            channels=delta["channels"],
            missing=delta["missing"],
        )
    else:
        entry["missing"] = ["stage timers (no control socket)"]
    spy = rec.pyspy.get(target.name, {})
    entry["pyspy"] = {
        "samples": sum(c for _, c in stacks),
        "errors": spy.get("errors"),
        "rate": opts.rate,
        "native": opts.native,
        "blocking": opts.blocking or opts.native,
        "busy_seconds": sum(c for _, c in stacks) / opts.rate,
        "threads": calltree.thread_samples(stacks),
        "raw": f"{target.name}/pyspy.raw",
        "flamegraph": f"{target.name}/flamegraph.svg",
        "speedscope": f"{target.name}/profile.speedscope.json",
    }
    entry["hot_functions"] = calltree.function_table(stacks, limit=20)
    entry["datapath_functions"] = calltree.datapath_functions(stacks)
    entry["scalene"] = target.meta.get("scalene")
    return entry


def write_artefacts(
    opts: Options,
    mode: str,
    targets: list[Target],
    rec: Recording,
    traffic: dict[str, Any] | None,
) -> dict[str, Any]:
    """Write stages.json, bench.json (lab), per-node py-spy files and report.html."""
    from .report import render_html

    profile: dict[str, Any] = {
        "version": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "requested_s": opts.duration,
        "interval_s": rec.interval,
        "machine": machine_info(),
        "traffic": traffic,
        "nodes": {},
    }
    svgs: dict[str, str] = {}
    for t in targets:
        t.dir.mkdir(parents=True, exist_ok=True)
        entry = node_profile(t, rec, opts)
        profile["nodes"][t.name] = entry
        raw = t.dir / "pyspy.raw"
        stacks = calltree.parse_collapsed(raw.read_text()) if raw.exists() else []
        speedscope = calltree.to_speedscope(stacks, name=t.name, rate=opts.rate)
        (t.dir / "profile.speedscope.json").write_text(json.dumps(speedscope) + "\n")
        subtitle = (
            f"{entry['pyspy']['samples']} busy samples at {opts.rate} Hz over "
            f"{entry['interval_s']:.1f} s, CPU {entry['cpu']['seconds']:.2f} s"
        )
        svgs[t.name] = render_svg(
            stacks, title=f"{t.name} ({t.role})", subtitle=subtitle, key=t.name
        )
        (t.dir / "flamegraph.svg").write_text(svgs[t.name])
    (opts.out / "stages.json").write_text(json.dumps(profile, indent=2) + "\n")
    if traffic is not None:
        (opts.out / "bench.json").write_text(json.dumps(bench_rows(profile), indent=2) + "\n")
    (opts.out / "report.html").write_text(render_html(profile, opts.out, svgs))
    return profile


def bench_rows(profile: dict[str, Any]) -> dict[str, Any]:
    """The lab profile as `ipop-trio bench --json` output (one row), for throughput.ipynb.
    CPU per GB is measured under py-spy, so a little higher than the bench's."""
    traffic = profile["traffic"] or {}
    nodes = profile["nodes"].values()
    cpu = sum(n["cpu"]["seconds"] for n in nodes)
    gigabytes = (traffic.get("bytes") or 0) / 1e9
    rss = [n["cpu"]["rss_mb_max"] for n in nodes if n["cpu"].get("rss_mb_max") is not None]
    return {
        "machine": profile["machine"],
        "source": "ipop-trio profile --lab",
        "rows": [
            {
                "scenario": traffic.get("link_mode") or "secure",
                "streams": traffic.get("streams", 1),
                "netem": None,
                "throughput_mbps": traffic.get("throughput_mbps"),
                "rtt_p50_ms": traffic.get("rtt_p50_ms"),
                "rtt_p99_ms": traffic.get("rtt_p99_ms"),
                "cpu_s_per_gb": round(cpu / gigabytes, 2) if gigabytes else None,
                "rss_mb_max": max(rss) if rss else None,
                "retransmits": traffic.get("retransmits"),
                "profiled": True,
            }
        ],
    }


__all__ = [
    "Options",
    "Progress",
    "Recording",
    "Target",
    "bench_rows",
    "node_profile",
    "profile_lab",
    "profile_nodes",
    "progress_line",
    "record",
    "require_scalene",
    "resolve_target",
    "scalene_html",
    "thread_cpu",
    "write_artefacts",
]
