"""`omnidaemon limits`: every limit's state read from the bus alone (a budget's level and its
debt, a keyed rate limit's level, a key's slots held, and how long a fresh event would wait);
and a worker's Prometheus gauges of its app's budgets' levels."""

from __future__ import annotations

import json
import re
from functools import partial
from typing import Any

import anyio
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from omnidaemon import App, Budget, Context, RateLimit
from omnidaemon.brokers import MemoryBroker
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.cli import main as cli_main
from omnidaemon.flow.gate import state_key
from omnidaemon.flow.inspect import LimitState, limit_states
from omnidaemon.observability.exporter import render_prometheus, serve_metrics
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio


async def test_limits_show_a_budget_in_debt_a_keyed_rate_limit_and_held_slots() -> None:
    app = App("limits-view")
    release = anyio.Event()
    holding: list[int] = []

    @app.agent("spend.asked", budgets=[Budget("model.tokens", 100, per="second")])
    async def spend(event: dict[str, int], ctx: Context) -> None:
        await ctx.charge("model.tokens", 300)  # 200 more than the budget holds: a debt

    @app.agent(
        "paced.asked", rate_limit=RateLimit(10, per=1, burst=2), rate_limit_key=lambda e: e["k"]
    )
    async def paced(event: dict[str, str]) -> None:
        pass

    @app.agent("slotted.asked", key_concurrency=2, concurrency_key=lambda e: e["k"])
    async def slotted(event: dict[str, Any]) -> None:
        holding.append(event["n"])
        await release.wait()

    async with TestApp(app) as bus:
        await bus.publish("spend.asked", {"n": 1})
        await bus.drain()
        for n in range(3):
            await bus.publish("slotted.asked", {"k": "a:b", "n": n})
        with anyio.fail_after(5):
            while len(holding) < 2:
                await anyio.sleep(0.01)
        for _ in range(3):
            await bus.publish("paced.asked", {"k": "x"})
        with anyio.fail_after(5):
            while True:  # until the third of "x" has been refused: it waits in line
                states = {(s.kind, s.name, s.key): s for s in await limit_states(bus.broker)}
                rate = states.get(("rate", "paced", "x"))
                if rate is not None and rate.waiting > 0:
                    break
                await anyio.sleep(0.005)
        release.set()
        await bus.drain()

    budget = states[("budget", "model.tokens", None)]
    assert (budget.capacity, budget.rate) == (100.0, 100.0)
    assert budget.level is not None and -200.5 < budget.level < -150  # in debt, paying back
    slots = states[("slots", "slotted", "a:b")]  # a key with ':' reads back as it was
    assert (slots.held, slots.slots) == (2, 2)  # the third event of "a:b" waits for one
    assert (rate.capacity, rate.rate) == (2.0, 10.0)
    assert rate.level is not None and rate.level < 1  # the burst is spent


async def test_values_that_are_no_limits_state_are_skipped() -> None:
    async with MemoryBroker() as broker:
        await broker.set_value("flow:rate:a", b"not json", 60)
        await broker.set_value("flow:unknown:a", b"{}", 60)
        await broker.set_value("flow:budget:b", b"[1, 2]", 60)
        await broker.set_value(state_key("budget", "shapeless"), b"{}", 60)
        assert await limit_states(broker) == [
            LimitState("budget", "shapeless", None, None, None, None, None, None, 0.0)
        ]


def test_the_limits_command_reads_the_bus(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def write() -> None:
        async with RedisBroker(redis_url) as broker:
            now = broker.clock()
            # A budget of 90,000 a minute, 30,000 in debt, and events waiting 2 s for it.
            state = {"t": now + 80.0, "w": now + 2.0, "r": 1500.0, "c": 90000.0}
            await broker.set_value(state_key("budget", "openai.tokens"), orjson.dumps(state), 600)

    anyio.run(write)

    def run(*args: str) -> str:
        with pytest.raises(SystemExit) as exited:
            cli_main(["limits", "--broker", redis_url, *args])
        out, err = capsys.readouterr()
        assert exited.value.code == 0, err
        return out

    [budget] = [s for s in json.loads(run("--json")) if s["name"] == "openai.tokens"]
    assert budget["kind"] == "budget" and budget["capacity"] == 90000.0
    assert -30_100 < budget["level"] < -29_000  # paid back at 1,500/s since it was written
    assert 1.5 < budget["waiting"] <= 2.0
    table = run()
    line = next(line for line in table.splitlines() if "openai.tokens" in line)
    assert re.search(r" -(29|30),\d{3} of 90,000 ", line), line


async def test_a_workers_metrics_endpoint_shows_each_budgets_level_and_its_debt() -> None:
    app = App("budget-gauges")
    tokens = Budget("model.tokens", 1000, per="minute")

    @app.agent("spend.asked", budgets=[tokens])
    async def spend(event: dict[str, int], ctx: Context) -> None:
        await ctx.charge("model.tokens", event["used"])

    async with TestApp(app) as bus:
        worker = bus._worker
        assert worker is not None
        await worker.budget_levels.refresh()
        assert worker.budget_levels.gauges() == {"model.tokens": (1000.0, 1000.0)}  # full
        await bus.publish("spend.asked", {"used": 1500})
        await bus.drain()
        await worker.budget_levels.refresh()
        async with anyio.create_task_group() as tg:
            port = await tg.start(
                partial(
                    serve_metrics,
                    "127.0.0.1",
                    0,
                    snapshots=list,
                    ready=lambda: True,
                    worker="w",
                    app=app.name,
                    budgets=worker.budget_levels.gauges,
                )
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                text = (await client.get("/metrics")).text
            tg.cancel_scope.cancel()
    samples = {
        sample.name: sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    level = samples["omnidaemon_budget_level"]
    assert level.labels == {"app": "budget-gauges", "budget": "model.tokens"}
    assert -500.5 < level.value < -480  # 1,500 used of 1,000: in debt by 500, paid back slowly
    assert samples["omnidaemon_budget_capacity"].value == 1000.0


def test_no_budgets_no_budget_series() -> None:
    text = render_prometheus([], worker="w", app="shop", budgets={}).decode()
    assert "omnidaemon_budget" not in text
