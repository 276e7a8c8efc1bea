"""The state of one limit on the bus, and the pure steps that change it.

Each limit (an agent's rate limit, or one key's; a budget; one key's concurrency slots) is one
small JSON value on the bus, changed only by the functions here, applied atomically by
`Broker.update_value` (compare-and-set, or one step on the in-memory bus). A function takes
the stored bytes and the time, and returns the bytes to store with its answer; it does no I/O,
so a compare-and-set that lost a race simply runs it again.

Two shapes:

- **Bucket** (rate limits and budgets): a token bucket in the GCRA form. `t` is the time at
  which the bucket is full again (its "theoretical arrival time"): the level at time `now` is
  `capacity - max(0, t - now) * rate`. A start of cost `c` is admitted when the level covers
  `c`, and moves `t` on by `c / rate`. A charge moves it by what was really used, past
  `now + capacity / rate` when that puts the budget in debt.
- **Slots** (per-key concurrency): the holders, each with the time its lease runs out. A
  worker that dies stops renewing; its slot is free once the lease has run out.

Each value also keeps its limit's shape (`r` and `c`, rate and capacity, for a bucket; `n`,
the slots, for slots) as last written by a start, so that `omnidaemon limits` can show a
level without the app's code (`omnidaemon.flow.inspect`).

Both keep `w`, the *waiting horizon*: when a start is refused, it is told to come back at a
time after every start refused before it, and `w` moves past it. Starts that have waited
their turn go before fresh ones (a fresh start is refused while the horizon is ahead), so
waiting events start roughly in the order they were refused and are not overtaken forever.
Times are seconds on the clock of `Broker.clock`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "Decision",
    "bucket_charge",
    "bucket_level",
    "bucket_refund",
    "bucket_take",
    "bucket_take_many",
    "bucket_ttl",
    "slots_release",
    "slots_renew",
    "slots_take",
    "slots_ttl",
]

_MIN_RECHECK = 0.01  # seconds: a refused start never comes back sooner than this
_EMA = 0.2  # weight of the newest observation in the running averages
# Seconds a slot is held, until releases have taught a key better. Short on purpose: a start
# told to come back too early costs one recheck, one told too late leaves a slot idle.
_FIRST_HOLD = 0.05


@dataclass(frozen=True, slots=True)
class Decision:
    """A limit's answer to one start.

    Attributes:
        admitted: Whether it may start now.
        wait: Seconds after which a refused start should ask again (0 when admitted).
        cost: What was reserved (units of a bucket; 0 for slots).
    """

    admitted: bool
    wait: float = 0.0
    cost: float = 0.0


def _load(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}  # written by hand or by another program: start afresh rather than stop
    return value if isinstance(value, dict) else {}


def _dump(state: dict[str, Any]) -> bytes:
    return orjson.dumps(state)


# Buckets -----------------------------------------------------------------------------------


def bucket_take(
    data: bytes | None,
    now: float,
    *,
    cost: float | None,
    rate: float,
    capacity: float,
    waited: bool,
    deadline: float = math.inf,
) -> tuple[bytes, Decision]:
    """Admit a start of `cost` units if the bucket holds them (and, for a start that has not
    waited yet, nobody waits before it); else say when to ask again.

    `cost=None` reserves the running average of what starts were charged (0 before the first
    charge): a budget with no estimate then spaces starts by what they usually use.
    """
    state = _load(data)
    state["r"], state["c"] = rate, capacity  # the limit's shape, for `omnidaemon limits`
    tat = max(float(state.get("t", now)), now)
    horizon = float(state.get("w", 0.0))
    average = float(state.get("a", 0.0))
    needed = average if cost is None else cost
    # Never more than the bucket holds (it would never be admitted), never nothing (a bucket
    # in debt must refuse even a start that reserves nothing).
    needed = min(max(needed, capacity * 1e-9), capacity)
    fits_at = tat + needed / rate - capacity / rate  # the first time the level covers it
    if now >= fits_at and (waited or horizon <= now):
        state["t"] = tat + needed / rate
        return _dump(state), Decision(True, 0.0, needed)
    if waited:
        # Its turn came but the bucket was not ready (a charge put it in debt meanwhile):
        # ask again when it is, keeping its place ahead of the fresh starts.
        start = max(fits_at, now + _MIN_RECHECK)
    else:
        start = max(fits_at, horizon, now + _MIN_RECHECK)
        if start <= deadline:  # one that would expire before its turn takes no turn
            state["w"] = start + needed / rate
    return _dump(state), Decision(False, start - now)


def bucket_take_many(
    data: bytes | None, now: float, *, count: int, rate: float, capacity: float, spare: int = 0
) -> tuple[bytes, int, float]:
    """Take up to `count` whole units the bucket holds now (for starts fetched together),
    and up to `spare` more while the bucket stays at least half full (far from binding, so
    taking them early changes nothing); return `(new state, how many, seconds until one more
    is there when none was)`."""
    state = _load(data)
    state["r"], state["c"] = rate, capacity
    tat = max(float(state.get("t", now)), now)
    level = capacity - (tat - now) * rate
    granted = min(count, int(level + 1e-9))
    if granted == count and spare:
        granted += max(0, min(spare, int(level - granted - capacity / 2)))
    if granted >= 1:
        state["t"] = tat + granted / rate
        return _dump(state), granted, 0.0
    return _dump(state), 0, max((1.0 - level) / rate, _MIN_RECHECK)


def bucket_refund(data: bytes | None, now: float, *, cost: float, rate: float) -> bytes:
    """Give back what `bucket_take` reserved for a start that did not happen after all."""
    state = _load(data)
    if "t" in state:
        state["t"] = float(state["t"]) - cost / rate
    return _dump(state)


def bucket_charge(
    data: bytes | None, now: float, *, used: float, reserved: float, rate: float
) -> bytes:
    """Settle a start's real use: `used` units where `reserved` were taken at admission.

    The difference moves the bucket (into debt, if more was used than it held); `used` feeds
    the running average that starts without an estimate reserve.
    """
    state = _load(data)
    tat = max(float(state.get("t", now)), now)
    state["t"] = tat + (used - reserved) / rate
    average = state.get("a")
    state["a"] = used if average is None else (1 - _EMA) * float(average) + _EMA * used
    return _dump(state)


def bucket_level(data: bytes | None, now: float, *, rate: float, capacity: float) -> float:
    """Units in the bucket at `now`: `capacity` when full, below 0 when in debt."""
    state = _load(data)
    tat = float(state.get("t", now))
    return capacity - max(0.0, tat - now) * rate


def bucket_ttl(data: bytes, now: float, *, rate: float, capacity: float) -> float:
    """Seconds the bucket's value must be kept: until it is full and nobody waits, plus a
    margin; after that, a missing value means the same thing (a full bucket)."""
    state = _load(data)
    until = max(float(state.get("t", now)), float(state.get("w", now)))
    return max(until - now, 0.0) + capacity / rate + 60.0


# Slots -------------------------------------------------------------------------------------


def _holders(state: dict[str, Any], now: float) -> dict[str, float]:
    raw = state.get("h")
    holders = {k: float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    return {token: until for token, until in holders.items() if until > now}


def slots_take(
    data: bytes | None,
    now: float,
    *,
    token: str,
    limit: int,
    lease: float,
    waited: bool,
    deadline: float = math.inf,
) -> tuple[bytes, Decision]:
    """Take one of `limit` slots for `token`, leased for `lease` seconds, if one is free (and,
    for a start that has not waited yet, nobody waits before it); else say when to ask again.

    A refused start is told to come back after its place in the line: one average hold of a
    slot (`d`, learned from releases) per `limit` starts refused before it. One that comes
    back and still finds no slot joins a second line (`v`) of such starts, ahead of fresh
    ones, spaced the same way.
    """
    state = _load(data)
    holders = _holders(state, now)
    horizon = float(state.get("w", 0.0))
    again = float(state.get("v", 0.0))
    hold = float(state.get("d", _FIRST_HOLD))
    state["h"] = holders
    state["n"] = limit  # the limit's shape, for `omnidaemon limits`
    if len(holders) < limit and (waited or max(horizon, again) <= now):
        holders[token] = now + lease
        return _dump(state), Decision(True)
    step = max(hold / limit, _MIN_RECHECK)
    if waited:
        # Back too early (the hold was longer than learned): in the line of those asking
        # again, one turn each, so they recheck about as often as slots free up.
        start = max(again, now) + step
        if start <= deadline:
            state["v"] = start
    else:
        start = max(horizon, again, now) + step
        if start <= deadline:
            state["w"] = start
    return _dump(state), Decision(False, start - now)


def slots_release(data: bytes | None, now: float, *, token: str, held: float | None) -> bytes:
    """Free `token`'s slot; `held` (seconds a handler held it; `None` when none ran) feeds
    the average hold."""
    state = _load(data)
    holders = _holders(state, now)
    holders.pop(token, None)
    state["h"] = holders
    if held is not None:
        hold = state.get("d")
        state["d"] = held if hold is None else (1 - _EMA) * float(hold) + _EMA * held
    return _dump(state)


def slots_renew(
    data: bytes | None, now: float, *, tokens: list[str], lease: float
) -> tuple[bytes, list[str]]:
    """Extend the leases of `tokens` still held; return the ones no longer held (their lease
    ran out, a paused worker's, and the slot may have gone to another start)."""
    state = _load(data)
    holders = _holders(state, now)
    lost = [token for token in tokens if token not in holders]
    for token in tokens:
        if token in holders:
            holders[token] = now + lease
    state["h"] = holders
    return _dump(state), lost


def slots_ttl(data: bytes, now: float, *, lease: float) -> float:
    """Seconds the slots' value must be kept: past every lease and the waiting horizon."""
    state = _load(data)
    holders = _holders(state, now)
    until = max([float(state.get("w", now)), float(state.get("v", now)), now, *holders.values()])
    return until - now + lease + 3600.0
