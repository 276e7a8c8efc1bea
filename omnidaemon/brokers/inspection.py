"""What a bus tells operators about itself: its servers, topics, consumer groups and
consumers (`Broker.nodes`, `Broker.describe`), as `omnidaemon bus`, the HTTP API and the
dashboard show them."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ConsumerInfo", "GroupInfo", "NodeInfo", "TopicInfo"]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One server of a bus made of several (a Redis Cluster's nodes), as `bus stats` lists it.

    Attributes:
        address: `host:port`.
        role: `master` or `replica`; `failed` when the others see it down.
        slots: Hash slots it serves (masters; 0 for replicas).
        replica_of: The master a replica copies (its address), else `None`.
        topics: Topics whose slot it serves (masters; 0 for replicas).
        used_memory: Memory the server says it uses, as it writes it (`1.20M`); `?` if down.
        clients: Connected clients; -1 if down.
    """

    address: str
    role: str
    slots: int
    replica_of: str | None
    topics: int
    used_memory: str
    clients: int


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of a group, as the bus sees it.

    Attributes:
        name: The consumer's name (`<host>:<pid>:<6 hex digits>` for omnidaemon workers).
        pending: Deliveries it holds unsettled.
        idle: Seconds since it last fetched or renewed anything.
    """

    name: str
    pending: int
    idle: float


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group (one agent) on a topic, as the bus sees it.

    Attributes:
        topic: The topic the group reads.
        group: The group's (agent's) name.
        consumers: How many consumers the bus knows in the group, live or not.
        pending: Deliveries handed out and not settled yet (first attempts and retries).
        lag: Entries of the topic the group has not been handed yet; `None` when the bus
            cannot tell (Redis after some trims and deletions).
        retries: Retries scheduled for later or due and not handed out yet.
        dead_letters: Records in the group's dead-letter queue.
        oldest_pending_age: Seconds since the oldest pending delivery's entry was published;
            `None` when nothing is pending.
        consumer_details: The consumers, when asked for.
    """

    topic: str
    group: str
    consumers: int
    pending: int
    lag: int | None
    retries: int
    dead_letters: int
    oldest_pending_age: float | None
    consumer_details: tuple[ConsumerInfo, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """One topic, as the bus sees it.

    Attributes:
        topic: The topic's name.
        length: Entries the topic holds now.
        delayed: Entries published with a delay, not yet appended.
        groups: The topic's consumer groups, by name.
        delayed_bytes: What the delayed entries take: on Redis, the server's estimate of the
            memory their sorted set uses (`MEMORY USAGE`); in memory, their sizes summed.
            `None` when the bus cannot tell. Delayed entries are not trimmed with the stream
            (`stream_maxlen`), so this is where a bus can fill up unseen.
    """

    topic: str
    length: int
    delayed: int
    groups: tuple[GroupInfo, ...]
    delayed_bytes: int | None = 0
