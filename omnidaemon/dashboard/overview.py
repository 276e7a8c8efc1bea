"""What the overview shows: the bus's health, live workers, and every agent's counts, rates,
lag and oldest pending event, read from the bus as `omnidaemon health` and `metrics` do."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from omnidaemon.app import App
from omnidaemon.brokers.base import GroupInfo
from omnidaemon.dashboard.rates import COUNTS, RateHistory, Sparkline, sparkline
from omnidaemon.fleet import HealthReport, WorkerStatus, check_health, fleet_metrics
from omnidaemon.metrics import AgentMetricsSnapshot

__all__ = ["AgentRow", "Overview", "WorkerRow", "read_overview"]

_TIMEOUT = 3.0  # seconds the bus may take: a live page must not hang on a stuck bus


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """A live worker as the overview lists it."""

    id: str
    app: str
    host: str
    pid: int
    agents: list[str]
    in_flight: int
    uptime: float
    beat_age: float


@dataclass(frozen=True, slots=True)
class AgentRow:
    """An agent's line in the overview: counts, live rates, and its consumer group's state."""

    topic: str
    agent: str
    declared: bool  # by this app (else seen on the bus only)
    counts: dict[str, int]
    in_flight: int
    throttled: int
    lag: int | None
    pending: int
    oldest_pending_age: float | None
    dead_letters: int
    charts: dict[str, Sparkline] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Overview:
    """Everything the overview page shows."""

    status: str  # healthy, degraded, down
    bus: str
    problems: list[str]
    workers: list[WorkerRow]
    agents: list[AgentRow]
    read_at: datetime


def _worker_row(worker: WorkerStatus, now: datetime) -> WorkerRow:
    agents: dict[str, Any] = dict(worker.agents)
    return WorkerRow(
        id=worker.id,
        app=worker.app,
        host=worker.host,
        pid=worker.pid,
        agents=sorted(agents),
        in_flight=sum(int(a.get("in_flight", 0)) for a in agents.values()),
        uptime=(now - worker.started_at).total_seconds(),
        beat_age=(now - worker.beat_at).total_seconds(),
    )


def _agent_rows(
    app: App,
    health: HealthReport,
    snapshots: list[AgentMetricsSnapshot],
    history: RateHistory,
) -> list[AgentRow]:
    groups: dict[tuple[str, str], GroupInfo] = {(g.topic, g.group): g for g in health.groups}
    by_key = {(s.topic, s.agent): s for s in snapshots}
    declared = {(spec.topic, spec.name) for spec in app.agents.values()}
    rows = []
    for topic, agent in sorted(declared | set(by_key)):
        snapshot = by_key.get((topic, agent)) or AgentMetricsSnapshot(topic, agent)
        group = groups.get((topic, agent))
        rates = history.rates(topic, agent)
        rows.append(
            AgentRow(
                topic=topic,
                agent=agent,
                declared=(topic, agent) in declared,
                counts={name: int(getattr(snapshot, name)) for name in COUNTS},
                in_flight=snapshot.in_flight,
                throttled=snapshot.throttled,
                lag=group.lag if group is not None else None,
                pending=group.pending if group is not None else 0,
                oldest_pending_age=group.oldest_pending_age if group is not None else None,
                dead_letters=group.dead_letters if group is not None else 0,
                charts={name: sparkline(rates[name]) for name in COUNTS},
            )
        )
    return rows


async def read_overview(app: App, history: RateHistory) -> Overview:
    """Read the overview from `app`'s bus (a bus that does not answer gives status `down`
    and no agents' counts, never an error)."""
    now = datetime.now(UTC)
    health = await check_health(app.broker, timeout=_TIMEOUT)
    snapshots: list[AgentMetricsSnapshot] = []
    if health.status != "down":
        try:
            snapshots = await fleet_metrics(app.broker, workers=list(health.workers))
        except Exception:  # the bus went away between the two reads: show what was read
            snapshots = []
        history.record(snapshots)
    return Overview(
        status=health.status,
        bus=health.bus,
        problems=list(health.problems),
        workers=[_worker_row(w, now) for w in health.workers],
        agents=_agent_rows(app, health, snapshots, history),
        read_at=now,
    )
