"""The Redis broker's connections: URL handling, the client and its pool, and the fast path
hot commands take on connections of the broker's own (`_direct`).

Every command the broker sends goes through `client` or `_direct`, and a command that finds its
consumer group gone goes through `_regroup`: this is the one place that knows which server a
key lives on, so routing by key (Redis Cluster) belongs here alone.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    NoScriptError,
    RedisError,
    ResponseError,
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
from omnidaemon.brokers.redis._keys import RedisKeys, _is_nogroup
from omnidaemon.errors import ConfigurationError, NotReplicated
from omnidaemon.observability.logging import get_logger

__all__ = ["MAX_CONNECTIONS", "MIN_REPLICAS_ENV", "RedisConnection", "redact_url"]

_log = get_logger("omnidaemon.broker")

_SOCKET_TIMEOUT = 10.0  # must stay above the longest BLOCK a fetch asks for
MAX_CONNECTIONS = 100  # the default size of a broker's connection pool (redis-py's own)
# Idle connections kept for publishing (see _direct); beyond these, a connection freed after a
# burst of concurrent publishes goes back to the pool, where every other command can use it.
_MAX_SPARES = 16

MIN_REPLICAS_ENV = "OMNIDAEMON_REDIS_MIN_REPLICAS"
_MAX_REDIRECTS = 5  # MOVED/ASK replies followed for one command before giving up

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
    "REPLAY",
    "DELAY",
    "REMOVE_CONSUMER",
    "PRUNE_CONSUMERS",
    "PURGE_BACKLOG",
)

# A connection of the broker's own and the cluster node it is on (None: a single server).
_Held = tuple[AbstractConnection, ClusterNode | None]

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
        if await cluster_enabled(plain):
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
                    await self._release(client, conn, node)
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

    # The broker's own connections -------------------------------------------------------

    async def _direct(
        self, args: Sequence[Any], *, key: str, owner: Hashable | None = None, timeout: float
    ) -> Any:
        """Send one command to the server that holds `key`; return its unparsed reply (see
        `_exchange`)."""
        return (await self._exchange((args,), key=key, owner=owner, timeout=timeout))[0]

    async def _exchange(
        self,
        commands: Sequence[Sequence[Any]],
        *,
        key: str,
        owner: Hashable | None = None,
        timeout: float,
        replicate: str | None = None,
    ) -> list[Any]:
        """Send commands, pipelined on one connection of the broker's own, to the server that
        holds `key` (every command's keys are in `key`'s slot); return their unparsed replies.

        The hot commands (a consumer's XREADGROUP, a publish's XADD) skip the client's
        command machinery (pool checkout, retry wrapper, per-command bookkeeping, reply
        callbacks): between two network round trips it costs about as much as the rest of
        the work. With an `owner` (a consumer of a subscription) the same connection serves
        all its commands; without, any idle one of the broker's does, and concurrent callers
        each get their own. A connection whose command failed or was cancelled midway may
        still have a reply on its way, so it is closed and replaced; an error reply
        (NOGROUP, a full disk) leaves it usable. On a cluster, a `MOVED` reply updates the
        slot map and the commands go to the new owner; an `ASK` reply (a slot being moved)
        sends the commands it names to the importing node, each after `ASKING`.

        With `replicate` (`"publish"` or `"settle"`) and `min_replicas` set, a `WAIT` follows
        the commands on each connection they ran on, so the call returns once that many
        replicas have its writes; too few in `publish_timeout` raise `NotReplicated` for a
        publish, and log a warning for a settle (a settle lost in a failover only means the
        event is delivered again). An error reply raises (the first one, after every reply
        was read); errors are redis-py's, as from the client.
        """
        if not self._mode_known:
            await self._learn_mode()
        if self._cluster is not None:
            # No command went through the client yet: it has no slot map (a no-op after).
            await self._cluster.initialize()
            if self._stale_slots:
                self._stale_slots = False
                await self._cluster.refresh_slots()
        node = self._node_of(key)
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        asking = False
        for _ in range(_MAX_REDIRECTS):
            batch = [commands[i] for i in todo]
            got = await self._send(
                batch,
                node,
                owner=owner if not asking else None,
                timeout=timeout,
                asking=asking,
                replicate=replicate if self._min_replicas > 0 else None,
            )
            moved: AskError | None = None
            redirected = []
            for index, reply in zip(todo, got, strict=True):
                if isinstance(reply, AskError):  # MovedError is an AskError
                    moved = reply if moved is None or isinstance(reply, MovedError) else moved
                    redirected.append(index)
                else:
                    replies[index] = reply
            if moved is None or self._cluster is None:
                break
            todo = redirected
            if isinstance(moved, MovedError):
                # The slot has a new owner (resharding done, or a failover): remember it.
                await self._cluster.nodes_manager.move_slot(moved)
                node, asking = self._node_of(key), False
            else:
                node, asking = self._cluster_node(moved.host, moved.port), True
        else:
            raise ClusterError(f"too many MOVED/ASK redirections for key {key!r}")
        error = next((r for r in replies if isinstance(r, ResponseError)), None)
        if error is not None:
            raise error
        return replies

    def _node_of(self, key: str) -> ClusterNode | None:
        """The master that holds `key`'s slot, by the cached slot map (None: not a cluster)."""
        if self._cluster is None:
            return None
        slot = self._cluster.keyslot(key)
        return self._cluster.nodes_manager.get_node_from_slot(slot)

    def _cluster_node(self, host: str, port: int) -> ClusterNode:
        assert self._cluster is not None
        manager = self._cluster.nodes_manager
        found = manager.get_node(host=host, port=port)
        if found is None:  # a node the map does not know yet
            found = ClusterNode(host, port, **manager.connection_kwargs)
            manager.set_nodes(manager.nodes_cache, {found.name: found})
        return found

    async def _send(
        self,
        commands: Sequence[Sequence[Any]],
        node: ClusterNode | None,
        *,
        owner: Hashable | None,
        timeout: float,
        asking: bool,
        replicate: str | None,
    ) -> list[Any]:
        """One round trip on one connection to `node`: every reply, error replies as values."""
        conn = self._take(owner, node)
        try:
            if conn is None:
                conn = await self._acquire(node)
                if owner is not None:
                    # A consumer's reads block; `interrupt` ends a block by this connection's id.
                    await conn.send_command("CLIENT", "ID")
                    client_id = int(await conn.read_response(timeout=timeout))
                    self._reader_ids[owner] = (client_id, node)
            packed: list[Sequence[Any]] = []
            for command in commands:
                packed += [("ASKING",), command] if asking else [command]
            if replicate:
                packed.append(("WAIT", self._min_replicas, int(self._publish_timeout * 1000)))
            await conn.send_packed_command(conn.pack_commands(packed))
            raw: list[Any] = []
            for _ in packed:
                try:
                    raw.append(await conn.read_response(timeout=timeout))
                except ResponseError as exc:
                    raw.append(exc)
        except BaseException as exc:
            if owner is not None:
                self._reader_ids.pop(owner, None)
            if isinstance(exc, _UNAVAILABLE) and self._cluster is not None:
                self._stale_slots = True  # the node may be gone: fetch the map again
            if conn is not None:
                with anyio.CancelScope(shield=True):
                    await conn.disconnect(nowait=True)
                    if self._client is not None:
                        await self._release(self._client, conn, node)
            raise
        await self._keep(conn, node, owner)
        acknowledged = raw.pop() if replicate else None
        replies = raw[1::2] if asking else raw
        # Commands all redirected (MOVED, ASK) wrote nothing here: the WAIT after them says
        # nothing (on a master since demoted, it is refused), and the caller follows them.
        if replicate and not all(isinstance(reply, AskError) for reply in replies):
            self._check_replicas(acknowledged, replicate)
        return replies

    def _check_replicas(self, acknowledged: Any, what: str) -> None:
        if isinstance(acknowledged, int) and acknowledged >= self._min_replicas:
            return
        if isinstance(acknowledged, ResponseError):
            if "replica" not in str(acknowledged):  # not allowed by the server's ACL...
                raise acknowledged
            # The node ran the writes, then stopped being a master before WAIT answered (a
            # failover): WAIT is refused, or unblocked with an error. They may be lost.
            self._stale_slots = True
            message = (
                f"the bus at {self._url} stored the {what} on a master that became a replica "
                f"before {self._min_replicas} replicas (min_replicas) confirmed it "
                f"({acknowledged}); it may be lost"
            )
        else:
            message = (
                f"the bus at {self._url} stored the {what} but {acknowledged} of the "
                f"{self._min_replicas} replicas required (min_replicas) confirmed it within "
                f"{self._publish_timeout:g} s; it may be lost if its master fails"
            )
        if what == "publish":
            raise NotReplicated(message)
        _log.warning(message)

    def _take(self, owner: Hashable | None, node: ClusterNode | None) -> AbstractConnection | None:
        """A kept connection to `node` for `owner` (or a spare); None if there is none."""
        if owner is not None:
            held = self._readers.pop(owner, None)
            if held is None:
                return None
            if held[1] is node:
                return held[0]
            # The topic's slot moved to another node: this one has nothing to read.
            self._reader_ids.pop(owner, None)
            if self._client is not None:
                self._background_release(held)
            return None
        for index in range(len(self._spares) - 1, -1, -1):
            if self._spares[index][1] is node:
                return self._spares.pop(index)[0]
        return None

    async def _acquire(self, node: ClusterNode | None) -> AbstractConnection:
        if node is None:
            return await self.client.connection_pool.get_connection()  # type: ignore[no-any-return]
        return node.acquire_connection()

    @staticmethod
    async def _release(client: Any, conn: AbstractConnection, node: ClusterNode | None) -> None:
        if node is None:
            await client.connection_pool.release(conn)
        else:
            node.release(conn)  # type: ignore[arg-type]

    def _background_release(self, held: _Held) -> None:
        conn, node = held
        if node is not None:
            node.release(conn)  # type: ignore[arg-type]
        # A connection of the single-server pool is released by `_keep`'s callers only.

    async def interrupt(self, sub: Subscription, consumer: str) -> None:
        # CLIENT UNBLOCK ends the consumer's blocking XREADGROUP as if it had timed out: what the
        # server already delivered still reaches the reader, unlike a cancelled read (whose
        # entries would stay pending and be charged an attempt when taken over).
        self._interrupted.add((sub, consumer))
        reader = self._reader_ids.get((sub, consumer))
        if reader is None:
            return
        client_id, node = reader
        try:
            if node is None:
                await self.client.execute_command("CLIENT", "UNBLOCK", client_id)
            else:  # sent to the node the reader's connection is on
                await node.execute_command("CLIENT", "UNBLOCK", client_id)
        except ResponseError as exc:  # not allowed by the server's ACL: the fetch times out
            _log.debug("cannot interrupt a blocking read", error=str(exc))

    async def _keep(
        self, conn: AbstractConnection, node: ClusterNode | None, owner: Hashable | None
    ) -> None:
        if self._client is None:  # the broker closed while the command ran
            await conn.disconnect(nowait=True)
        elif owner is not None:
            self._readers[owner] = (conn, node)
        elif len(self._spares) < _MAX_SPARES:
            self._spares.append((conn, node))
        else:
            await self._release(self._client, conn, node)

    # Scripts ------------------------------------------------------------------------------

    async def _script(
        self,
        name: str,
        *,
        keys: Sequence[str],
        args: Sequence[Any],
        replicate: str | None = None,
    ) -> Any:
        """Run one of the broker's scripts on the server that holds `keys` (one slot).

        With `replicate` and `min_replicas` set, it returns once that many replicas have the
        script's writes (see `_exchange`): the script goes on a connection of the broker's own,
        followed by `WAIT` on that same connection.
        """
        if replicate is None or self._min_replicas == 0:
            return await self._scripts[name](keys=keys, args=args)
        script = self._scripts[name]
        try:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            return await self._replicated(command, keys[0], replicate)
        except NoScriptError:
            # Not cached on this server (a new master after a failover): send its text. It was
            # refused whole, so nothing ran and sending it again cannot repeat a write.
            command = ("EVAL", script.script, len(keys), *keys, *args)
            return await self._replicated(command, keys[0], replicate)

    async def _replicated(self, command: Sequence[Any], key: str, what: str) -> Any:
        timeout = self._publish_timeout + _SOCKET_TIMEOUT
        return (await self._exchange((command,), key=key, timeout=timeout, replicate=what))[0]

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
        self,
        sub: Subscription,
        script: str,
        *,
        keys: Sequence[str],
        args: Sequence[Any],
        settles: bool = False,
    ) -> Any:
        """Run a script on `sub`'s group; `None` when the group was missing (it is recreated:
        see `_regroup`). Our scripts never return nil themselves. A script that `settles` a
        delivery waits for `min_replicas` replicas (see `_exchange`)."""
        try:
            return await self._script(
                script, keys=keys, args=args, replicate="settle" if settles else None
            )
        except ResponseError as exc:
            if not _is_nogroup(exc):
                raise
            await self._regroup(sub)
            return None
