"""Dead letters on NATS: listing, purging and replaying a group's dead-letter records (a
subject per group in the topic's dead-letter stream)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
from nats.aio.msg import Msg

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.nats._core import JetStreamError
from omnidaemon.brokers.nats._core import msg_seq as _seq
from omnidaemon.brokers.nats._fetching import ATTEMPT_HEADER
from omnidaemon.brokers.nats._listing import NatsListing

__all__ = ["NatsDeadLetters"]

_PAGE = 256  # records per direct-get page
_ID_IN_PROCESS = 10158  # "duplicate message id is in process"


class NatsDeadLetters(NatsListing):
    """`dead_letters`, `purge_dead_letters`, `replay_dead_letters`."""

    async def dead_letters(self, sub: Subscription, limit: int) -> list[tuple[str, bytes]]:
        stream, subject = self._names.dlq_stream(sub.topic), self._names.dlq(sub.topic, sub.group)
        found = await self._recent(stream, subject, limit)
        return [(str(_seq(m)), m.data) for m in found]

    async def purge_dead_letters(self, sub: Subscription) -> int:
        names = self._names
        return await self._purge(names.dlq_stream(sub.topic), names.dlq(sub.topic, sub.group))

    async def replay_dead_letters(
        self, sub: Subscription, select: Callable[[str, bytes], bytes | None]
    ) -> int:
        names = self._names
        dlq, subject = names.dlq_stream(sub.topic), names.dlq(sub.topic, sub.group)
        found = await self._stream_info(dlq, subject)
        if found is None or not found[1].get(subject):
            return 0
        # The stream must exist to take the entries; the group is left to its workers to make
        # (with their start), as any call of theirs does.
        await self._ensure_topic(sub.topic)
        state = found[0]["state"]
        start, last = int(state["first_seq"]), int(state["last_seq"])  # records made later wait
        moved = 0
        while start <= last:
            page, more = await self._page(dlq, subject, start, min(_PAGE, last - start + 1))
            for msg in page:
                if _seq(msg) > last:
                    return moved
                entry = select(str(_seq(msg)), msg.data)
                if entry is not None and await self._move(sub, msg, entry):
                    moved += 1
            if not page or not more:
                break
            start = _seq(page[-1]) + 1
        return moved

    async def _move(self, sub: Subscription, record: Msg, entry: bytes) -> bool:
        """Move one dead letter to the group alone, as a first attempt; whether this call did.

        Publish first, then delete: the delete decides who moved the record (deleting a
        sequence already deleted fails), and the publish's `Nats-Msg-Id`, derived from the
        record, makes the topic stream keep one entry when several replays publish it within
        its duplicate window (2 minutes). A crash between the two leaves the record where it
        was, to be moved again: within the window that adds nothing, after it the entry is
        delivered twice (at least once, never lost). Deleting first would decide the same, but
        a crash between would lose the record. The record is looked up on the stream leader
        just before the publish, so that a replay whose listing is old does not publish a
        record moved more than the window ago.
        """
        names = self._names
        dlq, seq = names.dlq_stream(sub.topic), _seq(record)
        if not await self._holds(dlq, seq):  # moved (or purged) meanwhile
            return False
        stamp = (record.headers or {}).get("Nats-Time-Stamp", "")
        headers = {"Nats-Msg-Id": f"omni-replay:{dlq}:{seq}:{stamp}", ATTEMPT_HEADER: "1"}
        subject = names.group_entries(sub.topic, sub.group)
        for _ in range(100):
            try:
                await self._publish(subject, entry, headers)
                break
            except JetStreamError as exc:
                if exc.err_code != _ID_IN_PROCESS:
                    raise
            # A replicated stream refuses a message id whose first publish is still being
            # stored; once it is, publishing again is acknowledged as a duplicate (and stores
            # the entry, should that first publish have failed).
            await anyio.sleep(0.05)
        else:
            raise TimeoutError(f"JetStream at {self._url} kept a replayed entry in process")
        try:
            await self._api(f"STREAM.MSG.DELETE.{dlq}", {"seq": seq, "no_erase": True})
        except JetStreamError:
            # The server says "no message found" (10057) or "sequence not found" (10043, with
            # a delete of the same sequence in flight): another replay moved it and counts it.
            if not await self._holds(dlq, seq):
                return False
            raise
        return True

    async def _holds(self, stream: str, seq: int) -> bool:
        """Whether the stream (its leader) still holds the message at `seq`."""
        try:
            await self._api(f"STREAM.MSG.GET.{stream}", {"seq": seq})
        except JetStreamError as exc:
            if exc.code == 404:
                return False
            raise
        return True
