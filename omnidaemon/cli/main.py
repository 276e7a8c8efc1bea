"""`omnidaemon COMMAND ...`: argument parsing and dispatch to one module per command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from omnidaemon.cli import bus, worker

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser for every command."""
    parser = _Parser(
        prog="omnidaemon",
        description="Event-driven AI agents on a real event bus.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    worker.add_parser(commands)
    bus.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line with `argv` (default: `sys.argv[1:]`) and exit."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Report unknown options against the command they were given to, with its help.
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    sys.exit(args.run(args))
