"""DeadLetter: the record kept for an event an agent gave up on."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from omnidaemon.envelope import Envelope, dumps

__all__ = ["DeadLetter"]

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])


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
