"""`omnidaemon publish` and `omnidaemon result`: put an event on the bus, and read what became
of it."""

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from omnidaemon.cli._common import (
    BrokerOption,
    JsonOption,
    WaitTimeoutOption,
    load_cli_app,
    open_cli_broker,
    run_async,
)
from omnidaemon.cli._output import emit_json, print_table, say

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.progress import EventProgress

__all__ = ["publish", "result"]


def _read_payload(source: str) -> Any:
    """The payload DATA names: JSON text, `@file.json`, or `-` for standard input."""
    import orjson

    if source == "-":
        text = sys.stdin.read()
        origin = "standard input"
    elif source.startswith("@"):
        try:
            with open(source[1:], encoding="utf-8") as file:
                text = file.read()
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot read {source[1:]}: {exc.strerror}", param_hint="DATA"
            ) from None
        origin = source[1:]
    else:
        text, origin = source, "DATA"
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"{origin} is not valid JSON ({exc})", param_hint="DATA") from None


async def _warn_if_unread(app: "App", topic: str) -> None:
    """One line on standard error when no consumer group reads `topic` (or one of its priority
    lanes): the likeliest reason an event seems to vanish is a typo in its topic, or a worker
    not started yet."""
    from omnidaemon.lanes_view import describe_with_lanes

    info = await describe_with_lanes(app.broker, topic)
    if info is None or not info.groups:
        print(
            f"omnidaemon publish: warning: no agent reads {topic!r} yet (the topic has no "
            "consumer group); the event is kept on the topic for agents that subscribe later",
            file=sys.stderr,
        )


def publish(
    topic: Annotated[str, typer.Argument(metavar="TOPIC", help="Where to publish.")],
    data: Annotated[
        str,
        typer.Argument(
            metavar="DATA", help="The payload: JSON text, @file.json, or - for standard input."
        ),
    ],
    correlation_id: Annotated[
        str | None, typer.Option("--correlation-id", help="Tie this event to a workflow.")
    ] = None,
    reply_to: Annotated[
        str | None, typer.Option("--reply-to", metavar="TOPIC", help="Send the result there.")
    ] = None,
    webhook: Annotated[
        str | None, typer.Option("--webhook", metavar="URL", help="POST the outcome there.")
    ] = None,
    tenant_id: Annotated[
        str | None, typer.Option("--tenant-id", help="Carried unchanged to handlers.")
    ] = None,
    delay: Annotated[
        float | None,
        typer.Option("--delay", min=0.0, metavar="S", help="Seconds before agents see it."),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option(
            "--priority",
            metavar="P",
            help="high, normal or low, or 0 (low) to 9 (high): agents start higher ones first.",
        ),
    ] = None,
    wait: Annotated[
        bool,
        typer.Option("--wait", help="Wait for the handling agent's result and print it."),
    ] = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="With --wait: print the chunks the handler streams (ctx.emit) as they come; "
            "--timeout is then the longest wait for the next one.",
        ),
    ] = False,
    timeout: WaitTimeoutOption = 30.0,
    app_target: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="MODULE:ATTR",
            help="Check DATA against the types this app's agents declare before sending.",
        ),
    ] = None,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """Publish one event; prints its id (with --wait, the agent's result; with --wait
    --stream, the chunks its handler streams as they come, then with --json the result).

    Exit status: 1 when the handling agent gave up on a --wait request (its reason is
    printed), or when --app's types refuse DATA (nothing is sent). A topic no agent reads yet
    gets a warning on standard error; the event is published all the same.
    """
    from omnidaemon.envelope import validate_topic

    try:
        validate_topic(topic)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="TOPIC") from None
    if wait and (reply_to or delay):
        raise typer.BadParameter("--wait waits for a reply itself: drop --reply-to and --delay")
    if stream and not wait:
        raise typer.BadParameter("--stream prints what --wait waits for: add --wait")
    from omnidaemon.lanes import lane_of, parse_priority

    try:
        lane = lane_of(parse_priority(priority))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--priority") from None
    payload = _read_payload(data)
    from omnidaemon.app import App

    async def run() -> None:
        if app_target is not None:
            # The app's own check, as its `publish` would make it: a payload its agents would
            # dead-letter is refused here, before anything is on the bus.
            load_cli_app(app_target).check_payload(topic, payload)
        app = App("cli", broker=open_cli_broker(broker, start_embedded=True))
        async with app:
            if wait and stream:
                from omnidaemon.cli._streaming import print_stream

                await _warn_if_unread(app, topic)
                await print_stream(
                    app,
                    topic,
                    payload,
                    timeout=timeout,
                    json=json,
                    correlation_id=correlation_id,
                    tenant_id=tenant_id,
                    priority=lane,
                )
                return
            if wait:
                await _warn_if_unread(app, topic)
                reply = await app.request(
                    topic,
                    payload,
                    timeout=timeout,
                    correlation_id=correlation_id,
                    tenant_id=tenant_id,
                    priority=lane,
                )
                emit_json(reply) if json or not isinstance(reply, str) else print(reply)
                return
            event_id = await app.publish(
                topic,
                payload,
                correlation_id=correlation_id,
                reply_to=reply_to,
                webhook=webhook,
                tenant_id=tenant_id,
                delay=delay,
                priority=lane,
            )
            await _warn_if_unread(app, topic)
        emit_json({"event_id": event_id, "topic": topic}) if json else print(event_id)

    run_async("publish", run)


def result(
    event_id: Annotated[str, typer.Argument(metavar="EVENT_ID", help="The id publish printed.")],
    agent: Annotated[
        str | None, typer.Option("--agent", help="Which agent's result, when several stored one.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the event succeeded or was dead-lettered.")
    ] = False,
    timeout: WaitTimeoutOption = 30.0,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """The stored status and result of an event (agents with store_results=True).

    Exit status: 0 succeeded, 1 dead-lettered, 3 not finished (pending, running or retrying),
    4 cancelled.
    """
    from omnidaemon.progress import EventProgress, event_progress
    from omnidaemon.results import Result, event_results

    run_hint: tuple[str, str] | None = None  # the id and status of the event's run

    async def run() -> tuple[list[Result], EventProgress | None]:
        from omnidaemon.app import App
        from omnidaemon.cli.traces import run_of

        nonlocal run_hint
        async with App("cli", broker=open_cli_broker(broker)) as app:
            found = await event_results(
                app, event_id, agent=agent, timeout=timeout if wait else None
            )
            if json or any(r.status != "pending" for r in found):
                return found, None
            # Nothing stored: say what the bus knows instead of a bare `pending`, and where
            # the rest of its run went.
            run_hint = await run_of(app, event_id)
            return found, await event_progress(app.broker, event_id)

    results, progress = run_async("result", run)
    if progress is not None and progress.topic is not None:
        _explain(progress)
    elif json:
        emit_json([r.model_dump(mode="json") for r in results])
    elif len(results) == 1 and results[0].status != "pending":
        r = results[0]
        say(f"{r.event_id}  {r.agent}  {r.status}  attempts={r.attempts}", style="bold")
        if r.error:
            say(f"error: {r.error.get('type')}: {r.error.get('message')}", style="red")
        if r.status == "succeeded":
            emit_json(r.result)
    else:
        print_table(
            ["EVENT ID", "AGENT", "STATUS", "ATTEMPTS", "RESULT / ERROR"],
            [
                [
                    r.event_id,
                    r.agent or "-",
                    r.status,
                    str(r.attempts or "-"),
                    str(r.error or r.result if r.status != "pending" else "")[:80],
                ]
                for r in results
            ],
            numeric=["ATTEMPTS"],
        )
    if run_hint is not None:
        from omnidaemon.cli.traces import print_run_hint

        sys.stdout.flush()  # the hint follows what the command printed
        print_run_hint(*run_hint)
    statuses = {r.status for r in results}
    if statuses <= {"succeeded"}:
        return
    raise typer.Exit(
        1 if "dead_lettered" in statuses else 4 if statuses <= {"succeeded", "cancelled"} else 3
    )


def cancel(
    event_id: Annotated[
        str | None,
        typer.Argument(metavar="[EVENT_ID]", help="The event to cancel (the id publish printed)."),
    ] = None,
    correlation_id: Annotated[
        str | None,
        typer.Option(
            "--correlation-id",
            help="Cancel a whole run instead: every event with this correlation id not "
            "finished yet, including those its handlers publish later.",
        ),
    ] = None,
    agent: Annotated[
        list[str] | None,
        typer.Option("--agent", help="Only this agent's handling of the event (repeatable)."),
    ] = None,
    reason: Annotated[
        str, typer.Option("--reason", help="Why; recorded with the outcome.")
    ] = "cancelled from the command line",
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """Cancel an event, or a whole run, across the fleet: not started yet, it never starts;
    running, its handler is stopped within about a second. Its outcome is `cancelled`."""
    if (event_id is None) == (correlation_id is None):
        raise typer.BadParameter("give an EVENT_ID or --correlation-id, one of the two")
    if agent and correlation_id is not None:
        raise typer.BadParameter("a run is cancelled for every agent: drop --agent")

    async def run() -> dict[str, object]:
        from omnidaemon.app import App

        async with App("cli", broker=open_cli_broker(broker)) as app:
            stored = await app.cancel(
                event_id, correlation_id=correlation_id, reason=reason, agent=agent or None
            )
        return stored.to_json()

    stored = run_async("cancel", run)
    if json:
        emit_json(stored)
        return
    what = f"event {event_id}" if event_id is not None else f"run {correlation_id}"
    agents = stored.get("agents")
    scope = f" for {', '.join(map(str, agents))}" if isinstance(agents, list) else ""
    say(f"cancelled {what}{scope}: workers stop it within about a second", style="bold")


def _explain(progress: "EventProgress") -> None:
    """What the bus knows of an event no agent stored a result for: where it is, how far each
    agent got, and the ids its handlers published, to follow a pipeline."""
    say(f"{progress.event_id}  no result stored for this event", style="bold")
    say(f"topic: {progress.topic}")
    for agent in progress.agents:
        say(f"  agent {agent.agent}: {agent.state.replace('_', ' ')}")
    if not progress.agents:
        say("  no agent reads this topic")
    if progress.published:
        say("published by its handlers (omnidaemon result ID follows them):")
        for child in progress.published:
            say(f"  {child.event_id}  on {child.topic}")
