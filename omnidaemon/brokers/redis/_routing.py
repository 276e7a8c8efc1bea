"""Where the Redis broker's commands go: the fast path on connections of the broker's own
(`_direct`, `_exchange`), routed to the master of a key's slot on a cluster (following `MOVED`
and `ASK`), replica confirmation (`min_replicas`), scripts, and recreating missing groups.

Every command the broker sends goes through `client` (redis-py routes those itself) or
`_exchange`, and a command that finds its consumer group gone goes through `_regroup`: this is
the one place that knows which server a key lives on.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import anyio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.redis._connection import (
    _MAX_SPARES,
    _SOCKET_TIMEOUT,
    _UNAVAILABLE,
    RedisConnection,
    _log,
    release_connection,
)
from omnidaemon.brokers.redis._keys import _is_nogroup
from omnidaemon.errors import NotReplicated

__all__ = ["RedisRouting"]

_MAX_REDIRECTS = 5  # MOVED/ASK replies followed for one command before giving up
# Replies are read under one deadline for the whole exchange (`anyio.fail_after`), not one per
# reply: redis-py's per-read timeout returns `None` when it expires (leaving the late reply to
# be read as the next command's) and costs a timer per reply.
_NO_TIMEOUT = math.inf

try:  # redis-py's hiredis parser, read directly by `_read_replies` (else through redis-py)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # pragma: no cover - a redis-py without them
    _NOT_ENOUGH_DATA = None
    _AsyncHiredisParser = type(None)  # type: ignore[assignment,misc]


class RedisRouting(RedisConnection):
    """The broker's own connections and command routing; the commands build on it."""

    # The broker's own connections -------------------------------------------------------

    async def _direct(
        self, args: Sequence[Any], *, key: str, owner: Hashable | None = None, timeout: float
    ) -> Any:
        """Send one command to the server that holds `key`; return its unparsed reply (see
        `_exchange`)."""
        if self._cluster is not None or not self._mode_known:
            return (await self._exchange((args,), key=key, owner=owner, timeout=timeout))[0]
        # One server, one command: the shortest way (a consumer's read, a publish), without
        # the routing and pipelining machinery; the same connection handling as `_send`.
        conn = self._take(owner, None)
        try:
            if conn is None:
                conn = await self._open(owner, None, timeout)
            with anyio.fail_after(timeout):
                await conn.send_packed_command(conn.pack_command(*args))
                reply = await conn.read_response(timeout=_NO_TIMEOUT)
        except ResponseError:
            if conn is not None:  # an error reply (NOGROUP...) leaves the connection usable
                await self._keep(conn, None, owner)
            raise
        except BaseException as exc:
            await self._discard(conn, None, owner, exc)
            raise
        await self._keep(conn, None, owner)
        return reply

    async def _exchange(
        self,
        commands: Sequence[Sequence[Any]],
        *,
        key: str,
        owner: Hashable | None = None,
        timeout: float,
        replicate: str | None = None,
        packed: tuple[Sequence[bytes], int] | None = None,
        packed_errors: list[Any] | None = None,
        raise_errors: bool = True,
    ) -> list[Any]:
        """Send commands, pipelined on one connection of the broker's own, to the server that
        holds `key` (every command's keys are in `key`'s slot); return their unparsed replies.

        `packed` is more commands already in the protocol (in pieces), with how many replies
        they get, sent after the others: for one server only, where nothing is redirected. Their
        replies are not returned: only their error replies, appended to `packed_errors`
        (never raised), so that a write of many small commands costs one check a reply.
        With `raise_errors` off, error replies are returned as values, not raised.

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
            if packed is not None:
                raise ValueError("packed commands go to one server, not a cluster")
            await self._load_slots()
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
                packed=packed,
                packed_errors=packed_errors,
            )
            packed = None
            moved: AskError | TryAgainError | None = None
            redirected = []
            for index, reply in zip(todo, got, strict=True):
                # MovedError is an AskError; only a cluster redirects (elsewhere: an error).
                if self._cluster is not None and isinstance(reply, _REDIRECTS):
                    moved = reply if moved is None or isinstance(reply, MovedError) else moved
                    redirected.append(index)
                else:
                    replies[index] = reply
            if moved is None:
                break
            todo = redirected
            if isinstance(moved, TryAgainError):
                # A multi-key command while its slot is half moved: nothing ran; soon it can.
                await anyio.sleep(0.05)
            elif isinstance(moved, MovedError):
                # The slot has a new owner (resharding done, or a failover): remember it.
                assert self._cluster is not None
                await self._cluster.nodes_manager.move_slot(moved)
                node, asking = self._node_of(key), False
            else:
                node, asking = self._cluster_node(moved.host, moved.port), True
        else:
            if isinstance(moved, TryAgainError):
                # Still half moved: "not now" (an unavailable bus) for the caller to retry.
                raise moved
            raise ClusterError(f"too many MOVED/ASK redirections for key {key!r}")
        error = next((r for r in replies if isinstance(r, ResponseError)), None)
        if isinstance(error, ClusterDownError):
            self._stale_slots = True  # a slot without a master: a failover is under way
        if error is not None and raise_errors:
            raise error
        return replies

    async def _load_slots(self) -> None:
        """Fetch the cluster's slot map if none was yet, or a node failed since (one caller
        fetches it; the others wait for that one)."""
        assert self._cluster is not None
        await self._cluster.initialize()  # a no-op once the client has its map
        if self._stale_slots:
            async with self._slots_lock:
                if self._stale_slots:
                    await self._cluster.refresh_slots()
                    self._stale_slots = False

    def _node_of(self, key: str) -> ClusterNode | None:
        """The master that holds `key`'s slot, by the cached slot map (None: not a cluster)."""
        if self._cluster is None:
            return None
        slot = self._cluster.keyslot(key)
        try:
            return self._cluster.nodes_manager.get_node_from_slot(slot)
        except (KeyError, SlotNotCoveredError):
            # No master serves the slot in the map we have (a failover under way): fetch the
            # map again before the next command, and let the caller retry as for a lost node.
            self._stale_slots = True
            raise RedisConnectionError(f"no master serves slot {slot} of the cluster") from None

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
        packed: tuple[Sequence[bytes], int] | None = None,
        packed_errors: list[Any] | None = None,
    ) -> list[Any]:
        """One round trip on one connection to `node`: every reply to `commands`, error
        replies as values; `packed` (commands already in the protocol, sent after them) has
        only its error replies kept, appended to `packed_errors`."""
        conn = self._take(owner, node)
        try:
            if conn is None:
                conn = await self._open(owner, node, timeout)
            commands_out: list[Sequence[Any]] = []
            for command in commands:
                commands_out += [("ASKING",), command] if asking else [command]
            chunks = conn.pack_commands(commands_out)
            if packed is not None:
                chunks += packed[0]
            if replicate:
                wait = ("WAIT", self._min_replicas, int(self._publish_timeout * 1000))
                chunks += conn.pack_commands([wait])
            with anyio.fail_after(timeout):
                await conn.send_packed_command(chunks)
                raw = await _read_replies(conn, len(commands_out))
                if packed is not None:
                    errors = await _read_replies(conn, packed[1], errors_only=True)
                    if packed_errors is not None:
                        packed_errors += errors
                if replicate:
                    raw += await _read_replies(conn, 1)
        except BaseException as exc:
            await self._discard(conn, node, owner, exc)
            raise
        await self._keep(conn, node, owner)
        acknowledged = raw.pop() if replicate else None
        replies = raw[1::2] if asking else raw
        # Commands all redirected (MOVED, ASK) wrote nothing here: the WAIT after them says
        # nothing (on a master since demoted, it is refused), and the caller follows them.
        if replicate and not all(isinstance(reply, AskError) for reply in replies):
            self._check_replicas(acknowledged, replicate)
        return replies

    async def _open(
        self, owner: Hashable | None, node: ClusterNode | None, timeout: float
    ) -> AbstractConnection:
        """A new connection of the broker's own to `node`; a consumer's learns its client id."""
        conn = await self._acquire(node)
        if owner is not None:
            try:
                # A consumer's reads block; `interrupt` ends a block by this connection's id.
                await conn.send_command("CLIENT", "ID")
                client_id = int(await conn.read_response(timeout=timeout))
            except BaseException as exc:
                await self._discard(conn, node, owner, exc)
                raise
            self._reader_ids[owner] = (client_id, node)
        return conn

    async def _discard(
        self,
        conn: AbstractConnection | None,
        node: ClusterNode | None,
        owner: Hashable | None,
        exc: BaseException,
    ) -> None:
        """After a command failed or was cancelled midway: a reply may still be on its way on
        `conn`, so it is closed and given back, never reused as it is."""
        if owner is not None:
            self._reader_ids.pop(owner, None)
        if isinstance(exc, _UNAVAILABLE) and self._cluster is not None:
            self._stale_slots = True  # the node may be gone: fetch the map again
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
                if self._client is not None:
                    await release_connection(self._client, conn, node)

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
            # The topic's slot moved to another node (only a cluster's connections have one):
            # this one has nothing to read; it goes back to its node's pool.
            self._reader_ids.pop(owner, None)
            if held[1] is not None:
                held[1].release(held[0])  # type: ignore[arg-type]
            return None
        for index in range(len(self._spares) - 1, -1, -1):
            if self._spares[index][1] is node:
                return self._spares.pop(index)[0]
        return None

    async def _acquire(self, node: ClusterNode | None) -> AbstractConnection:
        if node is None:
            return await self.client.connection_pool.get_connection()  # type: ignore[no-any-return]
        return node.acquire_connection()

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
            await release_connection(self._client, conn, node)

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

        On one server without `min_replicas`, through the client (which loads a script the
        server lacks). Otherwise on a connection of the broker's own (see `_exchange`): on a
        cluster, so that `ASK` is followed with `ASKING` on the same connection (redis-py's
        cluster client sends it on another pooled connection, and then loops between the two
        nodes until "TTL exhausted" while a slot is being moved); with `replicate` and
        `min_replicas`, so that the `WAIT` follows the script on its connection.
        """
        durable = replicate is not None and self._min_replicas > 0
        if self._cluster is None and not durable:
            return await self._scripts[name](keys=keys, args=args)
        script = self._scripts[name]
        what = replicate if durable else None
        try:
            command = ("EVALSHA", script.sha, len(keys), *keys, *args)
            return await self._own(command, keys[0], what)
        except NoScriptError:
            # Not cached on this server (a new master after a failover): send its text. It was
            # refused whole, so nothing ran and sending it again cannot repeat a write.
            command = ("EVAL", script.script, len(keys), *keys, *args)
            return await self._own(command, keys[0], what)

    async def _own(self, command: Sequence[Any], key: str, replicate: str | None) -> Any:
        """One command on a connection of the broker's own, to `key`'s server."""
        timeout = _SOCKET_TIMEOUT + self._replica_wait
        return (await self._exchange((command,), key=key, timeout=timeout, replicate=replicate))[0]

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


async def _read_replies(
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
                reply = await conn.read_response(timeout=_NO_TIMEOUT)
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
_REDIRECTS = (AskError, TryAgainError)  # MovedError is an AskError


class _NeverPushed:
    """No reply is one (a hiredis without push notifications)."""
