"""`omnidaemon COMMAND ...`: the command line, built with Typer.

Every bad argument prints one line (`omnidaemon CMD: error: ...`) and exits with status 2.
Commands import what they need when they run, so `omnidaemon --help` starts fast.
"""

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import typer

# Typer vendors click; its exceptions are not re-exported, and catching them is how a caller
# takes over error output (standalone_mode=False).
from typer._click.exceptions import BadParameter, ClickException, NoArgsIsHelpError, UsageError

from omnidaemon.cli import activity, apps, events, monitor, schedules, traces
from omnidaemon.cli import api as api_command
from omnidaemon.cli import bus_dead_letters as bus_dead_letters  # registers `bus dlq`, `replay`
from omnidaemon.cli import worker as worker_command
from omnidaemon.cli.bus import bus
from omnidaemon.cli.bus_local import register_local_commands

__all__ = ["build_cli", "main"]


def build_cli() -> typer.Typer:
    """The `omnidaemon` command with every subcommand."""
    cli = typer.Typer(
        name="omnidaemon",
        help="Event-driven AI agents on a real event bus.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    cli.command("worker")(worker_command.worker)
    cli.command("publish")(events.publish)
    cli.command("result")(events.result)
    cli.command("cancel")(events.cancel)
    cli.command("trace")(traces.trace)
    cli.command("runs")(traces.runs)
    cli.command("agents")(apps.agents)
    cli.command("graph")(apps.graph)
    cli.command("asyncapi")(apps.asyncapi)
    cli.command("schedules")(schedules.schedules)
    cli.command("metrics")(monitor.metrics)
    cli.command("health")(monitor.health)
    cli.command("limits")(monitor.limits)
    cli.command("inspect")(activity.inspect)
    cli.command("api")(api_command.api)
    cli.command("dashboard")(api_command.dashboard)
    register_local_commands(bus)
    cli.add_typer(bus)
    return cli


def _given_value(args: Sequence[str], exc: BadParameter) -> str | None:
    """The value given on the command line for the option `exc` is about, if it is one."""
    names = getattr(exc.param, "opts", None) or ()
    for index, arg in enumerate(args):
        for name in names:
            if not name.startswith("-"):
                continue
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1 :]
    return None


def _reader_went_away() -> NoReturn:
    """Exit as Unix tools do when the reader of stdout closes it (`omnidaemon bus list | head
    -1`): no traceback, and the status of a process killed by SIGPIPE (128 + 13), so
    `set -o pipefail` still sees the output was cut short."""
    # Python flushes stdout again at exit, which would fail and print a warning: point it at
    # /dev/null first, as the Python documentation advises.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(141)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line with `argv` (default: `sys.argv[1:]`) and exit."""
    command = typer.main.get_command(build_cli())
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        status = command.main(args=args, prog_name="omnidaemon", standalone_mode=False)
    except NoArgsIsHelpError as exc:
        # A command group named without its action: show what it offers.
        if exc.ctx is not None:
            print(exc.ctx.get_help())
        sys.exit(2)
    except UsageError as exc:
        path = exc.ctx.command_path if exc.ctx is not None else "omnidaemon"
        message = exc.format_message().splitlines()[0] if exc.format_message() else "bad usage"
        given = _given_value(args, exc) if isinstance(exc, BadParameter) else None
        if given is not None:
            # Name the value the operator typed: the parser's message does not.
            message = message.replace("': ", f"' ({given!r}): ", 1)
        print(f"{path}: error: {message} (see '{path} --help')", file=sys.stderr)
        sys.exit(2)
    except ClickException as exc:
        print(f"omnidaemon: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except BrokenPipeError:
        _reader_went_away()
    except SystemExit as exc:
        # Click turns a broken pipe into `sys.exit(1)` itself: the same quiet exit for it.
        if isinstance(exc.__context__, BrokenPipeError):
            _reader_went_away()
        raise
    sys.exit(status if isinstance(status, int) else 0)
