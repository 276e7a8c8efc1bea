"""Publishing on the Redis broker: single, batched and delayed events, retried with backoff
while the bus is unreachable."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import anyio
from redis.exceptions import AuthenticationError

from omnidaemon.brokers import _redis_scripts as scripts
from omnidaemon.brokers.redis._connection import _SOCKET_TIMEOUT, _UNAVAILABLE
from omnidaemon.brokers.redis._keys import _xadd_args
from omnidaemon.brokers.redis._routing import RedisRouting
from omnidaemon.errors import BusUnavailable, ConfigurationError

__all__ = ["RedisPublishing"]

# publish_many: a topic's entries go out as APPEND_MANY from this many on, this many a call
# (one call holds the server for about a millisecond per 1,000 entries).
_APPEND_MANY_FROM = 8
_APPEND_MANY_CHUNK = 1_000


class RedisPublishing(RedisRouting):
    """The publishing commands of `RedisBroker`."""

    async def _with_publish_deadline(self, attempt: Any) -> None:
        """Run `attempt()` until it succeeds, retrying an unreachable bus with backoff until
        `publish_timeout`, then raise `BusUnavailable`."""
        deadline = anyio.current_time() + self._publish_timeout
        delay = 0.05
        while True:
            try:
                await attempt()
                return
            except AuthenticationError as exc:
                # Wrong credentials will not fix themselves: say so at once.
                raise ConfigurationError(
                    f"the bus at {self._url} refused the credentials in the broker URL ({exc})"
                ) from None
            except _UNAVAILABLE as exc:
                if anyio.current_time() + delay > deadline:
                    raise BusUnavailable(
                        f"cannot publish: the bus at {self._url} did not answer within "
                        f"{self._publish_timeout:g} s ({type(exc).__name__}: {exc})"
                    ) from exc
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def publish(self, topic: str, data: bytes, *, delay: float = 0.0) -> None:
        key = self.stream_key(topic)
        maxlen = self._maxlen_of(topic)

        async def append() -> None:
            if self._min_replicas == 0:
                await self._direct(_xadd_args(key, maxlen, data), key=key, timeout=_SOCKET_TIMEOUT)
                return
            await self._exchange(
                (_xadd_args(key, maxlen, data),),
                key=key,
                timeout=_SOCKET_TIMEOUT + self._replica_wait,
                replicate="publish",
            )

        if delay <= 0:
            try:
                # The common case first, without the retry machinery's set-up; a failure is
                # retried (or reported) by `_with_publish_deadline` below.
                await append()
                return
            except (AuthenticationError, *_UNAVAILABLE):
                pass
            await self._with_publish_deadline(append)
            return
        # A delayed entry is held in the topic's delayed set by due time; consumers of the topic
        # release it into the stream (FETCH_RETRIES) once the server's clock reaches it. The
        # due time is set by that same clock (DELAY), not this process's: a publisher whose
        # clock is behind would otherwise have its events released early. The member is made
        # once, so a retried call cannot add it twice.
        delay_ms = max(0, int(delay * 1000))
        member = f"{self._unique_prefix}-{next(self._unique)}\n".encode() + data

        async def hold() -> None:
            await self._script(
                "DELAY",
                keys=[self.delayed_key(topic)],
                args=[delay_ms, member],
                replicate="publish",
            )

        await self._with_publish_deadline(hold)

    async def publish_many(self, entries: Sequence[tuple[str, bytes]]) -> None:
        if not entries:
            return

        # Per topic, in order; a topic's entries go out as one APPEND_MANY per chunk (few
        # entries: plain XADDs). Order across topics means nothing: they are separate streams.
        by_topic: dict[str, list[bytes]] = {}
        for topic, data in entries:
            by_topic.setdefault(topic, []).append(data)
        appends: list[tuple[str, int, list[bytes]]] = []  # (stream, maxlen, entries) per call
        for topic, datas in by_topic.items():
            key, maxlen = self.stream_key(topic), self._maxlen_of(topic)
            if len(datas) < _APPEND_MANY_FROM:
                appends += [(key, maxlen, [data]) for data in datas]
            else:
                step = _APPEND_MANY_CHUNK
                appends += [(key, maxlen, datas[i : i + step]) for i in range(0, len(datas), step)]
        append_many = self._scripts["APPEND_MANY"]

        async def attempt() -> None:
            if self._min_replicas > 0 or self._cluster is not None:
                # Each topic on a connection of its own, followed by WAIT on that connection
                # (a pipeline through the client could put the WAIT on another one), and
                # following a cluster's ASK on it (see `_script`).
                by_key: dict[str, list[tuple[Any, ...]]] = {}
                for key, maxlen, chunk in appends:
                    by_key.setdefault(key, []).append(_append_command(key, maxlen, chunk))
                timeout = _SOCKET_TIMEOUT + self._replica_wait
                errors: list[Exception] = []

                async def send(key: str, commands: list[tuple[Any, ...]]) -> None:
                    try:
                        await self._exchange(
                            commands, key=key, timeout=timeout, replicate="publish"
                        )
                    except Exception as exc:  # the first is raised once every topic is done
                        errors.append(exc)

                # Topics at once: each waits for its own replicas, not for the others'.
                async with anyio.create_task_group() as tasks:
                    for key, commands in by_key.items():
                        tasks.start_soon(send, key, commands)
                if errors:
                    raise errors[0]
                return
            if len(appends) == 1 and len(appends[0][2]) > 1:
                # One call: no pipeline, whose script check would cost a round trip more.
                key, maxlen, chunk = appends[0]
                await append_many(keys=[key], args=[maxlen, *chunk])
                return
            # Scripts go as EVAL with their text: no SCRIPT EXISTS round trip first.
            async with self.client.pipeline(transaction=False) as pipe:
                for key, maxlen, chunk in appends:
                    pipe.execute_command(*_append_command(key, maxlen, chunk))
                await pipe.execute()

        await self._with_publish_deadline(attempt)

    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        appended = False
        key, maxlen = self.stream_key(topic), self._maxlen_of(topic)

        async def attempt() -> None:
            nonlocal appended
            done = await self._script(
                "APPEND_IF_EXISTS", keys=[key], args=[maxlen, data], replicate="publish"
            )
            appended = bool(done)

        await self._with_publish_deadline(attempt)
        return appended

    async def publish_once(self, topic: str, data: bytes, key: str, *, window: float) -> bool:
        # One script checks the key's mark, appends and marks (APPEND_ONCE): atomic, and on a
        # cluster both keys carry the topic's hash tag. The token, made once per call, lets a
        # try after a lost reply tell its own earlier append from another caller's.
        appended = False
        stream, maxlen = self.stream_key(topic), self._maxlen_of(topic)
        mark = self.once_key(topic, key)
        window_ms = max(1, math.ceil(window * 1000))
        token = f"{self._unique_prefix}-{next(self._unique)}"

        async def attempt() -> None:
            nonlocal appended
            done = await self._script(
                "APPEND_ONCE",
                keys=[stream, mark],
                args=[maxlen, data, window_ms, token],
                replicate="publish",
            )
            appended = bool(done)

        await self._with_publish_deadline(attempt)
        return appended


def _append_command(key: str, maxlen: int, chunk: Sequence[bytes]) -> tuple[Any, ...]:
    """One entry: XADD; several: the APPEND_MANY script, sent with its text (EVAL)."""
    if len(chunk) == 1:
        return _xadd_args(key, maxlen, chunk[0])
    return ("EVAL", scripts.APPEND_MANY, 1, key, maxlen, *chunk)
