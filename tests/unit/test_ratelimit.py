from ipop_trio.proto.ratelimit import RateLimiter


def test_burst_then_rate_per_key() -> None:
    rl = RateLimiter(rate=10, burst=3)
    assert [rl.allow("a", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow("b", 0.0)  # another key has its own bucket
    assert not rl.allow("a", 0.05)  # half a token refilled
    assert rl.allow("a", 0.1)
    assert [rl.allow("a", 10.0) for _ in range(4)] == [True, True, True, False]  # capped


def test_memory_is_bounded_under_a_spoofed_source_flood() -> None:
    rl = RateLimiter(rate=1, burst=1, max_keys=100)
    for i in range(10_000):
        rl.allow(("10.0.0.1", i), 0.0)
    assert len(rl) == 100
    # the most recent keys are kept, the stalest dropped
    assert not rl.allow(("10.0.0.1", 9_999), 0.0)
