"""The fuzzing campaign: every target in fuzz.targets under atheris (libFuzzer), each in its
own subprocess, from a seed corpus of valid inputs; then a report.

    python -m fuzz.run [--runs N] [--only NAME ...] [--report PATH] [--corpus DIR]

Per target: inputs executed, seconds, exec/s, coverage (libFuzzer's cov = edges, ft =
features), and the crash (the input libFuzzer wrote, under DIR/crashes/). Exits 1 when any
target crashed. The corpus DIR (default out/fuzz/corpus) keeps what each run found, so a
later run starts from there; seeds are written into it at start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 8192  # the largest seed (a 3-piece super-frame) is ~3.3 kB


def _child(name: str, libfuzzer_args: list[str]) -> None:
    """Run one target under atheris, with the ipop_trio modules (and dnspython, which the
    dns_answer target drives) instrumented."""
    import atheris

    with atheris.instrument_imports(include=["ipop_trio", "dns"]):
        from fuzz import targets
    target = targets.TARGETS[name]
    # identities, keys and CA are built once here, not in the first fuzzed input
    for seed in targets.seeds(name):
        target(seed)
    atheris.Setup([sys.argv[0], *libfuzzer_args], target)
    atheris.Fuzz()


_STAT = re.compile(r"^stat::(\w+):\s*(\d+)", re.M)
_COV = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def _run_one(name: str, runs: int, corpus: Path, log_dir: Path) -> dict[str, object]:
    from fuzz import targets

    seeds_dir = corpus / name
    seeds_dir.mkdir(parents=True, exist_ok=True)
    for seed in targets.seeds(name):
        (seeds_dir / f"seed-{hashlib.sha1(seed).hexdigest()[:16]}").write_bytes(seed)
    crashes = corpus / "crashes"
    crashes.mkdir(parents=True, exist_ok=True)
    args = [
        str(seeds_dir),
        f"-runs={runs}",
        f"-max_len={MAX_LEN}",
        "-timeout=20",
        "-print_final_stats=1",
        f"-artifact_prefix={crashes}/{name}-",
    ]
    cmd = [sys.executable, "-m", "fuzz.run", "--child", name, "--", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
    seconds = time.monotonic() - start
    log = log_dir / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    stats = {k: int(v) for k, v in _STAT.findall(proc.stderr)}
    cov = _COV.findall(proc.stderr)
    executed = stats.get("number_of_executed_units", int(cov[-1][0]) if cov else 0)
    artifact = _ARTIFACT.search(proc.stderr)
    return {
        "target": name,
        "runs": executed,
        "seconds": round(seconds, 1),
        # libFuzzer's figure counts from its own start; a run under a second reports 0
        "exec_per_s": stats.get("average_exec_per_sec") or round(executed / max(seconds, 1e-3)),
        "cov": int(cov[-1][1]) if cov else None,
        "ft": int(cov[-1][2]) if cov else None,
        "corpus": len(list(seeds_dir.iterdir())),
        "returncode": proc.returncode,
        "crash": artifact.group(1) if artifact else None,
        "ok": proc.returncode == 0,
        "log": str(log),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
        return 0
    from fuzz import targets

    ap = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1_000_000, help="inputs per target")
    ap.add_argument("--only", action="append", choices=sorted(targets.TARGETS), help="target")
    ap.add_argument("--report", type=Path, default=ROOT / "out/fuzz/report.json")
    ap.add_argument("--corpus", type=Path, default=ROOT / "out/fuzz/corpus")
    opts = ap.parse_args(argv)
    names = opts.only or list(targets.TARGETS)
    opts.report.parent.mkdir(parents=True, exist_ok=True)
    log_dir = opts.report.parent / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'target':22} {'runs':>9} {'s':>7} {'exec/s':>7} {'cov':>5} {'ft':>6}  result")
    for name in names:
        row = _run_one(name, opts.runs, opts.corpus, log_dir)
        rows.append(row)
        result = "ok" if row["ok"] else f"CRASH {row['crash'] or ''} (log {row['log']})"
        print(
            f"{name:22} {row['runs']:>9} {row['seconds']:>7} {row['exec_per_s']:>7} "
            f"{row['cov']!s:>5} {row['ft']!s:>6}  {result}",
            flush=True,
        )
    total = sum(float(str(r["seconds"])) for r in rows)
    report = {"runs_per_target": opts.runs, "seconds": round(total, 1), "targets": rows}
    opts.report.write_text(json.dumps(report, indent=2) + "\n")
    failed = [r["target"] for r in rows if not r["ok"]]
    print(f"{len(rows)} targets, {total:.0f} s; report {opts.report}", end="")
    print(f"; CRASHED: {', '.join(map(str, failed))}" if failed else "")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
