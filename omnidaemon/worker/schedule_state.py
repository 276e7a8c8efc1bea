"""The state of an app's schedules on the bus, and the pure functions that change it.

Two kinds of value, each changed only through `Broker.update_value` (atomic on every bus):

- `schedule:<app>:<name>`, one per schedule: `last`, the tick up to which every tick is
  settled (fired, failed, or skipped as missed); the `claim` of the tick being fired
  (`tick`, `holder`, `until`: a lease, renewed while the holder works); and what the last
  settled tick came to, for `omnidaemon schedules`.
- `schedule-watch:<app>`: when a worker last ran each schedule (`seen`), refreshed every
  `WATCH_EVERY` seconds by every worker that runs it, and the `gaps`: spans longer than
  `GAP_AFTER` in which no worker ran it. A tick that fell due in a gap was *missed* (the
  schedule's `catch_up` decides what happens to it) if the gap ended more than the misfire
  grace after it (`MISFIRE_GRACE`, or the schedule's period if shorter) and no worker had
  claimed it; any other unsettled tick is *owed* and fired, late if need be. The worker that
  first refreshes after a gap records it, in the same atomic step that reads the stamps, so
  every worker agrees on what was missed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import orjson

__all__ = [
    "GAP_AFTER",
    "LEASE",
    "MISFIRE_GRACE",
    "STATE_TTL",
    "WATCH_EVERY",
    "Claim",
    "ScheduleState",
    "state_key",
    "watch_key",
]

LEASE = 5.0  # seconds a claim lasts unless renewed: a dead holder's tick waits this long
WATCH_EVERY = 2.0  # seconds between a worker's refreshes of the watch stamps
GAP_AFTER = 10.0  # seconds without a refresh that make a gap (a fleet outage)
MISFIRE_GRACE = 60.0  # at most this late after a gap, a tick is still owed (see `missed`)
STATE_TTL = 400 * 86_400.0  # kept for over a year: a yearly schedule writes once a year
_GAPS_KEPT = 8  # per schedule: older gaps concern ticks settled long ago

Outcome = Literal["fired", "failed", "empty", "missed"]
Update = Callable[[bytes | None], tuple[bytes, float, Any]]


def state_key(app: str, name: str) -> str:
    """The key of schedule `name`'s state."""
    return f"schedule:{app}:{name}"


def watch_key(app: str) -> str:
    """The key of the app's watch stamps and gaps."""
    return f"schedule-watch:{app}"


@dataclass(slots=True)
class Claim:
    """A worker firing `tick`, until its lease ends at `until` (seconds since the epoch)."""

    tick: float
    holder: str
    until: float


@dataclass(slots=True)
class ScheduleState:
    """One schedule's state on the bus.

    Attributes:
        last: Every tick at or before this is settled.
        claim: The tick being fired, if any.
        fired: The last tick whose event was published.
        outcome: What the last settled tick came to: `fired`, `failed` (its function raised
            or its payload was refused), `empty` (its function returned None), or `missed`
            (ticks that fell due while no worker ran, skipped).
        outcome_tick: That tick.
        error: Why it failed, for `failed`; how many ticks were missed, for `missed`.
    """

    last: float
    claim: Claim | None = None
    fired: float | None = None
    outcome: Outcome | None = None
    outcome_tick: float | None = None
    error: str | None = None

    def encode(self) -> bytes:
        """The state as JSON bytes."""
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> ScheduleState:
        """Read a state written by `encode`. Fields this version does not know are ignored:
        during a rolling upgrade a newer worker may have written some."""
        fields = orjson.loads(data)
        claim = fields.get("claim")
        known = {name: fields[name] for name in _STATE_FIELDS if name in fields}
        held = None
        if claim:
            held = Claim(**{name: claim[name] for name in ("tick", "holder", "until")})
        return cls(**known, claim=held)


_STATE_FIELDS = ("last", "fired", "outcome", "outcome_tick", "error")


def _stored(state: ScheduleState, answer: Any) -> tuple[bytes, float, Any]:
    return state.encode(), STATE_TTL, answer


def start(now: float) -> Update:
    """Read the state, making it if there is none: a new schedule starts from `now` (it does
    not fire for the past). Answers the state."""

    def update(current: bytes | None) -> tuple[bytes, float, Any]:
        state = ScheduleState(last=now) if current is None else ScheduleState.decode(current)
        return _stored(state, state)

    return update


def claim(tick: float, holder: str, now: float) -> Update:
    """Claim `tick` for `holder`. Answers `("done", state)` (settled already), `("mine",
    state)`, or `(until, state)`: the other holder's lease ends at `until`."""

    def update(current: bytes | None) -> tuple[bytes, float, Any]:
        # No state (the bus lost it): as for a new schedule, the past is not fired.
        state = ScheduleState(last=now) if current is None else ScheduleState.decode(current)
        if state.last >= tick:
            return _stored(state, ("done", state))
        held = state.claim
        if held is not None and held.holder != holder and held.until > now:
            return _stored(state, (held.until, state))
        state.claim = Claim(tick, holder, now + LEASE)
        return _stored(state, ("mine", state))

    return update


def renew(tick: float, holder: str, now: float) -> Update:
    """Extend `holder`'s lease on `tick`; answers whether it still held it."""

    def update(current: bytes | None) -> tuple[bytes, float, Any]:
        state = ScheduleState(last=now) if current is None else ScheduleState.decode(current)
        held = state.claim
        mine = held is not None and held.holder == holder and held.tick == tick
        if mine:
            state.claim = Claim(tick, holder, now + LEASE)
        return _stored(state, mine)

    return update


def settle(tick: float, outcome: Outcome, error: str | None = None) -> Update:
    """Record `tick` (and every tick before it) as settled with `outcome`; answers the state.
    Settling twice (a holder whose lease ran out, and the one that took over) is harmless."""

    def update(current: bytes | None) -> tuple[bytes, float, Any]:
        state = ScheduleState(last=tick) if current is None else ScheduleState.decode(current)
        if state.claim is not None and state.claim.tick <= tick:
            state.claim = None
        if tick >= state.last:
            state.last = tick
            state.outcome, state.outcome_tick, state.error = outcome, tick, error
        if outcome == "fired" and (state.fired is None or tick > state.fired):
            state.fired = tick
        return _stored(state, state)

    return update


def watch(names: Iterable[str], now: float, gap_after: float) -> Update:
    """Stamp `names` as run at `now`, recording a gap for each one not run for more than
    `gap_after` seconds (or never stamped: a gap from the epoch). Answers the recorded gaps
    of `names`: `{name: [(start, end)]}`."""
    names = list(names)

    def update(current: bytes | None) -> tuple[bytes, float, Any]:
        record: dict[str, Any] = (
            {"seen": {}, "gaps": {}} if current is None else orjson.loads(current)
        )
        seen: dict[str, float] = record["seen"]
        gaps: dict[str, list[list[float]]] = record["gaps"]
        for name in names:
            before = seen.get(name)
            if before is None:
                # Never run (a new schedule, whose state starts now anyway), or its stamp is
                # gone: nothing says a worker ran it, so its past ticks count as missed.
                gaps[name] = [[0.0, now]]
            elif now - before > gap_after:
                gaps[name] = [*gaps.get(name, []), [before, now]][-_GAPS_KEPT:]
            seen[name] = now if before is None else max(before, now)  # clocks may disagree
        answer = {name: [(a, b) for a, b in gaps.get(name, [])] for name in names}
        return orjson.dumps(record), STATE_TTL, answer

    return update


def in_gap(tick: float, gaps: Iterable[tuple[float, float]]) -> tuple[float, float] | None:
    """The gap `tick` fell due in, if any."""
    return next(((a, b) for a, b in gaps if a < tick <= b), None)
