"""Operator commands of issue 16 on the session's Redis: purging a backlog while keeping the
groups, output cut short by `| head`, unknown agents, plurals. The commands run in the test
process (`tests/e2e/_in_process.py`); `| head` is a real subprocess, and workers are processes.

Every test uses topics of its own: the Redis server is shared with the rest of the session.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from omnidaemon.brokers import RedisBroker, Subscription
from tests.e2e._in_process import run_in_process
from tests.e2e._support import (
    CLI,
    WorkerProcess,
    cli_env,
    wait_for,
    write_module,
)
from tests.servers import RedisServer

ONE_AGENT_APP = """
    from pydantic import BaseModel

    from omnidaemon import App

    app = App("solo")


    class Note(BaseModel):
        text: str


    @app.agent("notes.taken", max_retries=2)
    async def keep(note: Note) -> None:
        '''Keeps the note.'''
"""


@pytest.fixture
def env(redis_server: RedisServer) -> dict[str, str]:
    return cli_env(OMNIDAEMON_BROKER_URL=redis_server.url)


def cli_json(args: list[str], cwd: Path, env: dict[str, str]) -> Any:
    done = run_in_process([*args, "--json"], cwd, env)
    assert done.returncode == 0, done.stderr
    return orjson.loads(done.stdout)


def test_bus_purge_keep_groups_drops_the_backlog_and_keeps_the_agents_groups(
    redis_server: RedisServer, env: dict[str, str], tmp_path: Path
) -> None:
    topic = f"ops{uuid.uuid4().hex[:8]}.jobs"

    async def prepare() -> None:
        async with RedisBroker(redis_server.url) as broker:
            for agent in ("alpha", "beta"):
                await broker.subscribe(Subscription(topic, agent))
            await broker.publish_many([(topic, b'{"id":"x"}')] * 3)
            await broker.publish(topic, b'{"id":"later"}', delay=600)

    anyio.run(prepare)

    purged = run_in_process(["bus", "purge", topic, "--keep-groups", "--yes"], tmp_path, env)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == (
        f"purged the backlog of {topic} (3 entries, 1 delayed, 0 pending or retrying); "
        "kept 2 agents\n"
    )
    [after] = [t for t in cli_json(["bus", "list"], tmp_path, env) if t["topic"] == topic]
    assert (after["length"], after["delayed"]) == (0, 0)
    assert [(g["agent"], g["lag"], g["pending"]) for g in after["groups"]] == [
        ("alpha", 0, 0),
        ("beta", 0, 0),
    ]
    published = run_in_process(["publish", topic, '{"n": 1}'], tmp_path, env)
    assert published.returncode == 0, published.stderr
    [later] = [t for t in cli_json(["bus", "list"], tmp_path, env) if t["topic"] == topic]
    assert [g["lag"] for g in later["groups"]] == [1, 1]  # the groups see what comes next

    both = run_in_process(["bus", "purge", topic, "--keep-groups", "--dlq", "--yes"], tmp_path, env)
    assert both.returncode == 2
    assert len(both.stderr.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("args", [["bus", "list"], ["agents", "solo"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(
    args: list[str], env: dict[str, str], tmp_path: Path
) -> None:
    write_module(tmp_path, "solo", ONE_AGENT_APP)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head -1` that already exited: every write fails with EPIPE
    try:
        done = subprocess.run(
            [*CLI, *args],
            cwd=tmp_path,
            env=env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as `seq 1 1000000 | head -1` leaves it


def test_bus_dlq_of_an_unknown_agent_says_so_like_replay(
    env: dict[str, str], tmp_path: Path, redis_server: RedisServer
) -> None:
    topic = f"ops{uuid.uuid4().hex[:8]}.jobs"

    async def prepare() -> None:
        async with RedisBroker(redis_server.url) as broker:
            await broker.subscribe(Subscription(topic, "research"))

    anyio.run(prepare)
    on_topic = run_in_process(["bus", "dlq", topic, "--agent", "reserch"], tmp_path, env)
    anywhere = run_in_process(["bus", "dlq", "--agent", "reserch", "--json"], tmp_path, env)
    replay = run_in_process(["bus", "replay", topic, "--agent", "reserch", "--all"], tmp_path, env)

    for done in (on_topic, anywhere, replay):
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
    assert on_topic.stderr == (
        f"omnidaemon bus dlq: error: no agent 'reserch' reads topic {topic!r}\n"
    )
    assert replay.stderr == (
        f"omnidaemon bus replay: error: no agent 'reserch' reads topic {topic!r}\n"
    )
    assert anywhere.stderr == (
        "omnidaemon bus dlq: error: no agent 'reserch' reads any topic on the bus\n"
    )


def test_agents_of_a_one_agent_app_says_one_agent(env: dict[str, str], tmp_path: Path) -> None:
    write_module(tmp_path, "solo", ONE_AGENT_APP)
    done = run_in_process(["agents", "solo"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].strip() == "app solo: 1 agent:"
    [agent] = cli_json(["agents", "solo"], tmp_path, env)
    assert agent["backoff"]["jitter"] is True


SLOW_APP = """
    import os
    from pathlib import Path

    import anyio
    from pydantic import BaseModel

    from omnidaemon import App

    app = App("slow")
    GATE = Path(os.environ["E2E_GATE"])


    class Task(BaseModel):
        n: int


    @app.agent(os.environ["E2E_TOPIC"], name="crawler", concurrency=4)
    async def crawl(task: Task) -> None:
        '''Runs until the gate file is removed.'''
        while GATE.exists():
            await anyio.sleep(0.05)
"""


@pytest.mark.slow
def test_inspect_shows_the_events_each_worker_runs_now(
    env: dict[str, str], tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    topic = f"ops{uuid.uuid4().hex[:8]}.crawl"
    gate = tmp_path / "gate"
    gate.touch()
    write_module(tmp_path, "slow", SLOW_APP)
    env = {**env, "E2E_GATE": str(gate), "E2E_TOPIC": topic}
    env["OMNIDAEMON_HEARTBEAT_INTERVAL"] = "0.2"
    worker = spawn(["slow:app"], tmp_path, env)
    wait_for(lambda: worker.has_logged("worker started"), 20, "the worker")
    ids = []
    for n in (1, 2):
        done = run_in_process(["publish", topic, orjson.dumps({"n": n}).decode()], tmp_path, env)
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())

    def running() -> Any:
        [mine] = [w for w in cli_json(["inspect", "slow:app"], tmp_path, env)]
        return mine if mine["count"] == 2 else None

    mine = wait_for(running, 20, "both events to show as running", interval=0.1)
    assert mine["pid"] == worker.proc.pid
    assert {r["event_id"] for r in mine["running"]} == set(ids)
    for r in mine["running"]:
        assert (r["agent"], r["topic"], r["attempt"]) == ("crawler", topic, 1)
        assert "payload" not in r
    with_payload = cli_json(["inspect", "slow:app", "--payload"], tmp_path, env)
    payloads = {r["event_id"]: r["payload"] for w in with_payload for r in w["running"]}
    assert payloads == {ids[0]: {"n": 1}, ids[1]: {"n": 2}}

    table = run_in_process(["inspect", "--agent", "crawler", "--payload"], tmp_path, env)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:4] == ["WORKER", "AGENT", "EVENT", "ID"]
    [row] = [line for line in lines if ids[0] in line]
    assert row.split()[1:4] == ["crawler", ids[0], "1"]
    assert row.endswith('{"n":1}')

    gate.unlink()
    wait_for(
        lambda: cli_json(["inspect", "slow:app"], tmp_path, env)[0]["count"] == 0,
        20,
        "the events to finish",
        interval=0.1,
    )


def test_agents_json_has_schemas_and_asyncapi_prints_the_document(
    env: dict[str, str], tmp_path: Path
) -> None:
    write_module(tmp_path, "solo", ONE_AGENT_APP)
    [agent] = cli_json(["agents", "solo"], tmp_path, env)
    assert agent["payload_schema"] == {
        "properties": {"text": {"title": "Text", "type": "string"}},
        "required": ["text"],
        "title": "Note",
        "type": "object",
    }
    assert agent["return_schema"] == {"type": "null"}

    as_json = run_in_process(["asyncapi", "solo", "--api-version", "3.1.4"], tmp_path, env)
    assert as_json.returncode == 0, as_json.stderr
    document = orjson.loads(as_json.stdout)
    assert (document["asyncapi"], document["info"]["version"]) == ("3.0.0", "3.1.4")
    [channel] = document["channels"].values()
    assert channel["address"] == "notes.taken"
    [operation] = document["operations"].values()
    assert operation["action"] == "receive"
    assert document["components"]["schemas"]["Note"] == agent["payload_schema"]

    as_yaml = run_in_process(["asyncapi", "solo", "--format", "yaml"], tmp_path, env)
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert as_yaml.stdout.startswith("asyncapi: 3.0.0\ninfo:\n  title: solo\n")
    bad = run_in_process(["asyncapi", "solo", "--format", "xml"], tmp_path, env)
    assert bad.returncode == 2
    assert len(bad.stderr.splitlines()) == 1


NOTES_APP = """
    import os

    from pydantic import BaseModel

    from omnidaemon import App, Context

    app = App("notes")
    LOG = os.environ["E2E_LOG"]


    class Note(BaseModel):
        text: str


    @app.agent(os.environ["E2E_TOPIC"], name="keeper", max_retries=0)
    async def keep(note: Note, ctx: Context) -> None:
        with open(LOG, "a") as log:
            event = ctx.event
            log.write(f"{note.text} {event.id} {event.correlation_id} {ctx.attempt}\\n")
"""

FIXING_EDITOR = """
import json, sys
path = sys.argv[1]
with open(path) as f:
    payload = json.load(f)
payload["text"] = payload.pop("txt") + " (fixed)"
with open(path, "w") as f:
    json.dump(payload, f)
"""


@pytest.mark.slow
def test_bus_replay_edit_replays_one_dead_letter_with_a_corrected_payload(
    env: dict[str, str], tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    topic = f"ops{uuid.uuid4().hex[:8]}.notes"
    log = tmp_path / "handled.log"
    write_module(tmp_path, "notes", NOTES_APP)
    editor = tmp_path / "fix.py"
    editor.write_text(FIXING_EDITOR)
    env = {**env, "E2E_LOG": str(log), "E2E_TOPIC": topic}
    worker = spawn(["notes:app"], tmp_path, env)
    wait_for(lambda: worker.has_logged("worker started"), 20, "the worker")
    published = run_in_process(["publish", topic, '{"txt": "buy milk"}'], tmp_path, env)
    assert published.returncode == 0, published.stderr
    dead = published.stdout.strip()
    wait_for(
        lambda: cli_json(["bus", "dlq", topic], tmp_path, env), 20, "the event to be dead-lettered"
    )
    replay = ["bus", "replay", topic, "--agent", "keeper", "--id", dead, "--app", "notes:app"]

    invalid = run_in_process([*replay, "--payload", '{"text": 5}'], tmp_path, env)
    assert (invalid.returncode, invalid.stdout) == (1, "")
    assert invalid.stderr.splitlines() == [
        "omnidaemon bus replay: error: the corrected payload is not a valid Note: "
        "text: Input should be a valid string"
    ]
    unchecked = run_in_process([*replay[:-2], "--payload", '{"text": "x"}'], tmp_path, env)
    assert unchecked.returncode == 2
    assert "--app" in unchecked.stderr and len(unchecked.stderr.splitlines()) == 1
    assert len(cli_json(["bus", "dlq", topic], tmp_path, env)) == 1  # nothing changed

    edited = run_in_process([*replay, "--edit"], tmp_path, {**env, "EDITOR": f"{CLI[0]} {editor}"})
    assert edited.returncode == 0, edited.stderr
    *_, new_id = edited.stdout.split(" as ")[1].split(",")[0].split()
    assert edited.stdout == (
        f"replayed {dead} to keeper on {topic} as {new_id}, with the corrected payload\n"
    )
    handled = wait_for(lambda: log.exists() and log.read_text(), 20, "the corrected event")
    # The new event: its own id, the dead one's correlation, a first attempt.
    assert handled == f"buy milk (fixed) {new_id} {dead} 1\n"
    assert cli_json(["bus", "dlq", topic], tmp_path, env) == []
