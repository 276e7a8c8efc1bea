"""Streamed output in process (`TestApp`, the memory bus): `ctx.emit`, `App.stream` and its
guarantees: ordered, complete, late readers, resume, retries (attempts never mixed), the
bound, typed chunks, and agents that do not stream paying nothing."""

from __future__ import annotations

from typing import Any

import anyio
import orjson
import pytest
from pydantic import BaseModel

from omnidaemon import (
    AgentFailed,
    App,
    Cancelled,
    Context,
    OutputStream,
    PayloadValidationError,
    Reject,
    StreamChunk,
)
from omnidaemon.brokers import MemoryBroker
from omnidaemon.settings import Settings
from omnidaemon.streaming.follower import StreamFollower
from omnidaemon.streaming.records import chunk_entry, end_entry, output_key
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio


class Token(BaseModel):
    text: str
    n: int


async def collect(stream: OutputStream[Any]) -> list[StreamChunk[Any]]:
    return [chunk async for chunk in stream]


def make_app(**settings: Any) -> App:
    app = App("streams", broker=MemoryBroker(None), settings=Settings(**settings))

    @app.agent("chat.asked", stream=str, max_retries=2, retry_backoff=0.01)
    async def chat(question: dict[str, Any], ctx: Context) -> str:
        words = [f"w{i} " for i in range(question.get("words", 5))]
        for word in words:
            await ctx.emit(word)
            if ctx.attempt <= question.get("fail_attempts", 0) and word == "w2 ":
                raise RuntimeError(f"attempt {ctx.attempt} broke")
        if question.get("reject"):
            raise Reject("not answering that")
        return "".join(words)

    @app.agent("plain.asked")
    async def plain(question: dict[str, Any], ctx: Context) -> dict[str, int]:
        return {"n": 1}

    return app


async def test_chunks_come_in_order_complete_and_to_a_late_reader() -> None:
    app = make_app()
    async with TestApp(app) as bus:
        event_id = await bus.publish("chat.asked", {"words": 30})
        await bus.drain()  # the handler is long done: a late reader misses nothing
        stream = app.stream(event_id, timeout=2)
        chunks = await collect(stream)
    assert [c.data for c in chunks] == [f"w{i} " for i in range(30)]
    assert [c.index for c in chunks] == list(range(30))
    assert {(c.agent, c.attempt, c.restarted) for c in chunks} == {("chat", 1, False)}
    assert len({c.id for c in chunks}) == 30
    assert (stream.status, stream.result, stream.attempt) == (
        "succeeded",
        "".join(f"w{i} " for i in range(30)),
        1,
    )
    assert not stream.truncated


async def test_readers_follow_a_stream_while_it_is_written() -> None:
    app = App("live", broker=MemoryBroker(None))
    step = anyio.Event()

    @app.agent("slow.asked", stream=int)
    async def slow(question: dict[str, Any], ctx: Context) -> int:
        for i in range(3):
            await ctx.emit(i)
        await step.wait()  # the readers have read the first three before the rest exists
        for i in range(3, 6):
            await ctx.emit(i)
        return 6

    async with TestApp(app) as bus:
        event_id = await bus.publish("slow.asked", {})
        seen: dict[str, list[int]] = {"a": [], "b": []}

        async def read(name: str) -> None:
            async for chunk in app.stream(event_id, timeout=5):
                seen[name].append(chunk.data)
                if len(seen["a"]) == 3 and len(seen["b"]) == 3:
                    step.set()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(read, "a")
            tasks.start_soon(read, "b")
        await bus.drain()
    assert seen == {"a": list(range(6)), "b": list(range(6))}


async def test_a_reader_resumes_after_a_chunk() -> None:
    app = make_app()
    async with TestApp(app) as bus:
        event_id = await bus.publish("chat.asked", {"words": 6})
        await bus.drain()
        chunks = await collect(app.stream(event_id, timeout=2))
        rest = app.stream(event_id, after=chunks[2].id, timeout=2)
        resumed = await collect(rest)
        assert resumed == chunks[3:]
        assert rest.result == "w0 w1 w2 w3 w4 w5 "
        # Resumed after the last chunk: nothing more, and the result; after the end, too.
        assert await collect(tail := app.stream(event_id, after=chunks[-1].id)) == []
        assert tail.status == "succeeded"
        # An id the log does not hold: read from the start.
        assert await collect(app.stream(event_id, after="999999", timeout=2)) == chunks


async def test_a_retry_restarts_the_stream_and_attempts_never_mix() -> None:
    app = make_app()
    async with TestApp(app) as bus:
        event_id = await bus.publish("chat.asked", {"words": 5, "fail_attempts": 2})
        await bus.drain()
        stream = app.stream(event_id, timeout=2)
        chunks = await collect(stream)
    got = [(c.attempt, c.data, c.restarted) for c in chunks]
    assert got == [
        (1, "w0 ", False), (1, "w1 ", False), (1, "w2 ", False),
        (2, "w0 ", True), (2, "w1 ", False), (2, "w2 ", False),
        (3, "w0 ", True), (3, "w1 ", False), (3, "w2 ", False), (3, "w3 ", False),
        (3, "w4 ", False),
    ]  # fmt: skip
    assert [c.index for c in chunks if c.attempt == 3] == [0, 1, 2, 3, 4]
    assert (stream.restarts, stream.attempt, stream.status) == (2, 3, "succeeded")


async def test_a_late_entry_of_an_earlier_attempt_is_never_mixed_in() -> None:
    # A worker that lost its delivery (its lease was taken over) may still append: a reader
    # that follows attempt 2 ignores it, and is told of the restart even without an end.
    broker = MemoryBroker(None)
    key = output_key("ev1")
    for entry in [
        chunk_entry("a", 1, b'"x"'),
        chunk_entry("b", 1, b'"other agent"'),
        chunk_entry("a", 2, b'"y"'),
        chunk_entry("a", 1, b'"late"'),
        b"not json at all",
        end_entry("a", 1, "succeeded", result="stale"),
        end_entry("a", 2, "succeeded", result="fresh"),
    ]:
        await broker.append_output(key, entry, ttl=60)
    follower = StreamFollower(broker, "ev1")
    events = await follower.read(0)
    kinds = [(e.kind, e.attempt, e.data) for e in events]
    assert kinds == [
        ("chunk", 1, "x"),
        ("restart", 1, None),
        ("chunk", 2, "y"),
        ("end", 2, "fresh"),
    ]
    assert events[1].id is None  # inferred: no resume point of its own
    other = StreamFollower(broker, "ev1", agent="b")
    assert [e.data for e in await other.read(0)] == ["other agent"]


async def test_dead_letters_and_cancellations_end_the_stream_with_their_error() -> None:
    app = make_app()
    gate = anyio.Event()

    @app.agent("long.asked", stream=str)
    async def long(question: dict[str, Any], ctx: Context) -> str:
        await ctx.emit("started")
        await gate.wait()
        return "never"

    async with TestApp(app) as bus:
        rejected = await bus.publish("chat.asked", {"words": 2, "reject": True})
        failed = await bus.publish("chat.asked", {"words": 3, "fail_attempts": 3})
        await bus.drain()
        with pytest.raises(AgentFailed) as caught:
            await collect(app.stream(rejected, timeout=2))
        assert (caught.value.error_type, caught.value.agent) == ("Reject", "chat")
        chunks: list[StreamChunk[Any]] = []
        with pytest.raises(AgentFailed, match="attempt 3 broke"):
            async for chunk in app.stream(failed, timeout=2):
                chunks.append(chunk)  # noqa: PERF401 - kept up to the failure
        assert [c.attempt for c in chunks if c.index == 0] == [1, 2, 3]

        cancelled = await bus.publish("long.asked", {})
        stream = app.stream(cancelled, timeout=5)
        assert (await anext(stream)).data == "started"
        await app.cancel(cancelled, reason="user left")
        with pytest.raises(Cancelled, match="user left"):
            await anext(stream)
        assert stream.status == "cancelled"
        await bus.drain()


async def test_past_the_bound_the_stream_is_truncated_and_the_handler_finishes() -> None:
    app = make_app(output_max_chunks=4)
    kept: list[bool] = []

    @app.agent("many.asked", stream=str)
    async def many(question: dict[str, Any], ctx: Context) -> str:
        kept.extend([await ctx.emit(f"c{i}") for i in range(10)])
        return "done"

    async with TestApp(app) as bus:
        event_id = await bus.publish("many.asked", {})
        await bus.drain()
        stream = app.stream(event_id, timeout=2)
        assert [c.data for c in await collect(stream)] == ["c0", "c1", "c2", "c3"]
        log = await bus.broker.read_output(output_key(event_id))
    assert kept == [True] * 4 + [False] * 6
    assert (stream.truncated, stream.result) == (True, "done")
    assert len(log) == 6  # four chunks, one truncation marker, the end


async def test_the_byte_bound_counts_json_bytes() -> None:
    app = make_app(output_max_bytes=20)

    @app.agent("big.asked")
    async def big(question: dict[str, Any], ctx: Context) -> None:
        assert await ctx.emit("x" * 8)  # 10 bytes of JSON
        assert await ctx.emit("y" * 8)
        assert not await ctx.emit("z")

    async with TestApp(app) as bus:
        event_id = await bus.publish("big.asked", {})
        await bus.drain()
        stream = app.stream(event_id, timeout=2)
        assert len(await collect(stream)) == 2
    assert stream.truncated and stream.status == "succeeded"


async def test_typed_chunks_are_checked_at_the_emit_and_read_back_typed() -> None:
    app = App("typed", broker=MemoryBroker(None))
    errors: list[Exception] = []

    @app.agent("typed.asked", stream=Token, max_retries=0)
    async def typed(question: dict[str, Any], ctx: Context) -> None:
        await ctx.emit(Token(text="a", n=1))
        await ctx.emit({"text": "b", "n": "2"})  # validated (and coerced) like a payload
        try:
            await ctx.emit({"text": "c"})
        except PayloadValidationError as exc:
            errors.append(exc)

    @app.agent("loose.asked", max_retries=0)
    async def loose(question: dict[str, Any], ctx: Context) -> None:
        await ctx.emit({"nested": [1, 2.5, None, True]})
        await ctx.emit(object())  # a TypeError fails the handler, not the worker

    async with TestApp(app) as bus:
        typed_id = await bus.publish("typed.asked", {})
        loose_id = await bus.publish("loose.asked", {})
        await bus.drain()
        chunks = await collect(app.stream(typed_id, chunk_type=Token, timeout=2))
        assert [c.data for c in chunks] == [Token(text="a", n=1), Token(text="b", n=2)]
        assert len(errors) == 1
        assert "stream=Token" in str(errors[0])
        with pytest.raises(AgentFailed, match="JSON cannot carry this chunk") as failure:
            await collect(loose := app.stream(loose_id, timeout=2))
        assert failure.value.error_type == "TypeError"
    assert loose.restarts == 0


async def test_agents_that_do_not_stream_write_nothing() -> None:
    app = make_app()

    @app.agent("quiet.asked", stream=str)
    async def quiet(question: dict[str, Any]) -> str:
        return "no chunks"

    async with TestApp(app) as bus:
        plain_id = await bus.publish("plain.asked", {})
        quiet_id = await bus.publish("quiet.asked", {})
        await bus.drain()
        assert await bus.broker.read_output(output_key(plain_id)) == []
        with pytest.raises(TimeoutError, match="no streamed output"):
            await collect(app.stream(plain_id, timeout=0.2))
        # Declared `stream=`: its end is written, so a reader learns the result.
        quiet_stream = app.stream(quiet_id, timeout=2)
        assert await collect(quiet_stream) == []
        assert quiet_stream.result == "no chunks"


async def test_a_retry_that_emits_nothing_still_ends_what_the_first_attempt_began() -> None:
    app = App("undeclared", broker=MemoryBroker(None))

    @app.agent("once.asked", retry_backoff=0.01)  # no `stream=`: chunks of any JSON value
    async def once(question: dict[str, Any], ctx: Context) -> str:
        if ctx.attempt == 1:
            await ctx.emit({"partial": 1})
            raise RuntimeError("broke after a chunk")
        return "answered without streaming"

    async with TestApp(app) as bus:
        event_id = await bus.publish("once.asked", {})
        await bus.drain()
        stream = app.stream(event_id, timeout=2)
        assert [c.data for c in await collect(stream)] == [{"partial": 1}]
    assert (stream.restarts, stream.attempt, stream.result) == (
        1,
        2,
        "answered without streaming",
    )


async def test_agent_picks_one_of_several_streaming_agents() -> None:
    app = App("fan", broker=MemoryBroker(None))

    for name in ("first", "second"):

        def make(name: str) -> Any:
            async def handle(question: dict[str, Any], ctx: Context) -> str:
                await ctx.emit(f"{name} says hi")
                return name

            return handle

        app.agent("fan.asked", name=name, stream=str)(make(name))

    async with TestApp(app) as bus:
        event_id = await bus.publish("fan.asked", {})
        await bus.drain()
        for name in ("first", "second"):
            stream = app.stream(event_id, agent=name, timeout=2)
            assert [c.data for c in await collect(stream)] == [f"{name} says hi"]
            assert stream.result == name
        default = app.stream(event_id, timeout=2)
        await collect(default)
        assert default.agent in {"first", "second"}


async def test_plain_def_handlers_emit_with_emit_sync_and_request_stream_reads() -> None:
    app = App("sync", broker=MemoryBroker(None))

    @app.agent("sync.asked", stream=str)
    def handle(question: dict[str, Any], ctx: Context) -> int:
        for word in question["words"]:
            assert ctx.emit_sync(word)
        return len(question["words"])

    async with TestApp(app):
        stream = await app.request_stream("sync.asked", {"words": ["a", "b"]}, timeout=5)
        assert [c.data async for c in stream] == ["a", "b"]
        assert stream.result == 2


async def test_entries_are_compact_json_naming_agent_and_attempt() -> None:
    app = make_app()
    async with TestApp(app) as bus:
        event_id = await bus.publish("chat.asked", {"words": 1})
        await bus.drain()
        log = await bus.broker.read_output(output_key(event_id))
    assert [orjson.loads(data) for _, data in log] == [
        {"agent": "chat", "attempt": 1, "data": "w0 "},
        {"agent": "chat", "attempt": 1, "end": "succeeded", "result": "w0 "},
    ]


def test_bad_arguments_are_refused() -> None:
    app = make_app()
    with pytest.raises(ValueError, match="positive"):
        app.stream("x", timeout=0)
    with pytest.raises(TypeError, match="cannot validate chunks"):

        @app.agent("bad.asked", stream=object())
        async def bad(question: dict[str, Any]) -> None: ...
