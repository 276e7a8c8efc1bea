"""`omnidaemon bus dlq` and `omnidaemon bus replay`: the dead letters, and delivering them
again: commands of the `bus` group, registered when this module is imported (as
`omnidaemon.cli.main` does); apart from `bus.py` to keep each module one job."""

from typing import Annotated

import typer

from omnidaemon.cli._common import (
    BrokerOption,
    CommandError,
    JsonOption,
    open_cli_broker,
    run_async,
)
from omnidaemon.cli._output import emit_json, is_terminal, plural, print_table, progress, say
from omnidaemon.cli.bus import (
    LimitOption,
    TopicArgument,
    _check_topic,
    _one_line,
    _preview,
    _warn_undecodable,
    bus,
)

__all__ = ["dead_letters", "replay"]


@bus.command("dlq")
def dead_letters(
    topic: Annotated[
        str | None, typer.Argument(metavar="[TOPIC]", help="Only this topic.", show_default=False)
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.")] = None,
    limit: LimitOption = 20,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """Dead-lettered events: the error, the attempts and the payload of each."""
    if topic is not None:
        _check_topic(topic)
    from omnidaemon.admin import find_dead_letters

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            found = await find_dead_letters(bus_, topic=topic, agent=agent, limit=limit)
        letters = found.letters
        _warn_undecodable("bus dlq", found.undecodable, "skipped")
        if json:
            emit_json([{**d.model_dump(mode="json"), "payload": d.payload} for d in letters])
            return
        print_table(
            ["FAILED AT", "TOPIC", "AGENT", "EVENT ID", "ATTEMPTS", "ERROR", "PAYLOAD"],
            [
                [
                    d.failed_at.strftime("%Y-%m-%d %H:%M:%S"),
                    d.topic,
                    d.agent,
                    d.event_id or "?",
                    str(d.attempts),
                    _one_line(f"{d.error_type}: {d.error_message}", 100 if is_terminal() else 200),
                    _preview(d.payload, 50),
                ]
                for d in letters
            ],
            numeric=["ATTEMPTS"],
            empty="no dead letters",
        )

    run_async("bus dlq", run)


@bus.command("replay")
def replay(
    topic: TopicArgument,
    agent: Annotated[str, typer.Option("--agent", help="Whose dead letters (required).")],
    ids: Annotated[
        list[str] | None,
        typer.Option("--id", metavar="EVENT_ID", help="Replay this event (repeatable)."),
    ] = None,
    all_records: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be replayed; change nothing.")
    ] = False,
    edit: Annotated[
        bool, typer.Option("--edit", help="Correct the payload in $EDITOR first (one --id).")
    ] = False,
    payload: Annotated[
        str | None,
        typer.Option("--payload", metavar="JSON", help="The corrected payload (one --id)."),
    ] = None,
    app: Annotated[
        str | None,
        typer.Option("--app", metavar="APP", help="With --edit/--payload: the app, to check it."),
    ] = None,
    broker: BrokerOption = None,
) -> None:
    """Deliver dead-lettered events to their agent again, each as a first attempt.

    Only that agent sees them again; the records leave the dead-letter queue as they go.
    With --edit (or --payload), one event is replayed with a corrected payload, checked
    against the agent's type, as a new event with the same correlation.
    """
    _check_topic(topic)
    if not ids and not all_records:
        raise typer.BadParameter("name events with --id, or replay every one with --all")
    if ids and all_records:
        raise typer.BadParameter("give --id or --all, not both")
    if edit or payload is not None or app is not None:
        from omnidaemon.cli.replay_edit import replay_one_edited

        replay_one_edited(
            topic, agent, ids or [], edit=edit, payload=payload, app=app,
            all_records=all_records, dry_run=dry_run, broker=broker,
        )  # fmt: skip
        return
    from omnidaemon.admin import preview_replay, replay_dead_letters, require_group

    wanted = set(ids or ())
    event_ids = None if all_records else wanted

    async def run() -> None:
        async with open_cli_broker(broker) as bus_:
            if dry_run:
                preview = await preview_replay(bus_, topic, agent, event_ids=event_ids)
                for d in preview.chosen:
                    reason = f"{d.error_type}: {d.error_message}"
                    say(_one_line(f"would replay {d.event_id or '?'} ({reason})", 200))
                _warn_undecodable("bus replay", preview.undecodable, "it would not be replayed")
                chosen, total = len(preview.chosen), preview.total
                say(f"{chosen} of {plural(total, 'dead letter')} would be replayed (dry run)")
                return
            group = await require_group(bus_, topic, agent)  # the progress bar's length
            with progress(f"replaying to {agent}", group.dead_letters) as advance:
                outcome = await replay_dead_letters(
                    bus_, topic, agent, event_ids=event_ids, on_record=advance
                )
            moved = outcome.replayed
        _warn_undecodable("bus replay", outcome.undecodable, "not replayed, left in the queue")
        say(f"replayed {plural(moved, 'event')} to {agent} on {topic}")
        if wanted and moved < len(wanted):
            raise CommandError(
                f"{len(wanted) - moved} of the named events are not in {agent}'s dead letters"
            )

    run_async("bus replay", run)
