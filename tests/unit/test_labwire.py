"""The lab wire's sans-IO core: constant delay, FIFO order, seeded independent loss, a bounded
queue that counts what it refuses, and the drop classifier. No sockets, no root."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ipop_trio.lab.wire import VNET_HDR, Direction, Verdict, Wire, is_ipv4_udp


def direction(loss: float = 0.0, delay: float = 0.0, limit: int = 1000, seed: int = 1) -> Direction:
    return Direction(loss, delay, limit, random.Random(seed))


def binomial_bounds(n: int, p: float, sigmas: float = 5.0) -> tuple[float, float]:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - sigmas * sd, mean + sigmas * sd


def test_frames_leave_exactly_delay_later_in_order() -> None:
    d = direction(delay=0.005)
    for i in range(3):
        assert d.offer(bytes([i]), 10.0 + i * 0.001) is Verdict.QUEUED
    assert d.next_deadline() == pytest.approx(10.005)
    assert list(d.pop_due(10.0049)) == []
    assert list(d.pop_due(10.005)) == [b"\x00"]
    assert d.next_deadline() == pytest.approx(10.006)
    assert list(d.pop_due(11.0)) == [b"\x01", b"\x02"]
    assert d.next_deadline() is None and d.waiting == 0


def test_zero_delay_frames_are_due_at_once() -> None:
    d = direction()
    d.offer(b"x", 5.0)
    assert d.next_deadline() == 5.0
    assert list(d.pop_due(5.0)) == [b"x"]


def test_no_loss_loses_nothing_and_certain_loss_loses_all() -> None:
    keep, drop = direction(loss=0.0), direction(loss=1.0)
    for i in range(1000):
        keep.offer(b"f", i)
        drop.offer(b"f", i)
    assert (keep.lost, keep.waiting, keep.received) == (0, 1000, 1000)
    assert (drop.lost, drop.waiting, drop.received) == (1000, 0, 1000)


def test_loss_rate_is_binomial_and_reproducible() -> None:
    n, p = 20000, 0.01
    runs = []
    for _ in range(2):
        d = direction(loss=p, seed=42, limit=n)
        verdicts = [d.offer(b"f", 0.0) for _ in range(n)]
        runs.append(verdicts)
        low, high = binomial_bounds(n, p)
        assert low <= d.lost <= high
        assert d.lost + d.waiting == n
    assert runs[0] == runs[1], "the same seed must lose the same frame numbers"


def test_losses_are_independent_not_bursty() -> None:
    # With independent loss the chance that the frame after a lost one is lost is p too.
    n, p = 50000, 0.2
    d = direction(loss=p, seed=7, limit=n)
    lost = [d.offer(b"f", 0.0) is Verdict.LOST for _ in range(n)]
    after_loss = [b for a, b in itertools.pairwise(lost) if a]
    low, high = binomial_bounds(len(after_loss), p)
    assert low <= sum(after_loss) <= high


def test_full_queue_drops_and_counts_then_recovers() -> None:
    d = direction(delay=1.0, limit=3)
    assert [d.offer(b"f", 0.0) for _ in range(5)] == [Verdict.QUEUED] * 3 + [Verdict.OVERFLOW] * 2
    assert (d.overflow, d.lost, d.waiting, d.received) == (2, 0, 3, 5)
    assert len(list(d.pop_due(1.0))) == 3
    assert d.offer(b"g", 1.0) is Verdict.QUEUED


def test_directions_of_a_wire_lose_independently_and_reproducibly() -> None:
    def pattern(seed: int) -> tuple[list[Verdict], list[Verdict]]:
        w = Wire(0.3, 0.0, seed=seed)
        return (
            [w.a_to_b.offer(b"f", 0.0) for _ in range(200)],
            [w.b_to_a.offer(b"f", 0.0) for _ in range(200)],
        )

    ab, ba = pattern(9)
    assert ab != ba
    assert pattern(9) == (ab, ba)
    assert pattern(10) != (ab, ba)


def test_wire_timeout_is_time_to_the_first_due_frame() -> None:
    w = Wire(0.0, 0.010)
    assert w.timeout(0.0) is None
    w.b_to_a.offer(b"b", 1.000)
    w.a_to_b.offer(b"a", 1.004)
    assert w.next_deadline() == pytest.approx(1.010)
    assert w.timeout(1.002) == pytest.approx(0.008)
    assert w.timeout(2.0) == 0.0


@pytest.mark.parametrize(
    ("loss", "delay", "limit"), [(-0.1, 0.0, 1), (1.5, 0.0, 1), (0.0, -1.0, 1), (0.0, 0.0, 0)]
)
def test_nonsense_parameters_are_refused(loss: float, delay: float, limit: int) -> None:
    with pytest.raises(ValueError):
        Wire(loss, delay, limit=limit)


def _frame(ethertype: bytes, proto: int) -> bytes:
    eth = b"\xff" * 6 + b"\x02" * 6 + ethertype
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, proto, 0, 0]) + bytes(8)
    return bytes(VNET_HDR) + eth + ip + bytes(8)


def test_udp_classifier_looks_past_the_virtio_header() -> None:
    assert is_ipv4_udp(_frame(b"\x08\x00", 17))
    assert not is_ipv4_udp(_frame(b"\x08\x00", 6))  # TCP
    assert not is_ipv4_udp(_frame(b"\x08\x06", 17))  # ARP
    assert not is_ipv4_udp(_frame(b"\x08\x00", 17)[:30])  # runt
