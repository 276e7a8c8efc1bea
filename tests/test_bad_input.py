"""Bad input never crashes or stalls a worker, and oversized events are refused (issue 7).

Entries are written straight into a topic's stream with `broker.publish(topic, raw_bytes)`,
as a buggy or hostile producer would, bypassing `App.publish`. Whatever they hold, each must
end in the agent's dead-letter queue at once with a specific reason, and the good event
published right after it must be handled: the consume loop neither crashed nor stalled.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter, ValidationError

from omnidaemon import (
    App,
    ConfigurationError,
    Context,
    OmniDaemonError,
    PayloadTooLarge,
)
from omnidaemon.brokers import Broker, MemoryBroker, RedisBroker
from omnidaemon.envelope import Envelope
from omnidaemon.settings import Settings
from omnidaemon.testing import TestApp

TOPIC = "order.placed"
MIB = 1_048_576


class Order(BaseModel):
    order_id: str
    amount: int


_ORDER: TypeAdapter[Order] = TypeAdapter(Order)


def wire(**changes: Any) -> dict[str, Any]:
    """A valid envelope of a good order on TOPIC, as JSON data, with `changes` applied."""
    fields = orjson.loads(Envelope.new(TOPIC, {"order_id": "bad", "amount": 1}).encode())
    return {**fields, **changes}


def encode(value: Any) -> bytes:
    # The standard library's encoder: it writes integers of any size, which orjson refuses.
    return json.dumps(value, ensure_ascii=False).encode()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# --- max_payload_bytes: the setting ----------------------------------------------------------


def test_max_payload_bytes_defaults_to_one_mib_and_reads_the_environment() -> None:
    assert Settings().max_payload_bytes == MIB
    assert Settings.from_env({}).max_payload_bytes == MIB
    assert Settings.from_env({"OMNIDAEMON_MAX_PAYLOAD_BYTES": ""}).max_payload_bytes == MIB
    env = {"OMNIDAEMON_MAX_PAYLOAD_BYTES": "4096"}
    assert Settings.from_env(env).max_payload_bytes == 4096


@pytest.mark.parametrize("raw", ["abc", "1.5", "0", "-1", "1MiB"])
def test_a_bad_max_payload_bytes_is_a_configuration_error(raw: str) -> None:
    with pytest.raises(
        ConfigurationError, match=rf"OMNIDAEMON_MAX_PAYLOAD_BYTES='{re.escape(raw)}'"
    ):
        Settings.from_env({"OMNIDAEMON_MAX_PAYLOAD_BYTES": raw})


@pytest.mark.anyio
async def test_the_environment_variable_is_honoured_by_publishing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMNIDAEMON_MAX_PAYLOAD_BYTES", "1000")
    app = App("small", broker=MemoryBroker(None))  # reads the environment
    assert app.settings.max_payload_bytes == 1000
    await app.publish("notes.taken", {"text": "x" * 100})
    with pytest.raises(PayloadTooLarge, match=r"over max_payload_bytes \(1,000;"):
        await app.publish("notes.taken", {"text": "x" * 1000})


# --- max_payload_bytes: publishing refuses, and sends nothing --------------------------------


def check_refusal(error: PayloadTooLarge, topic: str, limit: int = MIB) -> None:
    assert isinstance(error, OmniDaemonError) and isinstance(error, ValueError)
    assert (error.topic, error.limit) == (topic, limit)
    assert error.size > limit
    assert str(error) == (
        f"cannot publish to {topic!r}: the event is {error.size:,} bytes, over "
        f"max_payload_bytes ({limit:,}; OMNIDAEMON_MAX_PAYLOAD_BYTES)"
    )
    assert "\n" not in str(error)


async def assert_nothing_on(broker: Broker, *topics: str) -> None:
    for topic in topics:
        assert await broker.entries(topic, 10) == []


@pytest.fixture(params=["memory", "redis"])
def bus(request: pytest.FixtureRequest) -> Broker:
    if request.param == "memory":
        return MemoryBroker(None)
    return RedisBroker(request.getfixturevalue("redis_url"), prefix=f"bad{uuid4().hex[:8]}")


@pytest.mark.anyio
async def test_publishing_over_the_limit_raises_and_sends_nothing(bus: Broker) -> None:
    app = App("big", broker=bus)
    async with app:
        with pytest.raises(PayloadTooLarge) as refused:
            await app.publish("doc.big", {"text": "x" * 2_400_000})
        check_refusal(refused.value, "doc.big")
        assert 2_400_000 < refused.value.size < 2_401_000  # the whole envelope is counted

        # A batch with one event over the limit sends none of its events.
        with pytest.raises(PayloadTooLarge):
            await app.publish_many(
                [("doc.small", {"n": 1}), ("doc.big", "x" * (MIB + 1)), ("doc.small", {"n": 2})]
            )
        await assert_nothing_on(bus, "doc.big", "doc.small")

        # Just under the limit is fine (the envelope adds a few hundred bytes).
        await app.publish("doc.big", {"text": "x" * (MIB - 1000)})
        assert len(await bus.entries("doc.big", 10)) == 1


@pytest.mark.anyio
async def test_the_limit_is_the_apps_setting() -> None:
    app = App("tiny", broker=MemoryBroker(None), settings=Settings(max_payload_bytes=300))
    await app.publish("notes.taken", {"text": "short"})
    with pytest.raises(PayloadTooLarge) as refused:
        await app.publish("notes.taken", {"text": "x" * 300})
    check_refusal(refused.value, "notes.taken", limit=300)


def test_publish_sync_over_the_limit_raises_and_sends_nothing(redis_url: str) -> None:
    broker = RedisBroker(redis_url, prefix=f"bad{uuid4().hex[:8]}")
    app = App("big", broker=broker)
    try:
        with pytest.raises(PayloadTooLarge) as refused:
            app.publish_sync("doc.big", {"text": "x" * 2_400_000})
        check_refusal(refused.value, "doc.big")
        app.publish_sync("doc.small", {"n": 1})
    finally:
        anyio.run(app.close)

    async def entries() -> tuple[int, int]:
        async with broker:
            return len(await broker.entries("doc.big", 10)), len(
                await broker.entries("doc.small", 10)
            )

    assert anyio.run(entries) == (0, 1)


@pytest.mark.anyio
async def test_a_handler_publishing_over_the_limit_fails_like_any_exception() -> None:
    app = App("shop", broker=MemoryBroker(None), settings=Settings(max_payload_bytes=2000))

    @app.agent(TOPIC, max_retries=0)
    async def fan_out(event: Order, ctx: Context) -> None:
        await ctx.publish("order.copied", {"blob": "x" * 5000})

    async with TestApp(app) as bus:
        await bus.publish(TOPIC, {"order_id": "o1", "amount": 1})
        await bus.drain()
        [letter] = bus.dead_letters("fan_out")
        assert bus.published("order.copied") == []
    assert letter.error_type == "PayloadTooLarge"
    assert "cannot publish to 'order.copied'" in letter.error_message


@pytest.mark.anyio
async def test_an_oversized_return_value_is_dead_lettered_without_retries() -> None:
    app = App("shop", broker=MemoryBroker(None), settings=Settings(max_payload_bytes=2000))
    attempts: list[int] = []

    class Big(BaseModel):
        blob: str

    @app.agent(TOPIC, publishes="order.enriched", max_retries=3)
    async def enrich(event: Order, ctx: Context) -> Big:
        attempts.append(ctx.attempt)
        return Big(blob="x" * 5000)

    async with TestApp(app) as bus:
        await bus.publish(TOPIC, {"order_id": "o1", "amount": 1})
        await bus.drain()
        [letter] = bus.dead_letters("enrich")
        assert bus.published("order.enriched") == []
    # Retrying would redo the work to produce the same oversized output.
    assert attempts == [1]
    assert (letter.error_type, letter.attempts) == ("PayloadTooLarge", 1)
    assert "cannot publish to 'order.enriched'" in letter.error_message
    assert letter.payload == {"order_id": "o1", "amount": 1}


# --- max_payload_bytes: a worker refuses an oversized entry unread --------------------------


@pytest.mark.anyio
async def test_an_oversized_entry_is_dead_lettered_unread_and_the_worker_goes_on() -> None:
    app = App("shop", broker=MemoryBroker(None), settings=Settings(max_payload_bytes=4096))
    handled: list[str] = []

    @app.agent(TOPIC, max_retries=3)
    async def charge(event: Order) -> None:
        handled.append(event.order_id)

    # A valid envelope: only its size is wrong, so it is not read at all.
    oversized = orjson.dumps(wire(payload={"order_id": "big", "amount": 1, "note": "x" * 9000}))
    async with TestApp(app) as bus:
        await bus.broker.publish(TOPIC, oversized)
        await bus.publish(TOPIC, {"order_id": "good", "amount": 1})
        await bus.drain()
        [letter] = bus.dead_letters("charge")
    assert handled == ["good"]
    assert (letter.error_type, letter.attempts, letter.event_id) == ("PayloadTooLarge", 1, None)
    assert f"{len(oversized):,} bytes" in letter.error_message
    assert "max_payload_bytes (4,096; OMNIDAEMON_MAX_PAYLOAD_BYTES)" in letter.error_message
    assert letter.entry == oversized.decode()  # kept whole, for a replay with a higher limit


# --- any bad entry: property-based, on the memory bus ----------------------------------------

LIMIT = 32 * 1024  # max_payload_bytes of the property test's app: long strings cross it
MALFORMED = frozenset({"MalformedEnvelope"})
UNSUPPORTED = frozenset({"UnsupportedVersion"})
INVALID_PAYLOAD = frozenset({"PayloadValidationError"})
FIELDS = frozenset(Envelope.model_fields)


@dataclass(frozen=True)
class Bad:
    """A bad entry and the dead-letter reasons that are right for it."""

    kind: str
    data: bytes
    reasons: frozenset[str]

    @property
    def expected(self) -> frozenset[str]:
        # Size is checked before anything else: an entry over the limit is never read.
        return frozenset({"PayloadTooLarge"}) if len(self.data) > LIMIT else self.reasons


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def is_order(value: Any) -> bool:
    try:
        _ORDER.validate_json(encode(value))
    except ValidationError:
        return False
    return True


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\x80", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8"]


def with_payload_bytes(payload: bytes) -> bytes:
    """A valid envelope whose payload is `payload`, spliced in as raw JSON bytes."""
    return orjson.dumps(wire(payload=None)).replace(b'"payload":null', b'"payload":' + payload)


def non_utf8(bad: bytes, at: int) -> Bad:
    good = orjson.dumps(wire())
    at %= len(good) + 1
    return Bad("non-UTF-8", good[:at] + bad + good[at:], MALFORMED)


def without(name: str, renamed: str | None) -> Bad:
    fields = {k: v for k, v in wire().items() if k != name}
    if renamed is not None:
        fields[renamed] = wire()[name]
    return Bad(f"{name} missing", encode(fields), MALFORMED)


def wrong_type(field: tuple[str, Any]) -> Bad:
    name, value = field
    return Bad(f"{name} of the wrong type", encode(wire(**{name: value})), MALFORMED)


def other_version(v: int, payload: Any) -> Bad:
    return Bad(f"version {v}", encode(wire(v=v, payload=payload)), UNSUPPORTED)


def nested(depth: int, kind: str) -> bytes:
    # Built as bytes, so neither the test nor an encoder recurses.
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def deep(depth: int, kind: str, where: str) -> Bad:
    data = nested(depth, kind) if where == "entry" else with_payload_bytes(nested(depth, kind))
    return Bad(f"{depth} nested {kind}s in the {where}", data, MALFORMED)


def long_string(n: int, where: str) -> Bad:
    text = "é" * (n // 2) if where == "payload" else "x" * n
    if where == "entry":
        return Bad("a long JSON string", encode(text), MALFORMED)
    if where == "text":
        return Bad("long plain text", text.encode(), MALFORMED)
    if where == "field name":
        return Bad("a long field name", encode({**wire(), text: 1, "id": None}), MALFORMED)
    if where == "payload":
        return Bad("a long payload string", encode(wire(payload=text)), INVALID_PAYLOAD)
    return Bad("a long id, newer version", encode(wire(v=2, id=text)), UNSUPPORTED)


bad_entries = st.one_of(
    # random bytes
    st.binary(max_size=300).map(lambda b: Bad("random bytes", b, MALFORMED)),
    # an invalid UTF-8 sequence anywhere in a good envelope
    st.builds(non_utf8, st.sampled_from(INVALID_UTF8), st.integers(min_value=0)),
    # valid JSON that is not an object
    json_values.filter(lambda v: not isinstance(v, dict)).map(
        lambda v: Bad("JSON, not an object", encode(v), MALFORMED)
    ),
    # a required field left out or renamed (`v` has a default: leaving it out is fine)
    st.builds(
        without,
        st.sampled_from(["id", "topic", "payload", "created_at"]),
        st.none() | st.text(min_size=1, max_size=12).filter(lambda k: k not in FIELDS),
    ),
    # metadata of the wrong type
    st.sampled_from(
        [
            ("id", 7),
            ("id", None),
            ("topic", ["order.placed"]),
            ("created_at", "yesterday"),
            ("created_at", True),
            ("headers", {"k": 1}),
            ("headers", ["k"]),
            ("correlation_id", {}),
            ("reply_to", 3),
            ("v", "one"),
            ("v", 1.5),
        ]
    ).map(wrong_type),
    # an object of unknown fields only
    st.dictionaries(
        st.text(max_size=10).filter(lambda k: k not in FIELDS), json_values, max_size=5
    ).map(lambda d: Bad("unknown fields", encode(d), MALFORMED)),
    # from a newer omnidaemon (or none: 0 and below were never written), with a payload this
    # release may or may not accept: the version is what the worker must report
    st.builds(
        other_version,
        st.integers(2, 10**9) | st.integers(10**9, 10**30) | st.integers(max_value=0),
        st.just({"order_id": "bad", "amount": 1}) | json_values,
    ),
    # a readable envelope whose payload is not an Order
    json_values.filter(lambda p: not is_order(p)).map(
        lambda p: Bad("payload not an Order", encode(wire(payload=p)), INVALID_PAYLOAD)
    ),
    # thousands of levels of nesting: far beyond the JSON parser's recursion limit (a couple
    # of hundred), so the entry is unreadable wherever the nesting is
    st.builds(
        deep,
        st.integers(1000, 5000),
        st.sampled_from(["list", "object"]),
        st.sampled_from(["entry", "payload"]),
    ),
    # very long strings, many of them over the limit
    st.builds(
        long_string,
        # anywhere up to a few times the limit, and often right around it
        st.integers(1_000, 150_000) | st.integers(LIMIT - 100, LIMIT + 100),
        st.sampled_from(["entry", "text", "field name", "payload", "id"]),
    ),
)


async def bad_entry_then_good_event(bad: Bad) -> None:
    app = App("shop", broker=MemoryBroker(None), settings=Settings(max_payload_bytes=LIMIT))
    handled: list[str] = []

    @app.agent(TOPIC, max_retries=3)
    async def charge(event: Order) -> None:
        handled.append(event.order_id)

    async with TestApp(app) as bus:
        await bus.broker.publish(TOPIC, bad.data)
        await bus.publish(TOPIC, {"order_id": "good", "amount": 1})
        await bus.drain(timeout=5)  # TimeoutError: the loop stalled on the bad entry
        letters = bus.dead_letters("charge")
    # Leaving the block stopped the worker: a crashed consume loop would have raised there.
    assert handled == ["good"], bad.kind
    [letter] = letters
    assert letter.error_type in bad.expected, (bad.kind, letter.error_type, letter.error_message)
    assert letter.error_message.strip()
    assert letter.attempts == 1  # at once: no retry can help
    assert letter.entry == bad.data.decode("utf-8", "backslashreplace")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(bad_entries)
# Each of these was handled as a version 1 event or given the wrong reason before issue 7.
@example(other_version(2, {"order_id": "bad", "amount": 1}))
@example(Bad("version 2 as text", encode(wire(v="2")), UNSUPPORTED))
@example(Bad("version 2.0", encode(wire(v=2.0)), UNSUPPORTED))
@example(other_version(10**30, {"order_id": "bad", "amount": 1}))
@example(other_version(10**30, []))
@example(without("payload", None))
def test_any_bad_entry_is_dead_lettered_with_its_reason_and_the_next_event_is_handled(
    bad: Bad,
) -> None:
    anyio.run(bad_entry_then_good_event, bad)


# --- one of each kind, on a real Redis ------------------------------------------------------

ONE_OF_EACH = [
    Bad("random bytes", b"\x00\x9f\xffgarbage", MALFORMED),
    non_utf8(b"\xff", 30),
    Bad("JSON, not an object", b"[1, 2, 3]", MALFORMED),
    Bad("empty entry", b"", MALFORMED),
    without("id", None),
    without("payload", "data"),
    Bad("unknown fields", b'{"event": "order", "data": {}}', MALFORMED),
    other_version(7, {"order_id": "bad", "amount": 1}),
    other_version(10**30, []),
    Bad("payload not an Order", encode(wire(payload={"order_id": 5})), INVALID_PAYLOAD),
    deep(3000, "list", "entry"),
    deep(3000, "object", "payload"),
    long_string(500_000, "entry"),
    Bad(
        "over 1 MiB",
        orjson.dumps(wire(payload={"order_id": "x", "amount": 1, "note": "x" * MIB})),
        frozenset({"PayloadTooLarge"}),
    ),
]


@pytest.mark.anyio
async def test_one_bad_entry_of_each_kind_on_redis(redis_url: str) -> None:
    app = App("shop", broker=RedisBroker(redis_url, prefix=f"bad{uuid4().hex[:8]}"))
    assert app.settings.max_payload_bytes == MIB  # the default limit, for the 1 MiB entry
    handled: list[str] = []

    @app.agent(TOPIC, max_retries=3)
    async def charge(event: Order) -> None:
        handled.append(event.order_id)

    async with app.running():
        for bad in ONE_OF_EACH:
            await app.broker.publish(TOPIC, bad.data)
        await app.publish(TOPIC, {"order_id": "good", "amount": 1})
        with anyio.fail_after(10):
            while len(letters := await app.dead_letters("charge")) < len(ONE_OF_EACH):
                await anyio.sleep(0.02)
        await wait_for(lambda: handled == ["good"])
    # Handled concurrently: the dead letters may be in any order; match them by entry.
    by_entry = {letter.entry: letter for letter in letters}
    assert len(by_entry) == len(ONE_OF_EACH)
    for bad in ONE_OF_EACH:
        letter = by_entry[bad.data.decode("utf-8", "backslashreplace")]
        assert letter.error_type in bad.reasons, (bad.kind, letter.error_message)
        assert letter.attempts == 1, bad.kind
        assert letter.error_message.strip(), bad.kind


# --- showing what was dead-lettered ------------------------------------------------------------


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["table", "json"])
def test_bus_dlq_shows_a_payload_integer_beyond_64_bits(
    redis_url: str, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    # orjson cannot write such an integer: `bus dlq` crashed with a traceback on this entry.
    from omnidaemon.cli import main

    topic = f"bad{uuid4().hex[:8]}.orders"
    app = App("shop", broker=RedisBroker(redis_url))

    @app.agent(topic)
    async def charge(event: Order) -> None: ...

    async def dead_letter_one() -> None:
        async with app.running():
            await app.broker.publish(topic, encode(wire(topic=topic, payload={"amount": 10**30})))
            with anyio.fail_after(10):
                while not await app.dead_letters("charge"):
                    await anyio.sleep(0.02)

    anyio.run(dead_letter_one)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["bus", "dlq", topic, "--broker", redis_url, *extra])
    out, err = capsys.readouterr()
    assert (done.value.code, err) == (0, "")
    assert "PayloadValidationError" in out
    assert ("1000000000000000000000000000000" if extra else '{"amount":10000000000') in out
