"""`redis://`, `rediss://`, `unix://`: the production bus, on Redis Streams (Redis >= 6.2, Valkey).

Layout per topic (every key carries the topic as a hash tag, so one topic lives in one Redis
Cluster slot), with `omni` as the default prefix:

- `omni:{<topic>}:stream`: the topic's entries, one field `e` holding the envelope; every
  agent is a consumer group on it.
- `omni:{<topic>}:due:<group>`: a sorted set of the group's scheduled retries by due time.
- `omni:{<topic>}:retry:<group>`: the group's retry stream: due retries are moved here (one
  atomic script) and read by the same group, with the attempt in field `a`.
- `omni:{<topic>}:dlq:<group>`: the group's dead-letter stream, one field `r` per record.
- `omni:{<topic>}:delayed`: a sorted set of entries published with a delay, by due time on the
  server's clock.
- `omni:{<topic>}:metrics:<group>`: a hash of the group's metrics, incremented by every worker
  with its batched acks (see `omnidaemon.metrics`).

Outside topics: `omni:result:<event id>` (stored results, a hash by agent) and
`omni:value:<key>` (idempotency claims, worker heartbeats `worker:<name>`).

Trimming: each publish trims the topic stream to about `maxlen` entries (`XADD MAXLEN ~`). An
entry no group has read yet is trimmed only once at least `maxlen` newer entries were published
after it; size `maxlen` above the backlog your slowest agent may build up.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from omnidaemon.brokers import _redis_scripts as scripts
from omnidaemon.brokers.base import (
    Broker,
    ConsumerInfo,
    Delivery,
    GroupInfo,
    Reclaimed,
    Renewal,
    Subscription,
    TopicInfo,
)
from omnidaemon.errors import BusUnavailable, ConfigurationError
from omnidaemon.metrics import is_extreme
from omnidaemon.observability.logging import get_logger

__all__ = ["RedisBroker", "redact_url"]

_log = get_logger("omnidaemon.broker")

_STREAM = "s"
_RETRY = "r"
_RETRY_CHECK_INTERVAL = 0.05  # seconds between looks at the due-retry set while busy
# publish_many: a topic's entries go out as APPEND_MANY from this many on, this many a call
# (one call holds the server for about a millisecond per 1,000 entries).
_APPEND_MANY_FROM = 8
_APPEND_MANY_CHUNK = 1_000
_SOCKET_TIMEOUT = 10.0  # must stay above the longest BLOCK a fetch asks for
MAX_CONNECTIONS = 100  # the default size of a broker's connection pool (redis-py's own)
# Idle connections kept for publishing (see _direct); beyond these, a connection freed after a
# burst of concurrent publishes goes back to the pool, where every other command can use it.
_MAX_SPARES = 16
_MAX_BLOCK_MS = 5_000

_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, OSError)


# Query parameters that carry credentials in the URLs of the buses we support (redis-py reads
# `password`, `username` and `ssl_password` from the query as well as from the userinfo).
_SECRET_PARAMS = frozenset(
    {"password", "username", "user", "pass", "ssl_password", "token", "auth_token", "secret"}
)


def redact_url(url: str) -> str:
    """`url` with every credential masked (`***`): the userinfo password, and query parameters
    such as `password`, `username` and `ssl_password`. Safe to log and to put in errors."""
    parts = urlsplit(url)
    if parts.password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    # The query is rewritten in place: urlunsplit would turn `unix:///path` into `unix:/path`.
    head, question, rest = url.partition("?")
    query, hash_, fragment = rest.partition("#")
    if not query:
        return url
    fields = parse_qsl(query, keep_blank_values=True)
    masked = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in fields]
    if masked == fields:
        return url
    return f"{head}{question}{urlencode(masked, safe='*')}{hash_}{fragment}"


class RedisBroker(Broker):
    """The Redis Streams broker.

    Args:
        url: `redis://[[user]:password@]host[:port][/db]`, `rediss://...` for TLS, or
            `unix:///path/to/socket[?db=N]`.
        prefix: The first part of every key.
        maxlen: Entries each topic stream keeps (approximately; see the module docs).
        topic_maxlen: Per-topic overrides of `maxlen`.
        publish_timeout: Seconds a publish keeps trying an unreachable bus before it raises
            `BusUnavailable`.
        max_connections: The most connections the broker opens to the server (its pool):
            one per consumer of each agent while it reads, plus those commands use while
            they run. A command that finds them all in use fails at once with
            `MaxConnectionsError`, a `ConnectionError`. The URL's `?max_connections=N` wins
            over this argument.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "omni",
        maxlen: int = 100_000,
        topic_maxlen: Mapping[str, int] | None = None,
        publish_timeout: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be at least 1, not {max_connections}")
        self._raw_url = url
        self._max_connections = max_connections
        self._url = redact_url(url)
        self._prefix = prefix
        self._maxlen = maxlen
        self._topic_maxlen = dict(topic_maxlen or {})
        self._publish_timeout = publish_timeout
        self._client: aioredis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._unique = itertools.count()
        self._unique_prefix = f"{os.getpid()}-{os.urandom(4).hex()}"
        # Per subscription: when the due-retry set was last looked at, and its next due time.
        self._retry_state: dict[Subscription, tuple[float, float]] = {}
        # Per consumer of a subscription: the connection its fetches read on, kept between
        # fetches (see _direct).
        self._readers: dict[Hashable, AbstractConnection] = {}
        self._reader_ids: dict[Hashable, int] = {}  # the server's client id of each reader
        self._interrupted: set[Hashable] = set()  # consumers whose fetch must return now
        self._spares: list[AbstractConnection] = []  # idle connections for publishing

    @property
    def url(self) -> str:
        return self._url

    def clone(self) -> RedisBroker:
        return RedisBroker(
            self._raw_url,
            prefix=self._prefix,
            maxlen=self._maxlen,
            topic_maxlen=self._topic_maxlen,
            publish_timeout=self._publish_timeout,
            max_connections=self._max_connections,
        )

    # Keys ---------------------------------------------------------------------------------

    def stream_key(self, topic: str) -> str:
        """The key of a topic's stream."""
        return f"{self._prefix}:{{{topic}}}:stream"

    def retry_key(self, sub: Subscription) -> str:
        """The key of a group's retry stream."""
        return f"{self._prefix}:{{{sub.topic}}}:retry:{sub.group}"

    def due_key(self, sub: Subscription) -> str:
        """The key of a group's sorted set of scheduled retries."""
        return f"{self._prefix}:{{{sub.topic}}}:due:{sub.group}"

    def delayed_key(self, topic: str) -> str:
        """The key of a topic's sorted set of delayed events."""
        return f"{self._prefix}:{{{topic}}}:delayed"

    def dlq_key(self, sub: Subscription) -> str:
        """The key of a group's dead-letter stream."""
        return f"{self._prefix}:{{{sub.topic}}}:dlq:{sub.group}"

    def metrics_key(self, sub: Subscription) -> str:
        """The key of a group's metrics hash."""
        return f"{self._prefix}:{{{sub.topic}}}:metrics:{sub.group}"

    def _origin_key(self, sub: Subscription, origin: str) -> str:
        return self.retry_key(sub) if origin == _RETRY else self.stream_key(sub.topic)

    # Connection ---------------------------------------------------------------------------

    async def connect(self) -> None:
        if self._client is not None:
            return
        options: dict[str, Any] = {}
        if not self._raw_url.startswith("unix:"):
            options["socket_keepalive"] = True  # TCP only: unix sockets take no such option
        client = aioredis.Redis.from_url(
            self._raw_url,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=5.0,
            health_check_interval=30,
            decode_responses=False,
            max_connections=self._max_connections,
            **options,
        )
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in (
                "RETRY",
                "DEAD_LETTER",
                "FETCH_RETRIES",
                "RECLAIM",
                "EXTEND",
                "RECOVER",
                "REPLACE_VALUE",
                "APPEND_MANY",
                "APPEND_IF_EXISTS",
                "REPLAY",
                "DELAY",
                "REMOVE_CONSUMER",
                "PRUNE_CONSUMERS",
                "PURGE_BACKLOG",
            )
        }
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        readers, self._readers = [*self._readers.values(), *self._spares], {}
        self._spares = []
        if client is not None:
            with anyio.CancelScope(shield=True):
                for conn in readers:
                    await client.connection_pool.release(conn)
                await client.aclose()

    @property
    def client(self) -> aioredis.Redis:
        """The redis-py client (connected brokers only)."""
        if self._client is None:
            raise RuntimeError("the broker is not connected; call connect() first")
        return self._client

    def _maxlen_of(self, topic: str) -> int:
        return self._topic_maxlen.get(topic, self._maxlen)

    # Publishing ---------------------------------------------------------------------------

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
            await self._direct(_xadd_args(key, maxlen, data), timeout=_SOCKET_TIMEOUT)

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
            await self._scripts["DELAY"](keys=[self.delayed_key(topic)], args=[delay_ms, member])

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
            if len(appends) == 1 and len(appends[0][2]) > 1:
                # One call: no pipeline, whose script check would cost a round trip more.
                key, maxlen, chunk = appends[0]
                await append_many(keys=[key], args=[maxlen, *chunk])
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for key, maxlen, chunk in appends:
                    if len(chunk) == 1:
                        pipe.execute_command(*_xadd_args(key, maxlen, chunk[0]))
                    else:
                        await append_many(keys=[key], args=[maxlen, *chunk], client=pipe)
                await pipe.execute()

        await self._with_publish_deadline(attempt)

    async def publish_if_exists(self, topic: str, data: bytes) -> bool:
        appended = False
        append_if_exists = self._scripts["APPEND_IF_EXISTS"]
        key, maxlen = self.stream_key(topic), self._maxlen_of(topic)

        async def attempt() -> None:
            nonlocal appended
            appended = bool(await append_if_exists(keys=[key], args=[maxlen, data]))

        await self._with_publish_deadline(attempt)
        return appended

    # Consuming ----------------------------------------------------------------------------

    async def subscribe(self, sub: Subscription) -> None:
        start = "$" if sub.start == "latest" else "0"
        for key, first in ((self.stream_key(sub.topic), start), (self.retry_key(sub), "0")):
            try:
                await self.client.xgroup_create(key, sub.group, id=first, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def remove_consumer(self, sub: Subscription, consumer: str) -> bool:
        removed = await self._scripts["REMOVE_CONSUMER"](
            keys=[self.stream_key(sub.topic), self.retry_key(sub)], args=[sub.group, consumer]
        )
        return bool(removed)

    async def prune_consumers(
        self,
        sub: Subscription,
        min_idle: float,
        *,
        alive: Callable[[str], Awaitable[bool]] | None = None,
    ) -> list[str]:
        found = await self._scripts["PRUNE_CONSUMERS"](
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, max(0, int(min_idle * 1000)), "0" if alive is None else "1"],
        )
        names = sorted(_decode(name) for name in found)
        if alive is None:
            return names
        # Listed only: each is removed on its own, with its pending check, unless it lives.
        return [n for n in names if not await alive(n) and await self.remove_consumer(sub, n)]

    async def fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        deadline = anyio.current_time() + timeout
        owner = (sub, consumer)
        self._interrupted.discard(owner)
        try:
            while True:
                # One pass blocks until the deadline or the next known retry falls due.
                deliveries = await self._fetch(
                    sub, consumer, count, deadline - anyio.current_time()
                )
                if deliveries or anyio.current_time() >= deadline:
                    return deliveries
                if owner in self._interrupted:  # `interrupt`: return now, with nothing
                    self._interrupted.discard(owner)
                    return deliveries
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            await self._regroup(sub)
            return []

    async def _regroup(self, sub: Subscription) -> None:
        """Recreate a group a command found missing, and say so once.

        The stream or group is gone: the topic was deleted, or the bus lost its data (restarted
        without persistence, failed over to an empty replica). Any command of a consumer may be
        the first to notice (a reclaim, a lease renewal, a settle, a fetch); each recreates the
        group instead of failing forever.
        """
        await self.subscribe(sub)
        _log.error(
            "the agent's consumer group was missing on the bus and was created again: the bus "
            "lost its data (restarted without persistence, or failed over to an empty replica) "
            "or the topic was deleted; events it held are gone",
            topic=sub.topic,
            agent=sub.group,
        )

    async def _fetch(
        self, sub: Subscription, consumer: str, count: int, timeout: float
    ) -> list[Delivery]:
        deliveries: list[Delivery] = []
        block_ms = min(_MAX_BLOCK_MS, max(0, int(timeout * 1000)))
        now = anyio.current_time()
        checked_at, next_due = self._retry_state.get(sub, (-math.inf, math.inf))
        # The due-retry set is looked at every few ms while busy, and whenever a retry known
        # to this worker falls due; other workers' retries are seen within one fetch timeout.
        if now - checked_at >= _RETRY_CHECK_INTERVAL or next_due <= now:
            entries, wait_ms = await self._scripts["FETCH_RETRIES"](
                keys=[
                    self.due_key(sub),
                    self.retry_key(sub),
                    self.delayed_key(sub.topic),
                    self.stream_key(sub.topic),
                ],
                args=[sub.group, consumer, count, self._maxlen_of(sub.topic)],
            )
            deliveries = [self._retry_delivery(entry, consumer) for entry in entries]
            next_due = now + int(wait_ms) / 1000 if int(wait_ms) >= 0 else math.inf
            self._retry_state[sub] = (-math.inf if deliveries else now, next_due)
        if not deliveries and next_due < math.inf:
            block_ms = min(block_ms, max(0, math.ceil((next_due - now) * 1000)))
        if len(deliveries) >= count:
            return deliveries
        args: list[Any] = ["XREADGROUP", "GROUP", sub.group, consumer, "COUNT"]
        args.append(count - len(deliveries))
        if not deliveries and block_ms > 0:
            args += ("BLOCK", block_ms)
        args += ("STREAMS", self.stream_key(sub.topic), ">")
        # [[stream, [[id, [field, value, ...]], ...]]] with RESP2, {stream: [...]} with RESP3.
        response = await self._direct(
            args, owner=(sub, consumer), timeout=block_ms / 1000 + _SOCKET_TIMEOUT
        )
        if not response:
            return deliveries
        for entries in response.values() if isinstance(response, dict) else (response[0][1],):
            for entry_id, flat in entries:
                data = flat[1] if flat and flat[0] == b"e" else _field(flat, b"e")
                deliveries.append(Delivery(entry_id.decode(), data, 1, _STREAM, consumer))
        return deliveries

    async def _direct(
        self, args: Sequence[Any], *, owner: Hashable | None = None, timeout: float
    ) -> Any:
        """Send one command on a connection of the broker's own; return the unparsed reply.

        The hot commands (a consumer's XREADGROUP, a publish's XADD) skip the client's
        command machinery (pool checkout, retry wrapper, per-command bookkeeping, reply
        callbacks): between two network round trips it costs about as much as the rest of
        the work. With an `owner` (a consumer of a subscription) the same connection serves
        all its commands; without, any idle one of the broker's does, and concurrent callers
        each get their own. A connection whose command failed or was cancelled midway may
        still have a reply on its way, so it is closed and replaced; an error reply
        (NOGROUP, a full disk) leaves it usable. Errors are redis-py's, as from the client.
        """
        conn = self._readers.pop(owner, None) if owner is not None else None
        if conn is None and owner is None and self._spares:
            conn = self._spares.pop()
        try:
            if conn is None:
                conn = await self.client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
                if owner is not None:
                    # A consumer's reads block; `interrupt` ends a block by this connection's id.
                    await conn.send_command("CLIENT", "ID")
                    self._reader_ids[owner] = int(await conn.read_response(timeout=timeout))
            await conn.send_packed_command(conn.pack_command(*args))
            reply = await conn.read_response(timeout=timeout)
        except ResponseError:
            if conn is not None:
                await self._keep(conn, owner)
            raise
        except BaseException:
            if owner is not None:
                self._reader_ids.pop(owner, None)
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.disconnect(nowait=True)
                    if self._client is not None:
                        await self._client.connection_pool.release(conn)
            raise
        await self._keep(conn, owner)
        return reply

    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        # CLIENT UNBLOCK ends the consumer's blocking XREADGROUP as if it had timed out: what the
        # server already delivered still reaches the reader, unlike a cancelled read (whose
        # entries would stay pending and be charged an attempt when taken over).
        self._interrupted.add((sub, consumer))
        client_id = self._reader_ids.get((sub, consumer))
        if client_id is None:
            return
        try:
            await self.client.execute_command("CLIENT", "UNBLOCK", client_id)  # type: ignore[no-untyped-call]
        except ResponseError as exc:  # not allowed by the server's ACL: the fetch times out
            _log.debug("cannot interrupt a blocking read", error=str(exc))

    async def _keep(self, conn: AbstractConnection, owner: Hashable | None) -> None:
        if self._client is None:  # the broker closed while the command ran
            await conn.disconnect(nowait=True)
        elif owner is not None:
            self._readers[owner] = conn
        elif len(self._spares) < _MAX_SPARES:
            self._spares.append(conn)
        else:
            await self._client.connection_pool.release(conn)

    @staticmethod
    def _retry_delivery(entry: Any, consumer: str) -> Delivery:
        entry_id, flat = entry[0], entry[1]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        attempt = int(fields.get(b"a", b"2"))
        return Delivery(_decode(entry_id), fields.get(b"e", b""), attempt, _RETRY, consumer)

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
    ) -> None:
        if not deliveries and not stats:
            return
        from_stream = [d.id for d in deliveries if d.origin != _RETRY]
        from_retry = [d.id for d in deliveries if d.origin == _RETRY]
        async with self.client.pipeline(transaction=False) as pipe:
            if from_stream:
                pipe.xack(self.stream_key(sub.topic), sub.group, *from_stream)
            if from_retry:
                # Retry entries are read by this group alone: once settled they can go.
                pipe.xack(self.retry_key(sub), sub.group, *from_retry)
                pipe.xdel(self.retry_key(sub), *from_retry)
            if stats:
                key = self.metrics_key(sub)
                extremes: list[str | int] = []
                for name, value in stats.items():
                    if is_extreme(name):
                        extremes += (name, value)
                    else:
                        pipe.hincrby(key, name, value)
                if extremes:
                    pipe.eval(scripts.KEEP_EXTREMES, 1, key, *extremes)
            replies = await pipe.execute(raise_on_error=False)
        errors = [reply for reply in replies if isinstance(reply, Exception)]
        if any(isinstance(e, ResponseError) and _is_nogroup(e) for e in errors):
            # Nothing is pending in a group that is gone: these acks have nothing to settle.
            await self._regroup(sub)
        elif errors:
            raise errors[0]

    async def retry(
        self,
        sub: Subscription,
        delivery: Delivery,
        delay: float,
        *,
        attempt: int | None = None,
        trimmed: bool = False,
    ) -> bool:
        unique = f"{self._unique_prefix}-{next(self._unique)}"
        next_attempt = delivery.attempt + 1 if attempt is None else attempt
        member = f"{next_attempt}\n{unique}\n".encode() + delivery.data
        settled = await self._group_script(
            sub,
            "RETRY",
            keys=[self._origin_key(sub, delivery.origin), self.due_key(sub)],
            args=[
                sub.group,
                delivery.id,
                max(0, int(delay * 1000)),
                member,
                "1" if delivery.origin == _RETRY else "0",
                "1" if trimmed else "0",
                delivery.consumer,
            ],
        )
        self._retry_state.pop(sub, None)
        return bool(settled)

    async def dead_letter(
        self, sub: Subscription, delivery: Delivery, record: bytes, *, trimmed: bool = False
    ) -> bool:
        settled = await self._group_script(
            sub,
            "DEAD_LETTER",
            keys=[self._origin_key(sub, delivery.origin), self.dlq_key(sub)],
            args=[
                sub.group,
                delivery.id,
                record,
                "1" if delivery.origin == _RETRY else "0",
                "1" if trimmed else "0",
                delivery.consumer,
            ],
        )
        # A group that is gone (None) took everything it held with it: nothing was settled.
        return bool(settled)

    async def _group_script(
        self, sub: Subscription, script: str, *, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        """Run a script on `sub`'s group; `None` when the group was missing (it is recreated:
        see `_regroup`). Our scripts never return nil themselves."""
        try:
            return await self._scripts[script](keys=keys, args=args)
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            await self._regroup(sub)
            return None

    async def extend(
        self, sub: Subscription, consumer: str, deliveries: Sequence[Delivery]
    ) -> Renewal:
        lost: list[Delivery] = []
        trimmed: list[Delivery] = []
        for origin in (_STREAM, _RETRY):
            mine = {d.id: d for d in deliveries if (d.origin == _RETRY) == (origin == _RETRY)}
            if not mine:
                continue
            found = await self._group_script(
                sub,
                "EXTEND",
                keys=[self._origin_key(sub, origin)],
                args=[sub.group, consumer, *mine],
            )
            if found is None:
                # The bus lost its data: nobody else holds these deliveries, and the bus has
                # nothing to deliver again, so the worker's copies are all there is.
                return Renewal(trimmed=tuple(deliveries))
            lost_ids, trimmed_ids = found
            lost += (mine[_decode(i)] for i in lost_ids)
            trimmed += (mine[_decode(i)] for i in trimmed_ids)
        if trimmed:
            _log.error(
                "entries were trimmed from the stream while their handlers ran; their outcome "
                "is settled from the worker's copy, but raise maxlen above the backlog",
                topic=sub.topic,
                agent=sub.group,
                count=len(trimmed),
            )
        return Renewal(tuple(lost), tuple(trimmed))

    async def reclaim(
        self,
        sub: Subscription,
        consumer: str,
        min_idle: float,
        count: int,
        *,
        hold_back: int | None = None,
    ) -> Reclaimed:
        found = await self._group_script(
            sub,
            "RECLAIM",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, consumer, max(0, int(min_idle * 1000)), count, hold_back or 0],
        )
        if found is None:
            return Reclaimed()
        claimed, lost, held = found
        if lost:
            _log.error(
                "pending entries were trimmed from the stream before they were handled; "
                "raise maxlen above the backlog",
                topic=sub.topic,
                agent=sub.group,
                count=int(lost),
            )
        found = Reclaimed(self._pending_delivery(entry, consumer) for entry in claimed)
        found.held_back = int(held)
        return found

    async def recover(self, sub: Subscription, consumer: str, count: int) -> list[Delivery]:
        held = await self._group_script(
            sub,
            "RECOVER",
            keys=[self.stream_key(sub.topic), self.retry_key(sub)],
            args=[sub.group, consumer, count],
        )
        return [self._pending_delivery(entry, consumer) for entry in held or ()]

    @staticmethod
    def _pending_delivery(entry: Any, consumer: str) -> Delivery:
        which, entry_id, flat, attempt = entry
        data = _field(flat, b"e")
        origin = _STREAM if int(which) == 1 else _RETRY
        return Delivery(_decode(entry_id), data, int(attempt), origin, consumer)

    async def _topic_keys(self, topic: str) -> list[str]:
        """The names of every key `topic` may hold (existing or not): its stream and delayed
        set, and per group its retry stream, due set, dead letters and metrics.

        The groups are those the stream lists, plus those this broker reads (in case the
        stream is already gone). Named, not searched for: a SCAN would walk the whole keyspace,
        and App.request deletes a topic per request.
        """
        stream = self.stream_key(topic)
        try:
            groups: Any = await self.client.xinfo_groups(stream)
        except ResponseError:  # no stream (never made, deleted or expired): no groups on it
            groups = []
        names = {_decode(group["name"]) for group in groups}
        names.update(sub.group for sub in self._retry_state if sub.topic == topic)
        keys = [stream, self.delayed_key(topic)]
        for name in sorted(names):
            sub = Subscription(topic, name)
            keys += [self.retry_key(sub), self.due_key(sub), self.dlq_key(sub)]
            keys.append(self.metrics_key(sub))
        return keys

    async def purge_backlog(self, topic: str) -> int:
        stream = self.stream_key(topic)
        try:
            groups: Any = await self.client.xinfo_groups(stream)
        except ResponseError:  # no stream: nothing but delayed events, if anything
            groups = []
        names = sorted(_decode(group["name"]) for group in groups)
        keys = [stream, self.delayed_key(topic)]
        for name in names:
            sub = Subscription(topic, name)
            keys += [self.retry_key(sub), self.due_key(sub)]
            # What this broker remembers of the group's next due retry is void now.
            self._retry_state.pop(sub, None)
        removed = await self._scripts["PURGE_BACKLOG"](keys=keys, args=names)
        return int(removed)

    async def expire_topic(self, topic: str, ttl: float) -> None:
        ttl_ms = max(1, math.ceil(ttl * 1000))
        keys = await self._topic_keys(topic)
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.pexpire(key, ttl_ms)  # a key that does not exist is left alone
            await pipe.execute()

    async def delete_topic(self, topic: str) -> None:
        # What this broker kept for the topic's consumers goes first, and whatever the DELETE
        # does: a process that makes a topic per request (request-reply) would otherwise keep
        # a connection per request, and with the pool exhausted the DELETE itself fails.
        for sub in [sub for sub in self._retry_state if sub.topic == topic]:
            del self._retry_state[sub]
        owners = [
            owner
            for owner in self._readers
            if isinstance(owner, tuple)
            and isinstance(owner[0], Subscription)
            and owner[0].topic == topic
        ]
        for owner in owners:
            self._reader_ids.pop(owner, None)
            self._interrupted.discard(owner)
            await self.client.connection_pool.release(self._readers.pop(owner))
        await self.client.delete(*await self._topic_keys(topic))

    # Results ------------------------------------------------------------------------------

    def result_key(self, event_id: str) -> str:
        """The key of an event's stored results (a hash: agent -> record)."""
        return f"{self._prefix}:result:{event_id}"

    async def put_result(self, event_id: str, agent: str, record: bytes, ttl: float) -> None:
        key = self.result_key(event_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(key, agent, record)
            pipe.pexpire(key, max(1, int(ttl * 1000)))
            await pipe.execute()

    async def get_results(self, event_id: str) -> dict[str, bytes]:
        records: Any = await self.client.hgetall(self.result_key(event_id))
        return {_decode(agent): record for agent, record in records.items()}

    # Keys and values ----------------------------------------------------------------------

    def value_key(self, key: str) -> str:
        """The Redis key of a stored value."""
        return f"{self._prefix}:value:{key}"

    async def set_value(
        self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False
    ) -> bool:
        stored = await self.client.set(
            self.value_key(key), value, px=max(1, int(ttl * 1000)), nx=only_if_absent
        )
        return bool(stored)

    async def get_value(self, key: str) -> bytes | None:
        value: Any = await self.client.get(self.value_key(key))
        return bytes(value) if value is not None else None

    async def delete_value(self, key: str) -> None:
        await self.client.delete(self.value_key(key))

    async def replace_value(
        self, key: str, expected: bytes, value: bytes | None, ttl: float
    ) -> bool:
        done = await self._scripts["REPLACE_VALUE"](
            keys=[self.value_key(key)],
            args=[expected, value if value is not None else b"", max(1, int(ttl * 1000))],
        )
        return bool(done)

    # Inspection ---------------------------------------------------------------------------

    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        moved = 0
        cursor = "-"
        while True:
            page: Any = await self.client.xrange(self.dlq_key(sub), min=cursor, count=100)
            for entry_id, fields in page:
                entry = select(_decode(entry_id), fields.get(b"r", b""))
                if entry is None:
                    continue
                # Out of the dead-letter stream and into the group's retry stream (read by this
                # group alone) as attempt 1, in one script that moves the record only if it is
                # still there: replays running at once all see it, exactly one moves it.
                if await self._scripts["REPLAY"](
                    keys=[self.dlq_key(sub), self.retry_key(sub)], args=[entry_id, entry]
                ):
                    moved += 1
            if len(page) < 100:
                return moved
            cursor = "(" + _decode(page[-1][0])

    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        entries: Any = await self.client.xrevrange(self.dlq_key(sub), count=limit)
        return [(_decode(i), fields.get(b"r", b"")) for i, fields in reversed(entries)]

    async def ping(self) -> None:
        await self.client.ping()

    async def server_info(self) -> dict[str, str]:
        info: Any = await self.client.info()
        kind = "valkey" if "valkey_version" in info else "redis"
        return {
            "server": f"{kind} {info.get(f'{kind}_version', '?')}",
            "used_memory": str(info.get("used_memory_human", "?")),
            "uptime_seconds": str(info.get("uptime_in_seconds", "?")),
            "connected_clients": str(info.get("connected_clients", "?")),
        }

    async def topics(self) -> list[str]:
        head = f"{self._prefix}:{{"
        names = set()
        # A topic's stream, or its delayed set alone (delayed events published before any
        # agent subscribed: no stream exists yet).
        for tail in ("}:stream", "}:delayed"):
            async for key in self.client.scan_iter(match=f"{head}*{tail}", count=1000):
                name = _decode(key)
                if name.startswith(head) and name.endswith(tail):
                    names.add(name[len(head) : -len(tail)])
        return sorted(names)

    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        client = self.client
        stream = self.stream_key(topic)
        async with client.pipeline(transaction=False) as pipe:
            pipe.exists(stream)
            pipe.xlen(stream)
            pipe.zcard(self.delayed_key(topic))
            pipe.xinfo_groups(stream)
            pipe.time()
            # Sampled (the server's default), so it costs the same for any number of entries.
            pipe.memory_usage(self.delayed_key(topic))
            replies = await pipe.execute(raise_on_error=False)
        exists, length, delayed, groups, now, used = replies
        # None: no delayed set; an error: MEMORY disabled (some hosted servers), so unknown.
        delayed_bytes = None if isinstance(used, Exception) else int(used or 0)
        if not exists:
            # Only delayed events (no stream yet), or no such topic at all.
            return TopicInfo(topic, 0, int(delayed), (), delayed_bytes) if int(delayed) else None
        if isinstance(groups, Exception):
            return None
        now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
        infos = []
        for group in groups:
            name = _decode(group["name"])
            sub = Subscription(topic, name)
            retry = self.retry_key(sub)
            async with client.pipeline(transaction=False) as pipe:
                pipe.xinfo_groups(retry)
                pipe.zcard(self.due_key(sub))
                pipe.xlen(self.dlq_key(sub))
                pipe.xpending(stream, name)
                pipe.xpending(retry, name)
                if consumers:
                    pipe.xinfo_consumers(stream, name)
                    pipe.xinfo_consumers(retry, name)
                replies = await pipe.execute(raise_on_error=False)
            retry_groups, due, dead, pending, retry_pending = replies[:5]
            retry_group = next(
                (
                    g
                    for g in ([] if isinstance(retry_groups, Exception) else retry_groups)
                    if _decode(g["name"]) == name
                ),
                None,
            )
            pending_count = int(group["pending"])
            waiting_retries = 0 if isinstance(due, Exception) else int(due)
            if retry_group is not None:
                pending_count += int(retry_group["pending"])
                waiting_retries += int(retry_group.get("lag") or 0)
            oldest = None
            for summary in (pending, retry_pending):
                if not isinstance(summary, Exception) and summary["pending"]:
                    first_ms = int(_decode(summary["min"]).split("-")[0])
                    age = max(0.0, (now_ms - first_ms) / 1000)
                    oldest = age if oldest is None else max(oldest, age)
            details: tuple[ConsumerInfo, ...] = ()
            if consumers:
                merged: dict[str, tuple[int, float]] = {}
                for listing in replies[5:7]:
                    for c in [] if isinstance(listing, Exception) else listing:
                        cname, held = _decode(c["name"]), int(c["pending"])
                        idle = int(c["idle"]) / 1000
                        before = merged.get(cname)
                        merged[cname] = (
                            (held, idle)
                            if before is None
                            else (before[0] + held, min(idle, before[1]))
                        )
                details = tuple(
                    ConsumerInfo(cname, held, idle)
                    for cname, (held, idle) in sorted(merged.items())
                )
            lag = group.get("lag")
            infos.append(
                GroupInfo(
                    topic=topic,
                    group=name,
                    consumers=int(group["consumers"]),
                    pending=pending_count,
                    lag=None if lag is None else int(lag),
                    retries=waiting_retries,
                    dead_letters=0 if isinstance(dead, Exception) else int(dead),
                    oldest_pending_age=oldest,
                    consumer_details=details,
                )
            )
        infos.sort(key=lambda g: g.group)
        return TopicInfo(topic, int(length), int(delayed), tuple(infos), delayed_bytes)

    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        if limit <= 0:
            return []
        found: Any = await self.client.xrevrange(self.stream_key(topic), count=limit)
        return [(_decode(i), fields.get(b"e", b"")) for i, fields in reversed(found)]

    async def purge_dead_letters(self, sub: Subscription) -> int:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.dlq_key(sub))
            pipe.delete(self.dlq_key(sub))
            count, _ = await pipe.execute()
        return int(count)

    async def stats(self) -> dict[tuple[str, str], dict[str, int]]:
        head, middle = f"{self._prefix}:{{", "}:metrics:"
        keys = [
            _decode(key)
            async for key in self.client.scan_iter(match=f"{head}*{middle}*", count=1000)
        ]
        found: dict[tuple[str, str], dict[str, int]] = {}
        if not keys:
            return found
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            hashes = await pipe.execute()
        for key, fields in zip(keys, hashes, strict=True):
            topic, sep, group = key[len(head) :].partition(middle)
            if sep and fields:
                found[(topic, group)] = {_decode(k): int(v) for k, v in fields.items()}
        return found

    async def scan_values(self, prefix: str) -> dict[str, bytes]:
        head = f"{self._prefix}:value:"
        keys = [
            key
            async for key in self.client.scan_iter(
                match=f"{head}{_escape_glob(prefix)}*", count=1000
            )
        ]
        if not keys:
            return {}
        values: Any = await self.client.mget(keys)
        return {
            _decode(key)[len(head) :]: bytes(value)
            for key, value in zip(keys, values, strict=True)
            if value is not None
        }


def _is_nogroup(exc: ResponseError) -> bool:
    return "NOGROUP" in str(exc)


def _escape_glob(text: str) -> str:
    return "".join(f"\\{c}" if c in "*?[]\\" else c for c in text)


def _field(flat: Sequence[bytes] | None, name: bytes) -> bytes:
    """The value of field `name` in a flat `[field, value, ...]` list; `b""` if absent."""
    if flat:
        for i in range(0, len(flat) - 1, 2):
            if flat[i] == name:
                return flat[i + 1]
    return b""


def _xadd_args(key: str, maxlen: int, data: bytes) -> tuple[Any, ...]:
    # What `client.xadd(key, {"e": data}, maxlen=maxlen, approximate=True)` sends, built
    # directly: its argument handling costs more per event than packing the command.
    return ("XADD", key, "MAXLEN", "~", maxlen, "*", "e", data)


def _decode(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
