"""Serving the API with uvicorn until SIGINT or SIGTERM (`omnidaemon api`)."""

import importlib.util
import math
import signal
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import anyio
import uvicorn
from fastapi import FastAPI

from omnidaemon.observability.logging import get_logger

__all__ = ["listen", "serve_api"]

_log = get_logger("omnidaemon.api")


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to `host`:`port` (0: any free port), for `serve_api`.

    Binding before the server starts turns a port in use into an `OSError` the caller can
    report in one line, and tells it the port when it asked for any.

    Raises:
        OSError: the address cannot be resolved or bound.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: `serve_api` handles signals itself, so
    that a graceful stop exits with status 0 (uvicorn re-raises the signal once it stopped)."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_api(api: FastAPI, sock: socket.socket, *, shutdown_grace: float = 10.0) -> int:
    """Serve `api` on the bound socket `sock` (from `listen`) until SIGINT or SIGTERM.

    The first signal stops accepting connections, lets requests in progress finish within
    `shutdown_grace` seconds, and runs the API's shutdown (which closes the bus connection);
    a second signal exits at once.

    Returns:
        The exit status: 0 after a graceful stop, 1 when the API did not start, 128 + the
        signal's number when a second signal cut the stop short.
    """
    config = uvicorn.Config(
        api,
        lifespan="on",
        # Our own lines (structlog) say when the server starts and stops, and log each
        # request with the name of its token; uvicorn's would repeat them.
        log_config=None,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(shutdown_grace),
    )
    server = _Server(config)
    status: int = anyio.run(_serve, server, sock, backend_options=_backend_options())
    return status


async def _serve(server: uvicorn.Server, sock: socket.socket) -> int:
    killed_by: int | None = None
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            nonlocal killed_by
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if not server.should_exit:
                        _log.info(
                            "stopping: finishing requests (signal again to exit now)",
                            signal=name,
                        )
                        server.should_exit = True
                    else:
                        _log.warning("exiting now", signal=name)
                        killed_by = signum
                        server.force_exit = True

        tg.start_soon(watch_signals)
        # uvicorn raises SystemExit when the application's startup failed; it logged why.
        with suppress(SystemExit):
            await server.serve(sockets=[sock])
        tg.cancel_scope.cancel()
    if not server.started:
        return 1
    return 0 if killed_by is None else 128 + killed_by


def _backend_options() -> dict[str, Any]:
    """Use uvloop when it is installed, as the worker does."""
    return {"use_uvloop": True} if importlib.util.find_spec("uvloop") is not None else {}
