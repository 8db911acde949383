from hypothesis import given
from hypothesis import strategies as st

from ipop_trio.net.udp import GSO_MAX_BYTES, UDP_MAX_SEGMENTS, _runs


def test_equal_sizes_form_one_run_closed_by_a_shorter_one() -> None:
    assert list(_runs([1400, 1400, 1400, 90, 1400])) == [(0, 4, 1400, 4290), (4, 1, 1400, 1400)]


def test_a_longer_datagram_starts_a_new_run() -> None:
    assert list(_runs([90, 1400, 1400])) == [(0, 1, 90, 90), (1, 2, 1400, 2800)]


@given(st.lists(st.integers(min_value=1, max_value=1472), max_size=300))
def test_runs_cover_everything_within_kernel_limits(sizes: list[int]) -> None:
    covered = []
    for start, count, seg, total in _runs(sizes):
        part = sizes[start : start + count]
        assert count <= UDP_MAX_SEGMENTS and total <= GSO_MAX_BYTES and sum(part) == total
        assert all(s == seg for s in part[:-1]) and part[-1] <= seg
        covered.extend(part)
    assert covered == sizes
