"""Helpers for the HTTP API tests: tokens, the tests' app, and uvicorn running in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import httpx
import uvicorn
from pydantic import BaseModel

from omnidaemon import App, Context
from omnidaemon.api import create_api, parse_tokens
from omnidaemon.brokers.base import Broker
from tests.e2e._support import wait_for
from tests.servers import free_port

__all__ = [
    "ADMIN",
    "PUBLISHER",
    "READER",
    "TOKENS_TEXT",
    "Job",
    "ServerThread",
    "apoll",
    "async_client",
    "auth",
    "make_app",
    "running_api",
]

# Long random-looking tokens, as real ones are; their text must never reach a log.
ADMIN = "adm-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
PUBLISHER = "pub-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
READER = "rdr-55aa66bb77cc88dd99ee00ff11aa22bb"
TOKENS_TEXT = f"""
# name    scopes          token
ops:admin:{ADMIN}
ci:read,publish:{PUBLISHER}
grafana:read:{READER}
"""


def auth(token: str) -> dict[str, str]:
    """The header presenting `token`."""
    return {"Authorization": f"Bearer {token}"}


class Job(BaseModel):
    """The payload of the tests' agents."""

    n: int
    fail: bool = False


def make_app(broker: Broker, lanes: dict[str, str], failing: set[str]) -> App:
    """An app with one agent per lane (`lanes`: agent name -> topic): each doubles `n`, and
    raises (dead-lettered at once: `max_retries=0`) when the job says `fail` or while its lane
    is in `failing`. Results are stored."""
    app = App("apitest", broker=broker)

    def lane_agent(lane: str) -> Callable[..., Any]:
        async def handle(job: Job, ctx: Context) -> dict[str, int]:
            if job.fail or lane in failing:
                raise RuntimeError(f"job {job.n} failed")
            return {"doubled": job.n * 2}

        return handle

    for lane, topic in lanes.items():
        app.agent(topic, name=lane, max_retries=0, store_results=True)(lane_agent(lane))
    return app


async def apoll(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0, message: str = ""
) -> Any:
    """`wait_for` for async tests: awaits `predicate` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        await anyio.sleep(0.02)


def async_client(url: str, token: str | None = None) -> httpx.AsyncClient:
    """A client of the API at `url` presenting `token` (for tests whose worker shares the
    event loop: a blocking client would stall it)."""
    return httpx.AsyncClient(base_url=url, headers=auth(token) if token else {}, timeout=10)


class ServerThread:
    """uvicorn serving an ASGI app on a free loopback port, in a thread of its own."""

    def __init__(self, asgi: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            asgi, host="127.0.0.1", port=self.port, log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), 10, "uvicorn to start")
        assert self.server.started, "uvicorn did not start"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@contextmanager
def running_api(app: App, **options: Any) -> Iterator[ServerThread]:
    """The API of `app` (tokens: `TOKENS_TEXT` unless given) served for the block."""
    if "tokens" not in options and not options.get("insecure_no_auth"):
        options["tokens"] = parse_tokens(TOKENS_TEXT, source="tests")
    server = ServerThread(create_api(app, **options))
    server.start()
    try:
        yield server
    finally:
        server.stop()
