"""What every command shares: the `--broker` option, opening the bus, running a coroutine, and
turning errors into one line."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker

__all__ = [
    "BrokerOption",
    "CommandError",
    "JsonOption",
    "ServedAppArgument",
    "WaitTimeoutOption",
    "load_cli_app",
    "open_cli_broker",
    "run_async",
]

T = TypeVar("T")

BrokerOption = Annotated[
    str | None,
    typer.Option(
        "--broker",
        envvar="OMNIDAEMON_BROKER_URL",
        show_envvar=True,
        show_default=False,
        metavar="URL",
        help="The bus (redis://, rediss://, unix://, nats://, tls://); default: the embedded bus.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
# The app a long-running command serves; it may come from the environment instead.
ServedAppArgument = Annotated[
    str | None,
    typer.Argument(
        metavar="APP",
        help=(
            "'module:attribute', a module holding one App, or a file ('./myapp.py', "
            "'agents/main.py:app') (default: $OMNIDAEMON_APP)."
        ),
        show_default=False,
    ),
]
WaitTimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.001, metavar="S", help="Seconds --wait waits.")
]


class CommandError(Exception):
    """A command failed; `status` is the exit status (1 runtime, 2 usage or configuration)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def open_cli_broker(url: str | None, *, start_embedded: bool = False) -> Broker:
    """The broker `url` names, or the embedded bus; the embedded server is started only with
    `start_embedded` (inspection commands report a stopped bus instead of starting one)."""
    from omnidaemon.brokers import open_broker
    from omnidaemon.brokers.embedded import EmbeddedBroker

    if url:
        return open_broker(url)
    return EmbeddedBroker(start_server=start_embedded)


def load_cli_app(target: str) -> App:
    """Import the app `target` names (`module:attribute`, a module, or a file path)."""
    from omnidaemon.worker.loader import load_app

    return load_app(target)


def run_async(command: str, func: Callable[[], Awaitable[T]]) -> T:
    """Run `func()` on a fresh event loop; omnidaemon's errors become one line on stderr and
    the exit status (2 for configuration errors, 1 otherwise)."""
    import anyio

    from omnidaemon.errors import AppLoadError, BusUnavailable, ConfigurationError, OmniDaemonError

    async def call() -> T:
        return await func()

    try:
        return anyio.run(call)
    except CommandError as exc:
        raise typer.Exit(_fail(command, str(exc), exc.status)) from None
    except (ConfigurationError, AppLoadError) as exc:
        raise typer.Exit(_fail(command, str(exc), 2)) from None
    except BusUnavailable as exc:
        raise typer.Exit(_fail(command, str(exc), 1)) from None
    except OmniDaemonError as exc:
        raise typer.Exit(_fail(command, str(exc), 1)) from None
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the entry point exits quietly
    except (OSError, TimeoutError) as exc:
        raise typer.Exit(_fail(command, f"{type(exc).__name__}: {exc}", 1)) from None
    except Exception as exc:
        if _is_redis_error(exc):
            raise typer.Exit(_fail(command, f"the bus failed: {exc}", 1)) from None
        raise


def _fail(command: str, message: str, status: int) -> int:
    from omnidaemon.cli._output import fail

    return fail(command, message, status)


def _is_redis_error(exc: BaseException) -> bool:
    from redis.exceptions import RedisError

    return isinstance(exc, RedisError)
