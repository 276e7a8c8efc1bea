"""A real local Redis Cluster for the tests: N masters (and a replica each) on loopback ports.

Built from the same `redis-server` as `tests.servers.RedisServer`, joined with
`redis-cli --cluster create`, and torn down by its owner (`stop()`, or `running_cluster`).
Every wait polls with a deadline: a cluster converges in about a second on loopback, and
a failover takes about two (`--cluster-node-timeout 1000`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import redis
from redis.crc import key_slot

from tests.servers import RedisServer, free_port

SLOTS = 16384
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ClusterMaster:
    node_id: str
    port: int
    slots: tuple[tuple[int, int], ...]  # inclusive ranges

    def owns(self, slot: int) -> bool:
        return any(start <= slot <= end for start, end in self.slots)


@dataclass(frozen=True)
class Migration:
    slot: int
    source: ClusterMaster
    target_id: str
    target_port: int


class RedisCluster:
    """`masters` masters, each with one replica when `replicas`, data under `directory`.

    Each node has its own folder (its `nodes.conf`, AOF and log) and its own cluster bus port.
    AOF is fsynced every second by default; `appendfsync="always"` for a test that SIGKILLs a
    node and restarts it expecting every acknowledged write back.
    """

    def __init__(
        self,
        directory: Path,
        *,
        masters: int = 3,
        replicas: bool = True,
        node_timeout_ms: int = 1000,
        appendfsync: str = "everysec",
    ) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        redis_cli = shutil.which("redis-cli")
        if redis_cli is None:
            raise RuntimeError("redis-cli is not installed (it comes with redis-server)")
        self.redis_cli = redis_cli
        self.directory = directory
        self.replicas = replicas
        self.nodes: dict[int, RedisServer] = {}
        self.killed: set[int] = set()
        self._clients: dict[int, redis.Redis] = {}
        self._killed_slots: dict[int, tuple[tuple[int, int], ...]] = {}
        for index in range(masters * (2 if replicas else 1)):
            node_dir = directory / f"node{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            server = RedisServer(
                node_dir,
                appendonly=True,
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", str(node_timeout_ms),
                    "--cluster-port", str(free_port()),
                    "--appendfsync", appendfsync,
                    # A full sync starts at once: Redis waits 5 s by default so that more
                    # replicas can share one transfer, but a master here has one replica, and
                    # every start and every rejoin after a kill paid those 5 s.
                    "--repl-diskless-sync-delay", "0",
                ],
            )  # fmt: skip
            self.nodes[server.port] = server

    # -- addresses -------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [port for port in self.nodes if port not in self.killed]

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{port}" for port in self.ports]

    @property
    def url(self) -> str:
        """A seed URL: any live node (cluster clients discover the rest)."""
        return self.urls[0]

    def client(self, port: int) -> redis.Redis:
        """A plain (non-cluster) client of one node, decoding replies."""
        if port not in self._clients:
            client = redis.Redis(host=HOST, port=port, decode_responses=True, socket_timeout=5)
            client.set_response_callback("CLUSTER NODES", _raw)  # we parse it ourselves
            self._clients[port] = client
        return self._clients[port]

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        try:
            for server in self.nodes.values():
                server.start()
            addresses = [f"{HOST}:{port}" for port in self.nodes]
            command = [self.redis_cli, "--cluster", "create", *addresses, "--cluster-yes"]
            if self.replicas:
                command += ["--cluster-replicas", "1"]
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout[-3000:]}")
            self.wait_ok(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL past 10 s). Safe to call twice."""
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        for server in self.nodes.values():
            server.stop()

    # -- state -----------------------------------------------------------------------------

    def cluster_nodes(self, port: int | None = None) -> list[dict[str, Any]]:
        """CLUSTER NODES as one node (by default a live one) sees it, one dict a node."""
        text = self.client(port or self.ports[0]).execute_command("CLUSTER NODES")
        nodes = []
        for line in str(text).splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            slots = []
            for item in fields[8:]:
                if item.startswith("["):  # a slot being imported or migrated
                    continue
                start, _, end = item.partition("-")
                slots.append((int(start), int(end or start)))
            nodes.append(
                {
                    "id": fields[0],
                    "port": int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                    "flags": set(fields[2].split(",")),
                    "master_id": fields[3],
                    "link": fields[7],
                    "slots": tuple(slots),
                }
            )
        return nodes

    def masters(self, port: int | None = None) -> list[ClusterMaster]:
        """The masters that are up and own slots, as `port` (or any live node) sees them."""
        return sorted(
            (
                ClusterMaster(node["id"], node["port"], node["slots"])
                for node in self.cluster_nodes(port)
                if "master" in node["flags"]
                and not node["flags"] & {"fail", "fail?"}
                and node["slots"]
            ),
            key=lambda master: master.slots,
        )

    def keyslot(self, key: str | bytes) -> int:
        return int(self.client(self.ports[0]).execute_command("CLUSTER KEYSLOT", key))

    def master_of(self, key: str | bytes) -> ClusterMaster:
        """The master owning `key`'s slot, per CLUSTER KEYSLOT and CLUSTER SHARDS."""
        slot = self.keyslot(key)
        client = self.client(self.ports[0])
        for shard in client.execute_command("CLUSTER SHARDS"):
            shard = _as_dict(shard)
            ranges = list(shard["slots"])  # start, end, start, end...
            pairs = zip(ranges[::2], ranges[1::2], strict=True)
            if not any(int(start) <= slot <= int(end) for start, end in pairs):
                continue
            for node in map(_as_dict, shard["nodes"]):
                if node["role"] == "master" and node["health"] == "online":
                    port = int(node["port"])
                    return next(m for m in self.masters() if m.port == port)
        raise LookupError(f"no online master owns slot {slot}")

    def spread(self, keys_of: Callable[[str], Sequence[str]]) -> str:
        """A fresh random tag whose keys `keys_of(tag)` land on as many different masters as
        they can (one each, while there are masters to go round).

        Slots are computed here (CRC16 of the key, or of its hash tag) against one CLUSTER
        NODES: the tag is found in microseconds, even when few tags qualify.
        """
        masters = self.masters()
        for _ in range(100_000):
            tag = uuid4().hex[:10]
            keys = keys_of(tag)
            owners = {
                next(m.port for m in masters if m.owns(key_slot(key.encode()))) for key in keys
            }
            if len(owners) == min(len(keys), len(masters)):
                return tag
        raise LookupError("no tag spreads these keys over the masters")

    def _wait(self, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                if ready():
                    return
            except redis.RedisError as error:  # a node still joining, or just killed
                last = error
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster: {what} not reached in {timeout} s ({last!r})")
            time.sleep(0.05)

    def _ok_everywhere(self) -> bool:
        expected_replicas = len(self.ports) - len(self.masters())
        for port in self.ports:
            info = self.client(port).cluster("INFO")
            if info["cluster_state"] != "ok" or int(info["cluster_slots_ok"]) != SLOTS:
                return False
            seen = self.cluster_nodes(port)
            live = [n for n in seen if not n["flags"] & {"fail", "fail?", "handshake"}]
            if len(live) != len(self.ports) or any(n["link"] != "connected" for n in live):
                return False
            role = self.client(port).info("replication")
            if role["role"] == "slave" and role["master_link_status"] != "up":
                return False
        return sum(1 for p in self.ports if self._role(p) == "slave") == expected_replicas

    def _role(self, port: int) -> str:
        return str(self.client(port).info("replication")["role"])

    def wait_ok(self, timeout: float = 20) -> None:
        """Until every live node says cluster_state:ok with all slots served, all links up."""
        self._wait("cluster_state:ok on every node", self._ok_everywhere, timeout)

    # -- faults ----------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node (no shutdown, no AOF rewrite: a crash)."""
        mine = [m for m in self.masters(port) if m.port == port]  # asked of itself: alive
        if mine:
            self._killed_slots[port] = mine[0].slots
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()
        self.nodes[port].stop(signal.SIGKILL)
        self.killed.add(port)

    def restart(self, port: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> None:
        """Stop one node with `sig` (SIGKILL: a crash) and start it again on its port with its
        data (AOF and `nodes.conf`): it rejoins with the same id and slots. Returns once every
        node says cluster_state:ok (a master's slots are down, cluster-wide, while it is)."""
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()
        self.nodes[port].restart(sig)
        self.wait_ok(timeout)

    def pause(self, port: int) -> None:
        """SIGSTOP one node: it holds its connections and answers nothing (a node cut off, or
        stalled by its host), until `resume`. Past the node timeout, its replica takes over."""
        mine = [m for m in self.masters() if m.port == port]
        if mine:
            self._killed_slots[port] = mine[0].slots
        process = self.nodes[port].process
        assert process is not None, f"node {port} is not running"
        process.send_signal(signal.SIGSTOP)
        self.killed.add(port)  # not asked anything while it cannot answer

    def resume(self, port: int) -> None:
        """SIGCONT a node `pause` stopped (call `wait_ok` to wait until it is back in)."""
        process = self.nodes[port].process
        assert process is not None, f"node {port} is not running"
        process.send_signal(signal.SIGCONT)
        self.killed.discard(port)
        self._killed_slots.pop(port, None)
        client = self._clients.pop(port, None)  # its socket may hold a reply it timed out on
        if client is not None:
            client.close()

    def role(self, port: int) -> str:
        """`master` or `slave`, as the node itself says."""
        return self._role(port)

    def wait_failover(self, old_master_port: int, timeout: float = 20) -> ClusterMaster:
        """Until a replica owns the killed master's slots and the cluster is ok; it is returned."""
        slots = self._killed_slots[old_master_port]
        promoted: list[ClusterMaster] = []

        def ready() -> bool:
            promoted[:] = [
                m for m in self.masters() if m.slots == slots and m.port != old_master_port
            ]
            return bool(promoted) and self._ok_everywhere()

        self._wait(f"failover of {old_master_port}", ready, timeout)
        return promoted[0]

    def revive(self, port: int, timeout: float = 20) -> None:
        """Start a killed node again with its data: it rejoins as a replica of whichever node
        took over its slots; return once the cluster is ok with it in sync."""
        self.nodes[port].start()
        self.killed.discard(port)
        self._killed_slots.pop(port, None)
        self.wait_ok(timeout)

    def master_with_replica(self, keys: Sequence[str]) -> tuple[str, ClusterMaster]:
        """The first of `keys` whose master has a live replica in sync, and that master."""
        for key in keys:
            master = self.master_of(key)
            for port in self.ports:
                role = self.client(port).info("replication")
                if (
                    role["role"] == "slave"
                    and int(role["master_port"]) == master.port
                    and role["master_link_status"] == "up"
                ):
                    return key, master
        raise LookupError("no key of those given has a master with a replica")

    # -- resharding ------------------------------------------------------------------------

    def begin_migration(self, slot: int, to_port: int) -> Migration:
        """SETSLOT IMPORTING on the target, then MIGRATING on the source (that order)."""
        source = next(m for m in self.masters() if m.owns(slot))
        if source.port == to_port:
            raise ValueError(f"slot {slot} is already on {to_port}")
        target_id = str(self.client(to_port).execute_command("CLUSTER MYID"))
        self.client(to_port).execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source.node_id)
        self.client(source.port).execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        return Migration(slot, source, target_id, to_port)

    def move_keys(self, migration: Migration, batch: int = 100) -> int:
        """MIGRATE the slot's keys in batches until GETKEYSINSLOT finds none; the count moved."""
        source = self.client(migration.source.port)
        moved = 0
        while keys := source.execute_command("CLUSTER GETKEYSINSLOT", migration.slot, batch):
            source.execute_command(
                "MIGRATE", HOST, migration.target_port, "", 0, 5000, "KEYS", *keys
            )
            moved += len(keys)
        return moved

    def finish_migration(self, migration: Migration, timeout: float = 10) -> None:
        """SETSLOT NODE on the target, the source, then every other master; wait for all."""
        others = [m.port for m in self.masters() if m.port != migration.source.port]
        order = [migration.target_port, migration.source.port]
        order += [p for p in others if p not in order]
        for port in order:
            self.client(port).execute_command(
                "CLUSTER SETSLOT", migration.slot, "NODE", migration.target_id
            )

        def everyone_agrees() -> bool:
            return all(
                any(
                    n["id"] == migration.target_id
                    and any(a <= migration.slot <= b for a, b in n["slots"])
                    for n in self.cluster_nodes(port)
                )
                for port in self.ports
            )

        self._wait(f"slot {migration.slot} on {migration.target_port}", everyone_agrees, timeout)

    def migrate_slot(self, slot: int, to_port: int) -> int:
        """Move `slot` and its keys to the master on `to_port`; the number of keys moved."""
        migration = self.begin_migration(slot, to_port)
        moved = self.move_keys(migration)
        self.finish_migration(migration)
        return moved


def _raw(response: Any, **options: Any) -> Any:
    return response


def _as_dict(item: Any) -> dict[str, Any]:
    """CLUSTER SHARDS entries are maps in RESP3 and flat key/value lists in RESP2."""
    if isinstance(item, dict):
        return {str(k): v for k, v in item.items()}
    return {str(k): v for k, v in zip(item[::2], item[1::2], strict=True)}


@contextlib.contextmanager
def running_cluster(
    directory: Path,
    *,
    masters: int = 3,
    replicas: bool = True,
    node_timeout_ms: int = 1000,
    appendfsync: str = "everysec",
) -> Iterator[RedisCluster]:
    cluster = RedisCluster(
        directory,
        masters=masters,
        replicas=replicas,
        node_timeout_ms=node_timeout_ms,
        appendfsync=appendfsync,
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
