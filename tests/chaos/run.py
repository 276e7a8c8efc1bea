"""One chaos run: a real Redis bus, three worker processes, a steady publisher, and faults at
seeded random times; then the checker's report.

    python -m tests.chaos --events 3000 --seconds 600 --seed 7
    python -m tests.chaos --cluster --min-replicas 1 --events 3000 --seconds 600 --seed 7
    python -m tests.chaos --nats --events 3000 --seconds 600 --seed 7

The bus is one redis-server (AOF, `appendfsync always`) behind a fault-injecting proxy, or with
`--cluster` a local Redis Cluster of 3 masters and 3 replicas (`tests/cluster.py`) that the
workers reach directly, or with `--nats` one JetStream nats-server behind the proxy (its faults
are those of one redis-server: `tests/chaos/nats_faults.py`). Faults (each chosen at random,
spread over the run):

- `kill worker`: SIGKILL a worker (often mid-handler) and start a new one;
- `stop worker`: SIGTERM a worker (graceful stop) and start a new one;
- `poison raise` / `poison exit`: publish an event whose handlers always raise, or kill
  their own worker;
- `garbage`: write an entry straight into the stream: random bytes, invalid JSON, a JSON
  value that is no envelope, an envelope from a future version, a payload that fails
  validation, or a 2 MB payload.

On one server, besides:

- `restart bus`: SIGTERM redis-server and start it again on the same port and data;
- `kill bus`: the same with SIGKILL (AOF with `appendfsync always` keeps every acknowledged
  write);
- `pause network` / `cut network` / `slow network`: for 1-4 s, between the workers and Redis.

On a cluster, instead (one cluster fault at a time, each once the cluster is whole again):

- `kill master`: SIGKILL the master of the topic's slot; its replica takes over, and the
  killed node is started again 1-4 s later, with its data, and rejoins as a replica;
- `kill other master`: the same with a master the topic does not live on (worker heartbeats,
  idempotency claims and results do);
- `kill replica`: SIGKILL the topic master's replica, started again 1-4 s later;
- `pause master`: SIGSTOP the topic's master for 0.5-4 s (the node timeout is 1 s: a long
  pause ends in a failover, and the paused node comes back as a replica);
- `migrate slot`: move the topic's slot (stream, retry streams, dead letters) to another
  master, holding it in the migrating state for up to 3 s (commands meet `ASK`, then `MOVED`).

The proxy is not used on a cluster: clients learn every node's address from the cluster
(`CLUSTER SLOTS`, `MOVED`, `ASK`), so a proxy in front of a seed would carry none of the
traffic that matters. `pause master` is the nearest thing to a network partition.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import redis
from redis.cluster import ClusterNode
from redis.cluster import RedisCluster as SyncClusterClient

from omnidaemon import App, BusUnavailable
from omnidaemon.brokers import Broker, RedisBroker, Subscription
from omnidaemon.envelope import encode_new
from tests.chaos.app import AGENTS, TOPIC, ChaosEvent
from tests.chaos.checker import RunReport, check
from tests.chaos.proxy import ChaosProxy
from tests.cluster import HOST, ClusterMaster, RedisCluster
from tests.servers import RedisServer

if TYPE_CHECKING:
    from tests.chaos.nats_faults import NatsBus

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 3
STREAM = f"omni:{{{TOPIC}}}:stream"
COMMON_FAULTS = ("kill worker", "stop worker", "poison raise", "poison exit", "garbage")
FAULTS = (
    "kill worker", "stop worker", "restart bus", "kill bus", "pause network", "cut network",
    "slow network", "poison raise", "poison exit", "garbage",
)  # fmt: skip
CLUSTER_FAULTS = (
    "kill worker", "stop worker", "kill master", "kill other master", "kill replica",
    "pause master", "migrate slot", "poison raise", "poison exit", "garbage",
)  # fmt: skip


def log(message: str) -> None:
    print(f"[chaos {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


_START = time.monotonic()


class Workers:
    """The worker processes; a watcher starts a new one in the place of any that ends."""

    def __init__(self, folder: Path, url: str, env: dict[str, str] | None = None) -> None:
        self._folder = folder
        self._url = url
        self._env = env or {}
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self.exits: Counter[int] = Counter()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        with self._lock:
            self._procs = [self._spawn() for _ in range(WORKERS)]
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "OMNIDAEMON_BROKER_URL": self._url,
            "OMNI_CHAOS_LOG": str(self._folder / "log"),
            "OMNIDAEMON_HEARTBEAT_INTERVAL": "1",
            "OMNIDAEMON_LOG_FORMAT": "json",
            **self._env,
        }
        out = open(self._folder / "workers.log", "ab")  # noqa: SIM115 (owned by the child)
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "omnidaemon", "worker", "tests.chaos.app:app",
                 "--log-level", "WARNING", "--shutdown-grace", "5"],
                cwd=ROOT, env=env, stdout=out, stderr=out,
            )  # fmt: skip
        finally:
            out.close()

    def _watch(self) -> None:
        while not self._stopping:
            with self._lock:
                for i, proc in enumerate(self._procs):
                    code = proc.poll()
                    if code is not None and not self._stopping:
                        self.exits[code] += 1
                        self._procs[i] = self._spawn()
            time.sleep(0.05)

    def signal_one(self, rng: random.Random, sig: signal.Signals) -> None:
        with self._lock:
            proc = rng.choice(self._procs)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def stop(self) -> None:
        self._stopping = True
        if self._watcher.ident is not None:
            self._watcher.join(timeout=5)
        with self._lock:
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            for proc in self._procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Publisher(threading.Thread):
    """Publishes `events` ordinary events at a steady rate over `seconds`, plus the poison
    events the injector asks for; records what the bus acknowledged."""

    def __init__(
        self, url: str, folder: Path, events: int, seconds: float, min_replicas: int = 0
    ) -> None:
        super().__init__(daemon=True)
        self._url = url
        self._out = folder / "published.jsonl"
        self._events = events
        self._seconds = seconds
        self._min_replicas = min_replicas
        self._poison: list[str] = []
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.seq = 0

    def poison(self, kind: str) -> None:
        with self._lock:
            self._poison.append(kind)

    def run(self) -> None:
        try:
            anyio.run(self._run)
        finally:
            self.done.set()

    def _broker(self) -> Broker:
        if self._url.startswith("nats://"):
            from omnidaemon.brokers.nats import NatsBroker

            return NatsBroker(self._url, publish_timeout=15.0)
        return RedisBroker(self._url, publish_timeout=15.0, min_replicas=self._min_replicas)

    async def _run(self) -> None:
        app = App("chaos-publisher", broker=self._broker())
        interval = self._seconds / max(1, self._events)
        start = time.monotonic()
        with self._out.open("a") as out:
            async with app:
                for i in range(self._events):
                    await anyio.sleep(max(0.0, start + i * interval - time.monotonic()))
                    with self._lock:
                        kinds, self._poison = ["ok", *self._poison], []
                    for kind in kinds:
                        await self._publish(app, out, kind)
                with self._lock:  # poison asked for after the last ordinary event
                    kinds, self._poison = self._poison, []
                for kind in kinds:
                    await self._publish(app, out, kind)

    async def _publish(self, app: App, out: Any, kind: str) -> None:
        seq, self.seq = self.seq, self.seq + 1
        event = ChaosEvent(seq=seq, kind=kind)  # type: ignore[arg-type]
        try:
            event_id = await app.publish(TOPIC, event)
        except Exception as exc:  # BusUnavailable is the promise; anything else is reported
            log(f"publish {seq} raised {type(exc).__name__}: {exc}")
            line = {"seq": seq, "kind": kind, "ok": False, "error": str(exc)}
            line["error_type"] = type(exc).__name__
            if not isinstance(exc, BusUnavailable):
                line["unexpected"] = True
            out.write(json.dumps(line))
        else:
            out.write(json.dumps({"seq": seq, "kind": kind, "ok": True, "id": event_id}))
        out.write("\n")
        out.flush()


def garbage_entry(rng: random.Random, n: int, huge: int = 2_000_000) -> tuple[str, bytes]:
    """One entry another program might write: `(marker, bytes)`; the marker is in the bytes
    (`huge`: the size of the oversized payload)."""
    marker = f"chaos-garbage-{n}"
    kind = rng.choice(["bytes", "json", "shape", "version", "payload", "huge"])
    if kind == "bytes":
        return marker, marker.encode() + bytes(rng.randrange(256) for _ in range(64))
    if kind == "json":
        return marker, f'{{"v": 1, "id": "{marker}", "topic": '.encode()
    if kind == "shape":
        return marker, json.dumps({"hello": marker}).encode()
    _, data = encode_new(TOPIC, {"seq": -1, "kind": "ok", "body": marker})
    envelope = json.loads(data)
    if kind == "version":
        envelope["v"] = 99
    elif kind == "payload":
        envelope["payload"] = {"seq": marker, "kind": "nope"}
    else:
        envelope["payload"] = {"seq": -1, "kind": "ok", "body": marker + "x" * huge}
        envelope["payload"]["kind"] = "huge"  # fails validation, after a large read
    return marker, json.dumps(envelope).encode()


def backlog(client: redis.Redis | SyncClusterClient) -> int | None:
    """Unread plus unsettled entries over the topic's groups (None while the bus is away).

    Unread entries are counted past each group's last-delivered id (at most 1,000 a group):
    the `lag` XINFO GROUPS reports is wrong after a failover (Redis 7.0 replicas do not
    keep a group's entries-read count, so the promoted one reports entries it handed out
    before it took over as unread, for good).
    """
    try:
        total = 0
        for group in client.xinfo_groups(STREAM):
            after = "(" + _text(group["last-delivered-id"])
            unread = client.xrange(STREAM, after, "+", count=1000) or []
            total += int(group["pending"]) + len(unread)
    except (redis.RedisError, OSError):
        return None
    return total


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def wait_for_groups(client: redis.Redis | SyncClusterClient, timeout: float = 60.0) -> None:
    """Until every agent's consumer group exists on the topic's stream. Polled, not slept on:
    on a loaded machine the workers take seconds to start, and a group made after a publish
    starts past it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            groups = {_text(group["name"]) for group in client.xinfo_groups(STREAM)}
        except redis.ResponseError:  # no such key: no worker has made its group yet
            groups = set()
        if groups >= set(AGENTS):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the workers made no groups {sorted(AGENTS)} in {timeout} s")
        time.sleep(0.1)


def describe_groups(client: redis.Redis | SyncClusterClient) -> Any:
    """XINFO GROUPS and an XPENDING summary per group of the topic (for a run that does not
    drain: what is left, and who holds it)."""
    try:
        groups = client.xinfo_groups(STREAM)
        return [
            {**group, "pending by consumer": client.xpending(STREAM, group["name"])["consumers"]}
            for group in groups
        ]
    except (redis.RedisError, OSError) as exc:
        return repr(exc)


class Sampler(threading.Thread):
    """Samples the backlog every 0.2 s (`measure`, on a client of its own, closed by `close`),
    until stopped."""

    def __init__(
        self, measure: Callable[[], int | None], close: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__(daemon=True)
        self._measure = measure
        self._close = close
        self._done = threading.Event()
        self.samples: list[tuple[float, int | None]] = []

    @classmethod
    def of(cls, bus: ServerBus | ClusterBus | NatsBus) -> Sampler:
        if isinstance(bus, ServerBus | ClusterBus):
            client = bus.sampling_client()
            return cls(lambda: backlog(client), client.close)
        return cls(bus.backlog)

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append((time.monotonic(), self._measure()))
            self._done.wait(0.2)

    def stop(self) -> None:
        self._done.set()
        if self.ident is not None:
            self.join(timeout=30)
        self._close()


class ServerBus:
    """One redis-server with AOF, and the proxy the workers reach it through."""

    faults = FAULTS
    huge_garbage = 2_000_000

    def __init__(self, folder: Path) -> None:
        self.server = RedisServer(folder, appendonly=True)
        self.server.start()
        self.proxy = ChaosProxy("127.0.0.1", self.server.port)
        self.proxy.start()
        self.client = redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=2)
        self.timings: dict[str, list[float]] = defaultdict(list)

    @property
    def worker_url(self) -> str:
        return self.proxy.url

    @property
    def url(self) -> str:
        return self.server.url

    def sampling_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=2)

    def write_garbage(self, data: bytes) -> bool:
        try:
            self.client.xadd(STREAM, {"e": data})
        except redis.RedisError:
            return False
        return True

    def inject(self, kind: str, rng: random.Random) -> None:
        if kind in ("restart bus", "kill bus"):
            self.server.restart(signal.SIGTERM if kind == "restart bus" else signal.SIGKILL)
            return
        action: Callable[[], None] = {
            "pause network": self.proxy.pause,
            "cut network": self.proxy.cut,
            "slow network": lambda: self.proxy.slow(0.05),
        }[kind]
        action()
        time.sleep(rng.uniform(1.0, 4.0))
        self.proxy.resume()

    def settle(self) -> None:
        """Nothing is left broken after a fault on one server."""

    def wait_subscribed(self) -> None:
        wait_for_groups(self.client)

    def describe_groups(self) -> Any:
        return describe_groups(self.client)

    def stop_proxy(self) -> None:
        self.proxy.stop()

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class ClusterBus:
    """A local Redis Cluster of 3 masters with a replica each; workers reach it directly.

    Workers get every node in their URL (`redis://h:p1,h:p2,...`: one dead at a worker's start
    does not stop it); the publisher gets one node (`redis://h:p`, found to be a cluster when
    it connects). Cluster faults run one at a time, each once the cluster is whole again: a
    killed node is started again in the background, while other kinds of faults go on.
    """

    faults = CLUSTER_FAULTS
    huge_garbage = 2_000_000

    def __init__(self, folder: Path) -> None:
        self.cluster = RedisCluster(folder / "cluster", masters=3, replicas=True)
        self.cluster.start()
        self.timings: dict[str, list[float]] = defaultdict(list)
        self.failovers = Counter[str]()
        self._restarting: threading.Thread | None = None
        self._restart_error: BaseException | None = None

    @property
    def worker_url(self) -> str:
        return "redis://" + ",".join(f"{HOST}:{port}" for port in self.cluster.nodes)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{next(iter(self.cluster.nodes))}"

    def sampling_client(self) -> SyncClusterClient:
        nodes = [ClusterNode(HOST, port) for port in self.cluster.nodes]  # type: ignore[no-untyped-call]
        return SyncClusterClient(startup_nodes=nodes, socket_timeout=2, socket_connect_timeout=1)

    def write_garbage(self, data: bytes) -> bool:
        """XADD on the topic's master, then WAIT for its replica on that connection: an entry
        a failover could drop is not counted as written."""
        self._wait_restart()
        try:
            port = self.cluster.master_of(STREAM).port
            with redis.Redis(host=HOST, port=port, socket_timeout=5) as client:
                pipe = client.pipeline(transaction=False)
                pipe.xadd(STREAM, {"e": data})
                pipe.execute_command("WAIT", 1, 2000)
                _, replicas = pipe.execute()
        except (redis.RedisError, LookupError, StopIteration):
            return False
        return int(replicas) >= 1

    def inject(self, kind: str, rng: random.Random) -> None:
        cluster = self.cluster
        self._wait_restart()
        cluster.wait_ok(60)
        topic_master = cluster.master_of(STREAM)
        if kind in ("kill master", "kill other master"):
            if kind == "kill master":
                port = topic_master.port
            else:
                port = rng.choice([m.port for m in cluster.masters() if m != topic_master])
            began = time.monotonic()
            cluster.kill(port)
            new = cluster.wait_failover(port, timeout=60)
            self.timings["failover (SIGKILL to replica serving, cluster ok)"].append(
                time.monotonic() - began
            )
            log(f"  {port} killed; {new.port} took over")
            self._restart_later(port, rng.uniform(1.0, 4.0))
        elif kind == "kill replica":
            port = self._replica_of(topic_master)
            cluster.kill(port)
            self._restart_later(port, rng.uniform(1.0, 4.0))
        elif kind == "pause master":
            port, length = topic_master.port, rng.uniform(0.5, 4.0)
            cluster.pause(port)
            time.sleep(length)
            cluster.resume(port)
            began = time.monotonic()
            cluster.wait_ok(60)
            failed_over = cluster.role(port) != "master"
            self.failovers["pause master: failed over" if failed_over else "pause master: not"] += 1
            self.timings["pause master: paused for"].append(length)
            self.timings["pause master: resume to cluster ok"].append(time.monotonic() - began)
            log(f"  {port} paused {length:.1f} s; {'failed over' if failed_over else 'kept'}")
        elif kind == "migrate slot":
            slot = cluster.keyslot(STREAM)
            target = rng.choice([m.port for m in cluster.masters() if m != topic_master])
            began = time.monotonic()
            migration = cluster.begin_migration(slot, target)
            time.sleep(rng.uniform(0.0, 1.0))  # MIGRATING: the source still serves
            moved = cluster.move_keys(migration)
            time.sleep(rng.uniform(0.5, 2.0))  # keys gone from the source: ASK
            cluster.finish_migration(migration)
            self.timings["migrate slot (begin to every node agreeing)"].append(
                time.monotonic() - began
            )
            log(f"  slot {slot} ({moved} keys) moved {topic_master.port} -> {target}")
        else:
            raise ValueError(kind)

    def _replica_of(self, master: ClusterMaster) -> int:
        nodes = self.cluster.cluster_nodes()
        return next(
            int(n["port"])
            for n in nodes
            if "slave" in n["flags"] and n["master_id"] == master.node_id
        )

    def _restart_later(self, port: int, delay: float) -> None:
        def restart() -> None:
            try:
                time.sleep(delay)
                began = time.monotonic()
                self.cluster.revive(port, timeout=60)
                self.timings["rejoin (restart to replica in sync, cluster ok)"].append(
                    time.monotonic() - began
                )
                log(f"  {port} restarted after {delay:.1f} s: {self.cluster.role(port)}")
            except BaseException as exc:  # raised again by the injector (_wait_restart)
                self._restart_error = exc

        self._restarting = threading.Thread(target=restart, daemon=True)
        self._restarting.start()

    def _wait_restart(self) -> None:
        """Until the node killed last is back (the cluster is used from one thread at once)."""
        if self._restarting is not None:
            self._restarting.join()
            self._restarting = None
        if self._restart_error is not None:
            raise self._restart_error

    def settle(self) -> None:
        self._wait_restart()
        self.cluster.wait_ok(60)

    def wait_subscribed(self) -> None:
        with self.sampling_client() as client:
            wait_for_groups(client)

    def describe_groups(self) -> Any:
        with self.sampling_client() as client:
            return describe_groups(client)

    def stop_proxy(self) -> None:
        """There is no proxy on a cluster."""

    def close(self) -> None:
        if self._restarting is not None:
            self._restarting.join()
        for port in list(self.cluster.killed):
            process = self.cluster.nodes[port].process
            if process is not None:  # paused, not killed: it must run to stop
                process.send_signal(signal.SIGCONT)
        self.cluster.stop()


def run(
    events: int,
    seconds: float,
    seed: int,
    folder: Path,
    *,
    cluster: bool = False,
    min_replicas: int = 0,
    nats: bool = False,
) -> RunReport:
    """Run the whole scenario in `folder` and return the checker's report.

    `cluster` runs it on a local Redis Cluster (see the module docs); `min_replicas` is given
    to the workers and the publisher (`OMNIDAEMON_REDIS_MIN_REPLICAS`). `nats` runs it on one
    JetStream nats-server (`tests/chaos/nats_faults.py`).
    """
    rng = random.Random(seed)
    (folder / "log").mkdir(parents=True, exist_ok=True)
    bus: ServerBus | ClusterBus | NatsBus
    if nats:
        from tests.chaos.nats_faults import NatsBus

        bus = NatsBus(folder)
    else:
        bus = ClusterBus(folder) if cluster else ServerBus(folder)
    env = {"OMNIDAEMON_REDIS_MIN_REPLICAS": str(min_replicas)}
    faults: Counter[str] = Counter()
    fault_ends: list[tuple[str, float]] = []
    try:
        workers = Workers(folder, bus.worker_url, env)
        # The publisher shares the workers' network faults on NATS; on Redis it reaches the bus
        # directly.
        publisher_url = bus.worker_url if nats else bus.url
        publisher = Publisher(publisher_url, folder, events, seconds, min_replicas)
        sampler = Sampler.of(bus)
        try:
            workers.start()
            # Every agent's group (consumer) made before events flow: agents start from new
            # entries, so one made after a publish would never see it.
            bus.wait_subscribed()
            log("workers subscribed; publishing")
            sampler.start()
            publisher.start()
            # A fault every 4 s on average (6 s on a cluster, whose faults take longer: a failover,
            # then the killed node's restart and resync), and every kind at least once however
            # short the run.
            count = max(len(bus.faults), int(seconds / (6 if cluster else 4)))
            plan = sorted(rng.uniform(1.0, max(2.0, seconds - 2.0)) for _ in range(count))
            kinds = [bus.faults[i % len(bus.faults)] for i in range(len(plan))]
            rng.shuffle(kinds)
            begun = time.monotonic()
            with (folder / "garbage.jsonl").open("a") as garbage_out:
                for at, kind in zip(plan, kinds, strict=True):
                    time.sleep(max(0.0, begun + at - time.monotonic()))
                    log(f"fault: {kind}")
                    faults[kind] += 1
                    _inject(kind, rng, workers, bus, publisher, garbage_out, faults)
                    fault_ends.append((kind, time.monotonic()))
            bus.settle()
            publisher.done.wait(timeout=seconds + 120)
            # Drain: until every group has read and settled everything (or a deadline), as a
            # sample taken after the last publish says (one from before would miss it).
            published = time.monotonic()
            deadline = published + 120
            while time.monotonic() < deadline:
                last = sampler.samples[-1] if sampler.samples else (0.0, None)
                if last[0] > published and last[1] == 0:
                    break
                time.sleep(0.2)
            left = sampler.samples[-1][1]
            log(f"published {publisher.seq} events; backlog at the end: {left}")
            if left != 0:
                log(f"the topic's groups at the end: {bus.describe_groups()}")
        finally:
            sampler.stop()
            workers.stop()
            bus.stop_proxy()
            with (folder / "samples.jsonl").open("w") as out:
                for at, left in sampler.samples:
                    out.write(json.dumps({"t": round(at - _START, 2), "backlog": left}) + "\n")
        recoveries = _recoveries(fault_ends, sampler.samples)
        return _report(folder, bus, faults, recoveries, workers, min_replicas)
    finally:
        bus.close()


def _inject(
    kind: str,
    rng: random.Random,
    workers: Workers,
    bus: ServerBus | ClusterBus | NatsBus,
    publisher: Publisher,
    garbage_out: Any,
    faults: Counter[str],
) -> None:
    if kind == "kill worker":
        workers.signal_one(rng, signal.SIGKILL)
    elif kind == "stop worker":
        workers.signal_one(rng, signal.SIGTERM)
    elif kind.startswith("poison"):
        publisher.poison(kind.split()[1])
    elif kind == "garbage":
        marker, data = garbage_entry(rng, faults[kind], bus.huge_garbage)
        if bus.write_garbage(data):
            garbage_out.write(json.dumps({"marker": marker}) + "\n")
            garbage_out.flush()
    else:
        bus.inject(kind, rng)


def _recoveries(
    fault_ends: list[tuple[str, float]], samples: list[tuple[float, int | None]]
) -> list[tuple[str, float | None]]:
    # Normal: the backlog at or below the run's median, i.e. what steady publishing leaves.
    known = sorted(b for _, b in samples if b is not None)
    normal = max(known[len(known) // 2] if known else 0, 5)
    out: list[tuple[str, float | None]] = []
    for kind, ended in fault_ends:
        after = [t for t, b in samples if t >= ended and b is not None and b <= normal]
        out.append((kind, after[0] - ended if after else None))
    return out


def _report(
    folder: Path,
    bus: ServerBus | ClusterBus | NatsBus,
    faults: Counter[str],
    recoveries: list[tuple[str, float | None]],
    workers: Workers,
    min_replicas: int,
) -> RunReport:
    async def read() -> tuple[dict[str, list[dict[str, Any]]], Counter[int]]:
        broker = RedisBroker(bus.url)
        async with broker:
            letters = {
                agent: [
                    json.loads(r)
                    for _, r in await broker.dead_letters(Subscription(TOPIC, agent), 100_000)
                ]
                for agent in AGENTS
            }
            seqs: Counter[int] = Counter()
            for _, fields in await broker.client.xrange(broker.stream_key(TOPIC)):
                with contextlib.suppress(Exception):
                    seqs[int(json.loads(fields[b"e"])["payload"]["seq"])] += 1
        return letters, seqs

    letters, seqs = anyio.run(read) if isinstance(bus, ServerBus | ClusterBus) else bus.outcome()
    crashed = sum(n for code, n in workers.exits.items() if code != 0)
    faults = faults.copy()
    faults["worker exits seen (any cause)"] = crashed
    if isinstance(bus, ClusterBus):
        faults.update(bus.failovers)
    report = check(folder, letters, seqs, faults, recoveries)
    # Acknowledged events a failover dropped are counted, never hidden; they fail the run
    # unless the bus was a cluster without replica confirmation (asynchronous replication).
    report.bus_loss_allowed = isinstance(bus, ClusterBus) and min_replicas == 0
    report.timings = dict(bus.timings)
    report.worker_log = worker_log_summary(folder / "workers.log")
    return report


def worker_log_summary(path: Path) -> Counter[str]:
    """The workers' warnings and errors, by level and message (tracebacks apart)."""
    counts: Counter[str] = Counter()
    if not path.exists():
        return counts
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line.startswith("Traceback"):
                counts["traceback (not a log line)"] += 1
            continue
        if not isinstance(record, dict):
            continue
        level = str(record.get("level", "?")).upper()
        event = str(record.get("event", "?"))
        error = record.get("error_type") or record.get("exc_type")
        counts[f"{level}: {event}" + (f" ({error})" if error else "")] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=3000, help="ordinary events to publish")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to publish for")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault schedule")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run on a local Redis Cluster (3 masters, 3 replicas)",
    )
    parser.add_argument(
        "--nats",
        action="store_true",
        help="run on one NATS JetStream server behind the fault proxy",
    )
    parser.add_argument(
        "--min-replicas",
        type=int,
        default=0,
        help="OMNIDAEMON_REDIS_MIN_REPLICAS for the workers and the publisher (cluster: 1 "
        "makes an acknowledged event lost in a failover fail the run)",
    )
    args = parser.parse_args(argv)
    if args.nats and (args.cluster or args.min_replicas):
        parser.error("--nats runs on one server: --cluster and --min-replicas are Redis's")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="omnichaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = run(
        args.events,
        args.seconds,
        args.seed,
        folder,
        cluster=args.cluster,
        min_replicas=args.min_replicas,
        nats=args.nats,
    )
    print(report.table())
    ok = report.ok
    lost = f"lost {report.lost}, lost with the bus's data {report.lost_by_bus}"
    print(f"\nresult: {'PASS' if ok else 'FAIL'} ({lost}); histories in {folder}")
    return 0 if ok else 1
