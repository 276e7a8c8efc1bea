"""`omnidaemon bus stop|status`: the embedded bus server (the bus when no broker URL is set)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from omnidaemon.brokers.embedded_server import default_home, server_status, stop_server
from omnidaemon.cli._args import seconds
from omnidaemon.errors import OmniDaemonError

__all__ = ["add_parser", "run_status", "run_stop"]


def add_parser(commands: Any) -> None:
    """Add the `bus` command (and its `stop` and `status` actions) to the CLI's subcommands."""
    parser = commands.add_parser(
        "bus",
        help="manage the embedded bus server",
        description=(
            "Manage the embedded Valkey server that omnidaemon starts when no broker URL is set. "
            "It lives in $OMNIDAEMON_HOME (default ./.omnidaemon)."
        ),
    )
    # The parser class is inherited from `commands`, so errors stay one line with status 2.
    actions = parser.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    stop = actions.add_parser(
        "stop",
        help="stop the embedded bus server (its data is kept)",
        description=(
            "Stop the embedded bus server gracefully; it writes its data to disk first, and the "
            "next worker or publisher starts it again."
        ),
    )
    stop.add_argument(
        "--timeout",
        type=seconds(zero_ok=False),
        default=10.0,
        metavar="S",
        help="seconds to wait for it to exit (default 10)",
    )
    stop.set_defaults(run=run_stop, parser=stop)
    status = actions.add_parser(
        "status",
        help="say whether the embedded bus server runs (exit status 1 if not)",
        description="Say whether the embedded bus server runs, with its pid and socket.",
    )
    status.set_defaults(run=run_status, parser=status)


def _fail(message: str) -> int:
    # One line, even when the error carries the server's log.
    print(f"omnidaemon bus: error: {message.splitlines()[0]}", file=sys.stderr)
    return 2


def run_stop(args: argparse.Namespace) -> int:
    """Run `bus stop`; returns the exit status."""
    try:
        home = default_home()
        stopped = stop_server(home, timeout=args.timeout)
    except (OmniDaemonError, OSError) as exc:
        return _fail(str(exc))
    if stopped:
        print(f"stopped the embedded bus server in {home}")
    else:
        print(f"no embedded bus server was running in {home}")
    return 0


def run_status(args: argparse.Namespace) -> int:
    """Run `bus status`; returns 0 if the server runs, 1 if not, 2 on an error."""
    try:
        status = server_status(default_home())
    except (OmniDaemonError, OSError) as exc:
        return _fail(str(exc))
    if status["running"]:
        pid = f"pid {status['pid']}" if status["pid"] is not None else "pid unknown"
        print(f"the embedded bus server runs ({pid}) at {status['url']}")
        return 0
    print(f"no embedded bus server runs in {status['data_dir']}")
    return 1
