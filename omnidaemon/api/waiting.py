"""Requests that wait (`POST /v1/requests`, `GET /v1/events/{id}/result?wait=`): a bound on how
many wait at once, and an end to the wait when the client goes away.

A waiting request holds a connection to the bus for as long as it waits (request-reply reads
its reply topic on one). Without a bound, a burst of them takes every connection of the pool
and the server answers 503 to everything, `/healthz` included; without watching the client, a
request whose client gave up (a proxy's short timeout, a user's Ctrl-C) holds its connection
until its own timeout, and a few rounds of abandoned requests do the same.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
from starlette.requests import Request

from omnidaemon.api.errors import ApiError

__all__ = ["CLIENT_GONE_STATUS", "DEFAULT_MAX_WAITING", "WaitingRequests"]

T = TypeVar("T")

DEFAULT_MAX_WAITING = 32
"""Requests that may wait at once by default: each holds a bus connection, and a publish needs
one more for a moment, so 32 leave a third of redis-py's default pool (100) to other routes."""

CLIENT_GONE_STATUS = 499
"""The status logged for a request whose client left before its answer (nginx's "client
closed request"); nobody receives it."""

_RETRY_AFTER = "1"  # seconds: waits end within their timeout, and most end far sooner


class WaitingRequests:
    """Counts the requests that wait, refuses those past `limit` with 503 at once, and ends a
    wait whose client has gone.

    Args:
        limit: Requests that may wait at the same time.
    """

    def __init__(self, limit: int = DEFAULT_MAX_WAITING) -> None:
        if limit < 1:
            raise ValueError(f"the limit of waiting requests must be at least 1, not {limit}")
        self.limit = limit
        self.waiting = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the `limit` slots for the block.

        Raises:
            ApiError: 503 `busy` with `Retry-After`, when every slot is taken.
        """
        if self.waiting >= self.limit:
            raise ApiError(
                503,
                "busy",
                f"{self.limit} requests are waiting already, the most this server lets wait "
                "at once; retry shortly",
                {"Retry-After": _RETRY_AFTER},
            )
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1

    async def wait(self, request: Request, work: Callable[[], Awaitable[T]]) -> T:
        """Run `work` in a slot; cancel it as soon as the client of `request` disconnects.

        Raises:
            ApiError: 503 when every slot is taken; 499 when the client left (cancelled,
                nothing reaches the client, and everything `work` held is released by its
                own `finally` blocks).
        """
        async with self.slot():
            return await _unless_client_leaves(request, work)


async def _unless_client_leaves(request: Request, work: Callable[[], Awaitable[T]]) -> T:
    left = False
    failure: Exception | None = None

    async with anyio.create_task_group() as group:

        async def watch() -> None:
            nonlocal left
            # The body was read before the route ran, so the next message the server has
            # for this request is its disconnect (after the answer, or when the client goes).
            while (await request.receive())["type"] != "http.disconnect":
                pass
            left = True
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            result = await work()
        except Exception as exc:  # raised as it is below, not inside an exception group
            failure = exc
        finally:
            group.cancel_scope.cancel()  # the watcher has nothing left to watch
    if failure is not None:
        raise failure
    if left:
        raise ApiError(CLIENT_GONE_STATUS, "client_closed_request", "the client went away")
    return result
