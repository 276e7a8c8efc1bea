"""`omnidaemon metrics`, `limits` and `health`: the whole fleet's work and state, from the bus."""

from typing import Annotated

import typer

from omnidaemon.cli._common import BrokerOption, JsonOption, open_cli_broker, run_async
from omnidaemon.cli._output import age, emit_json, number, print_table, say

__all__ = ["health", "limits", "metrics"]


def metrics(
    topic: Annotated[str | None, typer.Option("--topic", help="Only this topic's agents.")] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.")] = None,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """Per agent, summed over every worker: received, succeeded, failed, retried,
    dead-lettered, held back by flow control (THROTTLED, and how long they waited), cancelled,
    in flight,
    handler duration and end-to-end latency."""
    from omnidaemon.fleet import fleet_metrics

    async def run() -> None:
        async with open_cli_broker(broker) as bus:
            snapshots = await fleet_metrics(bus, topic=topic, agent=agent)
        if json:
            emit_json([s.to_json() for s in snapshots])
            return
        print_table(
            [
                "TOPIC",
                "AGENT",
                "RECEIVED",
                "OK",
                "FAILED",
                "RETRIED",
                "DLQ",
                "THROTTLED",
                "WAIT P99",
                "CANCELLED",
                "IN FLIGHT",
                "P50",
                "P99",
                "LATENCY P50",
                "LATENCY P99",
            ],
            [
                [
                    s.topic,
                    s.agent,
                    number(s.received),
                    number(s.succeeded),
                    number(s.failed),
                    number(s.retried),
                    number(s.dead_lettered),
                    number(s.throttled),
                    age(s.wait.quantile(0.99)),
                    number(s.cancelled),
                    number(s.in_flight),
                    age(s.duration.quantile(0.5)),
                    age(s.duration.quantile(0.99)),
                    age(s.latency.quantile(0.5)),
                    age(s.latency.quantile(0.99)),
                ]
                for s in snapshots
            ],
            numeric=[
                "RECEIVED",
                "OK",
                "FAILED",
                "RETRIED",
                "DLQ",
                "THROTTLED",
                "CANCELLED",
                "IN FLIGHT",
            ],
            empty="no metrics yet: no worker has handled an event",
        )

    run_async("metrics", run)


def limits(broker: BrokerOption = None, json: JsonOption = False) -> None:
    """Every flow-control limit on the bus now, per agent, budget and key: a rate limit's or
    budget's level (below 0: a budget in debt), a key's slots held, and how long an event
    that asked now would wait for its turn (NEXT TURN). Reads the bus alone."""
    from omnidaemon.flow.inspect import LimitState, limit_states

    async def run() -> None:
        async with open_cli_broker(broker) as bus:
            states = await limit_states(bus)
        if json:
            emit_json([s.to_json() for s in states])
            return

        def level(s: LimitState) -> str:
            if s.kind == "slots":
                return f"{s.held} of {'?' if s.slots is None else s.slots} held"
            if s.level is None or s.capacity is None:
                return "?"
            return f"{s.level:,.0f} of {s.capacity:,.0f}"

        print_table(
            ["LIMIT", "NAME", "KEY", "LEVEL", "PER SECOND", "NEXT TURN"],
            [
                [
                    s.kind,
                    s.name,
                    s.key or "",
                    level(s),
                    "" if s.rate is None else f"{s.rate:,.4g}",
                    age(s.waiting) if s.waiting else "now",
                ]
                for s in states
            ],
            empty="no limits on the bus: no agent with flow control has started an event",
        )

    run_async("limits", run)


def health(
    broker: BrokerOption = None,
    json: JsonOption = False,
    max_lag: Annotated[
        int, typer.Option("--max-lag", min=0, metavar="N", help="Degraded above this lag.")
    ] = 10_000,
    max_pending_age: Annotated[
        float,
        typer.Option(
            "--max-pending-age",
            min=0.0,
            metavar="S",
            help="Degraded when a pending event is older (seconds).",
        ),
    ] = 300.0,
    max_dead_letters: Annotated[
        int | None,
        typer.Option(
            "--max-dead-letters",
            min=0,
            metavar="N",
            help="Degraded when a dead-letter queue holds more (default: not checked).",
        ),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, metavar="S", help="Seconds the bus may take.")
    ] = 5.0,
) -> None:
    """Check the bus and the fleet. Exit status: 0 healthy, 1 degraded, 2 down, so it serves as
    a liveness or readiness probe."""
    from omnidaemon.fleet import HealthReport, check_health

    async def run() -> HealthReport:
        bus = open_cli_broker(broker)
        try:
            return await check_health(
                bus,
                max_lag=max_lag,
                max_pending_age=max_pending_age,
                max_dead_letters=max_dead_letters,
                timeout=timeout,
            )
        finally:
            await bus.close()

    report = run_async("health", run)
    if json:
        emit_json(report.to_json())
        raise typer.Exit(report.exit_code)
    style = {"healthy": "bold green", "degraded": "bold yellow", "down": "bold red"}
    say(f"{report.status}: {report.bus}", style=style[report.status])
    for problem in report.problems:
        say(f"  - {problem}", style="yellow" if report.status == "degraded" else "red")
    if report.status != "down":
        say(f"workers alive: {len(report.workers)}")
        print_table(
            ["TOPIC", "AGENT", "LAG", "PENDING", "RETRIES", "DLQ", "OLDEST PENDING"],
            [
                [
                    g.topic,
                    g.group,
                    number(g.lag),
                    number(g.pending),
                    number(g.retries),
                    number(g.dead_letters),
                    age(g.oldest_pending_age),
                ]
                for g in report.groups
            ],
            numeric=["LAG", "PENDING", "RETRIES", "DLQ"],
            empty="no agents on the bus",
        )
    raise typer.Exit(report.exit_code)
