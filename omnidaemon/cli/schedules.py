"""`omnidaemon schedules APP`: an app's schedules, from its code, with their next and last fire
times from the bus."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from omnidaemon.cli._common import JsonOption, load_cli_app, open_cli_broker, run_async
from omnidaemon.cli._output import emit_json, plural, print_table
from omnidaemon.cli.apps import AppArgument

__all__ = ["schedules"]

# Not `BrokerOption`: that one falls back on $OMNIDAEMON_BROKER_URL, and an app that names
# its bus must be read there, as its workers run there.
AppBrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        show_default=False,
        metavar="URL",
        help="The bus to read; default: the app's (its broker=, else $OMNIDAEMON_BROKER_URL, "
        "else the embedded bus).",
    ),
]


def _short(when: str | None) -> str:
    """An ISO time with a space for its `T` (`2026-12-03 09:00:00+00:00`); `-` for none."""
    return "-" if when is None else when.replace("T", " ")


def schedules(app: AppArgument, broker: AppBrokerOption = None, json: JsonOption = False) -> None:
    """The schedules of APP: spec or interval, time zone, topic, next fire, last fire and what
    the last tick came to (fired, failed, empty, missed), read from the bus its workers use."""

    async def run() -> None:
        loaded = load_cli_app(app)
        from omnidaemon.schedules_view import schedule_views

        if broker is not None:
            bus = open_cli_broker(broker)
        elif loaded._broker is not None or loaded.settings.broker_url:
            bus = loaded.broker
        else:
            bus = open_cli_broker(None)  # the embedded bus, reported if stopped, not started
        async with bus:
            views: list[dict[str, Any]] = await schedule_views(loaded, bus)
        if json:
            emit_json(views)
            return
        print_table(
            ["SCHEDULE", "WHEN", "TIME ZONE", "TOPIC", "NEXT FIRE", "LAST FIRE", "OUTCOME"],
            [
                [
                    v["name"],
                    v["spec"] + (" (catch up)" if v["catch_up"] else ""),
                    v["timezone"],
                    v["topic"],
                    _short(v["next_fire"]) + (" (not started)" if not v["started"] else ""),
                    _short(v["last_fire"]),
                    (v["last_outcome"] or "-")
                    + (f": {v['last_error']}" if v["last_outcome"] == "failed" else ""),
                ]
                for v in views
            ],
            title=f"app {loaded.name}: {plural(len(views), 'schedule')}",
            empty="the app declares no schedules",
        )

    run_async("schedules", run)
