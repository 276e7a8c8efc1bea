"""`omnidaemon bus init|status|ps|stop`: the embedded bus servers of this machine.

Which bus a command uses is decided by `embedded_home.find_home` (`OMNIDAEMON_HOME`, else the
nearest `.omnidaemon/` here or in a parent folder, else `~/.omnidaemon`); these commands show
that choice, list every server the user runs, and start a project's own bus or stop one.
`omnidaemon.cli.main` adds them to the `bus` group (`register_local_commands`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import JsonOption
from omnidaemon.cli._output import emit_json, fail, print_table, say

if TYPE_CHECKING:
    from omnidaemon.fleet import WorkerStatus

__all__ = ["init", "ps", "register_local_commands", "status", "stop"]

FolderArgument = Annotated[
    Path | None,
    typer.Argument(
        metavar="[FOLDER]",
        help="The bus's folder, as 'bus ps' shows it (default: the one commands here use).",
        show_default=False,
    ),
]


def _live_workers(home: Path) -> list[WorkerStatus] | None:
    """The live workers on the running bus of `home` (from heartbeats); None if unreadable."""
    import anyio
    import redis

    from omnidaemon.brokers.embedded import EmbeddedBroker
    from omnidaemon.errors import OmniDaemonError
    from omnidaemon.fleet import live_workers

    async def read() -> list[WorkerStatus]:
        async with EmbeddedBroker(home, start_server=False) as bus_:
            return await live_workers(bus_)

    try:
        return anyio.run(read)
    except (OmniDaemonError, OSError, redis.RedisError):
        return None


def init(
    folder: Annotated[
        Path,
        typer.Argument(metavar="[FOLDER]", help="The project folder.", show_default=False),
    ] = Path(),
) -> None:
    """Give a project its own bus: create FOLDER/.omnidaemon (default: here).

    Commands run in FOLDER or below it then use this bus; its server starts on first need.
    """
    from omnidaemon.brokers.embedded_home import HOME_NAME, _Files, check_home, make_home
    from omnidaemon.errors import OmniDaemonError

    try:
        files = _Files.of(folder / HOME_NAME)
        created = make_home(files.home)
        check_home(files)
    except (OmniDaemonError, OSError) as exc:
        raise typer.Exit(fail("bus init", str(exc), 2)) from None
    project = files.home.parent
    if created:
        say(f"created {files.home}: commands run in {project} or below it use this bus")
    else:
        say(f"{files.home} exists already: commands run in {project} or below it use it")
    if os.environ.get("OMNIDAEMON_HOME"):
        print(
            "omnidaemon bus init: warning: OMNIDAEMON_HOME is set and overrides it",
            file=sys.stderr,
        )


def status(json: JsonOption = False) -> None:
    """Which embedded bus commands run here use and why, and whether its server runs (exit
    status 1 if not)."""
    from omnidaemon.brokers.embedded_home import find_home
    from omnidaemon.brokers.embedded_server import server_status
    from omnidaemon.errors import OmniDaemonError

    try:
        chosen = find_home()
        found = server_status(chosen.path)
    except (OmniDaemonError, OSError) as exc:
        raise typer.Exit(fail("bus status", str(exc), 2)) from None
    url = os.environ.get("OMNIDAEMON_BROKER_URL")
    if json:
        emit_json(
            {
                "home": found["data_dir"],
                "source": chosen.source,
                "reason": chosen.reason,
                "running": found["running"],
                "pid": found["pid"],
                "socket": found["socket"],
                "log": found["log"],
                "overridden_by_broker_url": bool(url),
            }
        )
    else:
        if found["running"]:
            pid = f"pid {found['pid']}" if found["pid"] is not None else "pid unknown"
            server = f"runs ({pid})"
        else:
            server = "not running (a worker or a publisher starts it)"
        say(f"bus:    {found['data_dir']}")
        say(f"why:    {chosen.reason}")
        say(f"server: {server}")
        say(f"socket: {found['socket']}")
        if url:
            say("note:   OMNIDAEMON_BROKER_URL is set: commands use that bus, not this one")
    if not found["running"]:
        raise typer.Exit(1)


def ps(json: JsonOption = False) -> None:
    """Every embedded bus server this user runs, with its folder and live workers."""
    from omnidaemon.brokers.embedded_process import running_servers

    servers = [(pid, home, _live_workers(home)) for pid, home in running_servers()]
    if json:
        emit_json(
            [
                {
                    "pid": pid,
                    "home": str(home),
                    "workers": None if workers is None else len(workers),
                }
                for pid, home, workers in servers
            ]
        )
        return
    print_table(
        ["PID", "WORKERS", "FOLDER"],
        [
            [str(pid), "?" if workers is None else str(len(workers)), str(home)]
            for pid, home, workers in servers
        ],
        numeric=["PID", "WORKERS"],
        empty="no embedded bus server runs",
    )


def stop(
    folder: FolderArgument = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, metavar="S", help="Seconds to wait for it.")
    ] = 10.0,
) -> None:
    """Stop an embedded bus server (its data is kept; the next worker starts it again).

    Live workers still on the bus are named in a warning: they lose the bus until it runs again.
    """
    from omnidaemon.brokers.embedded_home import default_home
    from omnidaemon.brokers.embedded_server import server_status, stop_server
    from omnidaemon.errors import OmniDaemonError

    try:
        home = default_home() if folder is None else folder.expanduser().resolve()
        workers = _live_workers(home) if server_status(home)["running"] else None
        if workers:
            names = ", ".join(f"{w.id} ({w.app})" for w in workers[:5])
            more = f" and {len(workers) - 5} more" if len(workers) > 5 else ""
            count = (
                "1 live worker still uses"
                if len(workers) == 1
                else (f"{len(workers)} live workers still use")
            )
            print(
                f"omnidaemon bus stop: warning: {count} this bus ({names}{more}); they retry "
                "until it is started again",
                file=sys.stderr,
            )
        stopped = stop_server(home, timeout=timeout)
    except (OmniDaemonError, OSError) as exc:
        raise typer.Exit(fail("bus stop", str(exc), 2)) from None
    if stopped:
        say(f"stopped the embedded bus server in {home}")
    else:
        say(f"no embedded bus server was running in {home}")


def register_local_commands(group: typer.Typer) -> None:
    """Add init, status, ps and stop to the `bus` command group, once."""
    known = {command.name for command in group.registered_commands}
    for command in (init, status, ps, stop):
        if command.__name__ not in known:
            group.command(command.__name__)(command)
