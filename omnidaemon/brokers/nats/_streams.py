"""The streams and consumers the NATS broker makes on first use (and again when the bus lost
them), this process's readers, and `NatsParts`: what the broker's parts ask of each other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.nats._core import REPLICAS_ENV, JetStreamError, NatsCore, Reader
from omnidaemon.errors import ConfigurationError

__all__ = ["DUPLICATE_WINDOW", "NatsParts", "NatsStreams"]

_INFO_TRIES = 3

# Seconds a topic stream remembers a message id (`Nats-Msg-Id`): JetStream drops a publish
# whose id it saw within this window. Retries, dead letters and `publish_once` rely on it.
# JetStream's default; not shorter, for a `publish_once` repeated by a process that took over
# from one that died (after its lease ran out) must still find the first call's id.
DUPLICATE_WINDOW = 120.0


class NatsStreams(NatsCore):
    """Making streams and consumers, and this process's readers."""

    def _maxlen_of(self, topic: str) -> int:
        return self._topic_maxlen.get(topic, self._maxlen)

    async def _ensure_stream(self, name: str, config: dict[str, Any]) -> None:
        if name in self._streams:
            return
        config = {
            "name": name,
            "storage": "file",
            "num_replicas": self._replicas,
            "allow_direct": True,
            **config,
        }
        try:
            await self._api(f"STREAM.CREATE.{name}", config)
        except JetStreamError as exc:
            if exc.err_code == 10074:  # replicas > 1 on a server that is no cluster
                raise ConfigurationError(
                    f"{REPLICAS_ENV}={self._replicas} needs a JetStream cluster of at least "
                    f"{self._replicas} servers; the bus at {self._url} is one server ({exc})"
                ) from None
            if exc.err_code != 10058:  # "stream name already in use": made by someone else
                raise
        self._streams.add(name)

    async def _ensure_topic(self, topic: str) -> str:
        names = self._names
        stream = names.stream(topic)
        await self._ensure_stream(
            stream,
            {
                "subjects": [
                    names.entries(topic),
                    names.all_group_entries(topic),
                    names.all_delayed(topic),
                ],
                "retention": "limits",
                # Per subject, so that `maxlen` counts the topic's entries only: delayed
                # entries (a subject each) and entries for one agent are not trimmed by them.
                "max_msgs_per_subject": self._maxlen_of(topic),
                "discard": "old",
                "allow_msg_schedules": True,
                "allow_msg_ttl": True,
                "duplicate_window": int(DUPLICATE_WINDOW * 1e9),
            },
        )
        return stream

    async def _ensure_dlq(self, topic: str) -> str:
        stream = self._names.dlq_stream(topic)
        await self._ensure_stream(
            stream,
            {
                "subjects": [self._names.all_dlq(topic)],
                "retention": "limits",
                "duplicate_window": 120_000_000_000,
            },
        )
        return stream

    async def _ensure_kv(self) -> str:
        stream = self._names.kv_stream
        await self._ensure_stream(
            stream,
            {
                "subjects": [self._names.kv_all],
                "retention": "limits",
                "max_msgs_per_subject": 1,
                "allow_msg_ttl": True,
                "allow_rollup_hdrs": True,
                "deny_delete": False,
                "discard": "new",
                "duplicate_window": 0,
            },
        )
        return stream

    async def _ensure_metrics(self) -> str:
        stream = self._names.metrics_stream
        await self._ensure_stream(
            stream,
            {
                "subjects": [self._names.metrics_all],
                "retention": "limits",
                "allow_msg_counter": True,
                "max_msgs_per_subject": 1,
            },
        )
        return stream

    def _group_config(self, sub: Subscription, ack_wait: float) -> dict[str, Any]:
        names = self._names
        subjects = [names.entries(sub.topic), names.group_entries(sub.topic, sub.group)]
        return {
            "durable_name": names.consumer(sub.group),
            "deliver_policy": "all" if sub.start == "earliest" else "new",
            "ack_policy": "explicit",
            "ack_wait": int(ack_wait * 1e9),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "max_waiting": 4096,
            "filter_subjects": subjects,
            "num_replicas": 0,  # the stream's
        }

    async def _ensure_group(self, sub: Subscription) -> None:
        if sub in self._groups:
            return
        stream = await self._ensure_topic(sub.topic)
        durable = self._names.consumer(sub.group)
        try:
            info = await self._consumer_info(stream, durable)
            ack_wait = info["config"]["ack_wait"] / 1e9
        except JetStreamError as exc:
            if not exc.not_found:
                raise
            ack_wait = self._lease
            body = {"stream_name": stream, "config": self._group_config(sub, ack_wait)}
            body["action"] = "create"
            try:
                await self._api(f"CONSUMER.CREATE.{stream}.{durable}", body)
            except JetStreamError as again:
                if again.err_code != 10148:  # made by another process meanwhile
                    raise
        self._groups[sub] = ack_wait

    async def _consumer_info(self, stream: str, durable: str) -> dict[str, Any]:
        # On a cluster, a consumer info asked while another process's create of the same
        # consumer is being applied was seen to go unanswered: asked again, it is answered.
        for _ in range(_INFO_TRIES - 1):
            try:
                return await self._api(f"CONSUMER.INFO.{stream}.{durable}", timeout=2.0)
            except TimeoutError:
                continue
        return await self._api(f"CONSUMER.INFO.{stream}.{durable}")

    async def _set_ack_wait(self, sub: Subscription, ack_wait: float) -> None:
        """Make the group's lease `ack_wait` seconds (the server redelivers what was not
        renewed for that long)."""
        await self._ensure_group(sub)
        if abs(self._groups[sub] - ack_wait) < 1e-3:
            return
        stream, durable = self._names.stream(sub.topic), self._names.consumer(sub.group)
        # The consumer's config as it is, with only AckWait changed: whatever else was set
        # on it (`expire_topic`'s `inactive_threshold`, an operator's edit) stays.
        config = dict((await self._consumer_info(stream, durable))["config"])
        config["ack_wait"] = int(ack_wait * 1e9)
        body = {"stream_name": stream, "config": config, "action": "update"}
        info = await self._api(f"CONSUMER.CREATE.{stream}.{durable}", body)
        self._groups[sub] = info["config"]["ack_wait"] / 1e9

    def _forget(self, topic: str) -> None:
        """Drop what the caches say of a topic (it was deleted, or the bus lost it)."""
        self._streams.discard(self._names.stream(topic))
        self._streams.discard(self._names.dlq_stream(topic))
        for sub in [s for s in self._groups if s.topic == topic]:
            del self._groups[sub]

    async def _reader(self, sub: Subscription, consumer: str) -> Reader:
        reader = self._readers.get((sub, consumer))
        if reader is None:
            client = await self._nc()
            reader = Reader(client.new_inbox())
            # A callback, not nats-py's queue: a fetch cancelled while waiting must never take
            # a message off the queue and drop it.
            reader.sub = await client.subscribe(
                f"{reader.inbox}.*", cb=reader.on_message, pending_msgs_limit=-1
            )
            self._readers[(sub, consumer)] = reader
        return reader

    def _readers_of(self, sub: Subscription) -> list[tuple[str, Reader]]:
        return [(name, r) for (s, name), r in self._readers.items() if s == sub]


class NatsParts(NatsStreams):
    """What the broker's parts ask of each other (each implemented by one part), so that each
    part type-checks alone."""

    # `_values` ------------------------------------------------------------------------------

    async def _write_marks(self, sub: Subscription, marks: list[tuple[int, int]]) -> None:
        """Record, for each `(stream sequence, delivery count)`, that the entry was delivered
        again: a consumer that held an earlier delivery of it lost it."""
        raise NotImplementedError

    async def _read_mark(self, sub: Subscription, seq: int) -> int | None:
        """The highest delivery count recorded by `_write_marks` for an entry, or `None`."""
        raise NotImplementedError

    async def _read_free(self, sub: Subscription, seq: int) -> int:
        """How many deliveries of an entry were never run (`_write_free`); 0 if none."""
        raise NotImplementedError

    async def _write_free(self, sub: Subscription, seq: int, count: int) -> None:
        """Record how many deliveries of an entry were never run: they are no attempts."""
        raise NotImplementedError

    async def _register(self, sub: Subscription, consumer: str, pending: int) -> None:
        """List `consumer` in its group's registry (refreshing its idle time)."""
        raise NotImplementedError

    async def _registered(self, sub: Subscription) -> dict[str, tuple[int, float]]:
        """The group's registered consumers: name -> (pending when last written, idle s)."""
        raise NotImplementedError

    async def _unregister(self, sub: Subscription, consumer: str) -> None:
        raise NotImplementedError

    async def _add_stats(self, sub: Subscription, stats: Mapping[str, int]) -> None:
        """Add metrics increments (and keep extremes) for a group."""
        raise NotImplementedError
