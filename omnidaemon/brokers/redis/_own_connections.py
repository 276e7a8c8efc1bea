"""The Redis broker's own connections (its fast path, beside redis-py's clients): which node
of a cluster holds a key, and taking, opening, keeping and discarding a connection to it. A
consumer's blocking reads each keep a connection, which `interrupt` can unblock."""

from __future__ import annotations

from collections.abc import Hashable

import anyio
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, SlotNotCoveredError

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.redis._connection import (
    _MAX_SPARES,
    _UNAVAILABLE,
    RedisConnection,
    _log,
    release_connection,
)

__all__ = ["RedisOwnConnections"]


class RedisOwnConnections(RedisConnection):
    """The broker's own connections, by node (`None`: the one server) and owner (a
    consumer's reads keep theirs; other commands share spares)."""

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
