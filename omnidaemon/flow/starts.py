"""Starts of an agent-wide rate limit, taken before the fetch.

An agent-wide rate limit needs nothing of the payload, so the consume loop asks it before it
fetches: it takes as many starts as it has free handler slots, fetches at most that many
events, and keeps what the fetch did not use. When the limit allows nothing, the loop waits
and reads nothing, so events over the limit wait unread, in order, at no cost each.

Starts are used only within `FRESH` seconds of being taken: a start used later than the
limit counted it could let a window see more than the limit allows. So the guarantee is
`burst + (w + FRESH) x rate` starts in any window of `w` seconds (plus the round trips between
a fetch and its handler's start). Starts older than that are dropped, not given back: the
bucket has refilled meanwhile and would count them twice. After a fetch that brought nothing,
the loop fetches without starts (its events ask one by one) until events flow again, so an
idle worker does not drain the bucket.

While the bucket is far from empty (more than half full), a take also asks for `SPARE` starts
more, kept for the next fetches: a limit that never binds then costs one state change per
many fetches instead of one per fetch.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from omnidaemon.flow import state
from omnidaemon.flow.batching import StateUpdates
from omnidaemon.flow.limits import RateLimit

__all__ = ["FRESH", "FetchStarts"]

FRESH = 0.05
"""Seconds within which a start taken before a fetch must be used."""

SPARE = 64  # starts taken beyond the free slots while the bucket is more than half full


class FetchStarts:
    """The agent-wide rate limit's starts for one consume loop."""

    def __init__(
        self,
        limit: RateLimit,
        key: str,
        updates: StateUpdates,
        *,
        on_refused: Callable[[float], None],
        on_granted: Callable[[], None],
    ) -> None:
        self._rate = 1.0 / limit.interval
        self._capacity = float(limit.burst)
        self._key = key
        self._updates = updates
        self._on_refused = on_refused
        self._on_granted = on_granted
        self.idle = False
        """Set by the consume loop when a fetch with starts brought nothing: its next fetch
        goes without, and its events ask one by one, so an idle loop does not spend the
        limit's starts on fetches that wait."""
        self._kept = 0  # starts taken and not used yet
        self._kept_at = 0.0  # when the oldest of them was taken (anyio.current_time())

    async def take(self, count: int) -> tuple[int, float, float]:
        """Up to `count` starts: `(how many, seconds to wait when none, when they were
        taken)`; kept ones first, without a round trip."""
        now = anyio.current_time()
        if self._kept:
            if now - self._kept_at <= FRESH:
                used = min(count, self._kept)
                self._kept -= used
                return used, 0.0, self._kept_at
            self._kept = 0
        rate, capacity = self._rate, self._capacity

        def step(data: bytes | None, at: float) -> tuple[bytes, float, tuple[int, float]]:
            new, granted, wait = state.bucket_take_many(
                data, at, count=count, rate=rate, capacity=capacity, spare=SPARE
            )
            return new, state.bucket_ttl(new, at, rate=rate, capacity=capacity), (granted, wait)

        granted, wait = await self._updates.apply(self._key, step)
        taken = anyio.current_time()
        if not granted:
            self._on_refused(wait)
            return 0, wait, taken
        self._on_granted()
        if granted > count:
            self._kept, self._kept_at = granted - count, taken
            granted = count
        return granted, 0.0, taken

    def fresh(self, taken: float) -> bool:
        """Whether starts taken at `taken` may still be used."""
        return anyio.current_time() - taken <= FRESH

    def keep(self, count: int, taken: float) -> None:
        """Keep `count` unused starts taken at `taken` for the next fetch (while fresh)."""
        if count <= 0 or not self.fresh(taken):
            return
        if self._kept and self.fresh(self._kept_at):
            self._kept += count
            self._kept_at = min(self._kept_at, taken)
        else:
            self._kept, self._kept_at = count, taken
