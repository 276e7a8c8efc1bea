"""JSON the bus cannot carry is refused where it is published, with what and where; anything
published is read by the worker (issue 15, item 6)."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest

from omnidaemon import App, Context, PayloadValidationError
from omnidaemon._json_limits import nesting_exceeds
from omnidaemon.brokers import MemoryBroker, RedisBroker
from omnidaemon.envelope import MAX_NESTING, dumps
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio


def nested(depth: int) -> Any:
    """A value `depth` levels deep, objects and arrays in turn, with brackets in its strings."""
    value: Any = "]]}}[[{{"
    for level in range(depth):
        value = {"k]": value, "n": level} if level % 2 else [value, "}", level]
    return value


def test_the_limit_is_128_levels() -> None:
    assert MAX_NESTING == 128


@pytest.mark.parametrize("depth", [0, 1, 2, 127, 128, 129, 200, 253])
def test_nesting_is_measured_on_the_encoded_json_with_brackets_in_strings_ignored(
    depth: int,
) -> None:
    data = dumps(nested(depth))
    assert nesting_exceeds(data, 128) is (depth > 128)
    assert nesting_exceeds(data, depth) is False
    if depth:
        assert nesting_exceeds(data, depth - 1) is True


@pytest.mark.parametrize(
    ("payload", "headers", "message"),
    [
        (10**30, None, r"payload: an integer of 31 digits is outside the 64-bit range"),
        ({"n": [1, -(2**63) - 1]}, None, r"payload\['n'\]\[1\]: an integer of 19 digits"),
        (
            {"a": ["ok", "x\ud800"]},
            None,
            r"payload\['a'\]\[1\]: the string holds a lone "
            r"surrogate \('\\ud800' at index 1\)",
        ),
        ({"\udfff": 1}, None, r"payload: a key holds a lone surrogate \('\\udfff'"),
        (1, {"trace": "\ud800"}, r"headers\['trace'\]: the string holds a lone surrogate"),
        (nested(129), None, r"payload: arrays and objects are nested more than 128 levels"),
        (nested(230), None, r"payload: arrays and objects are nested more than 128 levels"),
        (nested(300), None, r"payload: arrays and objects are nested more than 128 levels"),
    ],
)
async def test_publish_refuses_what_json_cannot_carry_naming_it(
    payload: Any, headers: dict[str, str] | None, message: str
) -> None:
    broker = MemoryBroker(None)
    app = App("pub", broker=broker)
    with pytest.raises(
        PayloadValidationError, match=r"cannot publish to 'order\.placed': " + message
    ):
        await app.publish("order.placed", payload, headers=headers)
    if headers is None:  # publish_many takes no headers
        with pytest.raises(PayloadValidationError):
            await app.publish_many([("order.placed", payload)])

    def publish_sync() -> None:
        with pytest.raises(PayloadValidationError):
            app.publish_sync("order.placed", payload, headers=headers)

    await anyio.to_thread.run_sync(publish_sync)
    assert await broker.describe("order.placed") is None  # nothing was sent


async def test_publish_refuses_a_lone_surrogate_in_an_id() -> None:
    app = App("pub", broker=MemoryBroker(None))
    with pytest.raises(PayloadValidationError, match=r"correlation_id: the string holds a lone"):
        await app.publish("order.placed", {}, correlation_id="c\ud800")
    with pytest.raises(PayloadValidationError, match=r"tenant_id: the string holds a lone"):
        await app.publish("order.placed", {}, tenant_id="\udc00")


async def test_a_payload_at_the_limit_round_trips_through_a_real_worker(redis_url: str) -> None:
    app = App("deep", broker=RedisBroker(redis_url, prefix=f"deep{uuid.uuid4().hex[:8]}"))
    seen: list[Any] = []

    @app.agent("deep.request")
    async def echo(payload: Any, ctx: Context) -> Any:
        seen.append(payload)
        return payload

    deepest = nested(MAX_NESTING)
    widest = [1, 2**64 - 1, -(2**63), "\u00e9\U0001f600", nested(MAX_NESTING - 1)]
    async with app, app.running():
        assert await app.request("deep.request", deepest, timeout=20) == deepest
        assert await app.request("deep.request", widest, timeout=20) == widest
    assert seen == [deepest, widest]


async def test_a_return_value_nested_too_deep_is_dead_lettered_without_retries() -> None:
    app = App("deep", broker=MemoryBroker(None))
    attempts: list[int] = []

    @app.agent("deep.in", publishes="deep.out", max_retries=3)
    async def deepen(payload: Any, ctx: Context) -> Any:
        attempts.append(ctx.attempt)
        return nested(MAX_NESTING + 1)

    async with TestApp(app) as bus:
        await bus.publish("deep.in", {"n": 1})
        await bus.drain()
        [letter] = bus.dead_letters("deepen")
        assert bus.published("deep.out") == []
    # Retrying would produce the same value, which no worker could read.
    assert attempts == [1]
    assert (letter.error_type, letter.attempts) == ("PayloadValidationError", 1)
    assert "cannot publish to 'deep.out': payload: arrays and objects are nested more" in (
        letter.error_message
    )
