"""The TAP reader's inline path (datapath/pipeline.py): a small batch with nothing queued is
sent by the reader itself; a full one, or one behind a queued batch, goes through the channel,
and nothing is reordered either way."""

from __future__ import annotations

import trio
import trio.testing

from ipop_trio.datapath import pipeline
from ipop_trio.stats import Stats


class _Tap:
    """Hands out the given batches, one per wait, then blocks forever."""

    def __init__(self, batches: list[list[bytes]]) -> None:
        self.batches = batches

    async def wait_readable(self) -> None:
        if not self.batches:
            await trio.sleep_forever()

    def read_batch(self, n: int) -> list[bytes]:
        return self.batches.pop(0)[:n]


class _Outbound:
    def __init__(self) -> None:
        self.stats = Stats()
        self.sent: list[tuple[str, list[bytes]]] = []
        self.in_task = False

    def process(self, frames: list[bytes], now: float) -> list[bytes]:
        self.sent.append(("task" if self.in_task else "reader", frames))
        return []


class _Writer:
    def submit(self, frames: list[bytes]) -> None:
        raise AssertionError("no local frames in these tests")


async def _run(batches: list[list[bytes]]) -> _Outbound:
    outbound = _Outbound()
    send, receive = pipeline.make_outbound_channel()
    total = sum(len(b) for b in batches)

    async def task() -> None:
        async with receive:
            async for stamp, frames in receive:
                outbound.stats.channels["outbound"].taken(stamp)
                outbound.in_task = True
                outbound.process(frames, 0.0)
                outbound.in_task = False

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.tap_reader, _Tap(batches), send, outbound, _Writer())
        nursery.start_soon(task)
        while sum(len(f) for _, f in outbound.sent) < total:
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return outbound


def test_a_small_batch_is_sent_by_the_reader() -> None:
    out = trio.run(_run, [[b"ping"], [b"a", b"b"]])
    assert out.sent == [("reader", [b"ping"]), ("reader", [b"a", b"b"])]
    assert out.stats.channels["outbound"].batches == 0


def test_a_large_batch_goes_through_the_channel_and_order_holds() -> None:
    big = [bytes([i]) for i in range(pipeline.INLINE_FRAMES + 1)]
    out = trio.run(_run, [big, [b"after"]])
    assert [f for _, f in out.sent] == [big, [b"after"]]
    assert out.sent[0][0] == "task"
    assert out.stats.channels["outbound"].batches >= 1
