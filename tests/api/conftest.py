"""Fixtures of the HTTP API tests: per test module, a bus of its own (a key prefix on the
session's redis-server), the API of the tests' app served by uvicorn on a free loopback port,
and workers started by the tests that need them."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from omnidaemon import App
from omnidaemon.brokers.redis import RedisBroker
from tests.api._support import ServerThread, auth, make_app, running_api
from tests.servers import RedisServer

# One lane (agent and topic) per test that runs a worker, so tests do not see each other's
# events; the suffix keeps the topic names unique to this run.
SUFFIX = uuid.uuid4().hex[:8]
LANES = {lane: f"{lane}.t{SUFFIX}" for lane in ("handled", "options", "request", "replay", "purge")}


@pytest.fixture(scope="module")
def bus_prefix() -> str:
    """The module's own key prefix: `health`, `topics` and `stats` see only its keys."""
    return f"api{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def failing() -> set[str]:
    """Lanes whose agent fails while they are in the set."""
    return set()


@pytest.fixture(scope="module")
def make_bus_app(
    redis_server: RedisServer, bus_prefix: str, failing: set[str]
) -> Callable[[], App]:
    """Makes the tests' app on the module's bus (the API and each worker get their own)."""
    return lambda: make_app(RedisBroker(redis_server.url, prefix=bus_prefix), LANES, failing)


@pytest.fixture(scope="module")
def api_server(make_bus_app: Callable[[], App]) -> Iterator[ServerThread]:
    """The API, with the tokens of `TOKENS_TEXT`, for the whole module."""
    with running_api(make_bus_app()) as server:
        yield server


@pytest.fixture
def client(api_server: ServerThread) -> Iterator[Callable[..., httpx.Client]]:
    """Makes clients of the module's API, presenting a token or none; closes them after."""
    made: list[httpx.Client] = []

    def make(token: str | None = None) -> httpx.Client:
        headers = auth(token) if token else {}
        made.append(httpx.Client(base_url=api_server.url, headers=headers, timeout=10))
        return made[-1]

    yield make
    for c in made:
        c.close()
