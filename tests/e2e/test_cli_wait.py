"""`publish --wait` and `result` against a real Redis and a real worker process: every dead
letter answers a waiting request at once, and `result` follows a pipeline from the id publish
printed. The commands run in the test process (`tests/e2e/_in_process.py`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import WorkerProcess, cli_env, wait_for, write_module
from tests.servers import running_redis

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 20.0  # seconds a fresh worker may take to import and start handling
WORKER_MAX_BYTES = 2_000  # the worker's max_payload_bytes; the CLI keeps the default (1 MiB)
PATIENCE = 60.0  # the --timeout of waits that must end long before it

APP = """
    import os

    from pydantic import BaseModel

    from omnidaemon import App

    app = App("waits")
    SUFFIX = os.environ["E2E_SUFFIX"]


    class Job(BaseModel):
        n: int


    @app.agent(f"typed.{SUFFIX}", name="typed", max_retries=3)
    async def typed(job: Job) -> dict:
        return {"doubled": job.n * 2}


    @app.agent(f"flaky.{SUFFIX}", name="flaky", max_retries=1, retry_backoff=0.05)
    async def flaky(job: Job) -> dict:
        raise RuntimeError(f"job {job.n} never works")


    @app.agent(f"unserved.{SUFFIX}", name="unserved")
    async def unserved(job: Job) -> None:
        pass  # declares the topic's type; no worker of these tests runs it


    @app.agent(f"stage1.{SUFFIX}", name="extract", publishes=f"stage2.{SUFFIX}")
    async def extract(job: Job) -> Job:
        return Job(n=job.n + 1)


    @app.agent(f"stage2.{SUFFIX}", name="summarise", store_results=True)
    async def summarise(job: Job) -> dict:
        return {"summary": job.n * 10}
"""


@dataclass
class Bus:
    """A private Redis, the environment that selects it, and the worker running APP."""

    env: dict[str, str]
    cwd: Path
    suffix: str

    def topic(self, name: str) -> str:
        return f"{name}.{self.suffix}"

    def cli(self, *args: str) -> Ran:
        return run_in_process(args, self.cwd, self.env)

    def timed(self, *args: str) -> tuple[Ran, float]:
        started = time.monotonic()
        done = self.cli(*args)
        return done, time.monotonic() - started


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    cwd = tmp_path_factory.mktemp("cli-wait")
    write_module(cwd, "waits", APP)
    suffix = uuid.uuid4().hex[:8]
    with running_redis(cwd) as server:
        env = cli_env(OMNIDAEMON_BROKER_URL=server.url, E2E_SUFFIX=suffix)
        worker_env = {**env, "OMNIDAEMON_MAX_PAYLOAD_BYTES": str(WORKER_MAX_BYTES)}
        served = "typed,flaky,extract,summarise"
        worker = WorkerProcess(["waits:app", "--agents", served], cwd, worker_env)
        try:
            wait_for(lambda: worker.has_logged("worker started"), STARTUP_TIMEOUT, "the worker")
            yield Bus(env, cwd, suffix)
        finally:
            worker.kill()


def test_publish_wait_fails_at_once_with_the_dead_letters_reason(bus: Bus) -> None:
    too_large = orjson.dumps({"n": 1, "pad": "x" * WORKER_MAX_BYTES}).decode()
    waits = [
        ("typed", '{"n": "many"}', "PayloadValidationError"),
        ("typed", too_large, "PayloadTooLarge"),
        ("typed", '["not", "an", "object"]', "PayloadValidationError"),
        ("flaky", '{"n": 7}', "RuntimeError: job 7 never works"),
    ]

    def wait(topic: str, data: str) -> tuple[Ran, float]:
        return bus.timed("publish", bus.topic(topic), data, "--wait", "--timeout", str(PATIENCE))

    done = [wait(topic, data) for topic, data, _ in waits]

    for (topic, _, reason), (run, elapsed) in zip(waits, done, strict=True):
        assert run.returncode == 1, (topic, reason, run.stdout, run.stderr)
        assert reason in run.stderr, run.stderr
        assert f"agent '{topic}' failed" in run.stderr
        assert "TimeoutError" not in run.stderr
        # Answered by the dead letter, not by the timeout: well under PATIENCE even on a busy
        # machine.
        assert elapsed < PATIENCE / 3, (reason, elapsed)


def test_publish_with_app_refuses_an_invalid_payload_before_sending(bus: Bus) -> None:
    topic = bus.topic("unserved")

    refused = bus.cli("publish", topic, '{"n": "many"}', "--app", "waits:app")
    inspected = bus.cli("bus", "inspect", topic)

    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == ""
    [line] = refused.stderr.splitlines()
    assert "the payload is not a valid Job" in line
    # Nothing was sent: the topic does not even exist.
    assert inspected.stderr.splitlines() == [
        f"omnidaemon bus inspect: error: no topic {topic!r} on the bus"
    ]


def test_publish_to_a_topic_no_agent_reads_warns_once_and_keeps_the_event(bus: Bus) -> None:
    topic = bus.topic("nobody")

    published = bus.cli("publish", topic, '{"n": 1}')
    inspected = bus.cli("bus", "inspect", topic, "--json")
    read = bus.cli("publish", bus.topic("typed"), '{"n": 1}')

    assert published.returncode == 0, published.stderr
    event_id = published.stdout.strip()
    assert published.stderr.splitlines() == [
        f"omnidaemon publish: warning: no agent reads {topic!r} yet (the topic has no "
        "consumer group); the event is kept on the topic for agents that subscribe later"
    ]
    [entry] = orjson.loads(inspected.stdout)
    assert entry["id"] == event_id
    assert read.returncode == 0
    assert read.stderr == ""  # a topic an agent reads: no warning


def test_result_of_a_pipelines_first_event_says_what_happened_and_where_it_went(
    bus: Bus,
) -> None:
    published = bus.cli("publish", bus.topic("stage1"), '{"n": 4}')
    first = published.stdout.strip()
    # The pipeline's result is stored by its second stage, on the event the first published.
    done = {}

    def finished() -> bool:
        done["run"] = bus.cli("result", first)
        # The child is published before the first event's (batched) acknowledgement.
        out = done["run"].stdout
        return "on " + bus.topic("stage2") in out and "agent extract: handled" in out

    wait_for(finished, 20, "the first stage's child event", interval=0.2)
    lines = done["run"].stdout.splitlines()
    assert lines[0] == f"{first}  no result stored for this event"
    assert lines[1] == f"topic: {bus.topic('stage1')}"
    assert lines[2] == "  agent extract: handled"
    assert lines[3].startswith("published by its handlers")
    child, on, topic = lines[4].split()
    assert (on, topic) == ("on", bus.topic("stage2"))

    followed = bus.cli("result", child, "--wait", "--timeout", "20", "--json")
    assert followed.returncode == 0, followed.stderr
    [record] = orjson.loads(followed.stdout)
    assert record["agent"] == "summarise"
    assert record["result"] == {"summary": 50}
