"""DeadLetter: the record kept for an event an agent gave up on; reading records back, where
one that is not a worker's (written into the bus by hand, or damaged) is reported, never raised.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, field_validator

from omnidaemon.envelope import Envelope, dumps
from omnidaemon.observability.logging import get_logger

__all__ = [
    "DeadLetter",
    "ReplaySelection",
    "UndecodableRecord",
    "read_dead_letters",
    "warn_undecodable",
]

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])

_log = get_logger("omnidaemon")


class DeadLetter(BaseModel):
    """An event in an agent's dead-letter queue, with why it is there.

    Attributes:
        event_id: The event's id, or `None` if the entry could not be decoded at all.
        topic: The topic the event was consumed from.
        agent: The agent that gave up on it.
        entry: The bus entry exactly as it was published (for replay).
        error_type: The exception's class name (`ValidationError`, `Reject`, `TimeoutError`, ...).
        error_message: The exception's message.
        traceback: The formatted traceback, where there was one.
        attempts: How many times the agent was handed the event.
        failed_at: When the agent gave up (UTC).
    """

    model_config = ConfigDict(frozen=True)

    event_id: str | None
    topic: str
    agent: str
    entry: str
    error_type: str
    error_message: str
    traceback: str | None = None
    attempts: int
    failed_at: datetime

    @field_validator("failed_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        # Workers write UTC with its offset; a record written by hand may lack one, and naive
        # and aware times cannot be sorted together.
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    @property
    def envelope(self) -> Envelope[Any] | None:
        """The decoded envelope, or `None` if the entry is not a readable envelope."""
        try:
            return _ANY_ENVELOPE.validate_json(self.entry)
        except ValidationError:
            return None

    @property
    def payload(self) -> Any:
        """The event's payload as plain JSON data, or `None` if the entry is unreadable."""
        envelope = self.envelope
        return envelope.payload if envelope is not None else None

    def encode(self) -> bytes:
        """The record as JSON bytes, as brokers store it."""
        return dumps(self.model_dump())

    @classmethod
    def decode(cls, data: bytes) -> DeadLetter:
        """Read a record written by `encode`."""
        return cls.model_validate_json(data)


@dataclass(frozen=True, slots=True)
class UndecodableRecord:
    """A record in a dead-letter queue that is not a readable `DeadLetter`: written into the
    bus by something other than a worker, or damaged. Listing skips it and replay leaves it
    where it is; `omnidaemon bus purge TOPIC --dlq` (or deleting the record by its id on the
    bus) removes it.

    Attributes:
        record_id: The record's id in the queue (on Redis, the dead-letter stream entry's id).
        topic: The topic whose dead-letter queue holds it.
        agent: The agent whose dead-letter queue holds it.
        reason: Why it cannot be read.
    """

    record_id: str
    topic: str
    agent: str
    reason: str


def _read(record_id: str, data: bytes, topic: str, agent: str) -> DeadLetter | UndecodableRecord:
    if not data:
        return UndecodableRecord(record_id, topic, agent, "empty record (no record data)")
    try:
        return DeadLetter.decode(data)
    except ValidationError as exc:
        # The reason names what is wrong, never what the record holds (include_input=False):
        # the record is whatever its writer put there.
        errors = exc.errors(include_url=False, include_input=False)
        if errors and errors[0]["type"] == "json_invalid":
            reason = f"not JSON: {errors[0]['msg']}"
        else:
            reason = "not a dead-letter record: " + "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in errors[:3]
            )
        return UndecodableRecord(record_id, topic, agent, reason)


def read_dead_letters(
    records: Iterable[tuple[str, bytes]], topic: str, agent: str
) -> tuple[list[DeadLetter], list[UndecodableRecord]]:
    """Decode the `(record id, record)` pairs of `agent`'s dead-letter queue on `topic` (as
    `Broker.dead_letters` returns them): the readable records, and those that are not."""
    letters: list[DeadLetter] = []
    undecodable: list[UndecodableRecord] = []
    for record_id, data in records:
        found = _read(record_id, data, topic, agent)
        if isinstance(found, DeadLetter):
            letters.append(found)
        else:
            undecodable.append(found)
    return letters, undecodable


def warn_undecodable(records: Iterable[UndecodableRecord], skipped: str) -> None:
    """Log each undecodable record, for callers that have nowhere else to report them."""
    for r in records:
        _log.warning(
            f"dead-letter record cannot be read; {skipped}",
            record_id=r.record_id,
            topic=r.topic,
            agent=r.agent,
            reason=r.reason,
        )


class ReplaySelection:
    """The `select` of `Broker.replay_dead_letters`: re-queues the entry of each readable
    record (of the named events only, when `event_ids` is given) and leaves undecodable
    records where they are.

    Attributes:
        chosen: The event ids of the records chosen, in queue order.
        undecodable: The records that could not be read, so were not replayed.
    """

    def __init__(self, topic: str, agent: str, event_ids: Collection[str] | None = None) -> None:
        self._topic = topic
        self._agent = agent
        self._event_ids = event_ids
        self.chosen: list[str | None] = []
        self.undecodable: list[UndecodableRecord] = []

    def __call__(self, record_id: str, data: bytes) -> bytes | None:
        found = _read(record_id, data, self._topic, self._agent)
        if isinstance(found, UndecodableRecord):
            self.undecodable.append(found)
            return None
        if self._event_ids is not None and found.event_id not in self._event_ids:
            return None
        self.chosen.append(found.event_id)
        return found.entry.encode()
