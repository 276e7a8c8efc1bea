"""`omnidaemon worker APP`: run an app's agents until SIGINT or SIGTERM, in this process or, with
`--processes N`, in N worker processes under a supervisor."""

import importlib.util
import os
import signal
import sys
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer

from omnidaemon.cli._common import ServedAppArgument
from omnidaemon.cli._output import fail
from omnidaemon.observability.logging import get_logger

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from omnidaemon.worker.runner import Worker

__all__ = ["worker"]


class LogLevel(StrEnum):
    """Log levels the worker accepts."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


class LogFormat(StrEnum):
    """Log formats the worker accepts."""

    auto = "auto"
    console = "console"
    json = "json"


LogLevelOption = Annotated[
    LogLevel | None, typer.Option("--log-level", case_sensitive=False, help="Log level.")
]
LogFormatOption = Annotated[
    LogFormat | None,
    typer.Option("--log-format", help="console, json, or auto (console on a terminal)."),
]


def worker(
    app: ServedAppArgument = None,
    agents: Annotated[
        str | None,
        typer.Option("--agents", metavar="A,B", help="Run only these agents (comma-separated)."),
    ] = None,
    schedules: Annotated[
        bool,
        typer.Option(
            "--schedules/--no-schedules",
            help=(
                "Run the app's schedules too (the default, whatever --agents says: the bus "
                "gives each tick to one worker); --no-schedules leaves them to other workers."
            ),
        ),
    ] = True,
    processes: Annotated[
        int,
        typer.Option(
            "--processes",
            min=1,
            metavar="N",
            help="Run N worker processes under a supervisor that restarts any that dies.",
        ),
    ] = 1,
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency", min=1, metavar="N", help="Override every agent's concurrency."
        ),
    ] = None,
    shutdown_grace: Annotated[
        float | None,
        typer.Option(
            "--shutdown-grace",
            min=0.0,
            metavar="S",
            help="Seconds in-flight handlers get after a stop signal (default 30).",
        ),
    ] = None,
    connect_timeout: Annotated[
        float | None,
        typer.Option(
            "--connect-timeout",
            min=0.0,
            metavar="S",
            help=(
                "Seconds to keep trying to reach the bus at start, then exit 1 (default: "
                "$OMNIDAEMON_CONNECT_TIMEOUT, or for as long as it takes; 0 tries once)."
            ),
        ),
    ] = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help=(
                "Development: restart the worker when a .py file under the current folder (or "
                "the app file's folder) changes. Needs the 'reload' extra (watchfiles)."
            ),
        ),
    ] = False,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=0,
            max=65535,
            metavar="PORT",
            help=(
                "Serve Prometheus metrics, /livez and /readyz on this port (with --processes N, "
                "process i uses PORT+i)."
            ),
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option("--metrics-host", metavar="HOST", help="Address the metrics port binds."),
    ] = "127.0.0.1",
) -> None:
    """Run the agents of APP until SIGINT or SIGTERM (a second signal exits at once)."""
    from omnidaemon.errors import OmniDaemonError
    from omnidaemon.settings import Settings

    try:
        settings = Settings.from_env()
    except OmniDaemonError as exc:
        raise typer.Exit(fail("worker", str(exc), 2)) from None
    target = app or settings.app
    grace = settings.shutdown_grace if shutdown_grace is None else shutdown_grace
    if not target:
        raise typer.BadParameter(
            "name the app to run, e.g. 'omnidaemon worker myapp:app' (or set OMNIDAEMON_APP)",
            param_hint="APP",
        )
    if reload:
        raise typer.Exit(
            _reload(
                target,
                shutdown_grace=grace,
                log_level=log_level.value if log_level else settings.log_level,
                log_format=log_format.value if log_format else settings.log_format,
            )
        )
    if processes > 1:
        raise typer.Exit(
            _supervise(
                processes,
                sys.argv,
                shutdown_grace=grace,
                metrics_port=metrics_port,
                log_level=log_level.value if log_level else settings.log_level,
                log_format=log_format.value if log_format else settings.log_format,
            )
        )
    raise typer.Exit(
        _run_worker(
            target,
            settings=settings,
            agents=agents,
            schedules=schedules,
            concurrency=concurrency,
            shutdown_grace=shutdown_grace,
            connect_timeout=connect_timeout,
            log_level=log_level.value if log_level else settings.log_level,
            log_format=log_format.value if log_format else settings.log_format,
            metrics=(metrics_host, metrics_port) if metrics_port is not None else None,
        )
    )


def _child_argv(argv: list[str], index: int, metrics_port: int | None) -> list[str]:
    """The command line of worker process `index`: this one without `--processes` (and with
    its own metrics port)."""
    args: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg in ("--processes", "--metrics-port"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--metrics-port=")):
            continue
        args.append(arg)
    # argv[0] may be a console script or `-m omnidaemon`: run the module either way.
    head = args.index("worker") if "worker" in args else 0
    child = [sys.executable, "-m", "omnidaemon", *args[head:]]
    if metrics_port is not None:
        child += ["--metrics-port", str(metrics_port + index if metrics_port else 0)]
    return child


def _reload(target: str, *, shutdown_grace: float, log_level: str, log_format: str) -> int:
    from pathlib import Path

    from omnidaemon.cli import _reload as reloading
    from omnidaemon.observability.logging import configure_logging

    if not reloading.reload_available():
        return fail(
            "worker",
            "--reload needs the watchfiles package: pip install 'omnidaemon[reload]'",
            2,
        )
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    return reloading.run_with_reload(
        reloading.child_command(sys.argv),
        reloading.watched_folders(target, Path.cwd()),
        shutdown_grace,
    )


def _supervise(
    processes: int,
    argv: list[str],
    *,
    shutdown_grace: float,
    metrics_port: int | None,
    log_level: str,
    log_format: str,
) -> int:
    import anyio

    from omnidaemon.observability.logging import configure_logging
    from omnidaemon.worker.supervisor import Supervisor

    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    supervisor = Supervisor(
        lambda index: _child_argv(argv, index, metrics_port),
        processes,
        shutdown_grace=shutdown_grace,
    )
    return anyio.run(supervisor.run)


def _run_worker(
    target: str,
    *,
    settings: Any,
    agents: str | None,
    concurrency: int | None,
    schedules: bool = True,
    shutdown_grace: float | None,
    connect_timeout: float | None,
    log_level: str,
    log_format: str,
    metrics: tuple[str, int] | None,
) -> int:
    import anyio

    from omnidaemon.errors import BusUnavailable, OmniDaemonError
    from omnidaemon.observability.logging import configure_logging
    from omnidaemon.worker.loader import load_app
    from omnidaemon.worker.runner import Worker

    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    names = [a.strip() for a in agents.split(",") if a.strip()] if agents else None
    try:
        worker = Worker(
            load_app(target),
            agents=names,
            schedules=schedules,
            concurrency=concurrency,
            shutdown_grace=shutdown_grace,
            connect_timeout=connect_timeout,
        )
    except OmniDaemonError as exc:
        return fail("worker", str(exc), 2)
    try:
        try:
            killed_by = anyio.run(_serve, worker, metrics, backend_options=_backend_options())
        except BaseExceptionGroup as group:
            # Task groups wrap the error that ended the start; show the error, not the groups.
            raise _sole_error(group) from None
    except KeyboardInterrupt:
        killed_by = signal.SIGINT
    except BusUnavailable as exc:
        return fail("worker", str(exc), 1)
    except OmniDaemonError as exc:
        return fail("worker", str(exc), 2)
    if killed_by is not None or worker.abandoned_handlers:
        # Plain `def` handlers cancelled by a hard stop or the end of the grace period may still
        # run in threads, which cannot be cancelled: exit without waiting for them (their events
        # were not acknowledged and will be delivered again).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + killed_by if killed_by is not None else 0)
    return 0


async def _serve(worker: "Worker", metrics: tuple[str, int] | None) -> int | None:
    """Run the worker with signal handling (and its metrics endpoint).

    Returns None after a graceful stop, or the signal number that cut it short (the second).
    """
    import anyio

    log = get_logger("omnidaemon.worker")
    killed_by: int | None = None
    ready = False
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal killed_by, ready
            stopping = False
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not stopping:
                        stopping = True
                        ready = False
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
        if metrics is not None:
            from omnidaemon.observability.exporter import serve_metrics

            host, port = metrics
            await tg.start(
                lambda task_status: serve_metrics(
                    host,
                    port,
                    snapshots=lambda: [c.metrics.snapshot() for c in worker.consumers],
                    budgets=worker.budget_levels.gauges,
                    ready=lambda: ready,
                    worker=worker.name,
                    app=worker.app.name,
                    task_status=task_status,
                )
            )

        async def run_worker(*, task_status: "TaskStatus[None]") -> None:
            await worker.run(task_status=task_status)
            tg.cancel_scope.cancel()  # the signal watcher and the metrics server end with it

        await tg.start(run_worker)
        ready = True
    return killed_by


def _sole_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one omnidaemon error (or interrupt) inside nested task-group errors; the group
    itself when it holds anything else, so that a bug keeps its full traceback."""
    from omnidaemon.errors import OmniDaemonError

    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1 and isinstance(leaves[0], OmniDaemonError | KeyboardInterrupt):
        return leaves[0]
    return group


def _backend_options() -> dict[str, Any]:
    """Use uvloop when it is installed: a faster event loop for the same code."""
    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}
