"""Traces of whole runs written by two worker processes on a real bus (Redis, NATS
JetStream, a Redis Cluster): the document pipeline's fan-out, a chain, a retry, a dead letter
and a `Reject`, each in its exact place in the tree; and a worker SIGKILLed mid-handler,
whose attempt still shows (abandoned) beside the attempt that took over."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from omnidaemon import App
from omnidaemon.traces import EventTrace, Trace
from tests.e2e._support import (
    WorkerProcess,
    buses_chosen,
    cli_env,
    read_lines,
    side_by_side,
    wait_for,
    write_module,
)

pytestmark = pytest.mark.slow

STARTUP = 20.0

SOURCE = """
    import json
    import os
    import time

    import anyio

    from omnidaemon import App, Context, Reject, Retry

    app = App("traced")
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


    @app.agent(f"{P}.uploaded", publishes=f"{P}.extracted")
    async def extract(event: dict, ctx: Context) -> dict:
        await ctx.publish(f"{P}.audit", {"doc": event["doc"]})
        return {"doc": event["doc"]}


    @app.agent(f"{P}.audit")
    async def audit(event: dict, ctx: Context) -> None:
        pass


    @app.agent(f"{P}.extracted", publishes=f"{P}.summarised", max_retries=2)
    async def summarise(event: dict, ctx: Context) -> dict:
        if ctx.attempt == 1:
            raise Retry(0.2, "model overloaded")
        return {"doc": event["doc"]}


    @app.agent(f"{P}.extracted")
    async def index(event: dict, ctx: Context) -> None:
        if event["doc"] == "bad":
            raise Reject("unsupported format")


    @app.agent(f"{P}.summarised", max_retries=0)
    async def notify(event: dict, ctx: Context) -> None:
        raise RuntimeError("smtp down")


    @app.agent(f"{P}.slow", reclaim_idle=2.0)
    async def slow(event: dict, ctx: Context) -> None:
        note(agent="slow", attempt=ctx.attempt)
        if ctx.attempt == 1:
            await anyio.sleep(60)
"""


def shape(event: EventTrace) -> dict[str, Any]:
    """What a user reads off a tree: topics, each agent's attempts' outcomes, children."""
    return {
        "topic": event.topic.rsplit(".", 1)[-1] if event.topic else None,
        "by": event.published_by,
        "agents": {h.agent: [a.outcome for a in h.attempts] for h in event.handlings},
        "children": sorted((shape(child) for child in event.children), key=lambda s: json.dumps(s)),
    }


def pipeline(summarise_rest: str, index_outcome: str) -> dict[str, Any]:
    notify = {"topic": "summarised", "by": "summarise", "agents": {"notify": ["dead_lettered"]}}
    extracted = {
        "topic": "extracted",
        "by": "extract",
        "agents": {"index": [index_outcome], "summarise": ["retrying", summarise_rest]},
        "children": [{**notify, "children": []}],
    }
    audit = {"topic": "audit", "by": "extract", "agents": {"audit": ["succeeded"]}, "children": []}
    return {
        "topic": "uploaded",
        "by": None,
        "agents": {"extract": ["succeeded"]},
        "children": sorted([audit, extracted], key=lambda s: json.dumps(s)),
    }


def scenario(url: str, tmp: Path, spawn: Callable[..., WorkerProcess]) -> Callable[[], str]:
    def run() -> str:
        prefix = f"t{uuid.uuid4().hex[:8]}"
        log = tmp / "steps.jsonl"
        write_module(tmp, "traced_app", SOURCE)
        env = cli_env(OMNIDAEMON_BROKER_URL=url, T_LOG=str(log), T_PREFIX=prefix)
        workers = [spawn(["traced_app:app"], tmp, env) for _ in range(2)]
        for worker in workers:
            wait_for(lambda w=worker: w.has_logged("worker started"), STARTUP, "a worker")
        client = App("trace-test", broker=url)
        with start_blocking_portal() as portal, portal.wrap_async_context_manager(client):

            def trace(any_id: str) -> Trace | None:
                return portal.call(lambda: client.trace(any_id))

            def settled(any_id: str, expected: dict[str, Any]) -> Trace:
                def check() -> Trace | None:
                    found = trace(any_id)
                    ok = found is not None and found.status != "running"
                    return found if ok and shape(found.events[0]) == expected else None

                try:
                    return wait_for(check, 20, f"the trace of {any_id}", interval=0.2)
                except AssertionError:
                    found = trace(any_id)
                    pytest.fail(f"trace of {any_id}: {found and shape(found.events[0])}")

            good = portal.call(lambda: client.publish(f"{prefix}.uploaded", {"doc": "good"}))
            bad = portal.call(lambda: client.publish(f"{prefix}.uploaded", {"doc": "bad"}))
            good_trace = settled(good, pipeline("succeeded", "succeeded"))
            bad_trace = settled(bad, pipeline("succeeded", "rejected"))
            assert good_trace.run_id == good and good_trace.status == "failed"
            assert [f["agent"] for f in good_trace.failures] == ["notify"]
            assert good_trace.event_count == 4 and good_trace.attempt_count == 6
            assert sorted(f["agent"] for f in bad_trace.failures) == ["index", "notify"]
            # Any event of the run finds it: the leaf's id leads to the same tree.
            leaf = good_trace.events[0]
            while leaf.children:
                leaf = max(leaf.children, key=lambda e: len(e.children) + len(e.handlings))
            again = trace(leaf.id)
            assert again is not None and again.run_id == good
            # Both workers took part (each agent's attempts name their worker).
            seen = {
                a.worker
                for e in _walk(good_trace.events[0]) + _walk(bad_trace.events[0])
                for h in e.handlings
                for a in h.attempts
            }
            assert None not in seen

            # A worker SIGKILLed mid-handler: its attempt is in the trace as it ran.
            slow = portal.call(lambda: client.publish(f"{prefix}.slow", {"n": 1}))
            [first] = wait_for(lambda: _steps(log, "slow"), 15, "the slow handler to start")

            def running() -> bool:
                found = trace(slow)
                return found is not None and found.events[0].handlings[0].status == "running"

            wait_for(running, 10, "the trace to show the slow handler running", interval=0.1)
            victim = next(w for w in workers if w.proc.pid == first["pid"])
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
            expected = {
                "topic": "slow",
                "by": None,
                "agents": {"slow": ["abandoned", "succeeded"]},
                "children": [],
            }
            killed = settled(slow, expected)
            attempts = killed.events[0].handlings[0].attempts
            assert attempts[0].worker != attempts[1].worker
            assert attempts[0].started_at is not None and attempts[0].ended_at is None
            return (
                f"pipeline traces exact on both docs (workers {sorted(seen)}); "
                f"SIGKILLed attempt shown abandoned, taken over after "
                f"{attempts[1].started_at.timestamp() - attempts[0].started_at.timestamp():.1f} s"
                if attempts[1].started_at is not None
                else "?"
            )

    return run


def _walk(event: EventTrace) -> list[EventTrace]:
    return [event] + [e for child in event.children for e in _walk(child)]


def _steps(log: Path, agent: str) -> list[dict[str, Any]]:
    steps = [json.loads(line) for line in read_lines(log)]
    return [s for s in steps if s["agent"] == agent]


def test_traces_across_worker_processes(
    tmp_path: Path, spawn: Callable[..., WorkerProcess], request: pytest.FixtureRequest
) -> None:
    buses = buses_chosen(request, "T_TRACE_BUSES")
    side_by_side({name: scenario(url, tmp_path / name, spawn) for name, url in buses.items()})
