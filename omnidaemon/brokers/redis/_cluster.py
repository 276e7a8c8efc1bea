"""Redis Cluster: reading seed nodes from a broker URL, telling a cluster from a single server,
and making redis-py's cluster client.

A URL names one node (`redis://h1:7000`: whether it is a cluster is asked of the server) or
several, separated by commas (`redis://h1:7000,h2:7000,h3:7000`: always a cluster; any of the
seeds that answers gives the client the whole slot map, so one node down at start does not
stop a worker). Credentials, TLS (`rediss://`) and query options are written once and apply
to every node.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as _RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from omnidaemon.errors import ConfigurationError

__all__ = ["ClusterClient", "cluster_client", "cluster_enabled", "first_seed_url", "seeds"]

_DEFAULT_PORT = 6379


class ClusterClient(_RedisCluster):
    """redis-py's asyncio cluster client, for which no node answering is a `ConnectionError`.

    redis-py raises `RedisClusterException` ("Redis Cluster cannot be connected"), which is no
    `RedisError`, when it cannot fetch the slot map from any node: a worker waiting for its bus,
    or a publish retrying until `publish_timeout`, must see it as the bus being unreachable.
    """

    async def initialize(self, *args: Any, **kwargs: Any) -> ClusterClient:
        with _unreachable_as_connection_error():
            await super().initialize(*args, **kwargs)
        return self

    async def refresh_slots(self) -> None:
        """Fetch the slot map again (a node failed: its slots may have a new owner)."""
        with _unreachable_as_connection_error():
            await self.nodes_manager.initialize()


@contextlib.contextmanager
def _unreachable_as_connection_error() -> Iterator[None]:
    try:
        yield
    except RedisClusterException as exc:
        if not isinstance(exc.__cause__, RedisConnectionError | RedisTimeoutError | OSError):
            raise  # not a cluster node, slots not covered...: said as redis-py says it
        raise RedisConnectionError(f"no node of the Redis Cluster answered ({exc})") from exc


def seeds(url: str) -> list[tuple[str, int]]:
    """The `(host, port)` of every node a `redis://` or `rediss://` URL names, in order.

    Raises:
        ConfigurationError: a host is empty or a port is not a number from 1 to 65535 (the
            message never echoes the URL, which may hold a password).
    """
    netloc = urlsplit(url).netloc
    hosts = netloc.rpartition("@")[2]
    found = []
    for part in hosts.split(","):
        host, port = _host_port(part.strip())
        found.append((host, port))
    return found


def _host_port(part: str) -> tuple[str, int]:
    if part.startswith("["):  # [::1]:7000
        host, _, rest = part[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = part.partition(":")
    if not host:
        raise ConfigurationError("a host in the broker URL is empty")
    if not port_text:
        return host, _DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigurationError("a port in the broker URL is not a number from 1 to 65535")
    return host, int(port_text)


def names_several_nodes(url: str) -> bool:
    """Whether the URL lists several seed nodes (and so means a cluster)."""
    return "," in urlsplit(url).netloc.rpartition("@")[2]


def first_seed_url(url: str) -> str:
    """`url` with its host list cut to the first seed: what redis-py's URL parser reads."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{hosts.split(',')[0].strip()}"))


async def cluster_enabled(client: Any) -> bool:
    """Whether the server behind a plain client is a node of a Redis Cluster (`INFO cluster`)."""
    info = await client.execute_command("INFO", "cluster")
    return bool(int(info.get("cluster_enabled", 0))) if isinstance(info, dict) else False


def cluster_client(url: str, options: dict[str, Any]) -> ClusterClient:
    """redis-py's asyncio cluster client for a cluster URL (one seed or several).

    Raises:
        ConfigurationError: the URL selects a database other than 0 (a cluster has only one).
    """
    first = first_seed_url(url)
    path = urlsplit(first).path.strip("/")
    if path not in ("", "0"):
        raise ConfigurationError(
            "a Redis Cluster has only database 0; remove the database from the broker URL"
        )
    startup = [ClusterNode(host, port) for host, port in seeds(url)[1:]]
    kwargs = dict(options)
    if startup:
        kwargs["startup_nodes"] = startup
    # from_url makes an instance of the class it is called on (typed as redis-py's).
    return cast(ClusterClient, ClusterClient.from_url(first, **kwargs))
