"""A handler's outputs (its return value sent to `publishes=` and to the event's `reply_to`) are
checked against the types the app declares for the topic they go to, like any publish."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

import anyio
import pytest
from pydantic import BaseModel

from omnidaemon import App
from omnidaemon.brokers import RedisBroker

pytestmark = pytest.mark.anyio


class Summary(BaseModel):
    text: str


async def test_a_reply_that_contradicts_the_reply_topics_type_is_dead_lettered(
    redis_url: str,
) -> None:
    """`reply_to` is the publisher's choice: a reply breaking the type an agent declares for
    that topic used to reach it and be dead-lettered there, far from the handler that made it."""
    app = App("docs", broker=RedisBroker(redis_url, prefix=f"out{uuid4().hex[:8]}"))
    attempts: list[int] = []
    stored: list[str] = []

    @app.agent("doc.summarize", max_retries=3)
    async def summarize(event: dict[str, Any]) -> dict[str, Any]:
        attempts.append(1)
        return {"text": event["text"]} if event["good"] else {"words": 3}

    @app.agent("doc.summaries")
    async def store(event: Summary) -> None:
        stored.append(event.text)

    async with app.running():
        await app.publish("doc.summarize", {"text": "bad", "good": False}, reply_to="doc.summaries")
        await app.publish("doc.summarize", {"text": "ok", "good": True}, reply_to="doc.summaries")
        with anyio.fail_after(10):
            while not (letters := await app.dead_letters("summarize")) or stored != ["ok"]:
                assert await app.dead_letters("store") == [], "the bad output was published"
                await anyio.sleep(0.02)
    [letter] = letters
    assert letter.error_type == "PayloadValidationError"
    assert letter.error_message.startswith(
        "cannot publish to 'doc.summaries': the payload is not a valid Summary "
        "(agent 'store' consumes it)"
    )
    assert letter.payload == {"text": "bad", "good": False}
    assert len(attempts) == 2, "a retry would produce the same reply: dead-lettered at once"


async def test_a_publishes_output_that_contradicts_a_consumers_type_is_dead_lettered(
    redis_url: str,
) -> None:
    app = App("docs", broker=RedisBroker(redis_url, prefix=f"out{uuid4().hex[:8]}"))
    stored: list[str] = []

    @app.agent("doc.raw", publishes="doc.summaries")
    async def summarize(event: dict[str, Any]) -> dict[str, Any]:
        return {"text": event["text"]} if event["good"] else {"words": 3}

    @app.agent("doc.summaries")
    async def store(event: Summary) -> None:
        stored.append(event.text)

    async with app.running():
        await app.publish("doc.raw", {"text": "bad", "good": False})
        await app.publish("doc.raw", {"text": "ok", "good": True})
        with anyio.fail_after(10):
            while not (letters := await app.dead_letters("summarize")) or stored != ["ok"]:
                assert await app.dead_letters("store") == [], "the bad output was published"
                await anyio.sleep(0.02)
    [letter] = letters
    assert (letter.error_type, letter.attempts) == ("PayloadValidationError", 1)
    assert "cannot publish to 'doc.summaries'" in letter.error_message
