"""`omnidaemon bus ...`: look into the bus, and repair it: topics, groups, entries, dead letters,
replay, purge. The embedded servers' own commands (init, status, ps, stop) are in `bus_local`.

These commands need only the bus, not the app's code. Nothing here starts the embedded server:
a stopped one is reported as such.
"""

from collections.abc import Iterable
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import (
    BrokerOption,
    JsonOption,
    open_cli_broker,
    run_async,
)
from omnidaemon.cli._output import (
    age,
    emit_json,
    json_text,
    number,
    plural,
    print_table,
    progress,
    say,
)

if TYPE_CHECKING:
    from omnidaemon.dead_letters import UndecodableRecord

__all__ = ["bus"]

bus = typer.Typer(
    name="bus",
    help="Look into the bus and repair it: topics, groups, entries, dead letters.",
    no_args_is_help=True,
)

TopicArgument = Annotated[str, typer.Argument(metavar="TOPIC", help="The topic.")]
LimitOption = Annotated[
    int, typer.Option("-n", "--limit", min=1, help="How many, the most recent.")
]


def _check_topic(topic: str) -> None:
    from omnidaemon.debounce import is_internal_topic
    from omnidaemon.envelope import validate_topic

    try:
        # A debounced agent's batches and checks (`T#debounce.A`) are topics of the bus too.
        validate_topic(topic.partition("#")[0] if is_internal_topic(topic) else topic)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TOPIC") from None


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _preview(value: object, width: int = 60) -> str:
    text = json_text(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _warn_undecodable(command: str, records: "Iterable[UndecodableRecord]", what: str) -> None:
    """One line on stderr per dead-letter record that cannot be read: stdout stays the
    readable records (a table, or JSON a script parses)."""
    import sys

    for r in records:
        print(
            f"omnidaemon {command}: warning: record {r.record_id} of {r.agent} on {r.topic} "
            f"cannot be read ({_one_line(r.reason, 200)}); {what}",
            file=sys.stderr,
        )


@bus.command("list")
def list_topics(
    broker: BrokerOption = None,
    json: JsonOption = False,
    all_topics: Annotated[
        bool, typer.Option("--all", help="Include the reply topics of requests in progress.")
    ] = False,
) -> None:
    """Topics with their length and, per agent (consumer group): lag, pending, retries and
    dead letters."""
    from omnidaemon.fleet import describe_topics

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            topics = await describe_topics(bus_, include_replies=all_topics)
        if json:
            emit_json(
                [
                    {
                        "topic": t.topic,
                        "length": t.length,
                        "delayed": t.delayed,
                        "delayed_bytes": t.delayed_bytes,
                        "groups": [_group_json(g) for g in t.groups],
                    }
                    for t in topics
                ]
            )
            return
        rows = [
            [
                t.topic,
                number(t.length),
                number(t.delayed),
                g.group if g else "-",
                number(g.lag) if g else "",
                number(g.pending) if g else "",
                number(g.retries) if g else "",
                number(g.dead_letters) if g else "",
            ]
            for t in topics
            for g in (t.groups or (None,))
        ]
        print_table(
            ["TOPIC", "LENGTH", "DELAYED", "AGENT", "LAG", "PENDING", "RETRIES", "DLQ"],
            rows,
            numeric=["LENGTH", "DELAYED", "LAG", "PENDING", "RETRIES", "DLQ"],
            empty="no topics on the bus",
        )

    run_async("bus list", run)


def _group_json(g: object) -> dict[str, object]:
    from dataclasses import asdict

    data = asdict(g)  # type: ignore[call-overload]
    data["agent"] = data.pop("group")
    data["consumer_details"] = [dict(c) for c in data["consumer_details"]]
    return data  # type: ignore[no-any-return]


@bus.command("inspect")
def inspect_topic(
    topic: TopicArgument,
    limit: LimitOption = 10,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """The most recent entries of a topic, decoded: id, time, correlation and payload."""
    _check_topic(topic)
    from omnidaemon.admin import recent_entries

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            decoded = await recent_entries(bus_, topic, limit)
        if json:
            emit_json(decoded)
            return
        rows = [
            [
                d["entry_id"],
                str(d.get("id", "?")),
                str(d.get("created_at", ""))[:19].replace("T", " "),
                str(d.get("correlation_id") or ""),
                _preview(d["payload"])
                if "payload" in d
                else "(unreadable) " + _preview(d.get("unreadable", "")),
            ]
            for d in decoded
        ]
        print_table(
            ["ENTRY", "EVENT ID", "CREATED", "CORRELATION", "PAYLOAD"],
            rows,
            title=f"{topic}: last {plural(len(rows), 'entry')}",
            empty="the topic holds no entries",
        )

    run_async("bus inspect", run)


@bus.command("groups")
def groups(topic: TopicArgument, broker: BrokerOption = None, json: JsonOption = False) -> None:
    """The consumer groups (agents) of a topic and each one's consumers (workers)."""
    _check_topic(topic)
    from omnidaemon.admin import require_topic

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            info = await require_topic(bus_, topic, consumers=True)
        if json:
            emit_json([_group_json(g) for g in info.groups])
            return
        print_table(
            ["AGENT", "CONSUMERS", "LAG", "PENDING", "RETRIES", "DLQ", "OLDEST PENDING"],
            [
                [
                    g.group,
                    number(g.consumers),
                    number(g.lag),
                    number(g.pending),
                    number(g.retries),
                    number(g.dead_letters),
                    age(g.oldest_pending_age),
                ]
                for g in info.groups
            ],
            title=f"{topic}: {plural(info.length, 'entry')}",
            numeric=["CONSUMERS", "LAG", "PENDING", "RETRIES", "DLQ"],
            empty="no agent reads this topic",
        )
        for g in info.groups:
            if g.consumer_details:
                print_table(
                    ["CONSUMER", "PENDING", "IDLE"],
                    [[c.name, number(c.pending), age(c.idle)] for c in g.consumer_details],
                    title=f"{g.group}: consumers",
                    numeric=["PENDING"],
                )

    run_async("bus groups", run)


@bus.command("stats")
def stats(broker: BrokerOption = None, json: JsonOption = False) -> None:
    """The bus at a glance: server, totals, and every live worker (from heartbeats)."""
    from omnidaemon.fleet import bus_stats

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            found = await bus_stats(bus_)
        if json:
            emit_json(found.to_json())
            return
        url, server, totals, workers = found.bus, found.server, found.totals, found.workers
        say(f"bus: {url}  ({', '.join(f'{k} {v}' for k, v in server.items())})", style="bold")
        print_table(
            [k.upper().replace("_", " ") for k in totals],
            [[number(v) for v in totals.values()]],
            numeric=[k.upper().replace("_", " ") for k in totals],
        )
        if found.nodes:
            print_table(
                ["NODE", "ROLE", "SLOTS", "TOPICS", "REPLICA OF", "MEMORY", "CLIENTS"],
                [
                    [
                        n.address,
                        n.role,
                        number(n.slots),
                        number(n.topics),
                        n.replica_of or "",
                        n.used_memory,
                        number(n.clients) if n.clients >= 0 else "?",
                    ]
                    for n in found.nodes
                ],
                title="cluster nodes",
                numeric=["SLOTS", "TOPICS", "CLIENTS"],
            )
        from datetime import UTC, datetime

        now = datetime.now(UTC)
        print_table(
            ["WORKER", "APP", "AGENTS", "IN FLIGHT", "UP", "LAST BEAT", "VERSION"],
            [
                [
                    w.id,
                    w.app,
                    ",".join(w.agents),
                    number(w.in_flight),
                    age((now - w.started_at).total_seconds()),
                    age((now - w.beat_at).total_seconds()) + " ago",
                    w.version,
                ]
                for w in workers
            ],
            title="live workers",
            numeric=["IN FLIGHT"],
            empty="no live worker",
        )

    run_async("bus stats", run)


@bus.command("purge")
def purge(
    topic: TopicArgument,
    dlq: Annotated[
        bool, typer.Option("--dlq", help="Empty only the dead-letter queues; keep the topic.")
    ] = False,
    agent: Annotated[
        str | None, typer.Option("--agent", help="With --dlq: only this agent's queue.")
    ] = None,
    keep_groups: Annotated[
        bool,
        typer.Option(
            "--keep-groups", help="Drop the backlog only; keep the agents' groups and DLQs."
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm: this deletes events.")] = False,
    broker: BrokerOption = None,
) -> None:
    """Delete a topic with everything it holds (entries, groups, retries, dead letters,
    metrics), with --keep-groups only its backlog (entries, delayed, pending, retries), or
    with --dlq only its dead letters."""
    _check_topic(topic)
    if not yes:
        raise typer.BadParameter("purging deletes events for good: add --yes to confirm")
    if agent is not None and not dlq:
        raise typer.BadParameter("--agent goes with --dlq")
    if keep_groups and dlq:
        raise typer.BadParameter("give --keep-groups or --dlq, not both")
    from omnidaemon.admin import purge_backlog, purge_dead_letters, purge_topic, require_topic

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            if keep_groups:
                info = await purge_backlog(bus_, topic)
                dropped = sum(g.pending + g.retries for g in info.groups)
                say(
                    f"purged the backlog of {topic} ({plural(info.length, 'entry')}, "
                    f"{info.delayed:,} delayed, {dropped:,} pending or retrying); "
                    f"kept {plural(len(info.groups), 'agent')}"
                )
                return
            if not dlq:
                info = await purge_topic(bus_, topic)
                agents = plural(len(info.groups), "agent")
                say(f"purged topic {topic} ({plural(info.length, 'entry')}, {agents})")
                return
            info = await require_topic(bus_, topic)  # the progress bar's length
            queues = len(info.groups) if agent is None else 1
            with progress("purging dead letters", queues) as advance:
                removed = await purge_dead_letters(bus_, topic, agent=agent, on_group=advance)
        say(f"removed {plural(removed, 'dead letter')} from {topic}")

    run_async("bus purge", run)
