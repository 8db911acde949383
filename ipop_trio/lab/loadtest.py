"""Load test of the signalling server: many simulated nodes on loopback.

    .venv/bin/python -m ipop_trio.lab.loadtest --nodes 1000 --requests 2000

Starts `ipop-trio signal` as a child process on 127.0.0.1 (so its memory is its own), issues
one certificate per simulated node from a throwaway CA, and in this process:
  1. joins every node (connect, hello, challenge, auth, welcome), `--concurrency` at a time;
     joins/second = nodes / wall time of the whole phase;
  2. sends `--requests` con_req between random pairs, paced under the per-client rate limit,
     and measures relay latency (send → arrival at the target) p50 / p99;
  3. reads the server's RSS before the first and after the last join: memory per node.
Every simulated node keeps reading (join announcements: N²/2 messages in all), as a real node
does; a node that stopped reading would be disconnected by design. All nodes connect from
127.0.0.1, one source: the server is started with its per-source limits raised to fit the
run (`server_limits`). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from ipop_trio import pki
from ipop_trio.lab.measure import cpu_seconds
from ipop_trio.proto import signalling as sig
from ipop_trio.signalling.client import open_connection
from ipop_trio.signalling.server import raise_fd_limit


@dataclass
class SimNode:
    bundle: pki.NodeBundle
    ws: WebSocketConnection | None = None
    arrivals: dict[str, float] = field(default_factory=dict)
    joins: int = 0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _reader(node: SimNode) -> None:
    assert node.ws is not None
    try:
        while True:
            text = await node.ws.get_message()
            if isinstance(text, str) and text.startswith(
                '{"type":"join"'
            ):  # the bulk: count, skip the full decode
                node.joins += 1
                continue
            msg = sig.decode_untrusted(text, max_size=sig.MAX_SERVER_MESSAGE)
            if isinstance(msg, sig.ConReq):
                node.arrivals[msg.request_id] = time.perf_counter()
    except ConnectionClosed:
        pass


async def _pinger(node: SimNode) -> None:
    """As the real client: a ping every 15 s keeps the server's idle timer quiet."""
    assert node.ws is not None
    seq = 0
    while True:
        await trio.sleep(15)
        seq += 1
        await node.ws.send_message(sig.encode(sig.Ping(seq)))


async def _node_task(
    node: SimNode,
    url: str,
    limit: trio.Semaphore,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[None],
) -> None:
    async with limit:
        conn = open_connection(url)
        async with conn as ws:
            node.ws = ws
            cert = node.bundle.cert_der
            await ws.send_message(sig.encode(sig.Hello(cert)))
            challenge = sig.decode_untrusted(
                await ws.get_message(), max_size=sig.MAX_SERVER_MESSAGE
            )
            assert isinstance(challenge, sig.Challenge), challenge
            assert node.bundle.private_key is not None
            answer = sig.answer_challenge(node.bundle.private_key, cert, challenge)
            await ws.send_message(sig.encode(answer))
            welcome = sig.decode_untrusted(await ws.get_message(), max_size=sig.MAX_SERVER_MESSAGE)
            assert isinstance(welcome, sig.Welcome), welcome
            task_status.started()
            limit.release()  # joined: let the next one connect while we keep reading
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_reader, node)
                    nursery.start_soon(_pinger, node)
                    await done.wait()
                    nursery.cancel_scope.cancel()
            finally:
                await limit.acquire()


async def run(
    nodes: list[SimNode], url: str, server_pid: int, args: argparse.Namespace
) -> dict[str, float]:
    limit = trio.Semaphore(args.concurrency)
    done = trio.Event()
    result: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        rss_before = rss_kib(server_pid)
        t0 = time.perf_counter()
        async with trio.open_nursery() as joining:
            for node in nodes:
                joining.start_soon(nursery.start, _node_task, node, url, limit, done)
        join_time = time.perf_counter() - t0
        print(f"  joined in {join_time:.2f} s (server CPU {cpu_seconds(server_pid):.2f} s)")
        # Let the join announcements drain before measuring memory and latency.
        expected = len(nodes) * (len(nodes) - 1) // 2
        with trio.move_on_after(300):
            while sum(n.joins for n in nodes) < expected:
                await trio.sleep(0.05)
        print(
            f"  announcements delivered after {time.perf_counter() - t0:.2f} s: "
            f"{sum(n.joins for n in nodes)}/{expected}",
            flush=True,
        )
        rss_after = rss_kib(server_pid)
        result.update(
            nodes=len(nodes),
            join_seconds=join_time,
            joins_per_second=len(nodes) / join_time,
            rss_before_kib=rss_before,
            rss_after_kib=rss_after,
            kib_per_node=(rss_after - rss_before) / len(nodes),
            join_announcements=sum(n.joins for n in nodes),
        )

        rng = random.Random(1)
        sent: dict[str, float] = {}
        interval = 1.0 / args.rate
        for i in range(args.requests):
            src, dst = rng.sample(nodes, 2)
            rid = f"lt{i}"
            req = sig.ConReq(
                sender=src.bundle.public_key,
                to=dst.bundle.public_key,
                overlay="load",
                request_id=rid,
                candidates=(sig.Candidate("host", "127.0.0.1", 4600),),
                cert=src.bundle.cert_der,
                groups=(),
                policy="always",
            )
            assert src.ws is not None
            sent[rid] = time.perf_counter()
            await src.ws.send_message(sig.encode(req))
            await trio.sleep(interval)
        with trio.move_on_after(10):
            while sum(len(n.arrivals) for n in nodes) < len(sent):
                await trio.sleep(0.01)
        arrivals = {rid: t for n in nodes for rid, t in n.arrivals.items()}
        lat = sorted((arrivals[r] - t) * 1000 for r, t in sent.items() if r in arrivals)
        result.update(
            requests=len(sent),
            relayed=len(lat),
            relay_p50_ms=statistics.median(lat) if lat else float("nan"),
            relay_p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
            request_rate=args.rate,
        )
        report(result)
        # Stop the server before the nodes go: 1,000 leaves would be announced to everyone
        # left (N²/2 messages again), which is the join phase's cost a second time.
        os.kill(server_pid, signal.SIGTERM)
        done.set()
    return result


def report(result: dict[str, float]) -> None:
    print(
        f"\nnodes {result['nodes']:.0f}: joins/s {result['joins_per_second']:.0f} "
        f"({result['join_seconds']:.2f} s)\n"
        f"con_req relay latency: p50 {result['relay_p50_ms']:.2f} ms, "
        f"p99 {result['relay_p99_ms']:.2f} ms ({result['relayed']:.0f}/{result['requests']:.0f} "
        f"relayed at {result['request_rate']:.0f}/s)\n"
        f"server RSS {result['rss_before_kib'] / 1024:.1f} → "
        f"{result['rss_after_kib'] / 1024:.1f} MiB: "
        f"{result['kib_per_node']:.1f} KiB per connected node",
        flush=True,
    )


def server_limits(args: argparse.Namespace) -> list[str]:
    """Every simulated node connects from 127.0.0.1, one source to the server's per-source
    limits: raise them to what this run holds (its nodes, its joins in flight), with room."""
    return [
        "--max-clients-per-source",
        str(args.nodes + args.concurrency + 16),
        "--max-preauth-per-source",
        str(args.concurrency + 16),
        "--max-preauth",
        str(max(1024, args.concurrency + 16)),
        "--max-clients",
        str(max(100_000, args.nodes + args.concurrency + 16)),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rate", type=float, default=500.0, help="con_req per second in total")
    p.add_argument("--concurrency", type=int, default=64, help="joins in flight at once")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    raise_fd_limit()
    t0 = time.perf_counter()
    print(f"issuing {args.nodes} certificates ...", flush=True)
    now = time.time()
    ca = pki.new_ca_bundle("load", "10.64.0.0/16", now=now)
    nodes = []
    for i in range(args.nodes):
        address = f"10.64.{(i + 1) // 250}.{(i + 1) % 250 + 1}"
        nodes.append(SimNode(pki.issue_node_bundle(ca, f"n{i}", address, now=now)))
    print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ca_path = Path(tmp) / "ca.crt"
        ca_path.write_bytes(ca.cert_pem)
        argv_server = [sys.executable, "-m", "ipop_trio", "signal", "--listen", "127.0.0.1:0"]
        server = subprocess.Popen(
            [*argv_server, "--ca", str(ca_path), "--log-level", "warning", *server_limits(args)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if "listening on" not in line:
                print(f"server did not start: {line!r}", file=sys.stderr)
                return 1
            port = int(line.rsplit(":", 1)[1])
            print(f"server pid {server.pid} on port {port}; joining {args.nodes} nodes ...")
            result = trio.run(run, nodes, f"ws://127.0.0.1:{port}/", server.pid, args)
        finally:
            server.terminate()
            server.wait(timeout=10)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
