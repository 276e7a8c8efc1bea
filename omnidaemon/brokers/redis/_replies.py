"""Reading a Redis connection's replies: straight from its hiredis reader when it has one
(`read_replies`), under the caller's one deadline for a whole exchange."""

from __future__ import annotations

import math
from typing import Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

__all__ = ["NO_TIMEOUT", "read_replies"]

# Replies are read under one deadline for the whole exchange (`anyio.fail_after`), not one per
# reply: redis-py's per-read timeout returns `None` when it expires (leaving the late reply to
# be read as the next command's) and costs a timer per reply.
NO_TIMEOUT = math.inf

try:  # redis-py's hiredis parser, read directly by `read_replies` (else through redis-py)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # pragma: no cover - a redis-py without them
    _NOT_ENOUGH_DATA = None
    _AsyncHiredisParser = type(None)  # type: ignore[assignment,misc]


async def read_replies(
    conn: AbstractConnection, count: int, *, errors_only: bool = False
) -> list[Any]:
    """`count` replies from `conn`, error replies as values (the caller's deadline bounds the
    wait); with `errors_only`, only the error replies among them (a batch of writes whose
    replies say nothing else).

    Straight from the connection's hiredis reader when it has one, one `gets()` a reply:
    redis-py's `read_response` wraps each reply in five calls and a timeout, about 2 µs, and an
    ack batch carrying trace records gets two replies a record (measured with cProfile: the
    drain's biggest cost of traces). A push message (RESP3) goes to the parser's handler, as
    redis-py does; a connection parsed in Python goes through `read_response`.
    """
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if _NOT_ENOUGH_DATA is None or reader is None or not isinstance(parser, _AsyncHiredisParser):
        replies: list[Any] = []
        for _ in range(count):
            try:
                reply = await conn.read_response(timeout=NO_TIMEOUT)
            except ResponseError as exc:
                replies.append(exc)
            else:
                if not errors_only:
                    replies.append(reply)
        return replies
    replies = []
    append, gets = replies.append, reader.gets
    push = getattr(parser, "_hiredis_PushNotificationType", None) or _NeverPushed
    remaining = count
    while remaining:
        reply = gets()
        if type(reply) in _PLAIN:  # the common replies, with one check
            if not errors_only:
                append(reply)
            remaining -= 1
        elif reply is _NOT_ENOUGH_DATA:
            try:
                await parser.read_from_socket()  # type: ignore[no-untyped-call]
            except OSError as exc:  # as redis-py reports it: a ConnectionError
                raise RedisConnectionError(f"Error while reading from the server: {exc}") from exc
        elif isinstance(reply, RedisConnectionError):  # hiredis's protocol errors
            raise reply
        elif isinstance(reply, push):
            await parser.handle_push_response(reply)  # type: ignore[no-untyped-call]
        else:
            if not errors_only or isinstance(reply, Exception):
                append(reply)
            remaining -= 1
    return replies


_PLAIN = frozenset({int, bytes, list, dict, type(None)})


class _NeverPushed:
    """No reply is one (a hiredis without push notifications)."""
