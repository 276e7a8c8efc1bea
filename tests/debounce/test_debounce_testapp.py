"""Debounce in-process, on `TestApp`'s memory bus and its clock: one call per burst with every
message in publish order, keys apart, the quiet period and `max_wait` measured on the test's
clock, retries and dead letters of a batch (and its replay), duplicate deliveries of a message
collected once, a full window flushed at once, and the options as decoration, topology,
`agents --json` and AsyncAPI show them. The same guarantees across worker processes, with a
worker SIGKILLed mid-window, are in `test_debounce_processes.py`.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import orjson
import pytest
import typer
from pydantic import BaseModel

from omnidaemon import App, Context, admin
from omnidaemon.admin import find_dead_letters
from omnidaemon.asyncapi import asyncapi_document
from omnidaemon.cli.bus import _check_topic
from omnidaemon.debounce import spec as debounce_spec
from omnidaemon.errors import PayloadValidationError
from omnidaemon.testing import TestApp
from omnidaemon.topology import describe_agent

pytestmark = pytest.mark.anyio


class Message(BaseModel):
    conversation_id: str
    text: str


Call = tuple[str, list[str], list[str], int]  # key, texts, batch ids, attempt


def make_app(calls: list[Call], *, fail: int = 0, **options: Any) -> App:
    """An app whose `answer` records each call; its first `fail` calls raise."""
    app = App("t", broker="memory://")
    options.setdefault("debounce", timedelta(seconds=5))
    options.setdefault("debounce_key", lambda m: m.conversation_id)
    options.setdefault("debounce_max_wait", timedelta(seconds=30))

    @app.agent("chat.message", retry_backoff=0.01, **options)
    async def answer(messages: list[Message], ctx: Context) -> None:
        calls.append(
            (
                ctx.event.headers["omnidaemon-batch-key"],
                [m.text for m in messages],
                ctx.batch_ids,
                ctx.attempt,
            )
        )
        if len(calls) <= fail:
            raise RuntimeError("not yet")

    return app


async def say(bus: TestApp, conversation: str, text: str) -> str:
    return await bus.publish("chat.message", {"conversation_id": conversation, "text": text})


async def test_one_burst_is_one_call_with_every_message_in_publish_order() -> None:
    calls: list[Call] = []
    app = make_app(calls)
    async with TestApp(app, fast_retries=False) as bus:
        ids = [await say(bus, "c1", f"m{n}") for n in range(6)]
        await bus.advance(3)
        ids.append(await say(bus, "c1", "late"))  # within the quiet period: same burst
        await bus.advance(4.9)
        assert calls == []  # 4.9 s of quiet after the last message: not yet
        await bus.advance(0.2)
        assert calls == [("c1", [f"m{n}" for n in range(6)] + ["late"], ids, 1)]
        # The batch event: the burst's ids in order; its messages are of seven runs (each its
        # own), so the batch is a run of its own.
        batch = orjson.loads(next(e for e in bus.broker.log if "#debounce." in e[0])[1])
        assert batch["correlation_id"] == batch["id"]
        assert batch["headers"]["omnidaemon-batch-ids"] == ",".join(ids)
        # The next message opens a new window.
        after = await say(bus, "c1", "again")
        await bus.advance(5)
        assert calls[1] == ("c1", ["again"], [after], 1)
        assert bus.dead_letters("answer") == []


async def test_advance_after_a_burst_runs_the_handler_once() -> None:
    calls: list[Call] = []
    async with TestApp(make_app(calls)) as bus:
        for n in range(3):
            await say(bus, "c1", f"m{n}")
        await bus.advance(5)
        assert [c[1] for c in calls] == [["m0", "m1", "m2"]]


async def test_drain_flushes_open_windows() -> None:
    calls: list[Call] = []
    async with TestApp(make_app(calls)) as bus:
        await say(bus, "c1", "hello")
        await bus.drain()
        assert [c[1] for c in calls] == [["hello"]]
        assert bus.published("chat.message")[0].payload["text"] == "hello"
        assert len(bus.published()) == 1  # checks and batches are not listed


async def test_keys_interleaved_make_one_call_each() -> None:
    calls: list[Call] = []
    async with TestApp(make_app(calls), fast_retries=False) as bus:
        sent: dict[str, list[str]] = {"a": [], "b": [], "c": []}
        for n in range(5):
            for key in sent:
                sent[key].append(await say(bus, key, f"{key}{n}"))
        await bus.advance(5)
        assert sorted(c[0] for c in calls) == ["a", "b", "c"]
        for key, texts, ids, _ in calls:
            assert texts == [f"{key}{n}" for n in range(5)]
            assert ids == sent[key]


async def test_without_a_key_the_agent_has_one_window() -> None:
    calls: list[Call] = []
    app = App("t", broker="memory://")

    @app.agent("chat.message", debounce=2)
    async def answer(messages: list[Message]) -> None:
        calls.append(("", [m.text for m in messages], [], 1))

    async with TestApp(app, fast_retries=False) as bus:
        await say(bus, "a", "1")
        await say(bus, "b", "2")
        await bus.advance(2)
        assert [c[1] for c in calls] == [["1", "2"]]


async def test_max_wait_bounds_a_burst_that_never_ends() -> None:
    calls: list[Call] = []
    app = make_app(calls, debounce=5, debounce_max_wait=12)
    async with TestApp(app, fast_retries=False) as bus:
        for n in range(8):  # one message every 3 s, for 24 s: never 5 s of quiet
            await say(bus, "c1", f"m{n}")
            await bus.advance(3)
        # Each window is flushed 12 s after its first message: at 12 s and at 24 s.
        assert [c[1] for c in calls] == [["m0", "m1", "m2", "m3"], ["m4", "m5", "m6", "m7"]]


async def test_a_failing_handler_is_retried_with_the_same_batch() -> None:
    calls: list[Call] = []
    async with TestApp(make_app(calls, fail=2)) as bus:
        ids = [await say(bus, "c1", f"m{n}") for n in range(3)]
        await bus.drain()
        assert [(c[2], c[3]) for c in calls] == [(ids, 1), (ids, 2), (ids, 3)]
        assert bus.dead_letters("answer") == []


async def test_a_dead_letter_holds_the_batch_and_replay_runs_it_again() -> None:
    calls: list[Call] = []
    app = make_app(calls, fail=1, max_retries=0)
    async with TestApp(app) as bus:
        ids = [await say(bus, "c1", f"m{n}") for n in range(3)]
        await bus.drain()
        [letter] = bus.dead_letters("answer")
        assert letter.error_type == "RuntimeError"
        assert [m["text"] for m in letter.payload] == ["m0", "m1", "m2"]
        assert letter.envelope is not None
        assert letter.envelope.headers["omnidaemon-batch-ids"] == ",".join(ids)
        assert [d.event_id for d in await app.dead_letters("answer")] == [letter.event_id]
        assert await app.replay_dead_letters("answer") == 1
        await bus.drain()
        assert [(c[1], c[2]) for c in calls] == [(["m0", "m1", "m2"], ids)] * 2
        assert calls[-1][3] == 1  # the replay is a new first attempt
        assert bus.dead_letters("answer") == []


async def test_an_invalid_message_is_dead_lettered_alone() -> None:
    calls: list[Call] = []
    app = make_app(calls)
    async with TestApp(app) as bus:
        await say(bus, "c1", "fine")
        # Around the publish check, as another app without the type could send it.
        _, data = app._encode("chat.message", {"text": 1}, None, None, None, None, None, None)
        await bus.broker.publish("chat.message", data)
        await bus.drain()
        assert [c[1] for c in calls] == [["fine"]]
        [letter] = bus.dead_letters("answer")
        assert letter.error_type == "PayloadValidationError"
        assert "Message" in letter.error_message
        with pytest.raises(PayloadValidationError, match="Message"):
            await say(bus, "c1", 5)  # type: ignore[arg-type]


async def test_a_message_delivered_twice_is_collected_once() -> None:
    calls: list[Call] = []
    app = make_app(calls)
    async with TestApp(app, fast_retries=False) as bus:
        _, data = app._encode(
            "chat.message",
            {"conversation_id": "c1", "text": "x"},
            None,
            None,
            None,
            None,
            None,
            None,
        )
        await bus.broker.publish("chat.message", data)
        await bus.broker.publish("chat.message", data)  # as a redelivery would be
        await bus.advance(5)
        assert [c[1] for c in calls] == [["x"]]
        await bus.broker.publish("chat.message", data)  # after its window was flushed
        await bus.advance(5)
        assert [c[1] for c in calls] == [["x"]]


async def test_a_full_window_is_flushed_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debounce_spec, "MAX_WINDOW_MESSAGES", 4)
    calls: list[Call] = []
    app = make_app(calls)
    assert app.agents["answer"].debounce is not None
    assert app.agents["answer"].debounce.limits.max_messages == 4
    async with TestApp(app, fast_retries=False) as bus:
        for n in range(10):
            await say(bus, "c1", f"m{n}")
        await bus.advance(0)  # no time passes: only full windows go
        assert [c[1] for c in calls] == [
            [f"m{n}" for n in range(4)],
            [f"m{n}" for n in range(4, 8)],
        ]
        await bus.advance(5)
        assert [c[1] for c in calls][2:] == [["m8", "m9"]]


async def test_a_message_too_large_for_a_window_is_dead_lettered() -> None:
    calls: list[Call] = []
    app = make_app(calls)
    big = "x" * (app.settings.max_payload_bytes // 4)
    async with TestApp(app) as bus:
        await say(bus, "c1", big)
        await bus.drain()
        assert calls == []
        [letter] = bus.dead_letters("answer")
        assert letter.error_type == "Reject"
        assert "more than a debounce window holds" in letter.error_message


def test_options_are_checked_at_decoration() -> None:
    app = App("t", broker="memory://")

    async def single(message: Message) -> None: ...

    async def burst(messages: list[Message]) -> None: ...

    with pytest.raises(TypeError, match=r"list\[X\]"):
        app.agent("chat.message", debounce=5)(single)
    with pytest.raises(ValueError, match="at least debounce"):
        app.agent("chat.message", debounce=5, debounce_max_wait=4)(burst)
    with pytest.raises(ValueError, match="positive"):
        app.agent("chat.message", debounce=0)(burst)
    with pytest.raises(ValueError, match="positive"):
        app.agent("chat.message", debounce=timedelta(seconds=-1))(burst)
    with pytest.raises(TypeError, match="debounce_key"):
        app.agent("chat.message", debounce=5, debounce_key="conversation_id")(burst)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="need debounce"):
        app.agent("chat.message", debounce_key=lambda m: m)(burst)
    assert not app.agents


def test_the_options_show_in_topology_agents_and_asyncapi() -> None:
    app = make_app([])
    spec = app.agents["answer"]
    assert spec.payload_type is Message  # the topic carries one message
    described = describe_agent(spec)
    assert described["payload_type"] == "Message"
    assert described["debounce"] == {
        "seconds": 5.0,
        "max_wait": 30.0,
        "keyed": True,
        "max_messages": debounce_spec.MAX_WINDOW_MESSAGES,
        "max_bytes": app.settings.max_payload_bytes // 4,
        "batch_topic": "chat.message#debounce.answer",
        "check_topic": "chat.message#debounce-checks.answer",
    }
    topology = app.topology()
    assert topology.topics["chat.message"].payload_types == (Message,)
    assert "Message, debounced 5s (max 30s)" in topology.to_mermaid()
    document = asyncapi_document(app)
    [operation] = document["operations"].values()
    assert operation["x-omnidaemon-debounce"]["seconds"] == 5.0
    [channel] = document["channels"].values()
    assert channel["address"] == "chat.message"
    assert [m["name"] for m in channel["messages"].values()] == ["Message"]


async def test_the_bus_commands_reach_a_dead_lettered_batch() -> None:
    calls: list[Call] = []
    app = make_app(calls, fail=1, max_retries=0)
    batches = "chat.message#debounce.answer"
    _check_topic(batches)  # `omnidaemon bus dlq|replay|inspect TOPIC` accept it
    with pytest.raises(typer.BadParameter):
        _check_topic("chat.message#other")
    async with TestApp(app) as bus:
        await say(bus, "c1", "m0")
        await bus.drain()
        found = await find_dead_letters(bus.broker, agent="answer")
        assert [d.topic for d in found.letters] == [batches]
        outcome = await admin.replay_dead_letters(bus.broker, batches, "answer")
        assert outcome.replayed == 1
        await bus.drain()
        assert [c[1] for c in calls] == [["m0"], ["m0"]]


async def test_a_batch_is_in_its_messages_run_only_if_they_all_share_one() -> None:
    runs: dict[str, tuple[str, str]] = {}  # key: the batch's correlation id and event id
    app = App("t", broker="memory://")

    @app.agent("chat.message", debounce=5, debounce_key=lambda m: m.conversation_id)
    async def answer(messages: list[Message], ctx: Context) -> None:
        runs[messages[0].conversation_id] = (ctx.event.correlation_id, ctx.event_id)

    async with TestApp(app, fast_retries=False) as bus:
        for conversation, run in (("c1", "run-a"), ("c1", "run-a"), ("c2", "run-a")):
            await bus.publish("chat.message", {"conversation_id": conversation, "text": "t"},
                              correlation_id=run)  # fmt: skip
        await bus.publish("chat.message", {"conversation_id": "c2", "text": "t"},
                          correlation_id="run-b")  # fmt: skip
        await bus.advance(5)
    assert runs["c1"][0] == "run-a"
    # Messages of two runs: the batch is a run of its own (cancelling run-a must not cancel
    # run-b's message with it).
    assert runs["c2"][0] == runs["c2"][1]


async def test_collecting_faster_than_windows_flush(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Windows of two messages, collected concurrently: a collect that finds its window full
    # and the window before it not yet published publishes that one itself (the key's value
    # holds one sealed window at most), without failing.
    monkeypatch.setattr(debounce_spec, "MAX_WINDOW_MESSAGES", 2)
    calls: list[Call] = []
    app = make_app(calls)
    async with TestApp(app, fast_retries=False) as bus:
        ids = [await say(bus, "c1", f"m{n}") for n in range(41)]
        await bus.advance(0)  # the full windows go
        assert len(calls) == 20
        await bus.advance(5)
        batches = [c[2] for c in calls]
        assert sorted(i for batch in batches for i in batch) == sorted(ids)
        assert all(batch == sorted(batch) for batch in batches)  # publish order
        assert [len(batch) for batch in batches] == [2] * 20 + [1]
        [value] = (await bus.broker.scan_values("debounce:")).values()
        state = orjson.loads(value)
        assert state["open"] is None and state["sealed"] == []
        assert bus.dead_letters("answer") == []
    assert "handler failed" not in caplog.text


async def test_cancel_a_message_before_it_is_collected_or_else_its_batch() -> None:
    calls: list[Call] = []
    app = make_app(calls)
    async with TestApp(app, fast_retries=False) as bus:
        dropped = await say(bus, "c1", "a")
        await app.cancel(dropped, reason="withdrawn")  # still waiting on the topic
        kept = await say(bus, "c1", "b")
        await bus.advance(5)
        assert [(c[1], c[2]) for c in calls] == [(["b"], [kept])]

    # Once collected, a message is its burst's: cancel the batch, by its event id.
    started = anyio.Event()
    batch_ids: list[str] = []
    slow = App("t", broker="memory://")

    @slow.agent("chat.message", debounce=1, store_results=True)
    async def answer(messages: list[Message], ctx: Context) -> None:
        batch_ids.append(ctx.event_id)
        started.set()
        await anyio.sleep(3600)

    async with TestApp(slow) as bus:
        await say(bus, "c1", "a")
        async with anyio.create_task_group() as tg:
            tg.start_soon(bus.drain)
            await started.wait()
            await slow.cancel(batch_ids[0], reason="stop")
        assert (await slow.result(batch_ids[0])).status == "cancelled"
