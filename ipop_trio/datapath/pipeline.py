"""The data path's Trio tasks (docs/architecture.md, "The task tree"):

    tap reader  --[batches, bounded]-->  outbound (route, seal, GSO send)
    udp receiver (GRO, demux, open)  --[batches, bounded queue]-->  TAP writer thread

One `await` per batch; every channel is bounded and drops (counted) when full, because the
data path must never block on a slow stage — TCP above us recovers from a drop, it cannot
recover from a stalled node.

A small TAP batch (a ping, an ACK, a DNS query) with nothing queued ahead of it is routed and
sent by the reader itself, as the TAP writer writes small batches inline: handing it to the
outbound task costs a pass of Trio's scheduler (an epoll_wait and the task switch), measured
at ~45 µs a batch on the lab's 2-core VM, twice per ping. Nothing can overtake: the outbound
task's `process` never awaits, so with the channel empty no batch is half done.
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
OUTBOUND_QUEUE = 16  # batches between TAP reader and outbound
INLINE_FRAMES = 4  # TAP batches this small are sent by the reader when nothing is queued


Batch = tuple[int, list[bytes]]  # (stamp when queued, TAP reads)


async def tap_reader(
    tap: Tap,
    send: trio.MemorySendChannel[Batch],
    outbound: Outbound,
    writer: TapWriter,
) -> None:
    stats = outbound.stats
    stage = stats["tap_read"]
    channel = stats.channels["outbound"]
    async with send:
        while True:
            await tap.wait_readable()
            t0 = now_ns()
            frames = tap.read_batch(TAP_BATCH)
            if not frames:
                continue
            stage.record(len(frames), sum(map(len, frames)), t0)
            if len(frames) <= INLINE_FRAMES and channel.depth == 0:
                local = outbound.process(frames, time.monotonic())
                if local:
                    writer.submit(local)
                continue
            try:
                send.send_nowait((channel.put(), frames))
            except trio.WouldBlock:
                channel.depth -= 1
                stats.drop("outbound_queue_full", len(frames))
            if len(frames) >= TAP_BATCH:
                await trio.lowlevel.checkpoint()  # let outbound drain before the next batch


async def outbound_task(
    outbound: Outbound, receive: trio.MemoryReceiveChannel[Batch], writer: TapWriter
) -> None:
    channel = outbound.stats.channels["outbound"]
    async with receive:
        async for stamp, frames in receive:
            channel.taken(stamp)
            local = outbound.process(frames, time.monotonic())
            if local:
                writer.submit(local)


async def udp_receiver(udp: UdpSocket, inbound: Inbound, writer: TapWriter, stats: Stats) -> None:
    stage = stats["udp_recv"]
    while True:
        if inbound.has_pending():
            with trio.move_on_after(PENDING_FLUSH) as quiet:
                await udp.wait_readable()
            if quiet.cancelled_caught:
                out: list[bytes] = []
                inbound.flush_pending(out, time.monotonic())
                if out:
                    writer.submit(out)
                continue
        else:
            await udp.wait_readable()
        now = time.monotonic()  # the links' timer clock (control/links.py)
        out = []
        for _ in range(MAX_RECV_CALLS):
            t0 = now_ns()
            got = udp.recv_raw()
            if got is None:
                break
            data, segment, addr = got
            n = len(data)
            stage.record(-(-n // segment) if segment else 1, n, t0)
            inbound.receive(data, segment, addr, now, out)
        if out:
            writer.submit(out)


def make_outbound_channel() -> tuple[
    trio.MemorySendChannel[Batch], trio.MemoryReceiveChannel[Batch]
]:
    return trio.open_memory_channel[Batch](OUTBOUND_QUEUE)


__all__ = [
    "make_outbound_channel",
    "outbound_task",
    "tap_reader",
    "udp_receiver",
]
