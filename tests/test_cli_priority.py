"""`omnidaemon publish --priority`, run in-process against Redis: the event lands in its
topic's lane (names and 0-9, as an operator types them), `--wait` sends the request there too,
and a value that is not a priority is one line on stderr, exit status 2, nothing sent."""

from __future__ import annotations

import json
import uuid
from typing import Any

import anyio
import pytest
from anyio.from_thread import start_blocking_portal

from omnidaemon import App, Context
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.cli import main
from omnidaemon.lanes import LANES, Lane, lane_topic, lanes_mark_key


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    code = exited.value.code
    assert isinstance(code, int)
    return code


def fresh_topic(name: str) -> str:
    return f"{name}.t{uuid.uuid4().hex[:8]}"


def on_the_bus(url: str, topic: str) -> tuple[dict[Lane, list[bytes]], bytes | None]:
    """The entries of each of the topic's lanes, and the mark that its lanes are used."""

    async def look() -> tuple[dict[Lane, list[bytes]], bytes | None]:
        async with RedisBroker(url) as broker:
            entries: dict[Lane, list[bytes]] = {}
            for lane in LANES:
                entries[lane] = [
                    data for _, data in await broker.entries(lane_topic(topic, lane), 10)
                ]
            return entries, await broker.get_value(lanes_mark_key(topic))

    return anyio.run(look)


@pytest.mark.parametrize(
    ("priority", "lane"),
    [
        ("high", "high"),
        ("HIGH", "high"),
        ("9", "high"),
        ("7", "high"),
        ("normal", "normal"),
        ("6", "normal"),
        ("3", "normal"),
        (None, "normal"),
        ("low", "low"),
        ("2", "low"),
        ("0", "low"),
    ],
    ids=repr,
)
def test_publish_priority_puts_the_event_in_its_lane(
    redis_url: str, capsys: pytest.CaptureFixture[str], priority: str | None, lane: Lane
) -> None:
    topic = fresh_topic("cli")
    flag = [] if priority is None else ["--priority", priority]
    assert run_cli("publish", topic, '{"n": 1}', *flag, "--broker", redis_url, "--json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["topic"] == topic
    entries, mark = on_the_bus(redis_url, topic)
    assert {other: len(held) for other, held in entries.items()} == {
        other: int(other == lane) for other in LANES
    }
    assert printed["event_id"].encode() in entries[lane][0]
    assert (mark is not None) == (lane != "normal")


@pytest.mark.parametrize("priority", ["urgent", "10", "-1", "2.5", "", "high!", "7 high"], ids=repr)
def test_publish_with_an_invalid_priority_is_one_line_and_status_2(
    redis_url: str, capsys: pytest.CaptureFixture[str], priority: str
) -> None:
    topic = fresh_topic("cli")
    assert run_cli("publish", topic, "{}", "--priority", priority, "--broker", redis_url) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.splitlines()
    assert line.startswith("omnidaemon publish: error: Invalid value for --priority"), line
    assert "invalid priority" in line, line
    assert "Traceback" not in captured.err
    entries, mark = on_the_bus(redis_url, topic)
    assert entries == {"high": [], "normal": [], "low": []}
    assert mark is None


def test_publish_wait_sends_the_request_with_its_priority(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = fresh_topic("cliwait")
    worker = App("cliworker", broker=RedisBroker(redis_url))
    seen: list[Lane] = []

    @worker.agent(topic, name="answer")
    async def answer(event: dict[str, int], ctx: Context) -> dict[str, Any]:
        seen.append(ctx.priority)
        return {"n": event["n"], "lane": ctx.priority}

    with start_blocking_portal() as portal, portal.wrap_async_context_manager(worker.running()):
        # The worker reads the topic's lanes once it sees them used (within seconds).
        for priority, lane in [("high", "high"), ("1", "low")]:
            argv = ["publish", topic, '{"n": 4}', "--priority", priority, "--wait"]
            assert run_cli(*argv, "--timeout", "20", "--broker", redis_url, "--json") == 0
            assert json.loads(capsys.readouterr().out) == {"n": 4, "lane": lane}
    assert seen == ["high", "low"]
