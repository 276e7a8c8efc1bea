"""The Redis broker's state and client: URL handling, the settings, and the redis-py client
(a `Redis`, or a `RedisCluster` once the bus is known to be a cluster) with its pool.

The broker's own connections, and which server each command goes to, are `_routing`'s job.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Hashable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from omnidaemon._env import env_count
from omnidaemon.brokers import _redis_scripts as scripts
from omnidaemon.brokers.base import Broker, Subscription
from omnidaemon.brokers.redis._cluster import (
    ClusterClient,
    cluster_client,
    cluster_enabled,
    names_several_nodes,
)
from omnidaemon.brokers.redis._keys import RedisKeys
from omnidaemon.errors import ConfigurationError
from omnidaemon.observability.logging import get_logger

__all__ = [
    "MAX_CONNECTIONS",
    "MIN_REPLICAS_ENV",
    "RedisConnection",
    "redact_url",
    "release_connection",
]

_log = get_logger("omnidaemon.broker")

_SOCKET_TIMEOUT = 10.0  # must stay above the longest BLOCK a fetch asks for
MAX_CONNECTIONS = 100  # the default size of a broker's connection pool (redis-py's own)
# Idle connections kept for publishing (see _direct); beyond these, a connection freed after a
# burst of concurrent publishes goes back to the pool, where every other command can use it.
_MAX_SPARES = 16

MIN_REPLICAS_ENV = "OMNIDAEMON_REDIS_MIN_REPLICAS"

_SCRIPTS = (
    "RETRY",
    "DEAD_LETTER",
    "FETCH_RETRIES",
    "RECLAIM",
    "EXTEND",
    "RECOVER",
    "REPLACE_VALUE",
    "APPEND_MANY",
    "APPEND_IF_EXISTS",
    "APPEND_ONCE",
    "REPLAY",
    "DELAY",
    "REMOVE_CONSUMER",
    "PRUNE_CONSUMERS",
    "PURGE_BACKLOG",
)

# A connection of the broker's own and the cluster node it is on (None: a single server).
_Held = tuple[AbstractConnection, ClusterNode | None]

# A bus that does not answer; on a cluster, also none of the seeds answering or no full slot
# map yet (redis-py's RedisClusterException, which is no RedisError).
# ClusterDownError and TryAgainError are error replies (ResponseError) that say "not now":
# a slot without a master during a failover, a slot half moved.
_UNAVAILABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    RedisClusterException,
    ClusterDownError,
    TryAgainError,
)

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
        # Cut at the last "@": the host part may list several cluster nodes, which `hostname`
        # and `port` cannot parse.
        user = parts.username or ""
        hosts = parts.netloc.rpartition("@")[2]
        url = urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))
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
        min_replicas: int | None = None,
    ) -> None:
        if max_connections < 1:
            raise ConfigurationError(f"max_connections must be at least 1, not {max_connections}")
        if min_replicas is None:
            min_replicas = env_count(os.environ, MIN_REPLICAS_ENV, 0, minimum=0)
        if min_replicas < 0:
            raise ConfigurationError(f"min_replicas must be 0 or more, not {min_replicas}")
        self._raw_url = url
        self._max_connections = max_connections
        self._min_replicas = min_replicas
        self._url = redact_url(url)
        self._prefix = prefix
        self._maxlen = maxlen
        self._topic_maxlen = dict(topic_maxlen or {})
        self._publish_timeout = publish_timeout
        self._client: aioredis.Redis | ClusterClient | None = None
        self._cluster: ClusterClient | None = None  # the client, when the bus is a cluster
        self._mode_known = False  # whether we asked the server if it is a cluster
        self._stale_slots = False  # a node failed: fetch the slot map before the next command
        self._slots_lock = anyio.Lock()
        self._scripts: dict[str, Any] = {}
        self._unique = itertools.count()
        self._unique_prefix = f"{os.getpid()}-{os.urandom(4).hex()}"
        # Per subscription: when the due-retry set was last looked at, and its next due time.
        self._retry_state: dict[Subscription, tuple[float, float]] = {}
        # Per consumer of a subscription: the connection its fetches read on (and its cluster
        # node), kept between fetches (see _exchange).
        self._readers: dict[Hashable, _Held] = {}
        # The server's client id of each reader, and its node, for `interrupt`.
        self._reader_ids: dict[Hashable, tuple[int, ClusterNode | None]] = {}
        self._interrupted: set[Hashable] = set()  # consumers whose fetch must return now
        self._spares: list[_Held] = []  # idle connections for publishing

    @property
    def url(self) -> str:
        return self._url

    @property
    def _replica_wait(self) -> float:
        """The longest a write waits for replicas (WAIT's timeout), 0 without `min_replicas`."""
        return self._publish_timeout if self._min_replicas > 0 else 0.0

    @property
    def is_cluster(self) -> bool:
        """Whether the bus is a Redis Cluster (known once connected and the server answered)."""
        return self._cluster is not None

    # The client ---------------------------------------------------------------------------

    def _client_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_connect_timeout": 5.0,
            "health_check_interval": 30,
            "decode_responses": False,
            "max_connections": self._max_connections,
        }
        if not self._raw_url.startswith("unix:"):
            options["socket_keepalive"] = True  # TCP only: unix sockets take no such option
        return options

    async def connect(self) -> None:
        if self._client is not None:
            return
        if names_several_nodes(self._raw_url):
            self._use(cluster_client(self._raw_url, self._client_options()))
            self._mode_known = True
            return
        self._use(aioredis.Redis.from_url(self._raw_url, **self._client_options()))
        # A unix socket is never a cluster node (redis-py's cluster client speaks TCP only).
        self._mode_known = self._raw_url.startswith("unix:")
        with contextlib.suppress(RedisError, OSError):
            # Connecting makes no promise that the bus is up (a worker waits for it with
            # ping), so a bus that does not answer yet is asked again by ping and the fast path.
            await self._learn_mode()

    def _use(self, client: aioredis.Redis | ClusterClient) -> None:
        self._scripts = {name: client.register_script(getattr(scripts, name)) for name in _SCRIPTS}
        self._client = client
        self._cluster = client if isinstance(client, ClusterClient) else None

    async def _learn_mode(self) -> None:
        """Ask a single-seed bus whether it is a cluster; if so, switch to the cluster client."""
        if self._mode_known or self._client is None or self._cluster is not None:
            return
        plain = self._client
        try:
            enabled = await cluster_enabled(plain)
        except ResponseError as exc:
            # INFO refused (an ACL without it): taken for a single server. A cluster whose
            # users may not run INFO is named by two or more seeds, which needs no question.
            _log.warning(
                "cannot ask the bus whether it is a Redis Cluster (INFO refused); taking it "
                "for a single server: for a cluster, list two or more nodes in the URL",
                bus=self._url,
                error=str(exc),
            )
            enabled = False
        if enabled:
            self._use(cluster_client(self._raw_url, self._client_options()))
            await plain.aclose()
            _log.debug("the bus is a Redis Cluster", bus=self._url)
        self._mode_known = True

    async def close(self) -> None:
        client, self._client = self._client, None
        self._cluster = None
        held, self._readers = [*self._readers.values(), *self._spares], {}
        self._spares = []
        if client is not None:
            with anyio.CancelScope(shield=True):
                for conn, node in held:
                    await release_connection(client, conn, node)
                await client.aclose()

    @property
    def client(self) -> Any:
        """The redis-py client (connected brokers only): a `redis.asyncio.Redis`, or a
        `redis.asyncio.cluster.RedisCluster` when the bus is a cluster."""
        if self._client is None:
            raise RuntimeError("the broker is not connected; call connect() first")
        return self._client

    def _maxlen_of(self, topic: str) -> int:
        return self._topic_maxlen.get(topic, self._maxlen)


async def release_connection(
    client: Any, conn: AbstractConnection, node: ClusterNode | None
) -> None:
    """Give a connection of the broker's own back to its pool: the client's, or its node's."""
    if node is None:
        await client.connection_pool.release(conn)
    else:
        node.release(conn)  # type: ignore[arg-type]
