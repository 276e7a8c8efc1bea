"""What the benchmark and the peers' drivers share: the event, pacing, and what a consumer records.

Imports pydantic and the standard library only: the peers' drivers run in a venv of their own
(`bench/.peers-venv`, without omnidaemon) and import this file from beside them.

Times are `time.monotonic()` readings. On Linux that clock is system-wide, so a stamp taken by
a publisher process can be subtracted from one taken by a consumer process.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel

__all__ = [
    "BenchEvent",
    "Recorder",
    "emit",
    "make_event",
    "paced",
    "percentile",
]


class BenchEvent(BaseModel):
    """The benchmark's event: about 200 bytes of JSON, validated into this model by every
    consumer (omnidaemon, raw redis-py, FastStream, Taskiq)."""

    seq: int
    sent_at: float  # time.monotonic() when the publisher sent it; 0 when nobody measures latency
    user_id: str
    document_id: str
    action: str
    tags: list[str]
    score: float
    note: str


def make_event(seq: int, sent_at: float = 0.0) -> BenchEvent:
    """Event number `seq` (its JSON is about 200 bytes)."""
    return BenchEvent(
        seq=seq,
        sent_at=sent_at,
        user_id=f"user-{seq % 100_000:08d}",
        document_id=f"doc-{seq:012d}",
        action="document.uploaded",
        tags=["bench", "pdf", "priority-normal"],
        score=(seq % 1000) / 1000,
        note="lorem ipsum",
    )


async def paced(rate: float, count: int, send: Callable[[int], Awaitable[object]]) -> float:
    """Call `send(i)` for i in 0..count-1 at a steady `rate` per second (on an absolute
    schedule, so a late send does not push the later ones back); return the achieved rate."""
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        await send(i)
    elapsed = time.monotonic() - start
    return count / elapsed if elapsed > 0 else math.inf


class Recorder:
    """What one consumer process saw: when it handled its first and last event, its CPU time
    over that window, and (for latency runs) each event's time from send to handler.

    `expect`: how many handler calls this process will see, if known (one process); the CPU
    time is read at the first and at the `expect`-th call (reading it on every call would cost
    more than a no-op handler).
    """

    def __init__(self, expect: int | None = None) -> None:
        self.expect = expect
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0
        self.latencies: list[tuple[int, float]] = []

    def hit(self) -> None:
        """Count one handled event."""
        now = time.monotonic()
        if self.count == 0:
            self.first = now
            self.cpu_first = time.process_time()
        self.count += 1
        self.last = now
        if self.count == self.expect:
            self.cpu_last = time.process_time()

    def latency(self, event: BenchEvent) -> None:
        """Count one handled event and record its latency (now minus its `sent_at`)."""
        self.hit()
        self.latencies.append((event.seq, self.last - event.sent_at))

    def summary(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "first": self.first,
            "last": self.last,
            "cpu": (self.cpu_last - self.cpu_first) if self.cpu_last else None,
            "latencies": self.latencies,
        }


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q` quantile (0 < q <= 1) of `values`."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def emit(result: dict[str, Any]) -> None:
    """Print a driver's result: one JSON line on stdout (progress goes to stderr)."""
    print(json.dumps(result), flush=True)
