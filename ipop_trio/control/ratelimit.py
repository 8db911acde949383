"""Token buckets for work that strangers can make us do (handshake initiations cost two
X25519 operations and a certificate check each).

Pure: the caller passes `now` (monotonic seconds). Memory is bounded: at most `max_keys`
buckets, the stalest dropped first, so a spoofed-source flood cannot grow it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class RateLimiter:
    """`allow(key, now)`: at most `rate` events per second per key, bursts up to `burst`."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def allow(self, key: Hashable, now: float) -> bool:
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)  # most recently used last
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)
