"""The data path's Trio tasks (DESIGN.md §2):

    tap reader: TAP batch -> outbound (route, seal, GSO send), in the same task
    udp receiver (GRO, demux, open)  --[batches, bounded queue]-->  TAP writer thread

One `await` per batch; the queue to the writer thread is bounded and drops (counted) when
full, because the data path must never block on a slow stage — TCP above us recovers from a
drop, it cannot recover from a stalled node.

The outbound side has no channel between reading the TAP and sealing (DESIGN.md drew one):
both would run on the one Trio thread, so a channel there bought no parallelism, only a task
switch per batch, and on this VM a switch after a wake-up costs ~150 µs (measured with a UDP
echo server: epoll 0.25 ms RTT, one task 0.38, two tasks and a memory channel 0.53). Where
work really overlaps, the TAP writer thread, the queue stays.
"""

from __future__ import annotations

import time

import trio

from ..net.tap import Tap, TapWriter
from ..net.udp import UdpSocket
from ..stats import Stats, now_ns
from .inbound import MAX_RECV_CALLS, PENDING_FLUSH, Inbound
from .outbound import Outbound

TAP_BATCH = 64  # frames drained from the TAP per batch


async def tap_reader(tap: Tap, outbound: Outbound, writer: TapWriter, stats: Stats) -> None:
    """Read TAP batches and send each at once (route, seal, GSO); ARP answers go back to
    our own TAP through the writer."""
    stage = stats["tap_read"]
    while True:
        await tap.wait_readable()
        t0 = now_ns()
        frames = tap.read_batch(TAP_BATCH)
        if not frames:
            continue
        stage.record(len(frames), sum(map(len, frames)), t0)
        local = outbound.process(frames, time.monotonic())
        if local:
            writer.submit(local)
        if len(frames) >= TAP_BATCH:
            await trio.lowlevel.checkpoint()  # a full batch: let the receiver have a turn


async def udp_receiver(udp: UdpSocket, inbound: Inbound, writer: TapWriter, stats: Stats) -> None:
    stage = stats["udp_recv"]
    while True:
        if inbound.pending:
            with trio.move_on_after(PENDING_FLUSH) as quiet:
                await udp.wait_readable()
            if quiet.cancelled_caught:
                out: list[bytes] = []
                inbound.flush_pending(out)
                if out:
                    writer.submit(out)
                continue
        else:
            await udp.wait_readable()
        now = time.monotonic()  # the links' timer clock (control/links.py)
        out = []
        for _ in range(MAX_RECV_CALLS):
            t0 = now_ns()
            got = udp.recv_once()
            if got is None:
                break
            datagrams, addr = got
            stage.record(len(datagrams), sum(map(len, datagrams)), t0)
            if datagrams:
                inbound.process(datagrams, addr, now, out)
        if out:
            writer.submit(out)


__all__ = [
    "tap_reader",
    "udp_receiver",
]
