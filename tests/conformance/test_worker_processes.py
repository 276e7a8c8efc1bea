"""The delivery invariants (DESIGN.md section 4) proven with real worker processes.

Every test runs `python -m omnidaemon worker procs_app:app` subprocesses against a real bus and
publishes from the test process. The app module's handlers record what they did, one JSON line
per step (agent, event key, attempt, pid, phase), in the file named by `T_LOG`; each line is one
`O_APPEND` write followed by `fsync`, so a SIGKILL loses nothing already recorded.

Each bus joins by adding a factory to `BUSES` (and, when its server can be restarted by a test,
to `RESTARTABLE_BUSES`). The tests run against Redis and NATS JetStream (each its own broker
code); those marked `@on_every_bus` run against each bus. The embedded bus is a Valkey server
behind the Redis broker's code, so its delivery semantics are proven by the broker conformance
suite; here it only shows that workers given no broker URL at all share it, which two tests
suffice for (running all of them on it costs the suite half a minute). A Redis Cluster (3
masters) runs the tests where it differs from one server: a worker killed mid-handler (its
successor reclaims on the topic's master) and a master restarted under a running worker (the
other masters stay up).

The test side reads the bus through the broker API alone (`describe`, `publish`), on one
connection kept open in a blocking portal, so the same checks hold on every bus.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from uuid import uuid4

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal

from omnidaemon import App
from omnidaemon.brokers import Broker, RedisBroker, open_broker
from omnidaemon.brokers.base import GroupInfo
from omnidaemon.brokers.embedded import EmbeddedBroker
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import encode_new
from tests.cluster import RedisCluster, running_cluster
from tests.e2e._support import (
    WorkerProcess,
    cli_env,
    read_lines,
    wait_for,
    write_module,
)
from tests.nats import NatsServer

pytestmark = pytest.mark.slow

T = TypeVar("T")

STARTUP = 20.0  # seconds a fresh worker process may take to import and subscribe
SETTLE = 20.0  # seconds within which the work of one test must be done once it can be


@dataclass(frozen=True)
class RestartableBus:
    """A bus whose server a test may restart (data kept: AOF with `appendfsync always` on
    Redis, the JetStream file store on NATS).

    `restart(signal, key, noticed)` stops the server that holds `key` with `signal` and starts
    it again; on a cluster, the other masters stay up. A NATS server stays down until
    `noticed()` (the worker logged the outage): nats-py reconnects by itself and buffers what
    is sent meanwhile, so a restart quicker than a fetch may go unseen, which a real outage
    does not. `outage_errors` name the errors a worker may meet meanwhile: on a cluster, the
    other masters answer CLUSTERDOWN for the slots of the one that is down.
    """

    url: str
    restart: Callable[[signal.Signals, str, Callable[[], bool]], None]
    outage_errors: tuple[str, ...] = ("ConnectionError",)


BUSES: dict[str, Callable[[pytest.FixtureRequest], str]] = {
    "redis": lambda request: request.getfixturevalue("redis_url"),
    # Workers get no broker URL, only OMNIDAEMON_HOME: the default an app falls back to.
    "embedded": lambda request: f"embedded://{request.getfixturevalue('embedded_home')}",
    "cluster": lambda request: request.getfixturevalue("cluster_url"),
    "nats": lambda request: request.getfixturevalue("nats_url"),
}


@pytest.fixture(scope="module")
def durable_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 masters without replicas, AOF fsynced on every write, for the restart tests alone:
    a master they restart comes back with its data, and nobody else shares it."""
    directory = tmp_path_factory.mktemp("durable-cluster")
    with running_cluster(directory, replicas=False, appendfsync="always") as cluster:
        yield cluster


def _durable_redis(request: pytest.FixtureRequest) -> RestartableBus:
    server = request.getfixturevalue("durable_redis")
    return RestartableBus(server.url, lambda sig, key, noticed: server.restart(sig))


def _durable_cluster(request: pytest.FixtureRequest) -> RestartableBus:
    cluster: RedisCluster = request.getfixturevalue("durable_cluster")
    return RestartableBus(
        cluster.url,
        lambda sig, key, noticed: cluster.restart(cluster.master_of(key).port, sig),
        outage_errors=("ConnectionError", "ClusterDownError"),
    )


def _durable_nats(request: pytest.FixtureRequest) -> RestartableBus:
    server: NatsServer = request.getfixturevalue("durable_nats")

    def restart(sig: signal.Signals, key: str, noticed: Callable[[], bool]) -> None:
        server.stop(sig)
        try:
            wait_for(noticed, SETTLE, "the worker to notice that the bus is down")
        finally:
            server.start()

    # While nats-py reconnects, the broker refuses at once (ConnectionError); a request sent
    # just before the server went away gets no answer (TimeoutError).
    return RestartableBus(server.url, restart, outage_errors=("ConnectionError", "TimeoutError"))


RESTARTABLE_BUSES: dict[str, Callable[[pytest.FixtureRequest], RestartableBus]] = {
    "redis": _durable_redis,
    "cluster": _durable_cluster,
    "nats": _durable_nats,
}

# The buses every test runs on: each broker implementation (the embedded bus and the cluster
# run the Redis broker's code, so they join only where they differ).
BROKER_BUSES = ["nats", "redis"]


@pytest.fixture(params=BROKER_BUSES)
def bus_url(request: pytest.FixtureRequest) -> str:
    return BUSES[request.param](request)


on_every_bus = pytest.mark.parametrize("bus_url", ["embedded", *BROKER_BUSES], indirect=True)
# The tests where a cluster differs from one server (see the module's docs).
on_every_bus_and_cluster = pytest.mark.parametrize("bus_url", sorted(BUSES), indirect=True)


@pytest.fixture
def restartable_bus(request: pytest.FixtureRequest) -> RestartableBus:
    return RESTARTABLE_BUSES[request.param](request)


# The app module the workers run ------------------------------------------------------------

PREAMBLE = """
    import json
    import os

    import anyio
    from pydantic import BaseModel

    from omnidaemon import App, Context

    app = App("procs")

    TOPIC = os.environ["T_TOPIC"]
    LOG = os.environ["T_LOG"]
    RELEASE = os.environ.get("T_RELEASE", "")


    def note(agent, key, ctx, phase):
        line = json.dumps(
            {"agent": agent, "key": key, "attempt": ctx.attempt, "pid": os.getpid(), "phase": phase}
        )
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
"""

BLOCKING_AGENT = """
    @app.agent(TOPIC, name="work", reclaim_idle=1.0, concurrency=4)
    async def work(event: dict, ctx: Context) -> None:
        note("work", event["k"], ctx, "start")
        if event.get("block"):
            while not os.path.exists(RELEASE):
                await anyio.sleep(0.02)
        note("work", event["k"], ctx, "done")
"""

POISON_AGENT = """
    @app.agent(
        TOPIC,
        name="work",
        reclaim_idle=1.0,
        max_retries=int(os.environ.get("T_MAX_RETRIES", "2")),
        concurrency=int(os.environ.get("T_CONCURRENCY", "1")),
    )
    async def work(event: dict, ctx: Context) -> None:
        note("work", event["k"], ctx, "start")
        if event.get("poison"):
            os._exit(1)
        note("work", event["k"], ctx, "done")
"""

FAN_OUT_AGENTS = """
    @app.agent(TOPIC, name="a", reclaim_idle=1.0, concurrency=4)
    async def a(event: dict, ctx: Context) -> None:
        await anyio.sleep(0.01)
        note("a", event["k"], ctx, "done")


    @app.agent(TOPIC, name="b", reclaim_idle=1.0, concurrency=4)
    async def b(event: dict, ctx: Context) -> None:
        note("b", event["k"], ctx, "done")
"""

SLOW_AGENT = """
    SLEEP = float(os.environ["T_SLEEP"])
    CONCURRENCY = int(os.environ["T_CONCURRENCY"])
    RECLAIM_IDLE = float(os.environ.get("T_RECLAIM_IDLE", "1"))


    @app.agent(TOPIC, name="work", reclaim_idle=RECLAIM_IDLE, concurrency=CONCURRENCY)
    async def work(event: dict, ctx: Context) -> None:
        note("work", event["k"], ctx, "start")
        await anyio.sleep(SLEEP)
        note("work", event["k"], ctx, "done")
"""

TYPED_AGENT = """
    class Job(BaseModel):
        k: str
        n: int


    @app.agent(TOPIC, name="work", reclaim_idle=1.0)
    async def work(event: Job, ctx: Context) -> None:
        note("work", event.k, ctx, "done")
"""

RETRY_AGENTS = """
    RETRY_TOPIC = os.environ.get("T_RETRY_TOPIC", TOPIC)


    @app.agent(RETRY_TOPIC, name="flaky", reclaim_idle=1.0, max_retries=3, retry_backoff=0.05)
    async def flaky(event: dict, ctx: Context) -> None:
        note("flaky", event["k"], ctx, "start")
        if ctx.attempt < 3:
            raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
        note("flaky", event["k"], ctx, "done")


    @app.agent(RETRY_TOPIC, name="steady", reclaim_idle=1.0)
    async def steady(event: dict, ctx: Context) -> None:
        note("steady", event["k"], ctx, "start")
        note("steady", event["k"], ctx, "done")
"""


# The test side -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One line a handler recorded."""

    agent: str
    key: str
    attempt: int
    pid: int
    phase: str


@dataclass
class Fleet:
    """Worker processes of one test on one bus and one topic, and what their handlers did."""

    url: str
    topic: str
    cwd: Path
    log: Path
    spawn: Callable[..., WorkerProcess]
    env: dict[str, str] = field(default_factory=dict)
    _connection: tuple[contextlib.ExitStack, BlockingPortal, Broker] | None = field(
        default=None, repr=False
    )

    def write_app(self, agents: str) -> None:
        write_module(self.cwd, "procs_app", PREAMBLE + agents)

    def start(self, *args: str, **env: str) -> WorkerProcess:
        """Start a worker process (it may still be importing when this returns)."""
        bus: dict[str, str] = (
            # The embedded bus is what an app gets with no broker URL at all.
            {"OMNIDAEMON_HOME": self.url.removeprefix("embedded://"), "OMNIDAEMON_BROKER_URL": ""}
            if self.url.startswith("embedded://")
            else {"OMNIDAEMON_BROKER_URL": self.url}
        )
        full_env = cli_env(
            **bus,
            T_TOPIC=self.topic,
            T_LOG=str(self.log),
            **self.env,
            **env,
        )
        return self.spawn(["procs_app:app", *args], self.cwd, full_env)

    def start_ready(self, *args: str, **env: str) -> WorkerProcess:
        """Start a worker process and wait until its consumer groups exist."""
        worker = self.start(*args, **env)
        wait_for(
            lambda: worker.has_logged("worker started") or worker.proc.poll() is not None,
            STARTUP,
            "the worker to start",
        )
        assert worker.proc.poll() is None, worker.stderr
        return worker

    # What happened ------------------------------------------------------------------------

    def steps(self, phase: str | None = None, agent: str | None = None) -> list[Step]:
        steps = [Step(**json.loads(line)) for line in read_lines(self.log)]
        return [
            s
            for s in steps
            if (phase is None or s.phase == phase) and (agent is None or s.agent == agent)
        ]

    def done_counts(self, agent: str = "work") -> Counter[str]:
        return Counter(s.key for s in self.steps("done", agent))

    # The bus ------------------------------------------------------------------------------

    def publish(self, payloads: Sequence[dict[str, Any]]) -> list[str]:
        """Publish `payloads` to the topic in one round trip; return the event ids."""

        async def go() -> list[str]:
            async with App("publisher", broker=self.broker()) as app:
                return await app.publish_many([(self.topic, p) for p in payloads])

        return anyio.run(go)

    def dead_letters(self, agent: str) -> list[DeadLetter]:
        """The agent's dead-letter queue, read through the public API."""

        async def go() -> list[DeadLetter]:
            async with App("inspector", broker=self.broker()) as app:

                @app.agent(self.topic, name=agent)
                async def _unused(event: dict[str, Any]) -> None:
                    raise AssertionError("never run")

                return await app.dead_letters(agent)

        return anyio.run(go)

    def broker(self) -> Broker:
        """A broker on the fleet's bus, for the test process."""
        if self.url.startswith("embedded://"):
            return EmbeddedBroker(Path(self.url.removeprefix("embedded://")))
        return open_broker(self.url)

    def call(self, method: Callable[[Broker], Awaitable[T]]) -> T:
        """`method(broker)` on the fleet's own connected broker, kept open between calls (a
        poll costs a round trip, not a connect) until `close`."""
        if self._connection is None:
            with contextlib.ExitStack() as stack:
                portal = stack.enter_context(start_blocking_portal())
                bus = stack.enter_context(portal.wrap_async_context_manager(self.broker()))
                self._connection = (stack.pop_all(), portal, bus)
        _, portal, bus = self._connection
        return portal.call(method, bus)

    def close(self) -> None:
        """Close the fleet's connection to the bus (the next call opens a new one)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection[0].close()

    @property
    def stream_key(self) -> str:
        """The topic's stream key on Redis (where a cluster test finds the master to restart)."""
        return f"omni:{{{self.topic}}}:stream"

    def group(self, group: str) -> GroupInfo | None:
        """`group` on the fleet's topic, as the bus describes it (`omnidaemon bus stats`);
        `None` before a worker created it."""

        async def describe(bus: Broker) -> GroupInfo | None:
            info = await bus.describe(self.topic)
            return next((g for g in info.groups if g.group == group), None) if info else None

        return self.call(describe)

    def existing_group(self, group: str) -> GroupInfo:
        found = self.group(group)
        if found is None:
            raise LookupError(f"the bus has no group {group!r} on {self.topic}")
        return found

    def dlq_length(self, agent: str) -> int:
        """Records in the agent's dead-letter queue (0 before its group exists)."""
        found = self.group(agent)
        return 0 if found is None else found.dead_letters

    def pending(self, group: str) -> int:
        """Deliveries (first attempts and retries) `group` was handed and has not settled."""
        return self.existing_group(group).pending

    def settled(self, group: str) -> bool:
        """Nothing pending for `group` and no retry scheduled or due: no further handler run
        can happen without a new publish."""
        found = self.existing_group(group)
        return found.pending == 0 and found.retries == 0

    def publish_raw(self, entries: Sequence[bytes | None]) -> None:
        """Append entries to the topic as they are, not as envelopes; `None` is an entry
        without one (on Redis, a stream entry without the `e` field; elsewhere, empty)."""

        async def publish(bus: Broker) -> None:
            for data in entries:
                if data is None and isinstance(bus, RedisBroker):
                    await bus.client.xadd(self.stream_key, {"x": b"no e field"})
                else:
                    await bus.publish(self.topic, data or b"")

        self.call(publish)


def _make_fleet(url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess]) -> Fleet:
    return Fleet(
        url=url,
        topic=f"t{uuid4().hex[:12]}.jobs",
        cwd=tmp_path,
        log=tmp_path / "handlers.log",
        spawn=spawn,
    )


@pytest.fixture
def fleet(bus_url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess]) -> Iterator[Fleet]:
    f = _make_fleet(bus_url, tmp_path, spawn)
    try:
        yield f
    finally:
        f.close()


def log_events(worker: WorkerProcess, fragment: str) -> list[dict[str, Any]]:
    return [e for e in worker.logs() if fragment in e["event"]]


def supervise_until_dead_letter(
    fleet: Fleet, agent: str, max_restarts: int = 5
) -> tuple[WorkerProcess, list[int]]:
    """Run a worker and restart it whenever it dies, as systemd or Kubernetes would, until
    `agent`'s dead-letter queue is not empty; return the live worker and the exit statuses."""
    exit_codes: list[int] = []
    worker = fleet.start()
    deadline = time.monotonic() + 40
    while fleet.dlq_length(agent) == 0:
        assert time.monotonic() < deadline, f"no dead letter; worker exits: {exit_codes}"
        status = worker.proc.poll()
        if status is not None:
            exit_codes.append(status)
            assert len(exit_codes) <= max_restarts, "the poison message is crash-looping"
            worker = fleet.start()
        time.sleep(0.02)
    return worker, exit_codes


# 4.1 At least once across SIGKILL ----------------------------------------------------------


@on_every_bus_and_cluster
def test_event_of_a_worker_killed_mid_handler_is_taken_over_and_nothing_is_lost(
    fleet: Fleet,
) -> None:
    release = fleet.cwd / "release"
    fleet.env["T_RELEASE"] = str(release)
    fleet.write_app(BLOCKING_AGENT)
    workers = [fleet.start(), fleet.start()]
    for w in workers:
        wait_for(lambda w=w: w.has_logged("worker started"), STARTUP, "the workers to start")
    keys = [f"e{i}" for i in range(20)]
    fleet.publish([{"k": k, "block": k == "e10"} for k in keys])

    blocked = wait_for(
        lambda: [s for s in fleet.steps("start") if s.key == "e10"],
        SETTLE,
        "the blocking handler to start",
    )
    victim = next(w for w in workers if w.proc.pid == blocked[0].pid)
    survivor = next(w for w in workers if w is not victim)
    # Everything else was handled and acknowledged: only the blocked event is pending.
    wait_for(
        lambda: len(fleet.done_counts()) == 19 and fleet.pending("work") == 1,
        SETTLE,
        "the other 19 events to be handled and acknowledged",
    )

    victim.send(signal.SIGKILL)
    victim.wait_exit(timeout=5)
    release.touch()
    wait_for(
        lambda: fleet.done_counts()["e10"] == 1 and fleet.pending("work") == 0,
        SETTLE,
        "the surviving worker to take over and finish the killed worker's event",
    )

    assert fleet.done_counts() == Counter(keys), "every event handled to completion exactly once"
    runs = [(s.pid, s.attempt) for s in fleet.steps("start") if s.key == "e10"]
    assert runs == [(victim.proc.pid, 1), (survivor.proc.pid, 2)]
    [finished] = [s for s in fleet.steps("done") if s.key == "e10"]
    assert (finished.pid, finished.attempt) == (survivor.proc.pid, 2)
    taken_over = log_events(survivor, "took over an event")
    assert [e["attempt"] for e in taken_over] == [2], survivor.stderr
    assert survivor.proc.poll() is None
    assert fleet.dead_letters("work") == []


# 4.4 A poison message that kills its worker ends in the DLQ --------------------------------


def test_message_that_kills_its_worker_is_dead_lettered_after_max_retries(
    fleet: Fleet,
) -> None:
    # Concurrency 1 (T_CONCURRENCY's default): a crash takes down every handler its process
    # runs, so healthy events are kept out of the poison message's process at the same time.
    fleet.write_app(POISON_AGENT)
    healthy = [f"h{i}" for i in range(10)]
    # Events published before the first worker starts are handled too (start="earliest").
    payloads: list[dict[str, Any]] = [{"k": k} for k in healthy[:5]]
    payloads += [{"k": "poison", "poison": True}]
    payloads += [{"k": k} for k in healthy[5:]]
    poison_id = fleet.publish(payloads)[5]

    worker, exit_codes = supervise_until_dead_letter(fleet, "work")
    wait_for(
        lambda: set(fleet.done_counts()) == set(healthy) and fleet.settled("work"),
        SETTLE,
        "the healthy events to be handled",
    )

    # max_retries=2: three deliveries, each killing its worker; the fourth delivery goes to
    # the DLQ without running the handler.
    assert exit_codes == [1, 1, 1]
    poison_runs = [s.attempt for s in fleet.steps("start") if s.key == "poison"]
    assert poison_runs == [1, 2, 3]
    [letter] = fleet.dead_letters("work")
    assert letter.error_type == "AttemptsExhausted"
    assert letter.attempts == 4
    assert "without finishing it on all 3 attempts (max_retries=2)" in letter.error_message
    assert letter.envelope is not None and letter.envelope.id == poison_id
    assert letter.agent == "work"
    assert letter.topic == fleet.topic
    assert letter.payload == {"k": "poison", "poison": True}
    # The healthy events all completed, none was dead-lettered, and the last worker lives on.
    assert set(fleet.done_counts()) == set(healthy)
    assert worker.proc.poll() is None, worker.stderr


def test_dead_letter_of_a_message_that_killed_its_worker_names_the_event(fleet: Fleet) -> None:
    fleet.write_app(POISON_AGENT)
    fleet.env["T_MAX_RETRIES"] = "0"
    [poison_id] = fleet.publish([{"k": "poison", "poison": True}])

    _, exit_codes = supervise_until_dead_letter(fleet, "work")

    assert exit_codes == [1]
    [letter] = fleet.dead_letters("work")
    assert (letter.error_type, letter.attempts) == ("AttemptsExhausted", 2)
    assert letter.event_id == poison_id


def test_healthy_events_delivered_alongside_a_poison_message_are_not_dead_lettered(
    fleet: Fleet,
) -> None:
    fleet.write_app(POISON_AGENT)
    fleet.env["T_CONCURRENCY"] = "16"  # the default: the worker fetches all 11 at once
    healthy = [f"h{i}" for i in range(10)]
    payloads: list[dict[str, Any]] = [{"k": k} for k in healthy[:5]]
    payloads += [{"k": "poison", "poison": True}]
    payloads += [{"k": k} for k in healthy[5:]]
    fleet.publish(payloads)

    supervise_until_dead_letter(fleet, "work")
    wait_for(lambda: fleet.settled("work"), SETTLE, "every event to be settled")

    letters = fleet.dead_letters("work")
    assert [letter.payload for letter in letters] == [{"k": "poison", "poison": True}], (
        [(d.payload, d.error_type, d.attempts) for d in letters],
        [(s.phase, s.key, s.attempt, s.pid) for s in fleet.steps()],
    )
    assert set(fleet.done_counts()) == set(healthy)


# 4.2 / scale-out: fan-out to agents, load sharing between processes ------------------------


@on_every_bus
def test_two_worker_processes_share_each_agent_and_every_agent_gets_every_event(
    fleet: Fleet,
) -> None:
    fleet.write_app(FAN_OUT_AGENTS)
    first, second = fleet.start(), fleet.start()
    for w in (first, second):
        wait_for(lambda w=w: w.has_logged("worker started"), STARTUP, "the workers to start")
    keys = [f"e{i}" for i in range(200)]
    fleet.publish([{"k": k} for k in keys])

    wait_for(
        lambda: (
            len(fleet.done_counts("a")) == 200
            and len(fleet.done_counts("b")) == 200
            and fleet.pending("a") == 0
            and fleet.pending("b") == 0
        ),
        SETTLE,
        "both agents to handle all 200 events",
    )

    # Fan-out: each agent handled each event exactly once, over both processes together.
    assert fleet.done_counts("a") == Counter(keys)
    assert fleet.done_counts("b") == Counter(keys)
    # Load sharing: both processes handled some of agent a's events.
    by_pid = Counter(s.pid for s in fleet.steps("done", "a"))
    assert set(by_pid) == {first.proc.pid, second.proc.pid}, by_pid
    assert all(s.attempt == 1 for s in fleet.steps())
    assert first.proc.poll() is None and second.proc.poll() is None


# 4.7 Graceful shutdown with in-flight work -------------------------------------------------


def test_sigterm_finishes_in_flight_handlers_and_leaves_the_rest_to_the_next_worker(
    fleet: Fleet,
) -> None:
    fleet.write_app(SLOW_AGENT)
    fleet.env.update(T_SLEEP="1", T_CONCURRENCY="4")
    first = fleet.start_ready("--shutdown-grace", "10")
    keys = [f"e{i}" for i in range(10)]
    fleet.publish([{"k": k} for k in keys])
    wait_for(lambda: len(fleet.steps("start")) == 4, SETTLE, "four handlers to start")

    first.send(signal.SIGTERM)
    status, _ = first.wait_exit(timeout=8)

    assert status == 0, first.stderr
    started_first = {s.key for s in fleet.steps("start")}
    done_first = {s.key for s in fleet.steps("done")}
    assert len(started_first) == 4, "concurrency 4: only four events fetched"
    assert done_first == started_first, "every handler started before SIGTERM completed"
    # Their acknowledgements were flushed before exit; the rest were never delivered.
    assert fleet.pending("work") == 0

    # Its handlers need not be slow: what it does with the rest is what counts.
    fleet.env["T_SLEEP"] = "0.05"
    second = fleet.start_ready()
    wait_for(
        lambda: len(fleet.done_counts()) == 10 and fleet.pending("work") == 0,
        SETTLE,
        "the second worker to handle the rest",
    )

    assert fleet.done_counts() == Counter(keys), "each event handled once, none twice"
    second_steps = [s for s in fleet.steps("done") if s.pid == second.proc.pid]
    assert {s.key for s in second_steps} == set(keys) - started_first
    assert all(s.attempt == 1 for s in second_steps), "fresh deliveries, not reclaims"
    assert Counter(s.key for s in fleet.steps("start")) == Counter(keys)


# Reconnection after the server restarts ----------------------------------------------------


@pytest.mark.parametrize(
    ("restartable_bus", "server_signal"),
    [
        ("redis", signal.SIGTERM),
        ("redis", signal.SIGKILL),
        # One master of three, crashed and restarted with its AOF (a clean stop costs as long
        # and proves no more).
        ("cluster", signal.SIGKILL),
        # JetStream's file store, after a clean stop and after a crash.
        ("nats", signal.SIGTERM),
        ("nats", signal.SIGKILL),
    ],
    ids=["redis-term", "redis-kill", "cluster-kill", "nats-term", "nats-kill"],
    indirect=["restartable_bus"],
)
def test_worker_reconnects_by_itself_after_the_server_restarts(
    restartable_bus: RestartableBus,
    tmp_path: Path,
    spawn: Callable[..., WorkerProcess],
    server_signal: signal.Signals,
) -> None:
    fleet = _make_fleet(restartable_bus.url, tmp_path, spawn)
    try:
        fleet.write_app(SLOW_AGENT)
        # A reclaim_idle longer than the outage: no event is taken over while its
        # acknowledgement waits for the bus to come back, so none published after it runs twice.
        fleet.env.update(T_SLEEP="0.05", T_CONCURRENCY="2", T_RECLAIM_IDLE="5")
        worker = fleet.start_ready()
        before = [f"b{i}" for i in range(50)]
        fleet.publish([{"k": k} for k in before])
        wait_for(lambda: len(fleet.done_counts()) >= 5, SETTLE, "some events to be handled")

        def unreachable() -> list[dict[str, Any]]:
            """The worker's warnings that it cannot reach the bus."""
            said = ("cannot fetch", "acknowledgements failed", "cannot renew")
            return [
                e
                for e in worker.logs()
                if e["level"] == "warning" and any(m in e["event"] for m in said)
            ]

        restartable_bus.restart(server_signal, fleet.stream_key, lambda: bool(unreachable()))
        fleet.close()  # its connection died with the server
        after = [f"a{i}" for i in range(50)]
        fleet.publish([{"k": k} for k in after])
        wait_for(
            lambda: len(fleet.done_counts()) == 100 and fleet.pending("work") == 0,
            30,
            "all 100 events to be handled after the restart",
        )

        assert worker.proc.poll() is None, "the same worker process reconnected"
        done = fleet.done_counts()
        assert set(done) == set(before) | set(after), "nothing published was lost"
        # Events published after the restart ran once; some before it may have run again
        # (at least once: their acknowledgement may have been lost with the connection).
        assert all(done[k] == 1 for k in after), done
        # The outage was noticed and logged once per outage per agent and component (fetch,
        # acks, lease renewal), not once per retry; a stale pooled connection may fail once
        # more after the reconnect.
        warnings = unreachable()
        assert 1 <= len(warnings) <= 6, worker.stderr
        assert all(e["agent"] == "work" for e in warnings)
        assert all(
            any(kind in e.get("error", "") for kind in restartable_bus.outage_errors)
            for e in warnings
        ), worker.stderr
        problems = [e for e in worker.logs() if e["level"] in ("warning", "error")]
        assert len(problems) <= 10, worker.stderr
    finally:
        fleet.close()


# 4.6 Undecodable entries and invalid payloads go to the DLQ; 4.2 retries go to the failing
# agent alone --------------------------------------------------------------------------------


def test_bad_entries_are_dead_lettered_and_failures_retried_for_the_failing_agent_only(
    fleet: Fleet,
) -> None:
    # One worker process for both (starting one costs seconds): agent `work` reads the fleet's
    # topic, agents `flaky` and `steady` a topic of their own; the handlers share one log.
    retries = _make_fleet(fleet.url, fleet.cwd, fleet.spawn)
    try:
        fleet.write_app(TYPED_AGENT + RETRY_AGENTS)
        worker = fleet.start_ready(T_RETRY_TOPIC=retries.topic)
        keys = [f"e{i}" for i in range(5)]
        retries.publish([{"k": k} for k in keys])
        fleet.publish([{"k": "good1", "n": 1}])
        invalid_id, invalid = encode_new(fleet.topic, {"k": "bad", "n": "not a number"})
        fleet.publish_raw([b"\xff not json", None, invalid])
        fleet.publish([{"k": "good2", "n": 2}])

        wait_for(
            lambda: (
                fleet.done_counts() == Counter(["good1", "good2"])
                and fleet.dlq_length("work") == 3
                and fleet.pending("work") == 0
            ),
            SETTLE,
            "the good events handled and the bad ones dead-lettered",
        )
        wait_for(
            lambda: (
                len(retries.done_counts("flaky")) == 5
                and len(retries.done_counts("steady")) == 5
                and retries.settled("flaky")
                and retries.settled("steady")
            ),
            SETTLE,
            "both agents to finish every event",
        )

        assert worker.proc.poll() is None, worker.stderr
        # Undecodable entries and invalid payloads: dead-lettered without stopping the worker.
        # Handled concurrently: the records may be in any order.
        letters = {letter.entry: letter for letter in fleet.dead_letters("work")}
        garbage_entry = "\\xff not json"  # the undecodable byte kept, backslash-escaped
        assert set(letters) == {garbage_entry, "", invalid.decode()}
        garbage, no_field = letters[garbage_entry], letters[""]
        bad_payload = letters[invalid.decode()]
        assert (garbage.error_type, garbage.event_id) == ("MalformedEnvelope", None)
        assert (no_field.error_type, no_field.event_id) == ("MalformedEnvelope", None)
        assert bad_payload.error_type == "PayloadValidationError"
        assert bad_payload.event_id == invalid_id
        assert bad_payload.payload == {"k": "bad", "n": "not a number"}
        assert "valid integer" in bad_payload.error_message
        for letter in (garbage, no_field, bad_payload):
            assert letter.attempts == 1
            assert (letter.agent, letter.topic) == ("work", fleet.topic)
        assert len(log_events(worker, "event dead-lettered")) == 3

        # Failures: retried for the failing agent alone, the other agent ran each event once.
        attempts: dict[tuple[str, str], list[int]] = defaultdict(list)
        for s in retries.steps("start"):
            attempts[s.agent, s.key].append(s.attempt)
        assert {k: attempts["steady", k] for k in keys} == {k: [1] for k in keys}
        assert {k: attempts["flaky", k] for k in keys} == {k: [1, 2, 3] for k in keys}
        assert retries.done_counts("flaky") == Counter(keys)
        assert all(s.attempt == 3 for s in retries.steps("done", "flaky"))
        assert retries.done_counts("steady") == Counter(keys)
        assert retries.dead_letters("flaky") == []
        assert retries.dead_letters("steady") == []
        assert len(log_events(worker, "will retry")) == 10
    finally:
        retries.close()


# 4.5 Long handlers keep their lease ------------------------------------------------------


def test_handler_longer_than_reclaim_idle_runs_once(fleet: Fleet) -> None:
    fleet.write_app(SLOW_AGENT)  # reclaim_idle=1 s
    # 2.5 reclaim_idle: its lease is renewed 7 times, the other worker looks for idle events
    # to take over 5 times meanwhile.
    fleet.env.update(T_SLEEP="2.5", T_CONCURRENCY="4")
    workers = [fleet.start(), fleet.start()]
    for w in workers:
        wait_for(lambda w=w: w.has_logged("worker started"), STARTUP, "the workers to start")
    fleet.publish([{"k": "long"}])

    wait_for(
        lambda: fleet.done_counts()["long"] == 1 and fleet.pending("work") == 0,
        SETTLE,
        "the long handler to finish",
    )

    runs = [(s.phase, s.attempt) for s in fleet.steps()]
    assert runs == [("start", 1), ("done", 1)], "ran exactly once, never taken over"
    for w in workers:
        assert log_events(w, "took over") == [], w.stderr
        assert w.proc.poll() is None
