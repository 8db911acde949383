"""`ipop-trio profile` end to end: a 3 s lab profile writes every artefact, its flame graphs
show the data path, its stage timings agree with the nodes' CPU time, both notebooks run on
its output; attaching to running nodes; scalene; a clear error when py-spy may not attach.

One lab profile (module fixture, run as a child process exactly as a user would) feeds most
tests. The child is stopped with SIGTERM on timeout, which tears its lab down; the fixture
then checks that no namespace of that lab and no py-spy it started is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import netns

from ipop_trio.datapath import native
from profiling import calltree, stages
from profiling.pyspy import attach_error, find_pyspy
from profiling.session import Options, profile_nodes

from .conftest import Pair

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
PROFILE_TIMEOUT = 120.0
NODES = ("alpha", "beta")
PER_NODE = ("flamegraph.svg", "profile.speedscope.json", "pyspy.raw")
# Functions that only run when frames go through the data path (outbound on the sender,
# inbound on the receiver): at least one of each set must be in that node's samples.
SENDER_FUNCS = ("Outbound.send", "Outbound.process", "Session.seal")
RECEIVER_FUNCS = ("Inbound.process", "Session.open", "udp_receiver")

# jupyter_client / ipykernel plumbing emits these on some versions; they are about the
# notebook machinery, not our code, so they are filtered here only (pytest runs with
# filterwarnings=error).
NOTEBOOK_WARNINGS = [
    "ignore::DeprecationWarning:jupyter_client.*",
    "ignore::DeprecationWarning:zmq.*",
    "ignore:.*Jupyter is migrating its paths.*:DeprecationWarning",
]


def _py_spies() -> list[int]:
    """Running `py-spy record` processes."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"py-spy") and b"record" in argv:
            found.append(int(d.name))
    return found


def run_profile(
    args: list[str], timeout: float = PROFILE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """`ipop-trio profile ARGS` as a child; SIGTERM (lab teardown) on timeout, then SIGKILL."""
    before = set(_py_spies())
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipop_trio", "profile", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"ipop-trio profile {args} timed out\n{out}\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lab = re.search(r"lab (ipt[0-9a-f]{4})", out)
    if lab:
        left = [ns for ns in netns.listnetns() if ns.startswith(lab.group(1) + "-")]
        assert not left, f"namespaces left behind: {left}"
    stray = set(_py_spies()) - before
    assert not stray, f"py-spy processes left behind: {sorted(stray)}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def lab_profile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    out = tmp_path_factory.mktemp("profile")
    done = run_profile(["--lab", "--duration", "3", "--out", str(out)])
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    yield out, done.stdout, done.stderr


def _profile(out: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "stages.json").read_text())
    return data


def test_lab_profile_writes_every_file(lab_profile: tuple[Path, str, str]) -> None:
    out, _, _ = lab_profile
    for name in ("stages.json", "report.html", "bench.json"):
        assert (out / name).stat().st_size > 0, name
    for node in NODES:
        for name in PER_NODE:
            assert (out / node / name).stat().st_size > 0, f"{node}/{name}"
        svg = ET.parse(out / node / "flamegraph.svg").getroot()  # well-formed XML
        assert svg.find("{http://www.w3.org/2000/svg}script") is not None, "no zoom/search"
        speedscope = json.loads((out / node / "profile.speedscope.json").read_text())
        frames = speedscope["shared"]["frames"]
        assert speedscope["profiles"], "no profiles"
        for prof in speedscope["profiles"]:
            assert prof["type"] == "sampled"
            assert len(prof["samples"]) == len(prof["weights"])
            assert all(0 <= i < len(frames) for s in prof["samples"] for i in s)
    profile = _profile(out)
    assert set(profile["nodes"]) == set(NODES)
    for node in profile["nodes"].values():
        assert [r["stage"] for r in node["stages"]][: len(stages.STAGE_LABELS)] == list(
            stages.STAGE_LABELS
        )
        assert node["pyspy"]["samples"] > 50
    report = (out / "report.html").read_text()
    for needle in ("Where the time goes", "Call tree", "Flame graphs", "<svg", "Mbit/s"):
        assert needle in report, needle
    # Self-contained: nothing loaded; the one script per flame graph is inline (CDATA).
    assert "src=" not in report and "<link" not in report
    assert (
        report.count("<script")
        == len(NODES)
        == report.count('<script type="text/javascript"><![CDATA[')
    )
    # The call trees start at the data path, saying what was elided above it.
    assert report.count('<p class="thread"><b>MainThread') == len(NODES)
    assert "elided above it:" in report and "trio run loop" in report
    assert report.count('<details class="full">') == len(NODES)
    assert "<h3>Channels</h3>" in report and "&#x27;" not in report  # cells, not dict reprs
    bench = json.loads((out / "bench.json").read_text())
    assert bench["rows"][0]["throughput_mbps"] > 0


def test_flame_graphs_show_the_data_path(lab_profile: tuple[Path, str, str]) -> None:
    out, _, _ = lab_profile
    for node, wanted in (("alpha", SENDER_FUNCS), ("beta", RECEIVER_FUNCS)):
        stacks = calltree.parse_collapsed((out / node / "pyspy.raw").read_text())
        dp = calltree.datapath_functions(stacks)
        assert dp, f"{node}: no data-path frames in {len(stacks)} stacks"
        files = {calltree.parse_frame(f).file for s, _ in stacks for f in s}
        assert any(f.startswith("ipop_trio/datapath/") for f in files), files
        # the sessions' work: proto/session.py's, or the native core's behind the stages
        names = {calltree.parse_frame(f).name for s, _ in stacks for f in s}
        if native.AVAILABLE:
            native_calls = {"NativeOutbound._seal_and_send", "NativeInbound._open"}
            assert names & native_calls, sorted(n for n in names if "Native" in n)
        else:
            assert any(f == "ipop_trio/proto/session.py" for f in files), files
        svg = (out / node / "flamegraph.svg").read_text()
        hits = [f for f in wanted if f in svg]
        assert hits, f"{node}: none of {wanted} in the flame graph"


def test_stage_timings_agree_with_cpu_time(lab_profile: tuple[Path, str, str]) -> None:
    """Tolerance (profiling/stages.py explains it): the stage timers are wall-clock spans, so
    LOW x CPU <= sum of stages <= HIGH x (CPU + run-queue wait) + SLACK, with LOW = 0.35 (CPU
    outside every stage: Trio, epoll, keepalives) and HIGH = 1.25, SLACK = 50 ms (GIL waits of
    the TAP writer thread; 10 ms CPU tick rounding). The run-queue wait comes from schedstat,
    so a busy CI machine widens the upper bound by what it actually cost the node."""
    out, _, _ = lab_profile
    profile = _profile(out)
    iperf_bytes = profile["traffic"]["bytes"]
    for name, node in profile["nodes"].items():
        cpu = node["cpu"]["seconds"]
        wait = node["cpu"]["runqueue_wait_seconds"] or 0.0
        total = sum(r["seconds"] for r in node["stages"])
        assert total == pytest.approx(node["stage_seconds"])
        assert cpu > 0.1, f"{name}: the node hardly ran ({cpu} s CPU)"
        low = stages.CONSISTENT_LOW * cpu
        high = stages.CONSISTENT_HIGH * (cpu + wait) + stages.CONSISTENT_SLACK_S
        assert low <= total <= high, (
            f"{name}: stages {total:.3f} s, CPU {cpu:.3f} s, wait {wait:.3f} s: "
            f"outside [{low:.3f}, {high:.3f}]"
        )
        assert node["consistency"]["consistent"]
    # The counters cover the interval iperf3 measured: what alpha read from its TAP and beta
    # wrote to its TAP is at least what iperf3 received (frames carry headers, too).
    per = {n: {r["stage"]: r for r in v["stages"]} for n, v in profile["nodes"].items()}
    assert per["alpha"]["tap_read"]["bytes"] >= 0.9 * iperf_bytes
    assert per["beta"]["tap_write"]["bytes"] >= 0.9 * iperf_bytes
    assert per["alpha"]["seal"]["items"] > per["alpha"]["tap_read"]["batches"]


def test_terminal_summary_and_progress(lab_profile: tuple[Path, str, str]) -> None:
    _, stdout, stderr = lab_profile
    assert "recording [" in stderr and "##############################]" in stderr, stderr
    for needle in ("throughput", "where the time goes", "hottest data-path code", "report.html"):
        assert needle in stdout, needle
    assert "consistent" in stdout


@pytest.mark.parametrize(
    ("notebook", "env", "artefact"),
    [
        ("where_the_time_goes.ipynb", "IPOP_PROFILE_DIR", "."),
        ("throughput.ipynb", "IPOP_BENCH_JSON", "bench.json"),
    ],
)
@pytest.mark.filterwarnings(*NOTEBOOK_WARNINGS)
def test_notebooks_run_on_the_profile(
    lab_profile: tuple[Path, str, str],
    monkeypatch: pytest.MonkeyPatch,
    notebook: str,
    env: str,
    artefact: str,
) -> None:
    out, _, _ = lab_profile
    monkeypatch.setenv(env, str((out / artefact).resolve()))
    execute_notebook(NOTEBOOKS / notebook)


@pytest.mark.filterwarnings(*NOTEBOOK_WARNINGS)
def test_throughput_notebook_on_a_full_bench(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every branch of the reading: direct, secure, plain, lossy rows and a skipped one."""

    def row(scenario: str, mbps: float | None, cpu: float | None, netem: str | None = None) -> Any:
        return {
            "scenario": scenario,
            "streams": 1,
            "netem": netem,
            "throughput_mbps": mbps,
            "rtt_p50_ms": None if mbps is None else 0.3,
            "rtt_p99_ms": None if mbps is None else 1.2,
            "cpu_s_per_gb": cpu,
            "rss_mb_max": None if cpu is None else 60.0,
        }

    lossy = "loss 1% delay 5ms"
    bench = {
        "machine": {"cpu": "test", "nproc": 2, "kernel": "6", "python": "3.11"},
        "rows": [
            row("direct", 9000.0, None),
            row("secure", 2500.0, 6.1),
            row("plain", 4000.0, 3.9),
            row("direct", 300.0, None, lossy),
            row("secure", 250.0, 7.0, lossy),
            {**row("plain", None, None, lossy), "skipped": "plain: not yet"},
        ],
    }
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    monkeypatch.setenv("IPOP_BENCH_JSON", str(path))
    nb = execute_notebook(NOTEBOOKS / "throughput.ipynb")
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Encryption costs 2.20 CPU-s per GB" in text
    assert "keeps 83%" in text


def execute_notebook(path: Path) -> Any:
    """Run a notebook top to bottom in a fresh kernel; fail on any cell error."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "no figure"
    return nb


def test_attach_to_running_nodes(pair: Pair, tmp_path: Path) -> None:
    """--node by control socket and by pid: py-spy files and stage timings for both."""
    alpha, beta = pair.alpha, pair.beta
    lines: list[str] = []
    with open(os.devnull, "w") as quiet:
        profile = profile_nodes(
            [str(alpha.control), str(beta.pid)],
            Options(out=tmp_path, duration=1.0, rate=100),
            lines.append,
            quiet,
        )
    assert set(profile["nodes"]) == {"alpha", "beta"}, lines
    for name in ("alpha", "beta"):
        node = profile["nodes"][name]
        assert node["stages"] is not None, f"{name}: control socket not found from its pid"
        for f in PER_NODE:
            assert (tmp_path / name / f).exists()
    assert (tmp_path / "report.html").exists() and (tmp_path / "stages.json").exists()
    assert not (tmp_path / "bench.json").exists()  # no traffic of ours to report


def test_scalene_profile(tmp_path: Path) -> None:
    done = run_profile(
        ["--lab", "--scalene", "--duration", "2", "--rate", "50", "--out", str(tmp_path)]
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    for node in NODES:
        data = json.loads((tmp_path / node / "scalene.json").read_text())
        assert data.get("files"), f"{node}: scalene profiled no file"
        html = (tmp_path / node / "scalene.html").read_text()
        assert "<html" in html.lower()
    assert "scalene line profile" in (tmp_path / "report.html").read_text()


def test_scalene_needs_the_lab(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ipop_trio", "profile", "--node", "1", "--scalene"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "--scalene needs --lab" in done.stderr


def test_pyspy_refused_attach_is_explained() -> None:
    """py-spy run as an unprivileged user against a root process: the real refusal, explained."""
    target = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
        done = subprocess.run(
            [*nobody, find_pyspy(), "dump", "--pid", str(target.pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        message = attach_error(target.pid, done.stdout + done.stderr, done.returncode)
    finally:
        target.kill()
        target.wait()
        assert target.stdin is not None
        target.stdin.close()
    assert "permission denied" in message, message
    assert "root" in message or "CAP_SYS_PTRACE" in message
