"""A debounced agent's dead letters: its topic's (messages it could not collect) with those of
its batch and check topics (batches its handler gave up on), read and replayed as one queue."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from omnidaemon.brokers.base import Subscription
from omnidaemon.dead_letters import (
    DeadLetter,
    ReplaySelection,
    UndecodableRecord,
    read_dead_letters,
)

if TYPE_CHECKING:
    from omnidaemon.agents import AgentSpec
    from omnidaemon.brokers.base import Broker

__all__ = ["internal_subscriptions", "merge_dead_letters", "replay_internal"]


def internal_subscriptions(spec: AgentSpec) -> list[Subscription]:
    """The agent's groups on its batch and check topics (none if it is not debounced)."""
    if spec.debounce is None:
        return []
    return [
        Subscription(spec.debounce.batch_topic, spec.name),
        Subscription(spec.debounce.check_topic, spec.name),
    ]


async def merge_dead_letters(
    broker: Broker,
    spec: AgentSpec,
    letters: list[DeadLetter],
    undecodable: list[UndecodableRecord],
    limit: int,
) -> tuple[list[DeadLetter], list[UndecodableRecord]]:
    """`letters` (of the agent's topic) with the records of its batch and check topics, the
    `limit` most recent by `failed_at`, oldest first."""
    merged = list(letters)
    unread = list(undecodable)
    for sub in internal_subscriptions(spec):
        readable, unreadable = read_dead_letters(
            await broker.dead_letters(sub, limit), sub.topic, sub.group
        )
        merged += readable
        unread += unreadable
    merged.sort(key=lambda letter: letter.failed_at)  # stable: a queue's ties keep its order
    return merged[-limit:] if limit > 0 else [], unread


async def replay_internal(
    broker: Broker, spec: AgentSpec, event_ids: Collection[str] | None
) -> tuple[int, list[UndecodableRecord]]:
    """Replay the agent's dead-lettered batches (and checks): each goes back to its own topic,
    a batch to run the handler again with the same messages. Returns how many moved, and the
    records that could not be read."""
    moved = 0
    undecodable: list[UndecodableRecord] = []
    for sub in internal_subscriptions(spec):
        select = ReplaySelection(sub.topic, sub.group, event_ids)
        moved += await broker.replay_dead_letters(sub, select)
        undecodable += select.undecodable
    return moved, undecodable
