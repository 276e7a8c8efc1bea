"""`omnidaemon api APP`: serve the control-plane HTTP API of an app until SIGINT or SIGTERM.

FastAPI and uvicorn are an extra (`pip install 'omnidaemon[api]'`), imported only when the
command runs.
"""

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from omnidaemon.cli._common import BrokerOption, ServedAppArgument
from omnidaemon.cli._output import fail
from omnidaemon.cli.worker import LogFormat, LogFormatOption, LogLevel, LogLevelOption
from omnidaemon.observability.logging import get_logger

if TYPE_CHECKING:
    from omnidaemon.api.auth import ApiToken
    from omnidaemon.app import App

__all__ = ["api", "dashboard"]

_COMMAND = "api"


HostOption = Annotated[str, typer.Option("--host", metavar="HOST", help="Address to listen on.")]
PortOption = Annotated[
    int, typer.Option("--port", min=0, max=65535, metavar="PORT", help="Port (0: any).")
]
TokensFileOption = Annotated[
    Path | None,
    typer.Option(
        "--tokens-file",
        metavar="PATH",
        help="API tokens, NAME:SCOPES:TOKEN per line (also: $OMNIDAEMON_API_TOKENS).",
        show_default=False,
    ),
]
InsecureOption = Annotated[
    bool,
    typer.Option(
        "--insecure-no-auth",
        help="Serve without tokens: anyone who reaches the port may do anything. "
        "Loopback --host only.",
    ),
]
ShutdownGraceOption = Annotated[
    float,
    typer.Option(
        "--shutdown-grace",
        min=0.0,
        metavar="S",
        help="Seconds requests in progress get after a stop signal.",
    ),
]
MaxWaitingOption = Annotated[
    int,
    typer.Option(
        "--max-waiting",
        min=1,
        metavar="N",
        help="Requests that may wait at once (request-reply, results with wait); "
        "more get 503 with Retry-After. Each holds a bus connection.",
    ),
]


def api(
    app: ServedAppArgument = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8765,
    broker: BrokerOption = None,
    tokens_file: TokensFileOption = None,
    insecure_no_auth: InsecureOption = False,
    shutdown_grace: ShutdownGraceOption = 10.0,
    max_waiting: MaxWaitingOption = 32,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Serve the HTTP API of APP (publish, results, topics, dead letters, health, metrics)
    and its dashboard (/ui) until SIGINT or SIGTERM. Tokens come from
    $OMNIDAEMON_API_TOKENS or --tokens-file."""
    _run(
        app,
        host=host,
        port=port,
        broker=broker,
        tokens_file=tokens_file,
        insecure_no_auth=insecure_no_auth,
        shutdown_grace=shutdown_grace,
        max_waiting=max_waiting,
        log_level=log_level,
        log_format=log_format,
        dashboard=False,
    )


def dashboard(
    app: ServedAppArgument = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8765,
    broker: BrokerOption = None,
    tokens_file: TokensFileOption = None,
    insecure_no_auth: InsecureOption = False,
    shutdown_grace: ShutdownGraceOption = 10.0,
    max_waiting: MaxWaitingOption = 32,
    log_level: LogLevelOption = None,
    log_format: LogFormatOption = None,
) -> None:
    """Serve the web dashboard of APP at /ui (with the HTTP API) until SIGINT or SIGTERM.
    Sign in with a token of $OMNIDAEMON_API_TOKENS or --tokens-file; with none, on a
    loopback --host, it is served without sign-in to this machine only."""
    _run(
        app,
        host=host,
        port=port,
        broker=broker,
        tokens_file=tokens_file,
        insecure_no_auth=insecure_no_auth,
        shutdown_grace=shutdown_grace,
        max_waiting=max_waiting,
        log_level=log_level,
        log_format=log_format,
        dashboard=True,
    )


def _run(
    app: str | None,
    *,
    host: str,
    port: int,
    broker: str | None,
    tokens_file: Path | None,
    insecure_no_auth: bool,
    shutdown_grace: float,
    max_waiting: int,
    log_level: LogLevel | None,
    log_format: LogFormat | None,
    dashboard: bool,
) -> None:
    command = "dashboard" if dashboard else _COMMAND
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise typer.Exit(
            fail(command, "the HTTP API needs FastAPI: pip install 'omnidaemon[api]'", 2)
        ) from None
    from omnidaemon.api.auth import TOKENS_ENV, ApiToken, is_loopback, load_tokens
    from omnidaemon.errors import OmniDaemonError
    from omnidaemon.settings import Settings

    if insecure_no_auth and not is_loopback(host):
        raise typer.Exit(
            fail(
                command,
                f"--insecure-no-auth serves without tokens, so only on a loopback --host "
                f"(127.0.0.1, ::1, localhost), not {host!r}",
                2,
            )
        )
    tokens: list[ApiToken] = []
    try:
        settings = Settings.from_env()
        if not insecure_no_auth:
            tokens = load_tokens(os.environ, tokens_file)
    except OmniDaemonError as exc:
        raise typer.Exit(fail(command, str(exc), 2)) from None
    if dashboard and not insecure_no_auth and not tokens and is_loopback(host):
        # The quick look at a local app: nothing but this machine can reach a loopback port
        # (and the API refuses other Host names), so no sign-in, as with --insecure-no-auth.
        insecure_no_auth = True
    if not insecure_no_auth and not tokens:
        raise typer.Exit(
            fail(
                command,
                f"no API tokens: set {TOKENS_ENV} or pass --tokens-file (NAME:SCOPES:TOKEN "
                "entries), or serve a loopback --host with --insecure-no-auth",
                2,
            )
        )
    target = app or settings.app
    if not target:
        raise typer.BadParameter(
            "name the app to serve, e.g. 'omnidaemon api myapp:app' (or set OMNIDAEMON_APP)",
            param_hint="APP",
        )
    loaded = _load_app(target, broker, command)

    from omnidaemon.observability.logging import configure_logging

    configure_logging(
        log_level.value if log_level else settings.log_level,
        log_format.value if log_format else settings.log_format,
    )
    raise typer.Exit(
        _serve(
            loaded,
            host=host,
            port=port,
            tokens=tokens,
            insecure_no_auth=insecure_no_auth,
            ignored_tokens=insecure_no_auth and bool(os.environ.get(TOKENS_ENV) or tokens_file),
            tokens_file=tokens_file,
            shutdown_grace=shutdown_grace,
            max_waiting=max_waiting,
            dashboard=dashboard,
        )
    )


def _load_app(target: str, broker: str | None, command: str = _COMMAND) -> "App":
    """Import the app and resolve its bus; `--broker` is its bus unless its code names
    another (an error)."""
    from omnidaemon.brokers import open_broker
    from omnidaemon.cli._common import load_cli_app
    from omnidaemon.errors import OmniDaemonError

    # No --broker, or the environment's: as for the worker, an app that names its own bus in
    # code keeps it. Otherwise --broker is OMNIDAEMON_BROKER_URL, which an App made without
    # a broker reads when it is made.
    flag = broker if broker and broker != os.environ.get("OMNIDAEMON_BROKER_URL") else None
    try:
        wanted = open_broker(flag).url if flag else None  # checks it; password masked
        if flag:
            os.environ["OMNIDAEMON_BROKER_URL"] = flag
        loaded = load_cli_app(target)
        bus = loaded.broker.url  # a bad URL in the environment is one line here
    except OmniDaemonError as exc:
        raise typer.Exit(fail(command, str(exc), 2)) from None
    if wanted is not None and bus != wanted:
        raise typer.Exit(
            fail(
                command,
                f"app {loaded.name!r} names its own bus ({bus}), not --broker ({wanted}): "
                "drop --broker",
                2,
            )
        )
    return loaded


def _serve(
    app: "App",
    *,
    host: str,
    port: int,
    tokens: "list[ApiToken]",
    insecure_no_auth: bool,
    ignored_tokens: bool,
    tokens_file: Path | None,
    shutdown_grace: float,
    max_waiting: int,
    dashboard: bool = False,
) -> int:
    from omnidaemon.api import create_api
    from omnidaemon.api.server import listen, serve_api
    from omnidaemon.brokers.embedded import EmbeddedBroker
    from omnidaemon.errors import ConfigurationError, OmniDaemonError

    command = "dashboard" if dashboard else _COMMAND
    log = get_logger("omnidaemon.api")
    if insecure_no_auth:
        log.warning("serving without authentication (--insecure-no-auth)", host=host)
        if ignored_tokens:
            log.warning("API tokens are configured and ignored (--insecure-no-auth)")
    elif tokens_file is not None and _readable_by_others(tokens_file):
        log.warning("the tokens file is readable by other users: chmod 600 it", path=tokens_file)
    if isinstance(app.broker, EmbeddedBroker):
        # Started here rather than in the API's startup, so that a failure is one line.
        try:
            app.broker.ensure_server()
        except (OmniDaemonError, OSError) as exc:
            status = 2 if isinstance(exc, ConfigurationError) else 1
            return fail(command, f"cannot start the embedded bus: {exc}", status)
    try:
        asgi = create_api(
            app,
            tokens=tokens or None,
            insecure_no_auth=insecure_no_auth,
            max_waiting=max_waiting,
        )
    except ConfigurationError as exc:
        return fail(command, str(exc), 2)
    try:
        sock = listen(host, port)
    except OSError as exc:
        return fail(command, f"cannot listen on {host}:{port}: {exc.strerror or exc}", 1)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    if dashboard:
        log.info("dashboard listening", url=f"{url}/ui/", app=app.name, bus=app.broker.url)
    else:
        log.info(
            "api listening",
            url=url,
            docs=f"{url}/docs",
            ui=f"{url}/ui/",
            app=app.name,
            bus=app.broker.url,
        )
    sys.stderr.flush()
    return serve_api(asgi, sock, shutdown_grace=shutdown_grace)


def _readable_by_others(path: Path) -> bool:
    try:
        return bool(path.stat().st_mode & 0o077)
    except OSError:
        return False  # read a moment ago; gone now: nothing to warn about
