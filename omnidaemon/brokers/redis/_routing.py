"""Where the Redis broker's commands go: the fast path on connections of the broker's own
(`_direct`, `_exchange`; the connections are `_own_connections`'s), routed to the master of
a key's slot on a cluster (following `MOVED` and `ASK`), replica confirmation
(`min_replicas`), scripts, and recreating missing groups.

Every command the broker sends goes through `client` (redis-py routes those itself) or
`_exchange`, and a command that finds its consumer group gone goes through `_regroup`: this is
the one place that knows which server a key lives on.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import anyio
from redis.asyncio.cluster import ClusterNode
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    MovedError,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.redis._connection import (
    _SOCKET_TIMEOUT,
    _log,
)
from omnidaemon.brokers.redis._keys import _is_nogroup
from omnidaemon.brokers.redis._own_connections import RedisOwnConnections
from omnidaemon.brokers.redis._replies import NO_TIMEOUT, read_replies
from omnidaemon.errors import NotReplicated

__all__ = ["RedisRouting"]

_MAX_REDIRECTS = 5  # MOVED/ASK replies followed for one command before giving up
_REDIRECTS = (AskError, TryAgainError)  # MovedError is an AskError


class RedisRouting(RedisOwnConnections):
    """Command routing on the broker's own connections; the commands build on it."""

    # Round trips ----------------------------------------------------------------------------

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
                reply = await conn.read_response(timeout=NO_TIMEOUT)
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
                raw = await read_replies(conn, len(commands_out))
                if packed is not None:
                    errors = await read_replies(conn, packed[1], errors_only=True)
                    if packed_errors is not None:
                        packed_errors += errors
                if replicate:
                    raw += await read_replies(conn, 1)
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
