"""Per-token request limits: a token bucket for the request rate and a counter of requests in
flight. State lives in this process, so the limits hold per replica, not across a fleet."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenLimiter:
    """Admits or refuses one token's next request.

    ``per_minute`` requests refill continuously up to ``burst``, so an editor that fires a few
    completions at once is not refused while a script looping on the API is slowed to the
    sustained rate. ``max_in_flight`` bounds concurrent requests (streams count until they end).
    0 turns either limit off. Buckets exist only for authenticated tokens, so memory grows with
    the number of tokens in the database, not with what clients send.
    """

    def __init__(
        self,
        *,
        per_minute: float,
        burst: int,
        max_in_flight: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0  # tokens per second
        self.burst = burst
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._in_flight: dict[int, int] = {}

    def take(self, token_id: int) -> float | None:
        """Spend one request from ``token_id``'s bucket: None when admitted, else the seconds
        until the next request would be."""
        if self.rate <= 0:
            return None
        now = self._clock()
        bucket = self._buckets.get(token_id)
        if bucket is None:
            bucket = self._buckets[token_id] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / self.rate

    def enter(self, token_id: int) -> bool:
        """Count a request in flight for ``token_id``; False (and nothing counted) at the cap."""
        count = self._in_flight.get(token_id, 0)
        if self.max_in_flight and count >= self.max_in_flight:
            return False
        self._in_flight[token_id] = count + 1
        return True

    def leave(self, token_id: int) -> None:
        count = self._in_flight.get(token_id, 0) - 1
        if count > 0:
            self._in_flight[token_id] = count
        else:
            self._in_flight.pop(token_id, None)

    def in_flight(self, token_id: int) -> int:
        return self._in_flight.get(token_id, 0)


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))
