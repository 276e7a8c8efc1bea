"""The envelope: building, encoding, decoding, ids, and the version check."""

import dataclasses
import enum
import threading
import time
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any

import orjson
import pytest
from pydantic import BaseModel, TypeAdapter, ValidationError

from omnidaemon import Envelope
from omnidaemon.envelope import (
    WIRE_VERSION,
    UnsupportedVersion,
    dumps,
    new_event_id,
    validate_topic,
)

ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])

WIRE_KEYS = {
    "v",
    "id",
    "topic",
    "payload",
    "created_at",
    "correlation_id",
    "causation_id",
    "reply_to",
    "webhook",
    "source",
    "tenant_id",
    "headers",
}


class Upload(BaseModel):
    file_path: str
    user_id: str
    at: datetime | None = None


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Colour(enum.Enum):
    RED = "red"


def id_millis(event_id: str) -> int:
    return uuid.UUID(event_id).int >> 80


# Round trip ----------------------------------------------------------------------------------


def test_round_trip_keeps_every_field() -> None:
    original = Envelope.new(
        "document.uploaded",
        {"file_path": "a.pdf", "pages": [1, 2], "meta": {"ok": True, "ratio": 0.5, "n": None}},
        correlation_id="corr-1",
        causation_id="cause-1",
        reply_to="document.replies",
        webhook="https://example.com/hook",
        source="docs",
        tenant_id="tenant-7",
        headers={"traceparent": "00-abc-def-01", "x": "y"},
    )
    decoded = ANY_ENVELOPE.validate_json(original.encode())

    assert decoded.v == WIRE_VERSION == 1
    assert decoded.id == original.id
    assert decoded.topic == "document.uploaded"
    assert decoded.payload == {
        "file_path": "a.pdf",
        "pages": [1, 2],
        "meta": {"ok": True, "ratio": 0.5, "n": None},
    }
    assert decoded.created_at == original.created_at
    assert decoded.created_at.utcoffset() == timedelta(0)
    assert decoded.correlation_id == "corr-1"
    assert decoded.causation_id == "cause-1"
    assert decoded.reply_to == "document.replies"
    assert decoded.webhook == "https://example.com/hook"
    assert decoded.source == "docs"
    assert decoded.tenant_id == "tenant-7"
    assert decoded.headers == {"traceparent": "00-abc-def-01", "x": "y"}
    assert decoded == original
    # Encoding the decoded envelope gives the same bytes: nothing drifts over hops.
    assert decoded.encode() == original.encode()


def test_wire_form_is_one_json_object_with_the_documented_keys() -> None:
    envelope = Envelope.new("document.uploaded", {"a": 1})
    wire = orjson.loads(envelope.encode())
    assert set(wire) == WIRE_KEYS
    assert wire["v"] == 1
    assert wire["id"] == envelope.id
    assert wire["topic"] == "document.uploaded"
    assert wire["payload"] == {"a": 1}
    assert wire["created_at"].endswith("Z")
    assert datetime.fromisoformat(wire["created_at"]) == envelope.created_at
    assert wire["headers"] == {}
    for key in ("causation_id", "reply_to", "webhook", "source", "tenant_id"):
        assert wire[key] is None


def test_defaults_of_a_new_envelope() -> None:
    before = datetime.now(UTC)
    envelope = Envelope.new("document.uploaded", None)
    after = datetime.now(UTC)
    assert envelope.v == 1
    assert envelope.payload is None
    assert before <= envelope.created_at <= after
    assert envelope.created_at.tzinfo is not None
    assert envelope.causation_id is None
    assert envelope.reply_to is None
    assert envelope.webhook is None
    assert envelope.source is None
    assert envelope.tenant_id is None
    assert envelope.headers == {}


def test_decoding_into_a_typed_envelope_validates_the_payload() -> None:
    data = Envelope.new("document.uploaded", {"file_path": "a.pdf", "user_id": "u1"}).encode()
    decoded = TypeAdapter(Envelope[Upload]).validate_json(data)
    assert decoded.payload == Upload(file_path="a.pdf", user_id="u1")
    bad = Envelope.new("document.uploaded", {"file_path": "a.pdf"}).encode()
    with pytest.raises(ValidationError):
        TypeAdapter(Envelope[Upload]).validate_json(bad)


def test_unknown_wire_fields_are_ignored_and_missing_ones_refused() -> None:
    wire = orjson.loads(Envelope.new("document.uploaded", {"a": 1}).encode())
    decoded = ANY_ENVELOPE.validate_json(orjson.dumps({**wire, "added_in_v1_5": "x"}))
    assert decoded.payload == {"a": 1}
    assert not hasattr(decoded, "added_in_v1_5")
    for required in ("id", "topic", "payload", "created_at"):
        partial = {k: v for k, v in wire.items() if k != required}
        with pytest.raises(ValidationError):
            ANY_ENVELOPE.validate_json(orjson.dumps(partial))


def test_minimal_wire_form_decodes_with_defaults() -> None:
    """An envelope written by hand (another language, a shell) needs only the core fields."""
    data = orjson.dumps(
        {"id": "x", "topic": "a.b", "payload": [1], "created_at": "2026-01-02T03:04:05Z"}
    )
    decoded = ANY_ENVELOPE.validate_json(data)
    assert decoded.v == 1
    assert decoded.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert decoded.correlation_id is None
    assert decoded.headers == {}


# Ids -----------------------------------------------------------------------------------------


def test_id_is_a_uuid7() -> None:
    envelope = Envelope.new("document.uploaded", {})
    parsed = uuid.UUID(envelope.id)
    assert str(parsed) == envelope.id  # canonical lowercase 8-4-4-4-12 form
    assert parsed.version == 7
    assert (parsed.int >> 76) & 0xF == 7
    assert parsed.variant == uuid.RFC_4122
    assert (parsed.int >> 62) & 0b11 == 0b10


def test_id_timestamp_is_now() -> None:
    before_ms = time.time_ns() // 1_000_000
    envelope = Envelope.new("document.uploaded", {})
    after_ms = time.time_ns() // 1_000_000
    ms = id_millis(envelope.id)
    # The generator may run a few ms ahead of the clock after a burst; never behind it.
    assert before_ms <= ms <= after_ms + 1_000
    created_ms = envelope.created_at.timestamp() * 1000
    assert abs(created_ms - ms) < 1_000


def test_ten_thousand_ids_are_unique_and_time_ordered() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [Envelope.new("document.uploaded", None).id for _ in range(10_000)]
    after_ms = time.time_ns() // 1_000_000

    assert len(set(ids)) == 10_000
    assert all(a < b for a, b in pairwise(ids))  # as strings, strictly increasing
    ints = [uuid.UUID(i).int for i in ids]
    assert all(a < b for a, b in pairwise(ints))  # and as 128-bit numbers
    for event_id in ids:
        parsed = uuid.UUID(event_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
    assert before_ms <= id_millis(ids[0])
    assert id_millis(ids[-1]) <= after_ms + 1_000


def test_ids_made_on_many_threads_are_unique() -> None:
    results: list[list[str]] = [[] for _ in range(8)]

    def make(slot: list[str]) -> None:
        slot.extend(new_event_id() for _ in range(2_000))

    threads = [threading.Thread(target=make, args=(slot,)) for slot in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    every_id = [i for slot in results for i in slot]
    assert len(every_id) == 16_000
    assert len(set(every_id)) == 16_000
    for slot in results:  # each thread still sees its own ids in order
        assert slot == sorted(slot)


def test_correlation_id_defaults_to_the_events_own_id() -> None:
    envelope = Envelope.new("document.uploaded", {})
    assert envelope.correlation_id == envelope.id
    decoded = ANY_ENVELOPE.validate_json(envelope.encode())
    assert decoded.correlation_id == decoded.id == envelope.id

    chained = Envelope.new("text.extracted", {}, correlation_id=envelope.id)
    assert chained.correlation_id == envelope.id
    assert chained.id != envelope.id


# Immutability --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("topic", "other.topic"), ("payload", {}), ("id", "x"), ("correlation_id", "c")],
)
def test_envelope_is_frozen(field: str, value: Any) -> None:
    envelope = Envelope.new("document.uploaded", {"a": 1})
    with pytest.raises(ValidationError, match="frozen"):
        setattr(envelope, field, value)
    assert envelope.topic == "document.uploaded"
    assert envelope.payload == {"a": 1}


def test_decoded_envelope_is_frozen_too() -> None:
    decoded = ANY_ENVELOPE.validate_json(Envelope.new("document.uploaded", 1).encode())
    with pytest.raises(ValidationError, match="frozen"):
        decoded.topic = "other.topic"  # type: ignore[misc]


def test_headers_are_copied_from_the_caller() -> None:
    headers = {"k": "v"}
    envelope = Envelope.new("document.uploaded", {}, headers=headers)
    headers["k"] = "changed"
    headers["new"] = "x"
    assert envelope.headers == {"k": "v"}


# Payload encoding ---------------------------------------------------------------------------


def test_pydantic_model_payload_is_encoded() -> None:
    upload = Upload(
        file_path="a.pdf", user_id="u1", at=datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    )
    envelope = Envelope.new("document.uploaded", upload)
    wire = orjson.loads(envelope.encode())
    assert wire["payload"] == {
        "file_path": "a.pdf",
        "user_id": "u1",
        "at": "2026-01-02T03:04:05.600000Z",
    }
    decoded = TypeAdapter(Envelope[Upload]).validate_json(envelope.encode())
    assert decoded.payload == upload


def test_nested_models_dataclasses_and_scalars_are_encoded() -> None:
    when = datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC)
    event_uuid = uuid.UUID("01234567-89ab-7def-8123-456789abcdef")
    payload = {
        "models": [Upload(file_path="a", user_id="u")],
        "point": Point(1, 2),
        "when": when,
        "offset_when": datetime(2026, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2))),
        "day": date(2026, 5, 6),
        "uuid": event_uuid,
        "colour": Colour.RED,
        "tuple": (1, "two"),
    }
    wire = orjson.loads(Envelope.new("document.uploaded", payload).encode())["payload"]
    assert wire == {
        "models": [{"file_path": "a", "user_id": "u", "at": None}],
        "point": {"x": 1, "y": 2},
        "when": "2026-05-06T07:08:09Z",
        "offset_when": "2026-05-06T09:08:09+02:00",
        "day": "2026-05-06",
        "uuid": str(event_uuid),
        "colour": "red",
        "tuple": [1, "two"],
    }


def test_dataclass_payload_is_encoded() -> None:
    wire = orjson.loads(Envelope.new("shapes.moved", Point(3, 4)).encode())
    assert wire["payload"] == {"x": 3, "y": 4}


def test_non_string_keys_are_encoded_as_strings() -> None:
    wire = orjson.loads(Envelope.new("a.b", {1: "one"}).encode())
    assert wire["payload"] == {"1": "one"}


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(object(), id="object"),
        pytest.param({"nested": object()}, id="nested-object"),
        pytest.param({1, 2}, id="set"),
        pytest.param(2**64, id="int-beyond-64-bit"),
        pytest.param(lambda: None, id="function"),
    ],
)
def test_unencodable_payload_is_a_type_error(payload: Any) -> None:
    envelope = Envelope.new("document.uploaded", payload)
    with pytest.raises(TypeError):
        envelope.encode()
    with pytest.raises(TypeError):
        dumps(payload)


def test_unencodable_payload_error_names_the_type() -> None:
    class Widget:
        pass

    with pytest.raises(TypeError, match="Widget"):
        Envelope.new("document.uploaded", {"w": Widget()}).encode()


# Topic names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    ["orders", "document.uploaded", "billing.invoice-paid", "a_b.c-d.0", "x" * 200, "1.2.3"],
)
def test_validate_topic_returns_a_good_topic(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "Document.Uploaded",
        "document uploaded",
        "",
        ".document",
        "document.",
        "document..uploaded",
        "document/uploaded",
        "omni:{x}",
        "dökument",
        "x" * 201,
        None,
        42,
    ],
)
def test_validate_topic_refuses_a_bad_topic(topic: Any) -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        validate_topic(topic)


def test_validate_topic_refuses_a_trailing_newline() -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        validate_topic("document.uploaded\n")


def test_new_refuses_a_bad_topic_or_reply_to() -> None:
    with pytest.raises(ValueError, match="invalid topic name"):
        Envelope.new("Bad Topic", {})
    with pytest.raises(ValueError, match="invalid topic name"):
        Envelope.new("good.topic", {}, reply_to="Bad Reply")


# Version check ------------------------------------------------------------------------------


def test_check_version_refuses_a_newer_envelope() -> None:
    wire = orjson.loads(Envelope.new("document.uploaded", {}).encode())
    with pytest.raises(UnsupportedVersion, match="version 2") as info:
        Envelope.check_version(orjson.dumps({**wire, "v": 2}))
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(None, id="current-envelope"),
        pytest.param(b'{"v": 1}', id="v1"),
        pytest.param(b'{"id": "x"}', id="no-version"),
        pytest.param(b'{"v": "2"}', id="version-not-an-int"),
        pytest.param(b"not json at all", id="garbage"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x00", id="not-utf8"),
        pytest.param(b"[1, 2]", id="json-array"),
        pytest.param(b"null", id="json-null"),
        pytest.param(b"7", id="json-number"),
    ],
)
def test_check_version_passes_v1_and_garbage(data: bytes | None) -> None:
    if data is None:
        data = Envelope.new("document.uploaded", {}).encode()
    assert Envelope.check_version(data) is None


def test_envelope_type_adapter_accepts_bytes_and_str() -> None:
    data = Envelope.new("document.uploaded", {"a": 1}).encode()
    assert ANY_ENVELOPE.validate_json(data) == ANY_ENVELOPE.validate_json(data.decode())


def test_a_forked_child_makes_ids_of_its_own() -> None:
    import os

    new_event_id()  # the parent has random bytes buffered
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, ",".join(new_event_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = set(os.read(read, 100_000).decode().split(","))
    os.close(read)
    parent = {new_event_id() for _ in range(50)}
    # The random part (after the time and counter) must differ: the pool was not inherited.
    assert {i[19:] for i in child}.isdisjoint({i[19:] for i in parent})
