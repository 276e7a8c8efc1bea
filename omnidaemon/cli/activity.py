"""`omnidaemon inspect [APP]`: which events each live worker runs now (from the bus).

Like `celery inspect active`: per running delivery, its worker, agent, event id, attempt and
when it started; with `--payload`, its payload. Workers list what they run with each
heartbeat, so what is shown is at most one heartbeat interval old.
"""

from typing import Annotated

import typer

from omnidaemon.cli._common import (
    BrokerOption,
    JsonOption,
    load_cli_app,
    open_cli_broker,
    run_async,
)
from omnidaemon.cli._output import age, emit_json, fail, json_text, plural, print_table, say

__all__ = ["inspect"]


def inspect(
    app: Annotated[
        str | None,
        typer.Argument(
            metavar="[APP]",
            help="Only this app's workers, on its bus ('module:attribute'); default: every "
            "worker on the bus.",
            show_default=False,
        ),
    ] = None,
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent.")] = None,
    payload: Annotated[
        bool, typer.Option("--payload", help="Show each event's payload too.")
    ] = False,
    broker: BrokerOption = None,
    json: JsonOption = False,
) -> None:
    """The events each live worker runs now: agent, event id, attempt, when it started."""
    from datetime import UTC, datetime

    from omnidaemon.activity import fleet_activity
    from omnidaemon.errors import OmniDaemonError

    app_name = None
    bus = None
    if app is not None:
        try:
            loaded = load_cli_app(app)
        except OmniDaemonError as exc:
            raise typer.Exit(fail("inspect", str(exc), 2)) from None
        app_name = loaded.name
        bus = None if broker else loaded.broker

    async def run() -> None:
        async with bus if bus is not None else open_cli_broker(broker) as bus_:
            found = await fleet_activity(bus_, app=app_name, agent=agent)
        if json:
            emit_json([w.to_json(payload=payload) for w in found])
            return
        now = datetime.now(UTC)
        header = ["WORKER", "AGENT", "EVENT ID", "ATTEMPT", "RUNNING FOR", "STARTED AT"]
        rows = [
            [
                w.worker.id,
                r.agent,
                r.event_id or "?",
                str(r.attempt),
                age((now - r.started_at).total_seconds()),
                r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                *([_payload_cell(r.payload, r.payload_listed, r.entry_bytes)] if payload else []),
            ]
            for w in found
            for r in w.running
        ]
        print_table(
            [*header, *(["PAYLOAD"] if payload else [])],
            rows,
            title=f"{plural(len(found), 'live worker')}, "
            f"{plural(sum(w.count for w in found), 'event')} running",
            numeric=["ATTEMPT"],
            empty="no live worker" if not found else "no event is running",
        )
        for w in found:
            if w.count > len(w.running):
                say(f"{w.worker.id}: {w.count - len(w.running):,} more not listed")

    run_async("inspect", run)


def _payload_cell(value: object, listed: bool, size: int) -> str:
    if not listed:
        return f"({size:,} bytes, not listed)"
    text = json_text(value)
    return text if len(text) <= 80 else text[:79] + "…"
