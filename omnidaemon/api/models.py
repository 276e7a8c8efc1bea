"""The HTTP API's bodies, as pydantic models: FastAPI validates requests with them and writes
the OpenAPI schema from them. Response bodies are defined here, request bodies in `bodies`.

Responses carry the same fields as the matching command's `--json` output, wrapped in an
object (`{"topics": [...]}`) so that fields can be added later without breaking clients.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# The request bodies live in `bodies`; they are named here too, with every other model.
from omnidaemon.api.bodies import PublishRequest, ReplayRequest, ReplyRequest, TopicName
from omnidaemon.progress import AgentProgress, PublishedEvent
from omnidaemon.results import Result

__all__ = [
    "AgentInfo",
    "AgentList",
    "AgentMetrics",
    "BackoffInfo",
    "BusInfo",
    "BusNode",
    "BusStatsResponse",
    "BusTotals",
    "ConsumerInfo",
    "DeadLetterList",
    "DeadLetterRecord",
    "DeadLettersPurged",
    "Entry",
    "EntryList",
    "ErrorResponse",
    "EventResults",
    "GroupInfo",
    "GroupList",
    "HealthGroup",
    "HealthResponse",
    "Histogram",
    "MetricsResponse",
    "ProbeResponse",
    "PublishRequest",
    "PublishResponse",
    "ReplayRequest",
    "ReplayResponse",
    "UndecodableDeadLetter",
    "ReplyRequest",
    "ReplyResponse",
    "TopicInfo",
    "TopicList",
    "TopicName",
    "TopicPurged",
    "WorkerInfo",
]


class ErrorResponse(BaseModel):
    """What every error answers: a code for programs and one line for people."""

    code: str = Field(
        description=(
            "`bad_request`, `unauthorized`, `forbidden`, `not_found`, `invalid_json`, "
            "`invalid_request`, `invalid_payload`, `payload_too_large`, "
            "`unsupported_media_type`, `agent_failed`, `timeout`, `bus_unavailable`, "
            "`method_not_allowed` or `internal_error`."
        ),
        examples=["not_found"],
    )
    message: str = Field(examples=["no topic 'document.uploaded' on the bus"])
    details: list[dict[str, Any]] | None = Field(
        default=None, description="Per field, what is wrong (`invalid_request` only)."
    )


class PublishResponse(BaseModel):
    """A published event."""

    event_id: str = Field(description="The event's id (a UUIDv7).")
    topic: str


class ReplyResponse(BaseModel):
    """The handling agent's reply to a request."""

    topic: str
    reply: Any = Field(description="The handler's return value, as JSON.")


class EventResults(BaseModel):
    """The stored results of an event, one per agent with `store_results=True` that handled
    it; when none is stored, what the bus knows instead: the topic holding the event, each
    reading agent's progress, and the events its handlers published (follow a pipeline with
    their ids)."""

    event_id: str
    results: list[Result]
    topic: str | None = None
    agents: list[AgentProgress] = []
    published: list[PublishedEvent] = []


class BackoffInfo(BaseModel):
    """An agent's retry backoff: `initial` seconds, times `factor` per retry, at most
    `maximum`, with `jitter`."""

    initial: float
    factor: float
    maximum: float
    jitter: bool = Field(description="Whether each delay is randomised (50% to 100%).")


class AgentInfo(BaseModel):
    """An agent of the app (`omnidaemon agents --json`)."""

    name: str
    topic: str
    payload_type: str
    return_type: str
    payload_schema: dict[str, Any] | None = Field(description="JSON Schema of the payload.")
    return_schema: dict[str, Any] | None = Field(description="JSON Schema of the return value.")
    publishes: str | None
    description: str | None
    handler: str = Field(description="The handler's module and qualified name.")
    max_retries: int
    backoff: BackoffInfo
    concurrency: int
    timeout: float | None
    reclaim_idle: float
    start: Literal["earliest", "latest"]
    store_results: bool
    idempotent: bool
    flow: dict[str, Any] | None = Field(
        default=None,
        description="Flow control (rate_limit, rate_limit_keyed, key_concurrency, budgets, "
        "estimate), or null when the agent declares none.",
    )
    debounce: dict[str, Any] | None = Field(
        default=None,
        description="Debounce (seconds, max_wait, keyed, max_messages, max_bytes, batch_topic, "
        "check_topic), or null when the agent is not debounced.",
    )


class AgentList(BaseModel):
    """The agents an app declares."""

    app: str
    agents: list[AgentInfo]


class ConsumerInfo(BaseModel):
    """A consumer (a worker's reader) of a group."""

    name: str
    pending: int
    idle: float = Field(description="Seconds since it last fetched or renewed anything.")


class GroupInfo(BaseModel):
    """A consumer group: one agent on one topic, as the bus sees it."""

    topic: str
    agent: str
    consumers: int
    pending: int = Field(description="Handed out and not finished.")
    lag: int | None = Field(description="Not handed out yet; null when the bus cannot tell.")
    retries: int = Field(description="Retries scheduled.")
    dead_letters: int
    oldest_pending_age: float | None = Field(description="Seconds; null when none pending.")
    consumer_details: list[ConsumerInfo] = Field(default_factory=list)


class TopicInfo(BaseModel):
    """A topic with its groups (`omnidaemon bus list`)."""

    topic: str
    length: int = Field(description="Entries the topic holds.")
    delayed: int = Field(description="Entries published with a delay, not yet due.")
    delayed_bytes: int | None = Field(
        description=(
            "What the delayed entries take, in bytes (on Redis the server's estimate of its "
            "memory); null when the bus cannot tell. Delayed entries are not trimmed with "
            "the topic."
        )
    )
    groups: list[GroupInfo]


class TopicList(BaseModel):
    """Every topic on the bus."""

    topics: list[TopicInfo]


class GroupList(BaseModel):
    """A topic's groups with their consumers (`omnidaemon bus groups`)."""

    topic: str
    length: int
    groups: list[GroupInfo]


class Entry(BaseModel):
    """A topic's entry, decoded: the envelope's fields, or `unreadable` text for an entry
    that is not an envelope."""

    model_config = ConfigDict(extra="allow")

    entry_id: str = Field(description="The bus's id of the entry.")
    id: str | None = Field(default=None, description="The event's id.")
    topic: str | None = None
    payload: Any = None
    created_at: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    reply_to: str | None = None
    webhook: str | None = None
    source: str | None = None
    tenant_id: str | None = None
    headers: dict[str, Any] | None = None
    unreadable: str | None = None


class EntryList(BaseModel):
    """A topic's most recent entries, oldest first (`omnidaemon bus inspect`)."""

    topic: str
    entries: list[Entry]


class TopicPurged(BaseModel):
    """What a purged topic held."""

    topic: str
    entries: int
    agents: list[str]


class Histogram(BaseModel):
    """Durations in seconds: quantiles within 1.92 % of a real observation (from 0.1 ms to a
    day), never outside `min` and `max`."""

    count: int
    sum: float
    mean: float | None
    min: float | None = Field(description="The smallest observation (null if unknown).")
    max: float | None = Field(description="The largest observation (null if unknown).")
    p50: float | None
    p90: float | None
    p99: float | None
    buckets: dict[str, int] = Field(description="Observations at or below each bound.")


class AgentMetrics(BaseModel):
    """An agent's counts, summed over every worker (`omnidaemon metrics`)."""

    topic: str
    agent: str
    received: int
    succeeded: int
    failed: int
    retried: int
    dead_lettered: int
    throttled: int = 0
    expired: int = 0
    cancelled: int = 0
    in_flight: int
    duration_seconds: Histogram
    latency_seconds: Histogram
    wait_seconds: Histogram | None = None


class MetricsResponse(BaseModel):
    """Every agent's metrics."""

    metrics: list[AgentMetrics]


class WorkerInfo(BaseModel):
    """A live worker, from its heartbeat."""

    id: str
    app: str
    host: str
    pid: int
    version: str
    started_at: datetime
    beat_at: datetime
    in_flight: int
    agents: dict[str, dict[str, Any]]


class BusInfo(BaseModel):
    """The bus health was checked on."""

    url: str = Field(description="Password masked.")
    reachable: bool


class HealthGroup(BaseModel):
    """A consumer group's backlog."""

    topic: str
    agent: str
    lag: int | None
    pending: int
    retries: int
    dead_letters: int
    oldest_pending_age: float | None


class HealthResponse(BaseModel):
    """The health of the bus and the fleet (`omnidaemon health`)."""

    status: Literal["healthy", "degraded", "down"]
    bus: BusInfo
    problems: list[str]
    workers: list[WorkerInfo]
    groups: list[HealthGroup]


class ProbeResponse(BaseModel):
    """Whether this server can serve: it runs and the bus answers."""

    status: Literal["ok", "unavailable"]


class BusTotals(BaseModel):
    """Sums over the whole bus."""

    topics: int
    entries: int
    delayed: int = Field(description="Entries published with a delay, not yet due.")
    delayed_bytes: int = Field(
        description="What they take, in bytes (see `TopicInfo.delayed_bytes`)."
    )
    agents: int
    lag: int
    pending: int
    retries: int
    dead_letters: int
    workers: int
    in_flight: int


class BusNode(BaseModel):
    """One server of a bus made of several (a Redis Cluster node)."""

    address: str = Field(description="`host:port`.")
    role: str = Field(description="`master`, `replica`, or `failed` (seen down by the others).")
    slots: int = Field(description="Hash slots it serves (0 for replicas).")
    replica_of: str | None = Field(description="The master a replica copies.")
    topics: int = Field(description="Topics whose slot it serves (0 for replicas).")
    used_memory: str = Field(description="As the server writes it (`1.20M`); `?` if down.")
    clients: int = Field(description="Connected clients; -1 if down.")


class BusStatsResponse(BaseModel):
    """The bus at a glance (`omnidaemon bus stats`)."""

    bus: str = Field(description="The bus's URL, password masked.")
    server: dict[str, str]
    totals: BusTotals
    workers: list[WorkerInfo]
    nodes: list[BusNode] = Field(
        default_factory=list,
        description="A Redis Cluster's nodes, masters first; empty for a single server.",
    )


class DeadLetterRecord(BaseModel):
    """A dead-lettered event, with why it is there."""

    event_id: str | None = Field(description="Null when the entry could not be decoded.")
    topic: str
    agent: str
    entry: str = Field(description="The bus entry exactly as it was published.")
    error_type: str
    error_message: str
    traceback: str | None
    attempts: int
    failed_at: datetime
    payload: Any = Field(description="The event's payload; null when unreadable.")


class UndecodableDeadLetter(BaseModel):
    """A record in a dead-letter queue that is not a readable dead letter (written into the bus
    by hand, or damaged): skipped by listings, left in place by replays."""

    record_id: str = Field(description="Its id in the queue (on Redis, the stream entry id).")
    topic: str
    agent: str
    reason: str = Field(description="Why it cannot be read.")


class DeadLetterList(BaseModel):
    """Dead letters, oldest first (`omnidaemon bus dlq`)."""

    dead_letters: list[DeadLetterRecord]
    undecodable: list[UndecodableDeadLetter] = Field(
        default_factory=list, description="Records among the most recent that cannot be read."
    )


class ReplayResponse(BaseModel):
    """What a replay did, or would do (`dry_run`)."""

    topic: str
    agent: str
    dry_run: bool
    replayed: int = Field(description="Events re-queued (0 in a dry run).")
    event_ids: list[str | None] = Field(
        description="The events chosen (null for an unreadable record)."
    )
    missing: list[str] = Field(description="Named events not in the agent's dead letters.")
    undecodable: list[UndecodableDeadLetter] = Field(
        default_factory=list, description="Records that cannot be read: not replayed, kept."
    )


class DeadLettersPurged(BaseModel):
    """How many dead letters a purge removed."""

    topic: str
    agent: str | None
    removed: int
