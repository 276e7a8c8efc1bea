"""Looking into the bus and repairing it: topics, their entries and groups, dead letters,
replay and purge.

These read and change the bus only (no app code needed). `omnidaemon bus ...` and the HTTP
API's topic and dead-letter endpoints are thin shells around them, so both behave the same.
Every function takes a connected broker; a topic or agent that is not on the bus is a
`NotFound` whose message names it. A topic is seen with its priority lanes as one topic
(`omnidaemon.lanes_view`): its numbers, entries and dead letters are its lanes' merged, and
replay, purge and delete act on every lane (a replayed event goes back into its own lane).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

from omnidaemon import lanes_view
from omnidaemon.brokers.base import Broker, GroupInfo, Subscription, TopicInfo
from omnidaemon.dead_letters import DeadLetter, ReplaySelection, UndecodableRecord
from omnidaemon.envelope import Envelope, new_event_id
from omnidaemon.errors import NotFound, PayloadValidationError
from omnidaemon.lanes import Lane, lane_topic
from omnidaemon.topology import type_name

__all__ = [
    "DeadLetterListing",
    "ReplayOutcome",
    "ReplayPreview",
    "find_dead_letters",
    "find_dead_letter",
    "preview_replay",
    "purge_backlog",
    "purge_dead_letters",
    "purge_topic",
    "recent_entries",
    "replay_corrected",
    "replay_dead_letters",
    "require_group",
    "require_topic",
]


async def require_topic(broker: Broker, topic: str, *, consumers: bool = False) -> TopicInfo:
    """The topic's length, delayed entries and groups (with their consumers when `consumers`),
    its priority lanes' included.

    Raises:
        NotFound: the bus has no such topic.
    """
    info, _ = await lanes_view.require_lanes(broker, topic, consumers=consumers)
    return info


async def require_group(broker: Broker, topic: str, agent: str) -> GroupInfo:
    """The consumer group of `agent` on `topic` (its numbers on the priority lanes included).

    Raises:
        NotFound: no agent of that name reads the topic (or there is no such topic).
    """
    group, _ = await lanes_view.require_group_lanes(broker, topic, agent)
    return group


# The envelope fields shown as text; an entry with any of them of another type is no envelope.
_TEXT_FIELDS = (
    "id",
    "topic",
    "created_at",
    "correlation_id",
    "causation_id",
    "reply_to",
    "webhook",
    "source",
    "tenant_id",
    "unreadable",
)


def _decode_entry(entry_id: str, data: bytes, lane: Lane = "normal") -> dict[str, Any]:
    # An entry of a priority lane says which (`priority`); the topic's own entries as before.
    lane_field = {} if lane == "normal" else {"priority": lane}
    try:
        envelope = orjson.loads(data)
        if not isinstance(envelope, dict):
            raise ValueError("not an object")
        # Anyone can XADD to a topic: an object whose fields have the wrong types is shown
        # as text too, rather than break whoever displays it (the API's model, a table).
        if any(not isinstance(envelope.get(f, ""), str | None) for f in _TEXT_FIELDS) or not (
            isinstance(envelope.get("headers", {}), dict | None)
        ):
            raise ValueError("not an envelope")
    except ValueError:
        # Another producer's entry, or a damaged one: shown as text, not an error.
        return {"entry_id": entry_id, "unreadable": data.decode("utf-8", "replace"), **lane_field}
    return {**envelope, "entry_id": entry_id, **lane_field}


async def recent_entries(broker: Broker, topic: str, limit: int) -> list[dict[str, Any]]:
    """The topic's `limit` most recent entries, oldest first, each decoded: its bus id as
    `entry_id` and the envelope's fields (`id`, `created_at`, `payload`, ...), or `entry_id`
    and `unreadable` (the raw text) for an entry that is not a JSON object or whose envelope
    fields have the wrong types. Entries of the topic's priority lanes are among them, each
    with `priority` (`high` or `low`), in time order (`omnidaemon.lanes_view`).

    Raises:
        NotFound: the bus has no such topic.
    """
    _, lanes = await lanes_view.require_lanes(broker, topic)
    found = await lanes_view.entries_with_lanes(broker, topic, limit, lanes=list(lanes))
    return [_decode_entry(e.id, e.data, e.lane) for e in found]


@dataclass(frozen=True, slots=True)
class DeadLetterListing:
    """Dead letters found, and the records among the most recent that could not be read.

    Attributes:
        letters: The dead letters, oldest first.
        undecodable: Records of the queues looked at that are not readable dead letters
            (written into the bus by hand, or damaged): skipped, not an error.
    """

    letters: tuple[DeadLetter, ...]
    undecodable: tuple[UndecodableRecord, ...]


async def find_dead_letters(
    broker: Broker, *, topic: str | None = None, agent: str | None = None, limit: int = 20
) -> DeadLetterListing:
    """The `limit` most recent dead letters, oldest first, of every topic or only `topic`,
    of every agent or only `agent`, and the records among each queue's `limit` most recent
    that could not be read.

    Raises:
        NotFound: `topic` was given and the bus has no such topic, or `agent` was given and
            reads no topic searched (a typo must not look like an empty queue).
    """
    letters: list[DeadLetter] = []
    undecodable: list[UndecodableRecord] = []
    names = (
        {topic: lanes_view.VIEW_ORDER}
        if topic is not None
        else await lanes_view.topic_lanes(broker)
    )
    agent_seen = False
    for name, listed in names.items():
        lanes = await lanes_view.describe_lanes(broker, name, lanes=listed)
        info = lanes_view.merge_lanes(name, lanes)
        if info is None:
            if topic is not None:
                raise NotFound(f"no topic {topic!r} on the bus")
            continue  # deleted since it was listed
        agent_seen = agent_seen or any(g.group == agent for g in info.groups)
        for g in info.groups:
            if (agent is None or g.group == agent) and g.dead_letters:
                with_letters = lanes_view.lanes_with_group(lanes, g.group, dead_letters=True)
                sub = Subscription(name, g.group)
                records = await lanes_view.dead_letters_with_lanes(
                    broker, sub, limit, lanes=with_letters
                )
                readable, unreadable = lanes_view.read_lane_dead_letters(records, name, g.group)
                letters += readable
                undecodable += unreadable
    if agent is not None and not agent_seen:
        where = f"topic {topic!r}" if topic is not None else "any topic on the bus"
        raise NotFound(f"no agent {agent!r} reads {where}")
    letters.sort(key=lambda d: d.failed_at)
    return DeadLetterListing(tuple(letters[-limit:]), tuple(undecodable))


@dataclass(frozen=True, slots=True)
class ReplayPreview:
    """What a replay would do (a dry run).

    Attributes:
        chosen: The dead letters that would be replayed.
        total: How many records the agent's dead-letter queue holds.
        undecodable: Records that could not be read, so would not be replayed.
    """

    chosen: tuple[DeadLetter, ...]
    total: int
    undecodable: tuple[UndecodableRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplayOutcome:
    """What a replay did.

    Attributes:
        replayed: How many events were re-queued.
        event_ids: The ids of the events chosen for replay (`None` for a record without one).
        missing: The named event ids that are not in the agent's dead letters.
        undecodable: Records that could not be read, so were left where they are.
    """

    replayed: int
    event_ids: tuple[str | None, ...]
    missing: tuple[str, ...]
    undecodable: tuple[UndecodableRecord, ...] = ()


async def preview_replay(
    broker: Broker, topic: str, agent: str, *, event_ids: Collection[str] | None = None
) -> ReplayPreview:
    """Which of `agent`'s dead letters on `topic` a replay would re-queue; changes nothing.

    Args:
        event_ids: Only these events; default: every record.

    Raises:
        NotFound: no agent of that name reads the topic.
    """
    group, lanes = await lanes_view.require_group_lanes(broker, topic, agent)
    sub, count = Subscription(topic, agent), max(1, group.dead_letters)
    records = await lanes_view.dead_letters_with_lanes(broker, sub, count, lanes=lanes)
    letters, undecodable = lanes_view.read_lane_dead_letters(records, topic, agent)
    chosen = tuple(d for d in letters if event_ids is None or d.event_id in event_ids)
    return ReplayPreview(chosen, len(records), tuple(undecodable))


async def replay_dead_letters(
    broker: Broker,
    topic: str,
    agent: str,
    *,
    event_ids: Collection[str] | None = None,
    on_record: Callable[[], None] | None = None,
) -> ReplayOutcome:
    """Deliver `agent`'s dead letters on `topic` to it again, each as a new first attempt.

    Only that agent sees them again; the records leave the dead-letter queue as they go, each
    in one atomic step, an event of a priority lane back into that lane. A record that cannot
    be read stays where it is, reported in `undecodable`.

    Args:
        event_ids: Only these events; default: every record.
        on_record: Called once per record looked at (a progress display).

    Raises:
        NotFound: no agent of that name reads the topic.
    """
    _, lanes = await lanes_view.require_group_lanes(broker, topic, agent)
    selections = lanes_view.LaneSelections(topic, agent, event_ids, on_record)
    moved = await lanes_view.replay_with_lanes(
        broker, Subscription(topic, agent), selections, lanes=lanes
    )
    chosen = selections.chosen
    missing = () if event_ids is None else tuple(sorted(set(event_ids).difference(chosen)))
    return ReplayOutcome(moved, tuple(chosen), missing, tuple(selections.undecodable))


async def find_dead_letter(broker: Broker, topic: str, agent: str, event_id: str) -> DeadLetter:
    """The dead letter of event `event_id` in `agent`'s queue on `topic`.

    Raises:
        NotFound: no agent of that name reads the topic, or its queue holds no such event.
    """
    return (await _find_in_lanes(broker, topic, agent, event_id))[0]


async def _find_in_lanes(
    broker: Broker, topic: str, agent: str, event_id: str
) -> tuple[DeadLetter, Lane]:
    """`find_dead_letter`, with the lane whose queue holds the record."""
    group, lanes = await lanes_view.require_group_lanes(broker, topic, agent)
    sub, count = Subscription(topic, agent), max(1, group.dead_letters)
    records = await lanes_view.dead_letters_with_lanes(broker, sub, count, lanes=lanes)
    found = lanes_view.find_lane_dead_letter(records, topic, agent, event_id)
    if found is None:
        raise NotFound(f"event {event_id!r} is not in {agent}'s dead letters on {topic!r}")
    return found


async def replay_corrected(
    broker: Broker, topic: str, agent: str, event_id: str, payload: Any, *, payload_type: Any
) -> Envelope[Any]:
    """Replay one dead letter to its agent with a corrected payload: a new event (new id,
    first attempt) with the same correlation, caused by the dead one, for that agent alone;
    the record leaves the queue in the same atomic step (the new event goes into the lane the
    record was in, keeping its priority). Returns the new event.

    Args:
        payload: The corrected payload, as JSON data; it goes on the bus as given.
        payload_type: The agent's declared payload type: the payload must validate as one.

    Raises:
        NotFound: no such agent on the topic, or no such event in its dead letters.
        PayloadValidationError: the payload does not validate (nothing is changed).
    """
    letter, lane = await _find_in_lanes(broker, topic, agent, event_id)
    original = letter.envelope
    if original is None:
        raise NotFound(f"the dead letter of event {event_id!r} holds no readable event")
    try:
        TypeAdapter(payload_type).validate_python(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}"
            for e in exc.errors(include_url=False)[:3]
        )
        raise PayloadValidationError(
            f"the corrected payload is not a valid {type_name(payload_type)}: {problems}"
        ) from None
    corrected = original.model_copy(
        update={
            "id": new_event_id(),
            "payload": payload,
            "created_at": datetime.now(UTC),
            "correlation_id": original.correlation_id or original.id,
            "causation_id": original.id,
        }
    )
    moved = False

    def select(record_id: str, record: bytes) -> bytes | None:
        nonlocal moved
        if moved:
            return None
        found = ReplaySelection(topic, agent, {event_id})
        if found(record_id, record) is None:
            return None
        moved = True
        return corrected.encode()

    if not await broker.replay_dead_letters(Subscription(lane_topic(topic, lane), agent), select):
        raise NotFound(f"event {event_id!r} left {agent}'s dead letters meanwhile")
    return corrected


async def purge_topic(broker: Broker, topic: str) -> TopicInfo:
    """Delete a topic with everything it holds, its priority lanes too: entries, groups,
    retries, dead letters, metrics. Returns what it held just before.

    Workers still consuming the topic recreate it, empty, on their next fetch.

    Raises:
        NotFound: the bus has no such topic.
    """
    info, lanes = await lanes_view.require_lanes(broker, topic)
    await lanes_view.delete_topic_with_lanes(broker, topic, list(lanes))
    return info


async def purge_backlog(broker: Broker, topic: str) -> TopicInfo:
    """Drop a topic's backlog (entries, delayed events, pending deliveries, scheduled
    retries), its priority lanes' too, but keep its groups, so the agents go on receiving what
    is published next. Returns what the topic held just before.

    Raises:
        NotFound: the bus has no such topic.
    """
    info, lanes = await lanes_view.require_lanes(broker, topic)
    await lanes_view.purge_backlog_with_lanes(broker, topic, list(lanes))
    return info


async def purge_dead_letters(
    broker: Broker,
    topic: str,
    *,
    agent: str | None = None,
    on_group: Callable[[], None] | None = None,
) -> int:
    """Empty the dead-letter queues of `topic` and its priority lanes (every agent's, or only
    `agent`'s); returns how many records were removed.

    Args:
        on_group: Called once per queue emptied (a progress display).

    Raises:
        NotFound: the bus has no such topic, or `agent` does not read it.
    """
    info, lanes = await lanes_view.require_lanes(broker, topic)
    groups = [g for g in info.groups if agent is None or g.group == agent]
    if agent is not None and not groups:
        raise NotFound(f"no agent {agent!r} reads topic {topic!r}")
    removed = 0
    for g in groups:
        removed += await lanes_view.purge_dead_letters_with_lanes(
            broker, Subscription(topic, g.group), lanes=lanes_view.lanes_with_group(lanes, g.group)
        )
        if on_group is not None:
            on_group()
    return removed
