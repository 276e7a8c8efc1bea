"""The Redis broker's connections: URL handling, the client and its pool, and the fast path
hot commands take on connections of the broker's own (`_direct`).

Every command the broker sends goes through `client` or `_direct`, and a command that finds its
consumer group gone goes through `_regroup`: this is the one place that knows which server a
key lives on, so routing by key (Redis Cluster) belongs here alone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from omnidaemon.brokers import _redis_scripts as scripts
from omnidaemon.brokers.base import Broker, Subscription
from omnidaemon.brokers.redis._keys import RedisKeys, _is_nogroup
from omnidaemon.errors import ConfigurationError
from omnidaemon.observability.logging import get_logger

__all__ = ["MAX_CONNECTIONS", "RedisConnection", "redact_url"]

_log = get_logger("omnidaemon.broker")

_SOCKET_TIMEOUT = 10.0  # must stay above the longest BLOCK a fetch asks for
MAX_CONNECTIONS = 100  # the default size of a broker's connection pool (redis-py's own)
# Idle connections kept for publishing (see _direct); beyond these, a connection freed after a
# burst of concurrent publishes goes back to the pool, where every other command can use it.
_MAX_SPARES = 16

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


class RedisConnection(RedisKeys, Broker):
    """A Redis broker's state and connections; `RedisBroker` adds the commands."""

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

    # The client ---------------------------------------------------------------------------

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

    # The broker's own connections -------------------------------------------------------

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

    # Missing groups -----------------------------------------------------------------------

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
