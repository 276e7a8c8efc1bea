"""Dead-letter queues and topics holding records omnidaemon did not write: a hand-typed `XADD`,
another tool, a damaged copy. Reading them must skip and report those, never fail."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import Envelope

__all__ = ["Seeded", "seed_dead_letters"]

# (fields of the XADD, the start of the reason it is reported with)
BAD = [
    ({"r": b"not json {"}, "not JSON: "),
    ({"junk": b"x", "other": b"y"}, "empty record"),  # no record field at all
    ({"r": b'{"event_id": 7, "topic": "t"}'}, "not a dead-letter record: event_id: "),
]


def naive_utc_now() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat()


@dataclass(frozen=True)
class Seeded:
    """What `seed_dead_letters` wrote."""

    event_ids: list[str]  # of the good records, oldest first
    entries: list[bytes]  # their entries, as a replay re-queues them
    bad: dict[str, str]  # record id -> the start of its reason


async def seed_dead_letters(broker: RedisBroker, topic: str, agent: str) -> Seeded:
    """Make `agent`'s group on `topic` and fill its dead-letter queue with two good records
    (as a worker writes them) between three that are not records."""
    sub = Subscription(topic, agent)
    await broker.subscribe(sub)
    event_ids, entries, bad = [], [], {}
    for n in range(2):
        envelope = Envelope.new(topic, {"n": n})
        record = DeadLetter(
            event_id=envelope.id,
            topic=topic,
            agent=agent,
            entry=envelope.encode().decode(),
            error_type="RuntimeError",
            error_message=f"job {n} failed",
            attempts=1,
            failed_at=datetime.now(UTC),
        )
        data = record.encode()
        if n == 1:
            # Written by hand without a UTC offset: sorting it beside aware times used to fail.
            fields = {**record.model_dump(mode="json"), "failed_at": naive_utc_now()}
            data = orjson.dumps(fields)
        await broker.client.xadd(broker.dlq_key(sub), {"r": data})
        event_ids.append(envelope.id)
        entries.append(envelope.encode())
        for fields, reason in BAD[n::2]:
            record_id = await broker.client.xadd(broker.dlq_key(sub), fields)
            bad[record_id.decode()] = reason
    return Seeded(event_ids, entries, bad)
