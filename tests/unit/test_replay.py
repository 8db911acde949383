"""ReplayWindow (RFC 6479): edges of the window, far jumps, the reject limit, and a model."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ipop_trio.proto.session import (
    REJECT_AFTER_MESSAGES,
    RING_BLOCKS,
    WINDOW_SIZE,
    ReplayWindow,
)

W = WINDOW_SIZE
LIMIT = REJECT_AFTER_MESSAGES


def accept_all(window: ReplayWindow, counters: range | list[int]) -> None:
    for c in counters:
        assert window.update(c), c


def test_window_size_is_wireguards() -> None:
    assert W == 8192 - 64 == (RING_BLOCKS - 1) * 64


def test_counter_zero_first_then_duplicate() -> None:
    w = ReplayWindow()
    assert w.highest == -1
    assert w.check(0)
    assert w.update(0)
    assert w.highest == 0
    assert not w.check(0)
    assert not w.update(0)


def test_zero_after_higher_counters() -> None:
    w = ReplayWindow()
    accept_all(w, [5, 3])
    assert w.update(0)
    assert not w.update(0)
    assert not w.update(5)


def test_check_does_not_change_the_window() -> None:
    w = ReplayWindow()
    for c in (0, 10, 10**9, 3):
        w.check(c)
    assert w.highest == -1
    assert w.update(3)
    assert w.check(10**9)
    assert w.highest == 3
    assert w.update(0)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow()
    order = [7, 1, 0, 3, 2, 6, 5, 4, 100, 64, 63, 65, 99]
    accept_all(w, order)
    for c in order:
        assert not w.check(c)
        assert not w.update(c)
    assert w.highest == 100
    assert w.update(8)  # a hole stays acceptable


def test_too_old_just_outside_vs_just_inside() -> None:
    for high in (W, W + 1, W + 63, W + 64, 5 * W + 17, 2**40):
        w = ReplayWindow()
        assert w.update(high)
        outside = high - W
        inside = high - W + 1
        assert not w.check(outside), high
        assert not w.update(outside), high
        assert w.check(inside), high
        assert w.update(inside), high
        assert not w.update(inside), high


def test_window_below_size_accepts_everything_unseen() -> None:
    w = ReplayWindow()
    assert w.update(W - 1)
    accept_all(w, range(W - 1))  # 0 .. W-2, all inside (W-1) - W < 0


def test_sequential_across_block_boundaries_then_all_replays_refused() -> None:
    w = ReplayWindow()
    accept_all(w, range(3 * 64 + 5))
    for c in range(3 * 64 + 5):
        assert not w.update(c)


def test_slide_clears_reused_blocks() -> None:
    # Fill the whole window, then move ahead so the ring reuses the blocks of 0..127.
    w = ReplayWindow()
    accept_all(w, range(W))
    top = RING_BLOCKS * 64 + 70  # 8262: blocks 127, 0 and 1 of the ring are entered
    assert w.update(top)
    # Never-seen counters whose ring slots held the old bits of 0..127 are accepted.
    accept_all(w, range(W, top))
    # Seen counters still in the window stay refused, older ones are too old.
    for c in (top - W + 1, top - W + 2, W - 1, top):
        assert not w.update(c), c
    for c in (0, 63, 64, 127, top - W):
        assert not w.update(c), c


def test_far_ahead_clears_everything_and_refuses_old() -> None:
    w = ReplayWindow()
    accept_all(w, range(101))
    far = 10**12
    assert w.update(far)
    assert w.highest == far
    for c in (0, 50, 100, far - W, far - 2**20):
        assert not w.check(c)
        assert not w.update(c)
    for c in (far - 1, far - W + 1, far - 64, far - 65):
        assert w.update(c), c
    assert not w.update(far)


def test_jump_exactly_one_ring_ahead() -> None:
    w = ReplayWindow()
    accept_all(w, range(64))
    assert w.update(RING_BLOCKS * 64)  # block index 0 again: its old bits must be cleared
    assert w.update(RING_BLOCKS * 64 + 1)
    assert not w.update(RING_BLOCKS * 64)
    assert not w.update(63)  # too old, not merely "seen"


def test_near_the_reject_limit() -> None:
    w = ReplayWindow()
    for c in (LIMIT, LIMIT + 1, 2**64 - 1, 2**64, 2**70, -1, -(2**64)):
        assert not w.check(c), c
        assert not w.update(c), c
    assert w.highest == -1
    assert w.update(LIMIT - 1)
    assert not w.update(LIMIT - 1)
    assert not w.update(LIMIT)
    assert w.update(LIMIT - 2)
    assert w.update(LIMIT - W)
    assert not w.update(LIMIT - 1 - W)
    assert w.highest == LIMIT - 1


# --- model ---------------------------------------------------------------------------------


class Model:
    """The specification: accept iff in range, not seen, and counter > highest - W."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.highest = -1

    def check(self, c: int) -> bool:
        return 0 <= c < LIMIT and c not in self.seen and c > self.highest - W

    def update(self, c: int) -> bool:
        ok = self.check(c)
        if ok:
            self.seen.add(c)
            self.highest = max(self.highest, c)
        return ok


# Steps are relative to the current highest counter, so the walk keeps visiting the window's
# edges, block boundaries and ring wrap-arounds; bases put some runs next to the limit.
_step = st.one_of(
    st.integers(-80, 80),
    st.integers(-W - 130, -W + 130),
    st.integers(W - 200, W + 200),
    st.integers(1, RING_BLOCKS).map(lambda blocks: blocks * 64),
    st.sampled_from([-W, -W + 1, -W - 1, W, RING_BLOCKS * 64, -64, 64, 0, 1, -1]),
    st.integers(-3 * W, 3 * W),
    st.integers(-(2**65), 2**65),
)
_base = st.sampled_from([0, 1, 63, 64, W, 2**32 - 1, LIMIT - 2 * W, LIMIT - 5])


@settings(max_examples=300, deadline=None)
@given(base=_base, steps=st.lists(st.tuples(_step, st.booleans()), max_size=300))
def test_window_matches_set_model(base: int, steps: list[tuple[int, bool]]) -> None:
    w = ReplayWindow()
    m = Model()
    for step, check_only in steps:
        c = max(m.highest, base) + step
        expected = m.check(c)
        assert w.check(c) == expected, c
        if not check_only:
            assert w.update(c) == m.update(c) == expected, c
        assert w.highest == m.highest


# A window the runs start from (a far jump away, with a few counters seen), then runs of
# consecutive counters above the highest, some long enough to wrap the ring.
_run = st.tuples(
    st.one_of(st.integers(1, 70), st.integers(W - 70, W + 70), st.integers(1, 3 * W)),
    st.one_of(st.integers(1, 130), st.integers(RING_BLOCKS * 64 - 70, RING_BLOCKS * 64 + 70)),
)


@settings(max_examples=300, deadline=None)
@given(
    base=st.sampled_from([-1, 0, 63, 64, W, 2**32 - 1, LIMIT - 20 * W]),
    seen=st.lists(st.integers(-W - 10, 0), max_size=20),
    runs=st.lists(_run, min_size=1, max_size=5),
)
def test_accept_run_is_update_on_each(
    base: int, seen: list[int], runs: list[tuple[int, int]]
) -> None:
    fast, slow = ReplayWindow(), ReplayWindow()
    for c in [base, *(base + s for s in seen)]:
        assert fast.update(c) == slow.update(c)
    for gap, length in runs:
        first = slow.highest + gap
        last = min(first + length - 1, LIMIT - 1)
        if first > last:
            break
        fast.accept_run(first, last)
        accept_all(slow, range(first, last + 1))
        assert fast.highest == slow.highest == last
        # Every counter the window still remembers, and its edges, answer the same.
        for c in range(last - W - 70, last + 70):
            assert fast.check(c) == slow.check(c), c
