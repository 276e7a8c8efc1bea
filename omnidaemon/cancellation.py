"""Cancellation on the bus: what `App.cancel` writes, and what every worker follows.

A cancellation is a small record, kept for `cancel_ttl` (OMNIDAEMON_CANCEL_TTL, 7 days by
default): one event (for every agent, or some), or a whole run (every event with one
correlation id). The bus holds three things, all values, so every broker carries them:

- `cancel:event:<id>` and `cancel:run:<correlation id>`: the records themselves, the source
  of truth a starting worker loads in full.
- `cancel:log`: the last `_LOG_SIZE` records, each with a sequence number, so a running
  worker learns of new ones by reading one value.
- `cancel:seq`: the newest sequence number alone, a few bytes: what each worker polls
  (`POLL_INTERVAL`), reading the log only when it moved.

So a worker checks an event against cancellations in memory (no round trip per event), and
learns of a new cancellation within a poll. One that fell out of the log before a worker read
it (more than `_LOG_SIZE` cancels between two polls) is found by loading the records again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

import orjson

if TYPE_CHECKING:
    from omnidaemon.brokers.base import Broker

__all__ = [
    "POLL_INTERVAL",
    "RUN_GRACE",
    "Cancellation",
    "CancelRegistry",
    "cancellation_for",
    "record_cancellation",
]

POLL_INTERVAL = 0.5
"""Seconds between a worker's looks for new cancellations."""

RUN_GRACE = 60.0
"""A run's cancellation covers its events created up to this many seconds after it: those
published meanwhile by its handlers not stopped yet. A later event that reuses the
correlation id starts a new run and is not cancelled."""

_LOG_SIZE = 256
_KEY_MAX = 120  # longer ids are hashed: they name values on the bus
_PREFIX = "cancel:"
_LOG_KEY = "cancel:log"
_SEQ_KEY = "cancel:seq"

CancelKind = Literal["event", "run"]


def _record_key(kind: CancelKind, target: str) -> str:
    if len(target) > _KEY_MAX:
        target = "sha256-" + hashlib.sha256(target.encode()).hexdigest()
    return f"{_PREFIX}{kind}:{target}"


@dataclass(frozen=True, slots=True)
class Cancellation:
    """One cancellation.

    Attributes:
        kind: `"event"` (one event) or `"run"` (every event of a correlation id).
        target: The event id, or the correlation id.
        reason: Why, as given to `App.cancel`: recorded with the outcome and sent to the
            webhook and to a waiting request.
        agents: Only these agents' handling of the event is cancelled; `None`: every agent's.
        at: When it was recorded (seconds since the epoch).
        until: When it is forgotten.
    """

    kind: CancelKind
    target: str
    reason: str
    agents: tuple[str, ...] | None
    at: float
    until: float

    def covers(self, agent: str) -> bool:
        """Whether `agent`'s handling is cancelled."""
        return self.agents is None or agent in self.agents

    def to_json(self) -> dict[str, object]:
        """The record as JSON data."""
        return {
            "kind": self.kind,
            "target": self.target,
            "reason": self.reason,
            "agents": list(self.agents) if self.agents is not None else None,
            "at": self.at,
            "until": self.until,
        }

    @classmethod
    def from_json(cls, data: object) -> Cancellation | None:
        """Read a record; `None` for anything that is not one (never raises)."""
        if not isinstance(data, dict):
            return None
        kind, target, reason = data.get("kind"), data.get("target"), data.get("reason", "")
        agents, at, until = data.get("agents"), data.get("at"), data.get("until")
        if kind not in ("event", "run") or not isinstance(target, str):
            return None
        if not isinstance(at, int | float) or not isinstance(until, int | float):
            return None
        if agents is not None and not (
            isinstance(agents, list) and all(isinstance(a, str) for a in agents)
        ):
            return None
        return cls(
            kind,
            target,
            str(reason),
            tuple(agents) if agents is not None else None,
            float(at),
            float(until),
        )

    def merged(self, earlier: Cancellation | None) -> Cancellation:
        """This cancellation on top of an earlier one of the same target: the agents of both
        (every agent if either said so), the later reason and deadline."""
        if earlier is None or earlier.until < self.at:
            return self
        agents: tuple[str, ...] | None
        if self.agents is None or earlier.agents is None:
            agents = None
        else:
            agents = tuple(sorted({*earlier.agents, *self.agents}))
        return Cancellation(self.kind, self.target, self.reason, agents, self.at, self.until)


def cancellation_for(
    event_id: str | None,
    *,
    correlation_id: str | None,
    reason: str,
    agents: str | Iterable[str] | None,
    now: float,
    ttl: float,
) -> Cancellation:
    """Check what a caller asked to cancel and make its record.

    Raises:
        ValueError: neither or both of `event_id` and `correlation_id`, an empty one, or
            `agents` with a run (a run is cancelled for every agent).
    """
    if (event_id is None) == (correlation_id is None):
        raise ValueError("cancel takes an event id or a correlation_id, one of the two")
    target = event_id if event_id is not None else correlation_id
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"nothing to cancel: {target!r} is not an id")
    if isinstance(agents, str):
        agents = (agents,)
    names = tuple(sorted(set(agents))) if agents is not None else None
    if names is not None and correlation_id is not None:
        raise ValueError("a run is cancelled for every agent: drop agent=, or cancel events")
    if names == ():
        raise ValueError("agent= names no agent: give one or more, or leave it out")
    kind: CancelKind = "event" if event_id is not None else "run"
    return Cancellation(kind, target, reason, names, now, now + ttl)


async def record_cancellation(broker: Broker, cancellation: Cancellation) -> Cancellation:
    """Write a cancellation to the bus (its record, the log, the sequence number), merged with
    an earlier one of the same target; returns what was stored."""
    ttl = max(cancellation.until - cancellation.at, 1.0)

    def merge(current: bytes | None) -> tuple[bytes, float, Cancellation]:
        earlier = Cancellation.from_json(orjson.loads(current)) if current else None
        stored = cancellation.merged(earlier)
        return orjson.dumps(stored.to_json()), ttl, stored

    stored = await broker.update_value(_record_key(cancellation.kind, cancellation.target), merge)

    def append(current: bytes | None) -> tuple[bytes, float, int]:
        log = orjson.loads(current) if current else {}
        items = log.get("items", []) if isinstance(log, dict) else []
        seq = (log.get("seq", 0) if isinstance(log, dict) else 0) + 1
        items = [*items, {**stored.to_json(), "seq": seq}][-_LOG_SIZE:]
        return orjson.dumps({"seq": seq, "items": items}), ttl, seq

    seq = await broker.update_value(_LOG_KEY, append)

    def newest(current: bytes | None) -> tuple[bytes, float, None]:
        known = int(current) if current and current.isdigit() else 0
        return str(max(known, seq)).encode(), ttl, None

    await broker.update_value(_SEQ_KEY, newest)
    return stored


class CancelRegistry:
    """The cancellations one process knows, kept current from the bus by `refresh`.

    `match` is what a worker asks before it starts an event: two dictionary lookups.
    """

    def __init__(self, broker: Broker, *, clock: Callable[[], float] | None = None) -> None:
        self._broker = broker
        self._clock = clock or broker.clock
        self._events: dict[str, Cancellation] = {}
        self._runs: dict[str, Cancellation] = {}
        self._seq: int | None = None  # the newest sequence number applied; None: not loaded

    @property
    def empty(self) -> bool:
        """True while no cancellation is known: the hot path skips `match`."""
        return not self._events and not self._runs

    def match(
        self, event_id: str, correlation_id: str | None, created_at: datetime, agent: str
    ) -> Cancellation | None:
        """The cancellation that covers `agent`'s handling of this event, if any."""
        now = self._clock()
        found = self._events.get(event_id)
        if found is not None and found.until > now and found.covers(agent):
            return found
        if correlation_id is not None:
            run = self._runs.get(correlation_id)
            if run is not None and run.until > now and created_at.timestamp() <= run.at + RUN_GRACE:
                return run
        return None

    def apply(self, cancellations: Iterable[Cancellation]) -> list[Cancellation]:
        """Learn cancellations (merged with known ones); returns those that are news."""
        news = []
        for cancellation in cancellations:
            known = self._events if cancellation.kind == "event" else self._runs
            earlier = known.get(cancellation.target)
            merged = cancellation.merged(earlier)
            if merged != earlier:
                known[cancellation.target] = merged
                news.append(merged)
        return news

    def forget_expired(self) -> None:
        """Drop the cancellations past their `until`."""
        now = self._clock()
        for known in (self._events, self._runs):
            for target in [t for t, c in known.items() if c.until <= now]:
                del known[target]

    async def load(self) -> list[Cancellation]:
        """Read every cancellation the bus keeps; returns those that are news."""
        seq = await self._read_seq()
        records = await self._broker.scan_values(_PREFIX)
        loaded = []
        for key, data in records.items():
            if key in (_LOG_KEY, _SEQ_KEY):
                continue
            try:
                record = Cancellation.from_json(orjson.loads(data))
            except orjson.JSONDecodeError:
                continue
            if record is not None:
                loaded.append(record)
        self._seq = seq
        self.forget_expired()
        return self.apply(loaded)

    async def refresh(self) -> list[Cancellation]:
        """Learn what was cancelled since the last look (one small read when nothing was);
        returns the news."""
        if self._seq is None:
            return await self.load()
        seq = await self._read_seq()
        if seq == self._seq:
            return []
        if seq < self._seq:
            return await self.load()  # the bus lost its values (or they all expired)
        data = await self._broker.get_value(_LOG_KEY)
        log = orjson.loads(data) if data else {}
        items = log.get("items", []) if isinstance(log, dict) else []
        seqs = [item.get("seq", 0) for item in items if isinstance(item, dict)]
        if not seqs or min(seqs) > self._seq + 1:
            return await self.load()  # some fell out of the log before we read it
        fresh = [
            record
            for item in items
            if isinstance(item, dict) and item.get("seq", 0) > self._seq
            if (record := Cancellation.from_json(item)) is not None
        ]
        self._seq = max(seqs)
        self.forget_expired()
        return self.apply(fresh)

    async def _read_seq(self) -> int:
        data = await self._broker.get_value(_SEQ_KEY)
        return int(data) if data and data.isdigit() else 0
