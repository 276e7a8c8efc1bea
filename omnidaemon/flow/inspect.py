"""What the fleet's limits look like now, read from the bus alone (`omnidaemon limits`).

Every limit keeps its state as a value under `flow:` (see `omnidaemon.flow.state`): a bucket
for a rate limit or a budget, holders for per-key slots, each with the shape its last start
wrote (rate and capacity, or the number of slots). This reads them all and says, per limit
and key, how full it is and how long a fresh event would wait for its turn, without the
app's code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.flow.state import bucket_level

__all__ = ["LimitState", "limit_states"]

_KINDS = ("rate", "budget", "slots")


@dataclass(frozen=True, slots=True)
class LimitState:
    """One limit (or one key's share of a keyed limit), as the bus holds it now.

    Attributes:
        kind: `"rate"` (an agent's rate limit), `"budget"` or `"slots"` (per-key concurrency).
        name: The agent's name, or the budget's.
        key: The key of a keyed limit (`rate_limit_key`, `concurrency_key`), else `None`.
            A key longer than 200 characters shows as the hash the bus stores it under.
        level: Units in the bucket now (starts for a rate limit, units for a budget);
            below 0 when a budget is in debt. `None` for slots, or a bucket whose shape no
            start has written yet.
        capacity: What the bucket holds when full (the burst, or the budget's amount).
        rate: Units the bucket regains per second.
        held: Slots held now (leases not run out), for slots.
        slots: How many slots the key has, for slots.
        waiting: Seconds until an event that asks now would have its turn: the end of the
            line of events already told to wait (0 when nobody waits).
    """

    kind: str
    name: str
    key: str | None
    level: float | None
    capacity: float | None
    rate: float | None
    held: int | None
    slots: int | None
    waiting: float

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready data."""
        return asdict(self)


async def limit_states(broker: Broker) -> list[LimitState]:
    """Every limit's state on the bus, sorted by kind, name and key."""
    now = broker.clock()
    found = [
        state
        for key, data in (await broker.scan_values("flow:")).items()
        if (state := _read(key, data, now)) is not None
    ]
    return sorted(found, key=lambda s: (s.kind, s.name, s.key or ""))


def _unescape(part: str) -> str:
    return part.replace("%3A", ":").replace("%25", "%")


def _read(key: str, data: bytes, now: float) -> LimitState | None:
    """One value's state; `None` for a value that is no limit's (or not readable)."""
    _, kind, *parts = key.split(":")
    if kind not in _KINDS or not parts or len(parts) > 2:
        return None
    try:
        state = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(state, dict):
        return None
    name = _unescape(parts[0])
    limit_key = _unescape(parts[1]) if len(parts) == 2 else None
    try:
        if kind == "slots":
            holders = state.get("h") or {}
            line = max(float(state.get("w", 0.0)), float(state.get("v", 0.0)))
            slots = state.get("n")
            return LimitState(
                kind=kind,
                name=name,
                key=limit_key,
                level=None,
                capacity=None,
                rate=None,
                held=sum(1 for until in holders.values() if float(until) > now),
                slots=None if slots is None else int(slots),
                waiting=max(0.0, line - now),
            )
        rate = None if state.get("r") is None else float(state["r"])
        capacity = None if state.get("c") is None else float(state["c"])
        level = None
        if rate is not None and capacity is not None:
            level = bucket_level(data, now, rate=rate, capacity=capacity)
        return LimitState(
            kind=kind,
            name=name,
            key=limit_key,
            level=level,
            capacity=capacity,
            rate=rate,
            held=None,
            slots=None,
            waiting=max(0.0, float(state.get("w", 0.0)) - now),
        )
    except (TypeError, ValueError, AttributeError):
        return None
