"""`omnidaemon bus replay TOPIC --agent A --id EVENT --edit --app APP`: replay one dead letter
with a corrected payload.

The payload is edited in `$VISUAL`/`$EDITOR` (or given with `--payload JSON`), checked against
the type the agent declares (hence `--app`: the bus does not know the types), and replayed as a
new event with the same correlation, for that agent alone. An invalid payload changes nothing.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import typer

from omnidaemon.cli._common import CommandError, load_cli_app, open_cli_broker, run_async
from omnidaemon.cli._output import fail, json_text, say

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker

__all__ = ["replay_edited", "replay_one_edited"]

_COMMAND = "bus replay"


def _parse(text: str, origin: str) -> Any:
    if not text.strip():
        raise CommandError(f"{origin} is empty: nothing was replayed")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"{origin} is not valid JSON ({exc}): nothing was replayed") from None


def _edit(payload: Any, event_id: str) -> Any:
    """The payload as the operator leaves it in their editor."""
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory(prefix="omnidaemon-replay-") as directory:
        path = Path(directory) / f"{event_id}.json"
        path.write_text(json_text(payload, indent=True) + "\n")
        try:
            done = subprocess.run([*shlex.split(editor), str(path)], check=False)
        except OSError as exc:
            raise CommandError(f"cannot run the editor {editor!r}: {exc}") from None
        if done.returncode != 0:
            raise CommandError(
                f"the editor {editor!r} exited with status {done.returncode}: nothing was replayed"
            )
        return _parse(path.read_text(), "the edited payload")


def replay_edited(
    topic: str,
    agent: str,
    event_id: str,
    *,
    app_target: str,
    payload_text: str | None,
    broker_url: str | None,
) -> None:
    """Replay `event_id` of `agent`'s dead letters on `topic` with a corrected payload: the
    text given, or what the operator leaves in their editor."""
    from omnidaemon.admin import find_dead_letter, replay_corrected
    from omnidaemon.errors import OmniDaemonError

    try:
        app = load_cli_app(app_target)
    except OmniDaemonError as exc:
        raise CommandError(str(exc), 2) from None
    spec = app.agents.get(agent)
    if spec is None:
        raise CommandError(f"app {app.name!r} has no agent {agent!r}", 2)
    payload_type = spec.payload_type
    if spec.debounce is not None and topic == spec.debounce.batch_topic:
        payload_type = spec.debounce.parts[-1].payload_type  # a batch: `list[X]`
    elif spec.topic != topic:
        raise CommandError(f"agent {agent!r} of app {app.name!r} reads {spec.topic!r}", 2)

    def bus() -> Broker:
        # The app's own bus, unless --broker names one.
        return open_cli_broker(broker_url) if broker_url else _app_broker(app)

    if payload_text is None:

        async def original() -> Any:
            async with bus() as bus_:
                return (await find_dead_letter(bus_, topic, agent, event_id)).payload

        payload = _edit(run_async(_COMMAND, original), event_id)
    else:
        payload = _parse(payload_text, "--payload")

    async def replay() -> str:
        async with bus() as bus_:
            corrected = await replay_corrected(
                bus_, topic, agent, event_id, payload, payload_type=payload_type
            )
        return corrected.id

    new_id = run_async(_COMMAND, replay)
    say(f"replayed {event_id} to {agent} on {topic} as {new_id}, with the corrected payload")


def _app_broker(app: App) -> Broker:
    return app.broker


def replay_one_edited(
    topic: str,
    agent: str,
    ids: list[str],
    *,
    edit: bool,
    payload: str | None,
    app: str | None,
    all_records: bool,
    dry_run: bool,
    broker: str | None,
) -> None:
    """`bus replay` with `--edit`, `--payload` or `--app`: check the options go together,
    then replay the one event named with its corrected payload."""
    if not edit and payload is None:
        raise typer.BadParameter("--app goes with --edit or --payload")
    if edit and payload is not None:
        raise typer.BadParameter("give --edit or --payload, not both")
    if all_records or len(ids) != 1 or dry_run:
        raise typer.BadParameter("--edit and --payload correct one event: name it with one --id")
    if app is None:
        raise typer.BadParameter("--edit and --payload need --app, to check the payload")
    try:
        replay_edited(topic, agent, ids[0], app_target=app, payload_text=payload, broker_url=broker)
    except CommandError as exc:
        raise typer.Exit(fail(_COMMAND, str(exc), exc.status)) from None
