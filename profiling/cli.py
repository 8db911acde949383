"""`ipop-trio profile`: registered with the ipop-trio CLI through the ``ipop_trio.commands``
entry point (pyproject.toml), so ipop_trio never imports this package.

    ipop-trio profile --lab --duration 10 --out out/profile
    ipop-trio profile --node /run/ipop-trio/ipop0.sock --duration 30
    ipop-trio profile --node 12345 --native

Errors are `ProfileError`s (IpopError): the CLI prints them as one line and exits 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .pyspy import DEFAULT_RATE

DESCRIPTION = """\
Profile an overlay: py-spy flame graphs and call trees of the node processes, the nodes'
per-stage timers (TAP read, switch, seal, UDP send, UDP receive, open, TAP write) over the
recorded interval, optionally a scalene line profile, and one self-contained report.html.

--lab builds a two-node overlay in network namespaces and drives iperf3 through it while
recording; --node attaches to running nodes (their control socket or pid) and records
whatever traffic they carry. Needs root (namespaces; ptrace to attach py-spy).
"""

EPILOG = """\
output (in --out):
  report.html                    throughput, CPU, where the time goes, call tree, flame graph
  stages.json                    per-stage timings, batch sizes, drops, gauges, CPU per node
  bench.json                     (--lab) one row in `ipop-trio bench --json` format
  NODE/flamegraph.svg            flame graph of NODE's py-spy samples
  NODE/profile.speedscope.json   the same samples for https://www.speedscope.app
  NODE/pyspy.raw                 py-spy's collapsed stacks
  NODE/scalene.json, .html       (--scalene) scalene's line profile

notebooks: notebooks/where_the_time_goes.ipynb reads --out (env IPOP_PROFILE_DIR);
notebooks/throughput.ipynb reads bench JSON (env IPOP_BENCH_JSON).
"""


def register(sub: Any) -> None:
    """Add the `profile` command to ipop-trio's subparsers (the entry point)."""
    p = sub.add_parser(
        "profile",
        help="flame graphs and per-stage timings of a lab or running overlay",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--lab", action="store_true", help="build a two-node lab and profile it under iperf3"
    )
    where.add_argument(
        "--node",
        action="append",
        metavar="SOCKET|PID",
        help="attach to a running node (repeat for several)",
    )
    p.add_argument("--duration", type=float, default=10.0, help="seconds to record (default 10)")
    p.add_argument(
        "--out", type=Path, default=Path("out/profile"), help="output directory (out/profile)"
    )
    p.add_argument(
        "--rate", type=int, default=DEFAULT_RATE, help=f"py-spy samples/s (default {DEFAULT_RATE})"
    )
    p.add_argument(
        "--native", action="store_true", help="py-spy --native: C/Rust frames (cryptography)"
    )
    p.add_argument(
        "--blocking",
        action="store_true",
        help="py-spy pauses the node for each sample: exact stacks, much slower node",
    )
    p.add_argument(
        "--scalene",
        action="store_true",
        help="(--lab) run the nodes under scalene: CPU line profile, JSON and HTML",
    )
    p.add_argument(
        "--scalene-memory",
        action="store_true",
        help="with --scalene: memory profiling too (slows the data path a lot)",
    )
    p.add_argument(
        "--cipher",
        default="aes-256-gcm",
        choices=["aes-256-gcm", "chacha20-poly1305"],
        help="(--lab) the overlay's cipher",
    )
    p.add_argument("--streams", type=int, default=1, help="(--lab) iperf3 parallel streams")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Take the profile, print the summary; errors propagate to the CLI as ProfileError."""
    from ipop_trio.lab.netns import sigterm_raises

    from .report import summary_text
    from .session import Options, profile_lab, profile_nodes

    opts = Options(
        out=args.out,
        duration=args.duration,
        rate=args.rate,
        native=args.native,
        blocking=args.blocking,
        scalene=args.scalene or args.scalene_memory,
        scalene_memory=args.scalene_memory,
        cipher=args.cipher,
        streams=args.streams,
    )

    def say(line: str) -> None:
        print(line, flush=True)

    with sigterm_raises():
        if args.lab:
            profile = profile_lab(opts, say, sys.stderr)
        else:
            profile = profile_nodes(args.node, opts, say, sys.stderr)
    print()
    print(summary_text(profile, opts.out))
    return 0
