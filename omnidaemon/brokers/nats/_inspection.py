"""Inspecting and managing the NATS broker's data: the server and its cluster, topics, groups
and their backlogs, dead letters (listing, replaying, purging), topic purges, expiry and
deletion.

Messages are read with batched direct gets (`$JS.API.DIRECT.GET.<stream>` with
`next_by_subj` and `batch`, page by page), which any replica answers and which cost the stream
no consumer. Counts come from `STREAM.INFO` with `subjects_filter`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.inspection import ConsumerInfo, GroupInfo, NodeInfo, TopicInfo
from omnidaemon.brokers.nats._core import JetStreamError
from omnidaemon.brokers.nats._core import msg_seq as _seq
from omnidaemon.brokers.nats._core import server_time as _time
from omnidaemon.brokers.nats._listing import NatsListing
from omnidaemon.brokers.nats._names import decode

__all__ = ["NatsInspection"]

_PAGE = 256  # messages per direct-get page
_SAMPLE = 100  # delayed messages whose sizes are summed to estimate what they all take
_EXPIRES = "omni_expires_at"  # stream metadata: the server-clock Unix time it expires at


class NatsInspection(NatsListing):
    """The inspection and management commands of `NatsBroker`."""

    # The server -----------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._api("INFO")  # the account's JetStream usage: answered by any server

    async def server_info(self) -> dict[str, str]:
        client = await self._nc()
        account = await self._api("INFO")
        # The INFO the server sent at connect (updated by nats-py as the cluster changes).
        server: dict[str, Any] = getattr(client, "_server_info", {}) or {}
        urls = server.get("connect_urls") or []
        info = {
            "server": f"nats-server {server.get('version', '?')}",
            "server_name": str(server.get("server_name", "?")),
            "jetstream_memory": _human(int(account.get("memory", 0))),
            "jetstream_storage": _human(int(account.get("storage", 0))),
            "streams": str(account.get("streams", "?")),
            "consumers": str(account.get("consumers", "?")),
        }
        if server.get("cluster"):
            info["cluster"] = str(server["cluster"])
            # Every server advertises its client URL to the others (unless configured not to).
            info["cluster_size"] = str(len(urls)) if urls else "?"
        return info

    async def nodes(self) -> list[NodeInfo]:
        client = await self._nc()
        server: dict[str, Any] = getattr(client, "_server_info", {}) or {}
        if not server.get("cluster"):
            return []
        # Without the system account, servers show only in the placement of streams: each
        # names its leader and replicas. So: every server that holds a stream of ours (all of
        # them with replicas 3 on 3 servers), by name (no server's address is given), with
        # the topics it leads; `failed` when no stream has it as leader or as a current
        # replica (the server flags a replica not current some 10 s after it went silent).
        leads = {str(server.get("server_name", "?")): 0}
        up, down = set(leads), set[str]()
        for info in await self._listing("STREAM.LIST", "streams", subject=f"{self._prefix}.>"):
            cluster = info.get("cluster") or {}
            if leader := cluster.get("leader"):
                up.add(leader)
                is_topic = self._names.topic_of_stream(info["config"]["name"]) is not None
                leads[leader] = leads.get(leader, 0) + is_topic
            for replica in cluster.get("replicas") or []:
                name = replica["name"]
                leads.setdefault(name, 0)
                live = replica.get("current") and not replica.get("offline")
                (up if live else down).add(name)
        return [
            NodeInfo(name, "failed" if name in down - up else "peer", 0, None, count, "?", -1)
            for name, count in sorted(leads.items())
        ]

    # Topics ---------------------------------------------------------------------------------

    async def topics(self) -> list[str]:
        # Every topic stream listens on its topic's entries subject: `<prefix>.t.*` finds them.
        every_topic = self._names.entries("").rpartition(".")[0] + ".*"
        names: list[str] = []
        expired: list[str] = []
        for info in await self._listing("STREAM.LIST", "streams", subject=every_topic):
            topic = self._names.topic_of_stream(info["config"]["name"])
            if topic is not None:
                (expired if _expired(info) else names).append(topic)
        for topic in expired:
            await self._remove_expired(topic)
        return sorted(names)

    async def describe(self, topic: str, *, consumers: bool = False) -> TopicInfo | None:
        names = self._names
        stream = names.stream(topic)
        found = await self._stream_info(stream, names.entries(topic))
        if found is None:
            return None
        info, counts = found
        if _expired(info):
            await self._remove_expired(topic)
            return None
        length = counts.get(names.entries(topic), 0)
        found = await self._stream_info(stream, names.all_group_entries(topic))
        group_counts = found[1] if found else {}
        # The stream holds entries, group entries and delayed messages, nothing else: what is
        # neither of the first two is delayed (counted so, not listed: each has a subject).
        total = int((found[0] if found else info)["state"].get("messages", 0))
        delayed = max(0, total - length - sum(group_counts.values()))
        dlq = await self._stream_info(names.dlq_stream(topic), names.all_dlq(topic))
        dead = dlq[1] if dlq else {}
        groups = []
        for consumer in await self._listing(f"CONSUMER.LIST.{stream}", "consumers"):
            sub = Subscription(topic, decode(consumer["name"]))
            waiting = 0  # group entries not handed out yet: retries and replays, as on Redis
            if group_counts.get(names.group_entries(topic, sub.group)):
                after = int(consumer["delivered"]["stream_seq"]) + 1
                page, more = await self._page(
                    stream, names.group_entries(topic, sub.group), after, 1
                )
                waiting = len(page) + more
            groups.append(
                await self._group(sub, consumer, waiting, dead.get(names.dlq(topic, sub.group), 0))
            )
        if not consumers:
            groups = [dataclasses.replace(g, consumer_details=()) for g in groups]
        groups.sort(key=lambda g: g.group)
        return TopicInfo(
            topic, length, delayed, tuple(groups), await self._delayed_bytes(topic, delayed)
        )

    async def _group(
        self, sub: Subscription, consumer: dict[str, Any], waiting: int, dead: int
    ) -> GroupInfo:
        """One group as its consumer's info and the consumer registry tell it."""
        registered = await self._registered(sub)
        local = {
            name: len(reader.held)
            for (s, name), reader in self._readers.items()
            if (s.topic, s.group) == (sub.topic, sub.group)
        }
        # This process's own consumers are counted from what they hold now; the others from
        # what they last wrote to the registry.
        details = tuple(
            ConsumerInfo(
                name,
                local[name] if name in local else registered[name][0],
                registered[name][1] if name in registered else 0.0,
            )
            for name in sorted(registered.keys() | local.keys())
        )
        # JetStream counts a retry scheduled with `nak(delay)` as ack pending, like a delivery
        # being handled, and tells no one which is which. What the consumers say they hold is
        # handed out; the rest of `num_ack_pending` waits for its redelivery: a retry.
        ack_pending = int(consumer.get("num_ack_pending", 0))
        pending = min(ack_pending, sum(c.pending for c in details))
        oldest = None
        if pending:
            # The first entry past the ack floor is unsettled, and was handed out before any
            # later one (a consumer delivers in stream order): the oldest pending, unless it
            # is a retry waiting for its delay (then this is the age of that retry's entry).
            after = int(consumer["ack_floor"]["stream_seq"]) + 1
            names, firsts = self._names, []
            for subject in (names.entries(sub.topic), names.group_entries(sub.topic, sub.group)):
                firsts += (await self._page(names.stream(sub.topic), subject, after, 1))[0]
            if firsts:
                first = min(firsts, key=_seq).headers or {}
                now = _time(consumer.get("ts")) or time.time()
                oldest = max(0.0, now - _time(first.get("Nats-Time-Stamp")))
        lag = max(0, int(consumer.get("num_pending", 0)) - waiting)
        retries = ack_pending - pending + waiting
        return GroupInfo(
            sub.topic, sub.group, len(details), pending, lag, retries, dead, oldest, details
        )

    async def _delayed_bytes(self, topic: str, delayed: int) -> int | None:
        """What the delayed messages hold: the data of the first `_SAMPLE` of them, scaled to
        all (an estimate, as Redis's `MEMORY USAGE` is: reading every one could be costly;
        each also takes its subject and schedule headers, about 130 bytes)."""
        if not delayed:
            return 0
        page, _ = await self._page(
            self._names.stream(topic), self._names.all_delayed(topic), 1, _SAMPLE
        )
        if not page:
            return None
        return round(sum(len(m.data) for m in page) * delayed / len(page))

    async def entries(self, topic: str, limit: int) -> list[tuple[str, bytes]]:
        found = await self._recent(self._names.stream(topic), self._names.entries(topic), limit)
        return [(str(_seq(m)), m.data) for m in found]

    # Purging, expiry, deletion ----------------------------------------------------------------

    async def purge_backlog(self, topic: str) -> int:
        names = self._names
        stream = names.stream(topic)
        # Entries first, counted as they go (exactly what the topic held); then what waits for
        # one group alone and the delayed messages. Each purge moves every consumer's delivered
        # and ack floor past what it removed and drops its pending deliveries and scheduled
        # retries: the groups stay, at the end of the stream. Entries published meanwhile stay.
        removed = await self._purge(stream, names.entries(topic))
        await self._purge(stream, names.all_group_entries(topic))
        await self._purge(stream, names.all_delayed(topic))
        # A late ack of a purged delivery is taken without a word by the server: what this
        # process's readers of the topic hold, park or were pushed and not handed out yet is
        # void now, so that their settles report nothing (pull statuses stay, for the fetch
        # that waits on them; an entry published after the purge and dropped here with them
        # is delivered again once its lease runs out).
        for (sub, _), reader in self._readers.items():
            if sub.topic == topic:
                reader.held.clear()
                reader.parked.clear()
                reader.buffer[:] = [i for i in reader.buffer if (i[0].headers or {}).get("Status")]
        return removed

    async def expire_topic(self, topic: str, ttl: float) -> None:
        # JetStream has no stream expiry: nothing on the server deletes a stream by itself.
        # What it can do alone: `max_age` drops every message `ttl` after it was stored (so the
        # topic empties out: an entry appended later lives `ttl` after its own publish), and a
        # consumer's `inactive_threshold` deletes it once no worker has pulled for `ttl`. The
        # empty stream that remains is marked with its deadline (server clock), and any
        # broker of ours that lists or describes it after the deadline deletes it with what is
        # left (as Redis removes an expired key when it is next touched).
        names = self._names
        ns = max(math.ceil(ttl * 1e9), 100_000_000)  # the server's smallest max_age: 100 ms
        for stream in (names.stream(topic), names.dlq_stream(topic)):
            found = await self._stream_info(stream, None)
            if found is None:
                continue
            info = found[0]
            config = dict(info["config"])
            config["max_age"] = ns
            # The duplicate window may not outlast max_age.
            config["duplicate_window"] = min(int(config.get("duplicate_window") or ns), ns)
            deadline = (_time(info.get("ts")) or time.time()) + ttl
            config["metadata"] = {**(config.get("metadata") or {}), _EXPIRES: f"{deadline:.3f}"}
            await self._api(f"STREAM.UPDATE.{stream}", config)
        stream = names.stream(topic)
        for consumer in await self._listing(f"CONSUMER.LIST.{stream}", "consumers"):
            config = {**consumer["config"], "inactive_threshold": ns}
            body = {"stream_name": stream, "config": config, "action": "update"}
            await self._api(f"CONSUMER.CREATE.{stream}.{consumer['name']}", body)

    async def delete_topic(self, topic: str) -> None:
        names = self._names
        # This process's readers of the topic go first, whatever the deletes do: a process
        # that makes a topic per request must not keep an inbox subscription per request.
        for key in [key for key in self._readers if key[0].topic == topic]:
            reader = self._readers.pop(key)
            reader.interrupted.set()
            # A closed or broken connection: the subscription is gone anyway.
            with contextlib.suppress(Exception):
                await reader.sub.unsubscribe()
        try:
            for stream in (names.stream(topic), names.dlq_stream(topic)):
                # Purged first: a stream deleted and soon made again under its name was seen
                # to come back with its old messages (nats-server 2.15.1, file storage).
                await self._purge(stream, ">")
                try:
                    await self._api(f"STREAM.DELETE.{stream}")
                except JetStreamError as exc:
                    if not exc.not_found:
                        raise
            for kind in ("h", "f", "c", "e"):  # marks, never-run counts, registry, extremes
                await self._purge(names.kv_stream, names.topic_kv(kind, topic))
            await self._purge(names.metrics_stream, names.metrics_of_topic(topic))
        finally:
            self._forget(topic)

    async def _remove_expired(self, topic: str) -> None:
        """Delete a topic past its `expire_topic` deadline; another broker may be at it too."""
        with contextlib.suppress(JetStreamError):  # else left for the next look
            await self.delete_topic(topic)


def _expired(info: dict[str, Any]) -> bool:
    """Whether a stream is past the deadline `expire_topic` wrote into it (server clock)."""
    deadline = (info.get("config", {}).get("metadata") or {}).get(_EXPIRES)
    if deadline is None:
        return False
    try:
        return float(deadline) <= (_time(info.get("ts")) or time.time())
    except ValueError:
        return False


def _human(size: int) -> str:
    """Bytes as `1.20M` (as Redis writes its memory)."""
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024:
            return f"{int(value)}B" if unit == "B" else f"{value:.2f}{unit}"
        value /= 1024
    return f"{value:.2f}T"
