"""The envelope: what one event looks like on the bus.

An envelope is immutable once published. On the wire it is one JSON object encoded with orjson:

```json
{"v": 1, "id": "0193...", "topic": "document.uploaded", "payload": {...},
 "created_at": "2026-11-24T10:30:00.123456Z", "correlation_id": "...", "causation_id": null,
 "reply_to": null, "webhook": null, "source": "docs", "tenant_id": null, "headers": {}}
```

This module does no I/O.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import orjson
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from omnidaemon._json_limits import MAX_NESTING

__all__ = [
    "MAX_NESTING",
    "WIRE_VERSION",
    "Envelope",
    "UnsupportedVersion",
    "dumps",
    "encode_new",
    "new_event_id",
    "validate_topic",
]

WIRE_VERSION = 1
"""The envelope version this release writes and reads."""

PayloadT = TypeVar("PayloadT")

_TOPIC_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
_MAX_TOPIC_LENGTH = 200


# Topics already found valid: an app publishes to a handful of them, and the regular
# expression costs more than the rest of checking a publish.
_VALID_TOPICS: set[str] = set()
_MAX_REMEMBERED_TOPICS = 10_000


def validate_topic(topic: str) -> str:
    """Return `topic` if it is a valid topic name, else raise `ValueError`.

    A topic is dot-separated words of lowercase letters, digits, `_` and `-`
    (`document.uploaded`, `billing.invoice-paid`).
    """
    if type(topic) is str and topic in _VALID_TOPICS:
        return topic
    if (
        not isinstance(topic, str)
        or len(topic) > _MAX_TOPIC_LENGTH
        or not _TOPIC_RE.fullmatch(topic)
    ):
        raise ValueError(
            f"invalid topic name {topic!r}: use dot-separated words of [a-z0-9_-], "
            "e.g. 'document.uploaded'"
        )
    if type(topic) is str and len(_VALID_TOPICS) < _MAX_REMEMBERED_TOPICS:
        _VALID_TOPICS.add(topic)
    return topic


def _id_prefix(ms: int) -> str:
    """An id's first 15 characters: the 48-bit millisecond time and the version digit."""
    return f"{ms >> 16 & 0xFFFF_FFFF:08x}-{ms & 0xFFFF:04x}-7"


class _IdClock:
    """UUIDv7 generator (RFC 9562), monotonic within one process.

    Within one millisecond the 12-bit `rand_a` field is a counter started at a random value, so
    ids made by one process sort in the order they were made. The 62 random bits of `rand_b`
    come from the OS.
    """

    _BATCH = 256  # random tails made at once

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_ms = 0
        self._counter = 0
        self._prefix = ""  # the id's first 15 characters, the same for one millisecond
        # The random part of each id ("vxxx-xxxxxxxxxxxx", variant bits included) is made a
        # batch at a time from one `os.urandom` call, in a tight loop: making ids one by one
        # between network round trips, each step costs several times what it costs here.
        self._tails: list[str] = []

    def forget_random(self) -> None:
        """Drop the prepared random parts (a forked child must not reuse its parent's)."""
        with self._lock:
            self._tails = []

    def _refill(self) -> None:
        raw = os.urandom(8 * self._BATCH)
        mask = 0x3FFF_FFFF_FFFF_FFFF
        self._tails = [
            f"{0x8000 | value >> 48:04x}-{value & 0xFFFF_FFFF_FFFF:012x}"  # variant 0b10
            for value in (int.from_bytes(raw[i : i + 8]) & mask for i in range(0, len(raw), 8))
        ]

    def next(self) -> str:
        with self._lock:
            if not self._tails:
                self._refill()
            tail = self._tails.pop()
            ms = time.time_ns() // 1_000_000
            if ms > self._last_ms:
                self._last_ms = ms
                # A random start in 0..0x7FF, leaving room to count up within the millisecond.
                self._counter = int(tail[-3:], 16) & 0x7FF
                self._prefix = _id_prefix(ms)
            else:
                self._counter += 1
                if self._counter > 0xFFF:
                    # Counter exhausted: borrow the next millisecond rather than repeat an id.
                    self._last_ms += 1
                    self._counter = 0
                    self._prefix = _id_prefix(self._last_ms)
            return f"{self._prefix}{self._counter:03x}-{tail}"


_ids = _IdClock()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.forget_random)


def new_event_id() -> str:
    """Return a new time-ordered event id (a UUIDv7 string)."""
    return _ids.next()


def _default(obj: Any) -> Any:
    # orjson handles dataclasses, datetimes, UUIDs and enums itself; pydantic models are ours to do.
    if isinstance(obj, BaseModel):
        # Serialised by pydantic's own (Rust) JSON serialiser and spliced in as it is: no
        # intermediate dict.
        return orjson.Fragment(obj.__pydantic_serializer__.to_json(obj))
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_DUMPS_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NON_STR_KEYS


def dumps(value: Any) -> bytes:
    """Encode `value` as JSON bytes, the way omnidaemon puts anything on the bus.

    Pydantic models, dataclasses, datetimes, UUIDs and enums are encoded; anything else that
    JSON cannot hold raises `TypeError`.
    """
    return orjson.dumps(value, default=_default, option=_DUMPS_OPTIONS)


def encode_new(
    topic: str,
    payload: Any,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    reply_to: str | None = None,
    webhook: str | None = None,
    source: str | None = None,
    tenant_id: str | None = None,
    headers: dict[str, str] | None = None,
    expires_at: datetime | None = None,
) -> tuple[str, bytes]:
    """Encode a new event straight to its wire form; return `(event_id, data)`.

    What publishing uses: the same bytes as `Envelope.new(...).encode()`, without building a
    model first. The correlation id defaults to the new event's own id. The arguments may be
    passed by position, in this order (publishing does: it is measurably cheaper).
    """
    if type(topic) is not str or topic not in _VALID_TOPICS:
        validate_topic(topic)
    if reply_to is not None:
        validate_topic(reply_to)
    event_id = _ids.next()
    fields = {
        "v": WIRE_VERSION,
        "id": event_id,
        "topic": topic,
        "payload": payload,
        "created_at": datetime.now(UTC),
        "correlation_id": correlation_id or event_id,
        "causation_id": causation_id,
        "reply_to": reply_to,
        "webhook": webhook,
        "source": source,
        "tenant_id": tenant_id,
        "headers": headers or {},
    }
    if expires_at is not None:
        # Written only when set: most events have none, and every byte is on the hot path.
        fields["expires_at"] = expires_at
    return event_id, dumps(fields)


class UnsupportedVersion(ValueError):
    """An envelope was written by a newer omnidaemon than this one."""

    @classmethod
    def of(cls, version: int) -> UnsupportedVersion:
        """The error for an envelope that claims wire version `version`."""
        # Only a newer version calls for an upgrade; 0 or -1 was never written by omnidaemon.
        advice = "upgrade the workers" if version > WIRE_VERSION else "no release writes it"
        return cls(
            f"envelope version {version} is not supported by this omnidaemon "
            f"(it reads version {WIRE_VERSION}); {advice}"
        )


class Envelope(BaseModel, Generic[PayloadT]):
    """One event: its payload and the metadata that routes and traces it.

    Handlers usually receive only the payload; the envelope is `ctx.event`. Build one with
    `Envelope.new` rather than by hand.

    Attributes:
        v: The wire version (currently 1).
        id: Time-ordered unique id (UUIDv7).
        topic: Where it was published, e.g. `document.uploaded`.
        payload: The event's data, validated into the handler's payload type.
        created_at: When it was published (UTC).
        correlation_id: Shared by every event of one conversation or workflow.
        causation_id: The id of the event whose handler published this one.
        reply_to: A topic that the handler's return value is sent to.
        webhook: A URL that the outcome is POSTed to.
        source: The name of the app that published it.
        tenant_id: Free-form tenant marker, carried unchanged.
        headers: String metadata carried unchanged (tracing context, for example).
        expires_at: When it expires: an event not started by then is dead-lettered as
            `Expired` without running (`None`: never).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    v: int = WIRE_VERSION
    id: str
    topic: str
    payload: PayloadT
    created_at: datetime
    correlation_id: str | None = None
    causation_id: str | None = None
    reply_to: str | None = None
    webhook: str | None = None
    source: str | None = None
    tenant_id: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    expires_at: datetime | None = None

    @classmethod
    def new(
        cls,
        topic: str,
        payload: PayloadT,
        *,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        reply_to: str | None = None,
        webhook: str | None = None,
        source: str | None = None,
        tenant_id: str | None = None,
        headers: dict[str, str] | None = None,
        expires_at: datetime | None = None,
    ) -> Envelope[PayloadT]:
        """Make a new envelope with a fresh id and the current time.

        The correlation id defaults to the new event's own id, so every chain of events has one.
        """
        event_id = new_event_id()
        return cls.model_construct(
            v=WIRE_VERSION,
            id=event_id,
            topic=validate_topic(topic),
            payload=payload,
            created_at=datetime.now(UTC),
            correlation_id=correlation_id or event_id,
            causation_id=causation_id,
            reply_to=validate_topic(reply_to) if reply_to is not None else None,
            webhook=webhook,
            source=source,
            tenant_id=tenant_id,
            headers=dict(headers) if headers else {},
            expires_at=expires_at,
        )

    def encode(self) -> bytes:
        """Return the wire form: orjson-encoded JSON bytes."""
        fields = {
            "v": self.v,
            "id": self.id,
            "topic": self.topic,
            "payload": self.payload,
            "created_at": self.created_at,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "reply_to": self.reply_to,
            "webhook": self.webhook,
            "source": self.source,
            "tenant_id": self.tenant_id,
            "headers": self.headers,
        }
        if self.expires_at is not None:
            fields["expires_at"] = self.expires_at
        return dumps(fields)

    @staticmethod
    def check_version(data: bytes) -> None:
        """Raise `UnsupportedVersion` if `data` claims a wire version this release cannot read.

        Called on the error path only, to tell a version mismatch from a malformed entry.
        """
        # pydantic-core's parser, the one the envelope was validated with: orjson reads an
        # integer beyond 64 bits as a float, and a version of 10**30 was then not recognised.
        try:
            version = pydantic_core.from_json(data).get("v")
        except (ValueError, AttributeError):
            return
        # `type(...) is int`: a JSON `true` or `false` is no version at all.
        if type(version) is int and version != WIRE_VERSION:
            raise UnsupportedVersion.of(version)
