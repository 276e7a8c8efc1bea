"""What the dead-letter pages show and do, on the control-plane functions the JSON API's
dead-letter routes use (`omnidaemon.admin`, `omnidaemon.fleet`): the topics holding dead
letters, one topic's dead letters as table rows, replaying a choice of them, and reading a
corrected payload typed into the edit form.

A dead letter is named in forms by `agent/event_id` (an agent's name never holds a `/`): one
event can be dead-lettered by several agents of a topic, and replay is per agent.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import orjson

from omnidaemon import admin
from omnidaemon.dashboard.formatting import pretty_json
from omnidaemon.dead_letters import DeadLetter, UndecodableRecord
from omnidaemon.errors import NotFound
from omnidaemon.fleet import describe_topics

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker, TopicInfo

__all__ = [
    "DeadLetterRow",
    "ReplayDone",
    "TopicDeadLetters",
    "TopicView",
    "dead_letter_topics",
    "find_letter",
    "parse_choice",
    "parse_payload",
    "payload_type_of",
    "read_topic",
    "replay_all",
    "replay_chosen",
]

DEFAULT_LIMIT = 100
"""How many of a topic's most recent dead letters its page shows, unless asked otherwise."""


@dataclass(frozen=True, slots=True)
class TopicDeadLetters:
    """A topic with dead letters, for the index: its total and each agent's count."""

    topic: str
    total: int
    agents: tuple[tuple[str, int], ...]


def _counts(info: TopicInfo) -> tuple[tuple[str, int], ...]:
    return tuple((g.group, g.dead_letters) for g in info.groups if g.dead_letters)


async def dead_letter_topics(broker: Broker) -> list[TopicDeadLetters]:
    """Every topic whose dead-letter queues hold records, by name."""
    found = []
    for info in await describe_topics(broker):
        agents = _counts(info)
        if agents:
            found.append(TopicDeadLetters(info.topic, sum(n for _, n in agents), agents))
    return found


def _path(part: str) -> str:
    return quote(part, safe="")


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """One dead letter as its table row shows it.

    Attributes:
        key: How forms name it (`agent/event_id`), or `None` when the record holds no event
            id (only "replay all" can move it).
        editable: Whether this server's app declares the agent, so that a corrected payload
            can be checked against its type.
        payload: The payload as indented JSON, or the raw entry when it is no envelope.
    """

    event_id: str | None
    agent: str
    error_type: str
    error_message: str
    traceback: str | None
    attempts: int
    failed_at: datetime
    payload: str
    key: str | None
    edit_url: str | None
    editable: bool


def _row(app: App, letter: DeadLetter) -> DeadLetterRow:
    envelope = letter.envelope
    key = f"{letter.agent}/{letter.event_id}" if letter.event_id is not None else None
    editable = key is not None and envelope is not None
    editable = editable and payload_type_of(app, letter.topic, letter.agent) is not None
    edit_url = (
        f"/ui/dead-letters/{_path(letter.topic)}/{_path(letter.event_id)}/edit"
        f"?agent={_path(letter.agent)}"
        if letter.event_id is not None
        else None
    )
    return DeadLetterRow(
        event_id=letter.event_id,
        agent=letter.agent,
        error_type=letter.error_type,
        error_message=letter.error_message,
        traceback=letter.traceback,
        attempts=letter.attempts,
        failed_at=letter.failed_at,
        payload=pretty_json(envelope.payload) if envelope is not None else letter.entry,
        key=key,
        edit_url=edit_url if editable else None,
        editable=editable,
    )


@dataclass(frozen=True, slots=True)
class TopicView:
    """A topic's dead-letter page: its most recent dead letters (newest first), how many its
    queues hold in all, each agent's count, and the records that cannot be read."""

    topic: str
    total: int
    agents: tuple[tuple[str, int], ...]
    rows: tuple[DeadLetterRow, ...]
    undecodable: tuple[UndecodableRecord, ...]


async def read_topic(app: App, topic: str, *, agent: str | None, limit: int) -> TopicView:
    """The dead letters of `topic` (only `agent`'s when given), the `limit` most recent.

    Raises:
        NotFound: no such topic, or `agent` does not read it.
    """
    info = await admin.require_topic(app.broker, topic)
    found = await admin.find_dead_letters(app.broker, topic=topic, agent=agent, limit=limit)
    agents = _counts(info)
    total = sum(n for name, n in agents if agent is None or name == agent)
    rows = tuple(_row(app, d) for d in reversed(found.letters))
    return TopicView(topic, total, agents, rows, found.undecodable)


def parse_choice(value: str) -> tuple[str | None, str]:
    """`agent/event_id` as `(agent, event_id)`; a bare event id as `(None, event_id)`: every
    agent of the topic holding it."""
    agent, slash, event_id = value.partition("/")
    return (agent, event_id) if slash else (None, value)


@dataclass(frozen=True, slots=True)
class ReplayDone:
    """What a replay from the dashboard did, over every agent it touched."""

    replayed: int = 0
    missing: int = 0
    undecodable: int = 0

    def __add__(self, other: ReplayDone) -> ReplayDone:
        return ReplayDone(
            self.replayed + other.replayed,
            self.missing + other.missing,
            self.undecodable + other.undecodable,
        )


async def _agents_with_letters(broker: Broker, topic: str) -> list[str]:
    info = await admin.require_topic(broker, topic)
    return [name for name, _ in _counts(info)]


async def replay_chosen(broker: Broker, topic: str, choices: Iterable[str]) -> ReplayDone:
    """Replay the dead letters named by `choices` (`agent/event_id`, or a bare event id for
    every agent holding it), each to its agent (`admin.replay_dead_letters`).

    Raises:
        NotFound: no such topic, or a named agent does not read it.
    """
    wanted: dict[str, set[str]] = {}
    anyone: set[str] = set()
    for choice in choices:
        agent, event_id = parse_choice(choice)
        if agent is None:
            anyone.add(event_id)
        else:
            wanted.setdefault(agent, set()).add(event_id)
    if anyone:
        for agent in await _agents_with_letters(broker, topic):
            wanted.setdefault(agent, set()).update(anyone)
    done = ReplayDone()
    seen: set[str] = set()
    for agent, event_ids in sorted(wanted.items()):
        outcome = await admin.replay_dead_letters(broker, topic, agent, event_ids=event_ids)
        seen.update(e for e in outcome.event_ids if e is not None)
        done += ReplayDone(outcome.replayed, 0, len(outcome.undecodable))
    named = {event_id for ids in wanted.values() for event_id in ids}
    return ReplayDone(done.replayed, len(named - seen), done.undecodable)


async def replay_all(broker: Broker, topic: str, *, agent: str | None = None) -> ReplayDone:
    """Replay every dead letter of `topic` (only `agent`'s when given), each to its agent.

    Raises:
        NotFound: no such topic, or `agent` does not read it.
    """
    agents = [agent] if agent is not None else await _agents_with_letters(broker, topic)
    done = ReplayDone()
    for name in agents:
        outcome = await admin.replay_dead_letters(broker, topic, name)
        done += ReplayDone(outcome.replayed, 0, len(outcome.undecodable))
    return done


async def find_letter(broker: Broker, topic: str, event_id: str, agent: str | None) -> DeadLetter:
    """The dead letter of `event_id` on `topic`: `agent`'s, or, without one, that of the one
    agent holding it (`admin.find_dead_letter`).

    Raises:
        NotFound: no such topic, agent or event, or several agents hold the event and none
            was named.
    """
    if agent is not None:
        return await admin.find_dead_letter(broker, topic, agent, event_id)
    found = []
    for name in await _agents_with_letters(broker, topic):
        try:
            found.append(await admin.find_dead_letter(broker, topic, name, event_id))
        except NotFound:
            continue
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"event {event_id!r} is not in the dead letters of {topic!r}")
    names = ", ".join(d.agent for d in found)
    raise NotFound(f"event {event_id!r} was dead-lettered by several agents ({names}): pick one")


def payload_type_of(app: App, topic: str, agent: str) -> Any | None:
    """The type a corrected payload for `agent` on `topic` must validate as (as
    `omnidaemon bus replay --edit` checks it), or `None` when this app does not declare
    that agent on that topic: the bus does not know the types."""
    spec = app.agents.get(agent)
    if spec is None:
        return None
    if spec.debounce is not None and topic == spec.debounce.batch_topic:
        return spec.debounce.parts[-1].payload_type  # a batch: `list[X]`
    return spec.payload_type if spec.topic == topic else None


def parse_payload(text: str) -> Any:
    """The JSON a user typed as a corrected payload.

    Raises:
        ValueError: it is empty or not JSON; the message says where.
    """
    if not text.strip():
        raise ValueError("the payload is empty: type the JSON to replay")
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"the payload is not valid JSON: {exc}") from None
