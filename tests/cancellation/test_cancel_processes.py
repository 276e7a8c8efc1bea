"""Cancellation across two worker processes on a real bus (Redis, NATS JetStream, a Redis
Cluster): the canceller is another process, so the workers learn of each cancellation from
the bus alone.

One test per bus runs every case against the same two workers: a running `async def`
handler stopped within about a second, a plain `def` handler told through `ctx.cancelled`,
a delayed event and a retrying one never started again, a run cancelled while it fans out,
and cancels that race their handlers' ends (exactly one outcome each). Handlers write one
fsynced JSON line per step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from omnidaemon import App
from omnidaemon.fleet import fleet_metrics
from tests.e2e._support import (
    WorkerProcess,
    cli_env,
    read_lines,
    wait_for,
    write_module,
)

pytestmark = pytest.mark.slow

STARTUP = 20.0
STOP_WITHIN = 3.0  # "about a second": the workers look every 0.5 s; margin for a loaded CI
RACERS = 30

SOURCE = """
    import json
    import os
    import time

    import anyio

    from omnidaemon import App, Context, Retry

    app = App("cancels")
    LOG = os.environ["T_LOG"]
    P = os.environ["T_PREFIX"]


    def note(**fields):
        fields.update(pid=os.getpid(), at=time.time())
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(fields) + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)


    @app.agent(f"{P}.slow", store_results=True, concurrency=4)
    async def slow(event: dict, ctx: Context) -> None:
        note(agent="slow", n=event["n"], phase="start", attempt=ctx.attempt)
        try:
            await anyio.sleep(60)
        finally:
            note(agent="slow", n=event["n"], phase="stopped")


    @app.agent(f"{P}.sync", store_results=True, concurrency=2)
    def crunch(event: dict, ctx: Context) -> dict:
        note(agent="sync", n=event["n"], phase="start")
        deadline = time.monotonic() + 60
        while not ctx.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        note(agent="sync", n=event["n"], phase="saw", cancelled=ctx.cancelled)
        return event


    @app.agent(f"{P}.flaky", store_results=True, max_retries=5)
    async def flaky(event: dict, ctx: Context) -> None:
        note(agent="flaky", n=event["n"], phase="start", attempt=ctx.attempt)
        raise Retry(delay=2)


    @app.agent(f"{P}.fan", store_results=True)
    async def fan(event: dict, ctx: Context) -> None:
        note(agent="fan", n=0, phase="start")
        for n in range(event["children"]):
            await ctx.publish(f"{P}.child", {"n": n})
            await anyio.sleep(0.1)
        note(agent="fan", n=0, phase="end")


    @app.agent(f"{P}.child", publishes=f"{P}.leaf", store_results=True, concurrency=16)
    async def child(event: dict, ctx: Context) -> dict:
        note(agent="child", n=event["n"], phase="start")
        await anyio.sleep(1.0)
        note(agent="child", n=event["n"], phase="end")
        return event


    @app.agent(f"{P}.leaf", store_results=True)
    async def leaf(event: dict, ctx: Context) -> None:
        note(agent="leaf", n=event["n"], phase="start")


    @app.agent(f"{P}.race", publishes=f"{P}.raced", store_results=True, concurrency=32)
    async def race(event: dict, ctx: Context) -> dict:
        note(agent="race", n=event["n"], phase="start")
        await anyio.sleep(event["hold"])
        note(agent="race", n=event["n"], phase="end")
        return event


    @app.agent(f"{P}.raced", concurrency=32)
    async def raced(event: dict, ctx: Context) -> None:
        note(agent="raced", n=event["n"], phase="start")
"""


def _steps(log: Path, agent: str, phase: str = "start") -> list[dict[str, Any]]:
    steps = [json.loads(line) for line in read_lines(log)]
    return sorted(
        (s for s in steps if s["agent"] == agent and s["phase"] == phase), key=lambda s: s["at"]
    )


BUSES = ["redis", "nats", "cluster"]


@pytest.mark.parametrize("bus", BUSES)
def test_cancellation_across_worker_processes(
    bus: str, tmp_path: Path, spawn: Callable[..., WorkerProcess], request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{bus}_url")
    prefix = f"c{uuid.uuid4().hex[:8]}"
    write_module(tmp_path, "cancel_app", SOURCE)
    log = tmp_path / "steps.jsonl"
    env = cli_env(OMNIDAEMON_BROKER_URL=url, T_LOG=str(log), T_PREFIX=prefix)
    workers = [spawn(["cancel_app:app"], tmp_path, env) for _ in range(2)]
    for worker in workers:
        wait_for(lambda w=worker: w.has_logged("worker started"), STARTUP, "a worker to start")
    client = App("cancel-test", broker=url)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(client):

        def publish(topic: str, payload: dict[str, Any], **options: Any) -> str:
            return portal.call(lambda: client.publish(f"{prefix}.{topic}", payload, **options))

        def cancel(event_id: str | None = None, **options: Any) -> None:
            portal.call(lambda: client.cancel(event_id, **options))

        def status(event_id: str, agent: str | None = None) -> str:
            return portal.call(lambda: client.result(event_id, agent=agent)).status

        def settles_as(event_id: str, expected: str, within: float = 15.0) -> None:
            wait_for(lambda: status(event_id) == expected, within, f"{event_id} {expected}")

        # A running async handler: stopped at its await, within about a second.
        slow_id = publish("slow", {"n": 1})
        wait_for(lambda: _steps(log, "slow"), 10, "the slow handler to start")
        asked = time.time()
        cancel(slow_id, reason="user gave up")
        stopped = wait_for(lambda: _steps(log, "slow", "stopped"), 10, "the handler to stop")
        assert stopped[0]["at"] - asked < STOP_WITHIN
        figures = [f"async handler stopped {stopped[0]['at'] - asked:.2f} s after the cancel"]
        settles_as(slow_id, "cancelled")

        # Plain def handlers: told through ctx.cancelled, their return values dropped. Two
        # workers run two each: the fifth event waits on the topic, and is never started.
        syncs = [publish("sync", {"n": n}) for n in range(5)]
        started = wait_for(lambda: len(_steps(log, "sync")) >= 4 and _steps(log, "sync"), 10)
        [waiting] = set(range(5)) - {s["n"] for s in started}
        cancel(syncs[waiting], reason="never mind")  # settled once a worker reaches it
        asked = time.time()
        for n, event_id in enumerate(syncs):
            if n != waiting:
                cancel(event_id)
        saw = wait_for(
            lambda: len(_steps(log, "sync", "saw")) >= 4 and _steps(log, "sync", "saw"), 10
        )
        assert all(s["cancelled"] is True and s["at"] - asked < STOP_WITHIN for s in saw)
        figures.append(f"sync handlers saw it within {max(s['at'] for s in saw) - asked:.2f} s")
        for event_id in syncs:
            settles_as(event_id, "cancelled")

        # A delayed event, and one waiting for its retry: never started (again).
        delayed_id = publish("slow", {"n": 2}, delay=2)
        cancel(delayed_id)
        flaky_id = publish("flaky", {"n": 1})
        wait_for(lambda: status(flaky_id) == "retrying", 10, "the flaky event to retry")
        cancel(flaky_id, reason="no point")
        settles_as(delayed_id, "cancelled")
        settles_as(flaky_id, "cancelled")
        assert [s["attempt"] for s in _steps(log, "flaky")] == [1]

        # A run cancelled while it fans out: what has not finished is cancelled, wherever it
        # is, and what its handlers would publish later is too.
        run = f"run-{uuid.uuid4().hex}"
        fan_id = publish("fan", {"children": 40}, correlation_id=run)
        wait_for(lambda: len(_steps(log, "child")) >= 8, 15, "the fan-out to be under way")
        cut = time.time()
        cancel(correlation_id=run, reason="abandoned")
        settles_as(fan_id, "cancelled")
        children = wait_for(
            lambda: (
                [
                    e
                    for e in portal.call(lambda: _children(client, prefix, run))
                    if status(e) in ("succeeded", "cancelled")
                ]
                or None
            ),
            15,
            "the children's outcomes",
        )
        published_children = portal.call(lambda: _children(client, prefix, run))
        wait_for(
            lambda: all(status(e) in ("succeeded", "cancelled") for e in published_children),
            15,
            "every child to finish one way or the other",
        )
        assert children
        assert len(published_children) < 40, "the fan-out went on after it was cancelled"
        late = [
            s for s in _steps(log, "child") + _steps(log, "leaf") if s["at"] > cut + STOP_WITHIN
        ]
        assert late == [], "a handler of the run started after it was cancelled"
        assert any(status(e) == "cancelled" for e in published_children)

        # Cancels racing the handlers' ends (handlers of 0.2 to 1.65 s, cancelled around the
        # time the first ones end): each event gets exactly one outcome, and its output is
        # published exactly when that outcome is `succeeded`.
        racers = [publish("race", {"n": n, "hold": 0.2 + 0.05 * n}) for n in range(RACERS)]
        wait_for(lambda: len(_steps(log, "race")) >= RACERS, 15, "every racer to start")
        time.sleep(max(0.0, _steps(log, "race")[0]["at"] + 0.45 - time.time()))
        for event_id in racers:
            cancel(event_id, reason="race")
        wait_for(
            lambda: all(status(e) in ("succeeded", "cancelled") for e in racers),
            15,
            "every racer's outcome",
        )
        outcomes = {e: status(e) for e in racers}
        succeeded = {n for n, e in enumerate(racers) if outcomes[e] == "succeeded"}
        wait_for(lambda: {s["n"] for s in _steps(log, "raced")} >= succeeded, 10, "the outputs")
        time.sleep(0.5)  # an output of a cancelled racer would have come by now
        assert {s["n"] for s in _steps(log, "raced")} == succeeded

        def counted() -> dict[str, int] | None:
            found = portal.call(lambda: fleet_metrics(client.broker, agent="race"))
            counts = found[0].to_json() if found else {}
            total = counts.get("succeeded", 0) + counts.get("cancelled", 0)
            return counts if total >= RACERS else None

        counts = wait_for(counted, 10, "the racers' metrics")
        assert counts["succeeded"] + counts["cancelled"] == RACERS  # one outcome each
        assert counts["succeeded"] == len(succeeded) and counts["failed"] == 0
        assert counts["retried"] == 0 and counts["dead_lettered"] == 0
        figures.append(f"racers: {counts['succeeded']} succeeded, {counts['cancelled']} cancelled")
        print(f"{bus}: " + "; ".join(figures))  # the figures, for the resolution note (-s)

    # Nothing cancelled was started again.
    assert [s["attempt"] for s in _steps(log, "slow")] == [1]
    assert len(_steps(log, "sync")) == 4  # the waiting one never started


async def _children(client: App, prefix: str, run: str) -> list[str]:
    """The ids of the child events the run's fan-out published."""
    entries = await client.broker.entries(f"{prefix}.child", 1000)
    ids = []
    for _, data in entries:
        envelope = json.loads(data)
        if envelope.get("correlation_id") == run:
            ids.append(envelope["id"])
    return ids
