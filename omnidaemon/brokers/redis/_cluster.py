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
from collections.abc import Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode
from redis.asyncio.cluster import RedisCluster as _RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from omnidaemon.brokers.inspection import NodeInfo
from omnidaemon.errors import ConfigurationError

__all__ = [
    "ClusterClient",
    "cluster_client",
    "cluster_enabled",
    "cluster_server_info",
    "describe_nodes",
    "first_seed_url",
    "seeds",
]

_DEFAULT_PORT = 6379


class ClusterClient(_RedisCluster):
    """redis-py's asyncio cluster client, for which no node answering is a `ConnectionError`.

    redis-py raises `RedisClusterException` ("Redis Cluster cannot be connected"), which is no
    `RedisError`, when it cannot fetch the slot map from any node: a worker waiting for its
    bus, or a publish retrying until `publish_timeout`, must see it as the bus unreachable.
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
        raise ConfigurationError("the broker URL's port is not a number from 1 to 65535")
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


async def describe_nodes(client: ClusterClient, topic_keys: Sequence[str]) -> list[NodeInfo]:
    """Every node of the cluster as the node the client asks sees it, masters first, with the
    topics (by stream key) each master serves and what each node says of its memory."""
    seen: dict[str, dict[str, Any]] = await client.cluster_nodes()
    address_of = {fields["node_id"]: address for address, fields in seen.items()}
    slots_of = {address: _ranges(fields["slots"]) for address, fields in seen.items()}
    topic_slots = [client.keyslot(key) for key in topic_keys]
    found = []
    for address, fields in seen.items():
        flags = set(str(fields["flags"]).split(","))
        ranges = slots_of[address]
        failed = bool(flags & {"fail", "fail?", "noaddr"})
        role = "failed" if failed else "master" if "master" in flags else "replica"
        used, clients = "?", -1
        if not failed:
            with contextlib.suppress(RedisError, OSError):
                info = await _node(client, address).execute_command("INFO")
                used = str(info.get("used_memory_human", "?"))
                clients = int(info.get("connected_clients", -1))
        found.append(
            NodeInfo(
                address=address,
                role=role,
                slots=sum(end - start + 1 for start, end in ranges),
                replica_of=address_of.get(str(fields["master_id"])),
                topics=sum(1 for slot in topic_slots if _in(slot, ranges)),
                used_memory=used,
                clients=clients,
            )
        )
    order = {"master": 0, "replica": 1, "failed": 2}
    return sorted(found, key=lambda n: (order[n.role], n.replica_of or n.address, n.address))


async def cluster_server_info(client: ClusterClient) -> dict[str, str]:
    """`server_info` of a cluster: kind and version, masters and replicas, and the memory and
    clients of all masters together."""
    await client.initialize()  # the map, if no command has fetched it yet
    primaries = client.get_primaries()
    infos = []
    for node in primaries:
        with contextlib.suppress(RedisError, OSError):
            infos.append(await node.execute_command("INFO"))
    first = infos[0] if infos else {}
    kind = "valkey" if "valkey_version" in first else "redis"
    replicas = len(client.get_nodes()) - len(primaries)
    return {
        "server": f"{kind} {first.get(f'{kind}_version', '?')} cluster",
        "masters": str(len(primaries)),
        "replicas": str(replicas),
        "used_memory": _human(sum(int(i.get("used_memory", 0)) for i in infos)),
        "connected_clients": str(sum(int(i.get("connected_clients", 0)) for i in infos)),
    }


def _node(client: ClusterClient, address: str) -> ClusterNode:
    node = client.get_node(node_name=address)
    if node is None:  # known to the asked node, not (yet) to the client's map
        host, _, port = address.rpartition(":")
        node = ClusterNode(host, int(port), **client.nodes_manager.connection_kwargs)
        client.nodes_manager.set_nodes(client.nodes_manager.nodes_cache, {node.name: node})
    return node


def _ranges(slots: Sequence[Sequence[str]]) -> list[tuple[int, int]]:
    return [(int(r[0]), int(r[-1])) for r in slots]


def _in(slot: int, ranges: Sequence[tuple[int, int]]) -> bool:
    return any(start <= slot <= end for start, end in ranges)


def _human(size: int) -> str:
    """Bytes as Redis writes `used_memory_human` (`1.20M`)."""
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.2f}{unit}" if unit != "B" else f"{int(value)}B"
        value /= 1024
    return f"{value:.2f}T"  # pragma: no cover - the loop returns at G
