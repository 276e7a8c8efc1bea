"""`omnidaemon worker APP`: run an app's agents until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import sys
from typing import Any

import anyio
import structlog

from omnidaemon.cli._args import positive_int, seconds
from omnidaemon.errors import OmniDaemonError
from omnidaemon.observability.logging import configure_logging
from omnidaemon.settings import Settings
from omnidaemon.worker.loader import load_app
from omnidaemon.worker.runner import Worker

__all__ = ["add_parser", "run"]


def add_parser(commands: Any) -> None:
    """Add the `worker` command to the CLI's subcommands."""
    parser = commands.add_parser(
        "worker",
        help="run an app's agents",
        description=(
            "Run the agents of APP until SIGINT or SIGTERM (a second signal exits at once)."
        ),
    )
    parser.add_argument(
        "app",
        nargs="?",
        metavar="APP",
        help="'module:attribute' or a module holding one App (default: $OMNIDAEMON_APP)",
    )
    parser.add_argument(
        "--agents", metavar="A,B", help="run only these agents (comma-separated names)"
    )
    parser.add_argument(
        "--concurrency", type=positive_int, metavar="N", help="override every agent's concurrency"
    )
    parser.add_argument(
        "--shutdown-grace",
        type=seconds(zero_ok=True),
        metavar="S",
        help="seconds in-flight handlers get after a stop signal (default 30)",
    )
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], type=str.upper
    )
    parser.add_argument("--log-format", choices=["auto", "console", "json"])
    parser.set_defaults(run=run, parser=parser)


def _fail(message: str) -> int:
    print(f"omnidaemon worker: error: {message}", file=sys.stderr)
    return 2


async def _serve(worker: Worker) -> int | None:
    """Run the worker with signal handling.

    Returns None after a graceful stop, or the signal number that cut it short (the second).
    """
    log = structlog.get_logger("omnidaemon.worker")
    killed_by: int | None = None
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal killed_by
            stopping = False
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stopping:
                        stopping = True
                        log.info(
                            "stopping: finishing in-flight handlers (signal again to exit now)",
                            signal=name,
                            grace=worker.shutdown_grace,
                        )
                        worker.stop()
                    else:
                        killed_by = signum
                        log.warning("exiting now", signal=name)
                        tg.cancel_scope.cancel()
                        return

        tg.start_soon(watch_signals)
        await worker.run()
        tg.cancel_scope.cancel()
    return killed_by


def _backend_options() -> dict[str, Any]:
    """Use uvloop when it is installed: a faster event loop for the same code."""
    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}


def run(args: argparse.Namespace) -> int:
    """Run the `worker` command; returns the exit status."""
    try:
        settings = Settings.from_env()
    except OmniDaemonError as exc:
        return _fail(str(exc))
    target = args.app or settings.app
    if not target:
        return _fail(
            "name the app to run, e.g. 'omnidaemon worker myapp:app' (or set OMNIDAEMON_APP)"
        )
    configure_logging(args.log_level or settings.log_level, args.log_format or settings.log_format)
    agents = [a.strip() for a in args.agents.split(",") if a.strip()] if args.agents else None
    try:
        app = load_app(target)
        worker = Worker(
            app, agents=agents, concurrency=args.concurrency, shutdown_grace=args.shutdown_grace
        )
    except OmniDaemonError as exc:
        return _fail(str(exc))
    try:
        killed_by = anyio.run(_serve, worker, backend_options=_backend_options())
    except KeyboardInterrupt:
        killed_by = signal.SIGINT
    if killed_by is not None or worker.abandoned_handlers:
        # Plain `def` handlers cancelled by a hard stop or the end of the grace period may still
        # run in threads, which cannot be cancelled: exit without waiting for them (their events
        # were not acknowledged and will be delivered again).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + killed_by if killed_by is not None else 0)
    return 0
