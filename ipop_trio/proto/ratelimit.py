"""Token buckets for work that strangers can make us do: handshake initiations (two X25519
operations and a certificate check each), signalling messages.

Pure: the caller passes `now` (monotonic seconds). `TokenBucket` is one bucket;
`RateLimiter` keeps one per key with bounded memory (at most `max_keys` buckets, the
stalest dropped first), so a spoofed-source flood cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class TokenBucket:
    """At most `rate` events per second, bursts up to `burst`; starts full."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.last = now

    def allow(self, now: float) -> bool:
        """Take one token if there is one (a clock that steps back refills nothing)."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RateLimiter:
    """`allow(key, now)`: one `TokenBucket(rate, burst)` per key."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, now)
        self._buckets[key] = bucket  # most recently used last
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return bucket.allow(now)

    def __len__(self) -> int:
        return len(self._buckets)
