"""The OmniDaemon SDK's views of the bus and the fleet (`OmniDaemonSDK` inherits them): the
engine's metrics, topics, groups, entries and dead letters, in the dict shapes OmniDaemon
returned."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson

from omnidaemon.app import App
from omnidaemon.brokers import Subscription
from omnidaemon.dead_letters import DeadLetter, warn_undecodable
from omnidaemon.fleet import describe_topics, fleet_metrics, live_workers
from omnidaemon.lanes_view import (
    dead_letters_with_lanes,
    describe_lanes,
    describe_with_lanes,
    entries_with_lanes,
    lanes_with_group,
    merge_lanes,
    read_lane_dead_letters,
)

__all__ = ["BusViews"]

_STREAM_PREFIX = "omni-stream:"  # OmniDaemon's stream key prefix, accepted in stream names


def _stream_topic(stream: str) -> str:
    return stream[len(_STREAM_PREFIX) :] if stream.startswith(_STREAM_PREFIX) else stream


class BusViews:
    """What the SDK reports of the bus and the workers on it, read through `app`."""

    app: App

    async def metrics(self, topic: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """Per topic and agent, summed over every worker: `tasks_received`,
        `tasks_processed`, `tasks_failed`, `tasks_retried`, `tasks_dead_lettered`,
        `in_flight` and `avg_processing_time_sec`."""
        await self.app.connect()
        found: dict[str, dict[str, dict[str, Any]]] = {}
        for snap in await fleet_metrics(self.app.broker, topic=topic):
            found.setdefault(snap.topic, {})[snap.agent] = {
                "tasks_received": snap.received,
                "tasks_processed": snap.succeeded,
                "tasks_failed": snap.failed,
                "tasks_retried": snap.retried,
                "tasks_dead_lettered": snap.dead_lettered,
                "in_flight": snap.in_flight,
                "avg_processing_time_sec": snap.duration.mean,
            }
        return found

    async def list_streams(self) -> list[dict[str, Any]]:
        """Every topic on the bus: `stream` (the topic's name) and `length`."""
        await self.app.connect()
        return [
            {"stream": t.topic, "length": t.length} for t in await describe_topics(self.app.broker)
        ]

    async def inspect_stream(self, stream: str, limit: int = 10) -> list[dict[str, Any]]:
        """The `limit` most recent entries of a topic (its priority lanes' included): `id` (the
        entry's) and `data` (the decoded envelope). OmniDaemon's `omni-stream:` prefix is
        accepted."""
        await self.app.connect()
        entries = await entries_with_lanes(self.app.broker, _stream_topic(stream), limit)
        out = []
        for _, entry_id, data in entries:
            try:
                decoded: Any = orjson.loads(data)
            except orjson.JSONDecodeError:
                decoded = {"unreadable": data.decode("utf-8", "replace")}
            out.append({"id": entry_id, "data": decoded})
        return out

    async def list_groups(self, stream: str) -> list[dict[str, Any]]:
        """The consumer groups (agents) of a topic: `name`, `consumers`, `pending`, `lag`,
        `retries`, `dead_letters` and `oldest_pending_age`."""
        await self.app.connect()
        info = await describe_with_lanes(self.app.broker, _stream_topic(stream))
        if info is None:
            return []
        return [
            {
                "name": g.group,
                "consumers": g.consumers,
                "pending": g.pending,
                "lag": g.lag,
                "retries": g.retries,
                "dead_letters": g.dead_letters,
                "oldest_pending_age": g.oldest_pending_age,
            }
            for g in info.groups
        ]

    async def inspect_dlq(self, topic: str, limit: int = 100) -> list[dict[str, Any]]:
        """The dead letters of every agent on `topic` (its priority lanes' included), up to
        `limit` per agent: `id` (the event's), `agent`, `data` (the envelope), `error_type`,
        `error_message`, `traceback`, `attempts` and `failed_at`."""
        await self.app.connect()
        lanes = await describe_lanes(self.app.broker, topic)
        info = merge_lanes(topic, lanes)
        if info is None:
            return []
        letters: list[DeadLetter] = []
        for group in info.groups:
            sub, where = Subscription(topic, group.group), lanes_with_group(lanes, group.group)
            records = await dead_letters_with_lanes(self.app.broker, sub, limit, lanes=where)
            readable, undecodable = read_lane_dead_letters(records, topic, group.group)
            warn_undecodable(undecodable, "skipped")
            letters.extend(readable)
        return [
            {
                "id": letter.event_id,
                "agent": letter.agent,
                "data": letter.envelope.model_dump(mode="json") if letter.envelope else None,
                "error_type": letter.error_type,
                "error_message": letter.error_message,
                "traceback": letter.traceback,
                "attempts": letter.attempts,
                "failed_at": letter.failed_at.isoformat(),
            }
            for letter in letters
        ]

    async def get_bus_stats(self) -> dict[str, Any]:
        """The bus at a glance (as `omnidaemon bus stats --json`): `bus`, `server`, `topics`
        (each with its groups) and live `workers`."""
        await self.app.connect()
        broker = self.app.broker
        topics = await describe_topics(broker)
        workers = await live_workers(broker)
        return {
            "bus": broker.url,
            "server": await broker.server_info(),
            "topics": {
                t.topic: {
                    "length": t.length,
                    "delayed": t.delayed,
                    "groups": {
                        g.group: {k: v for k, v in asdict(g).items() if k != "consumer_details"}
                        for g in t.groups
                    },
                }
                for t in topics
            },
            "workers": [w.to_json() for w in workers],
        }
