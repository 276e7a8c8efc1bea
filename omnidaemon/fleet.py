"""The operator's view of the whole fleet: live workers, summed metrics and health.

Everything here reads the bus only: it works from any machine that reaches the bus, without the
app's code, for every worker at once. The CLI's `metrics`, `health` and `bus stats` commands are
thin shells around it. A topic's priority lanes are part of the topic (`omnidaemon.lanes_view`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import anyio
import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.brokers.inspection import GroupInfo, NodeInfo, TopicInfo
from omnidaemon.lanes import split_lane_topic
from omnidaemon.lanes_view import describe_with_lanes, topic_lanes
from omnidaemon.metrics import AgentMetricsSnapshot, is_extreme
from omnidaemon.requests import REPLY_PREFIX
from omnidaemon.worker.heartbeat import HEARTBEAT_PREFIX

__all__ = [
    "BusStats",
    "HealthReport",
    "HealthStatus",
    "WorkerStatus",
    "bus_stats",
    "check_health",
    "describe_topics",
    "fleet_metrics",
    "group_infos",
    "live_workers",
]

HealthStatus = Literal["healthy", "degraded", "down"]


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """A live worker, from its latest heartbeat.

    Attributes:
        id: The worker's consumer name (`<host>:<pid>:<6 hex digits>`, unique per worker).
        app: Its app's name.
        host: The machine it runs on.
        pid: Its process id.
        version: The omnidaemon version it runs.
        started_at: When it started.
        beat_at: When it last said it lives.
        agents: Per agent it runs: `topic`, `concurrency`, `in_flight` and its own counts
            (`received`, `succeeded`, `failed`, `retried`, `dead_lettered`).
    """

    id: str
    app: str
    host: str
    pid: int
    version: str
    started_at: datetime
    beat_at: datetime
    agents: Mapping[str, Mapping[str, Any]]

    @property
    def in_flight(self) -> int:
        """Handlers this worker runs now, over all its agents."""
        return sum(int(a.get("in_flight", 0)) for a in self.agents.values())

    def to_json(self) -> dict[str, Any]:
        """The status as JSON data."""
        return {
            "id": self.id,
            "app": self.app,
            "host": self.host,
            "pid": self.pid,
            "version": self.version,
            "started_at": self.started_at.isoformat(),
            "beat_at": self.beat_at.isoformat(),
            "in_flight": self.in_flight,
            "agents": {name: dict(info) for name, info in self.agents.items()},
        }


async def live_workers(broker: Broker) -> list[WorkerStatus]:
    """Every worker whose heartbeat has not expired, sorted by host and pid.

    A record that cannot be read (another version's, say) is skipped.
    """
    workers = []
    for value in (await broker.scan_values(HEARTBEAT_PREFIX)).values():
        try:
            data = orjson.loads(value)
            workers.append(
                WorkerStatus(
                    id=str(data["id"]),
                    app=str(data.get("app", "")),
                    host=str(data.get("host", "")),
                    pid=int(data.get("pid", 0)),
                    version=str(data.get("version", "")),
                    started_at=datetime.fromisoformat(data["started_at"]),
                    beat_at=datetime.fromisoformat(data["beat_at"]),
                    agents=dict(data.get("agents", {})),
                )
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    workers.sort(key=lambda w: (w.host, w.pid, w.id))
    return workers


def _topic_of(name: str) -> str:
    """The agent's own topic of a bus topic: a debounced agent's checks and batches topics
    (`T#debounce.A`) are its topic's (`T`), which its workers' heartbeats name."""
    from omnidaemon.debounce import is_internal_topic

    return name.partition("#")[0] if is_internal_topic(name) else name


def _in_flight_by_agent(workers: list[WorkerStatus]) -> dict[tuple[str, str], int]:
    found: dict[tuple[str, str], int] = {}
    for worker in workers:
        for agent, info in worker.agents.items():
            key = (str(info.get("topic", "")), agent)
            found[key] = found.get(key, 0) + int(info.get("in_flight", 0))
    return found


async def fleet_metrics(
    broker: Broker,
    *,
    topic: str | None = None,
    agent: str | None = None,
    workers: list[WorkerStatus] | None = None,
) -> list[AgentMetricsSnapshot]:
    """Every agent's metrics summed over every worker that ever ran it, sorted by topic and
    agent; in flight comes from the live workers' heartbeats.

    Args:
        topic: Only this topic's agents.
        agent: Only this agent.
        workers: Live workers already read (saves a round trip).
    """
    if workers is None:
        workers = await live_workers(broker)
    in_flight = _in_flight_by_agent(workers)
    fields = _fold_lanes(await broker.stats())
    keys = set(fields) | set(in_flight)
    snapshots = [
        AgentMetricsSnapshot.from_fields(
            t, a, fields.get((t, a), {}), in_flight=in_flight.get((t, a), 0)
        )
        for t, a in sorted(keys)
        if (topic is None or t == topic) and (agent is None or a == agent)
    ]
    return snapshots


def _fold_lanes(
    fields: Mapping[tuple[str, str], Mapping[str, int]],
) -> dict[tuple[str, str], dict[str, int]]:
    """`Broker.stats` with the fields of a lane's `(topic, group)` folded into the topic's:
    sums summed, extremes (`omnidaemon.metrics.is_extreme`) kept extreme. Workers write an
    agent's metrics to its topic's group alone: this only keeps lanes out of the listing."""
    folded: dict[tuple[str, str], dict[str, int]] = {}
    for (topic, group), values in fields.items():
        into = folded.setdefault((split_lane_topic(topic)[0], group), {})
        for name, value in values.items():
            if name in into and is_extreme(name):
                value = (min if name.endswith(":min_us") else max)(into[name], value)
            elif name in into:
                value += into[name]
            into[name] = value
    return folded


async def describe_topics(broker: Broker, *, include_replies: bool = False) -> list[TopicInfo]:
    """Every topic on the bus with its groups, sorted by name, each with its priority lanes
    merged in (`omnidaemon.lanes_view.merge_lanes`): a lane is never listed as a topic.

    The reply topics of requests in progress (`omni-reply.*`) are left out unless
    `include_replies`.
    """
    infos = []
    for name, lanes in (await topic_lanes(broker)).items():
        if not include_replies and name.startswith(REPLY_PREFIX):
            continue
        info = await describe_with_lanes(broker, name, lanes=lanes)
        if info is not None:
            infos.append(info)
    return infos


async def group_infos(broker: Broker, *, include_replies: bool = False) -> list[GroupInfo]:
    """Every consumer group on the bus, sorted by topic and group (reply topics of requests
    in progress left out unless `include_replies`)."""
    topics = await describe_topics(broker, include_replies=include_replies)
    return [group for topic in topics for group in topic.groups]


@dataclass(frozen=True, slots=True)
class BusStats:
    """The bus at a glance (`omnidaemon bus stats`).

    Attributes:
        bus: The bus's URL (password masked).
        server: What the bus's server says of itself (kind, version, memory).
        totals: Sums over the bus, in display order: `topics`, `entries`, `delayed`,
            `delayed_bytes`, `agents`, `lag`, `pending`, `retries`, `dead_letters`, `workers`,
            `in_flight`. `delayed_bytes` counts the topics whose bus can tell (see
            `TopicInfo.delayed_bytes`).
        workers: The live workers.
        nodes: The bus's servers when it has several (a Redis Cluster's nodes), else empty.
    """

    bus: str
    server: Mapping[str, str]
    totals: Mapping[str, int]
    workers: tuple[WorkerStatus, ...]
    nodes: tuple[NodeInfo, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stats as JSON data."""
        return {
            "bus": self.bus,
            "server": dict(self.server),
            "totals": dict(self.totals),
            "workers": [w.to_json() for w in self.workers],
            "nodes": [dataclasses.asdict(node) for node in self.nodes],
        }


async def bus_stats(broker: Broker) -> BusStats:
    """Read the bus's server info, its totals over every topic and agent, and the live
    workers (reply topics of requests in progress left out)."""
    server = await broker.server_info()
    topics = await describe_topics(broker)
    workers = await live_workers(broker)
    groups = [g for t in topics for g in t.groups]
    totals = {
        "topics": len(topics),
        "entries": sum(t.length for t in topics),
        "delayed": sum(t.delayed for t in topics),
        "delayed_bytes": sum(t.delayed_bytes or 0 for t in topics),
        "agents": len(groups),
        "lag": sum(g.lag or 0 for g in groups),
        "pending": sum(g.pending for g in groups),
        "retries": sum(g.retries for g in groups),
        "dead_letters": sum(g.dead_letters for g in groups),
        "workers": len(workers),
        "in_flight": sum(w.in_flight for w in workers),
    }
    nodes = tuple(await broker.nodes())
    return BusStats(broker.url, server, totals, tuple(workers), nodes)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """What `omnidaemon health` found.

    Attributes:
        status: `healthy`, `degraded` (the bus answers but something needs a look) or `down`
            (the bus does not answer).
        bus: The bus's URL (password masked).
        problems: One line per reason the status is not `healthy`.
        workers: The live workers.
        groups: Every consumer group with its lag, pending and dead letters.
    """

    status: HealthStatus
    bus: str
    problems: tuple[str, ...] = ()
    workers: tuple[WorkerStatus, ...] = ()
    groups: tuple[GroupInfo, ...] = field(default=())

    @property
    def exit_code(self) -> int:
        """0 healthy, 1 degraded, 2 down: the exit status of `omnidaemon health`."""
        return {"healthy": 0, "degraded": 1, "down": 2}[self.status]

    def to_json(self) -> dict[str, Any]:
        """The report as JSON data."""
        return {
            "status": self.status,
            "bus": {"url": self.bus, "reachable": self.status != "down"},
            "problems": list(self.problems),
            "workers": [w.to_json() for w in self.workers],
            "groups": [
                {
                    "topic": g.topic,
                    "agent": g.group,
                    "lag": g.lag,
                    "pending": g.pending,
                    "retries": g.retries,
                    "dead_letters": g.dead_letters,
                    "oldest_pending_age": g.oldest_pending_age,
                }
                for g in self.groups
            ],
        }


async def check_health(
    broker: Broker,
    *,
    max_lag: int = 10_000,
    max_pending_age: float = 300.0,
    max_dead_letters: int | None = None,
    timeout: float = 5.0,
) -> HealthReport:
    """Check the bus and the fleet.

    `down` when the bus does not answer within `timeout` seconds (or refuses to connect).
    `degraded` when a group has work waiting and no live worker runs its agent, when no worker
    is alive at all while agents exist, when a group's lag exceeds `max_lag`, when its oldest
    pending delivery is older than `max_pending_age` seconds, or when its dead-letter queue
    holds more than `max_dead_letters` records (not checked when `None`).
    """
    try:
        with anyio.fail_after(timeout):
            await broker.connect()
            await broker.ping()
            workers = await live_workers(broker)
            groups = await group_infos(broker)
    except Exception as exc:
        reason = "no answer" if isinstance(exc, TimeoutError) else type(exc).__name__
        detail = str(exc).splitlines()[0] if str(exc) else ""
        problem = f"the bus at {broker.url} is unreachable ({reason}{': ' if detail else ''}"
        return HealthReport("down", broker.url, (f"{problem}{detail})",))
    served = {
        (str(info.get("topic", "")), agent) for w in workers for agent, info in w.agents.items()
    }
    problems = []
    if groups and not workers:
        problems.append("no worker is alive")
    for g in groups:
        name = f"{g.topic}/{g.group}"
        waiting = (g.lag or 0) + g.pending + g.retries
        if workers and waiting and (_topic_of(g.topic), g.group) not in served:
            problems.append(f"{name}: {waiting} events wait and no live worker runs this agent")
        if g.lag is not None and g.lag > max_lag:
            problems.append(f"{name}: lag {g.lag} is above {max_lag}")
        if g.oldest_pending_age is not None and g.oldest_pending_age > max_pending_age:
            problems.append(
                f"{name}: oldest pending event is {g.oldest_pending_age:.0f} s old "
                f"(above {max_pending_age:g} s)"
            )
        if max_dead_letters is not None and g.dead_letters > max_dead_letters:
            problems.append(f"{name}: {g.dead_letters} dead letters (above {max_dead_letters})")
    return HealthReport(
        "degraded" if problems else "healthy",
        broker.url,
        tuple(problems),
        tuple(workers),
        tuple(groups),
    )
