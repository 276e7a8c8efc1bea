"""Records omnidaemon did not write (a hand-typed XADD into a dead-letter queue or a topic)
are skipped and reported by the API, never a 500, and do not stop a replay of the others."""

from __future__ import annotations

import uuid

import orjson
import pytest

from omnidaemon.brokers import RedisBroker, Subscription
from tests.api._support import ADMIN, READER, ServerThread, async_client
from tests.bad_records import seed_dead_letters
from tests.servers import RedisServer

pytestmark = pytest.mark.anyio


async def test_undecodable_dead_letters_are_listed_apart_and_not_replayed(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    topic = f"garbage.t{uuid.uuid4().hex[:8]}"
    async with RedisBroker(redis_server.url, prefix=bus_prefix) as broker:
        seeded = await seed_dead_letters(broker, topic, "keeper")
        async with async_client(api_server.url, READER) as reader:
            for path, params in ((f"/v1/dlq/{topic}", {}), ("/v1/dlq", {"agent": "keeper"})):
                answer = await reader.get(path, params=params)
                assert answer.status_code == 200, (path, answer.text)
                body = answer.json()
                assert [d["event_id"] for d in body["dead_letters"]] == seeded.event_ids
                assert [d["payload"] for d in body["dead_letters"]] == [{"n": 0}, {"n": 1}]
                reported = {u["record_id"]: u for u in body["undecodable"]}
                assert set(reported) == set(seeded.bad), path
                for record_id, reason in seeded.bad.items():
                    assert reported[record_id]["reason"].startswith(reason), reported[record_id]
                    assert (reported[record_id]["topic"], reported[record_id]["agent"]) == (
                        topic,
                        "keeper",
                    )

        replay = {"agent": "keeper", "all": True}
        async with async_client(api_server.url, ADMIN) as admin:
            dry = await admin.post(f"/v1/dlq/{topic}/replay", json={**replay, "dry_run": True})
            assert dry.status_code == 200, dry.text
            assert dry.json()["event_ids"] == seeded.event_ids
            assert {u["record_id"] for u in dry.json()["undecodable"]} == set(seeded.bad)

            done = await admin.post(f"/v1/dlq/{topic}/replay", json=replay)
            assert done.status_code == 200, done.text
            assert (done.json()["replayed"], done.json()["event_ids"]) == (2, seeded.event_ids)
            assert {u["record_id"] for u in done.json()["undecodable"]} == set(seeded.bad)

        sub = Subscription(topic, "keeper")
        left = await broker.client.xrange(broker.dlq_key(sub))
        assert {i.decode() for i, _ in left} == set(seeded.bad), "the bad records stay"
        requeued = await broker.client.xrange(broker.retry_key(sub))
        assert [fields[b"e"] for _, fields in requeued] == seeded.entries


async def test_topic_entries_that_are_not_envelopes_are_shown_as_unreadable(
    api_server: ServerThread, redis_server: RedisServer, bus_prefix: str
) -> None:
    topic = f"garbage.t{uuid.uuid4().hex[:8]}"
    async with RedisBroker(redis_server.url, prefix=bus_prefix) as broker:
        stream = broker.stream_key(topic)
        mistyped = orjson.dumps(
            {"id": 5, "created_at": 1, "headers": "h", "entry_id": [1], "payload": {"n": 1}}
        )
        ids = [
            await broker.client.xadd(stream, {"e": b"\xff not json"}),
            await broker.client.xadd(stream, {"junk": b"x"}),
            await broker.client.xadd(stream, {"e": mistyped}),
        ]
        await broker.publish(topic, b'{"id": "e-1", "payload": {"n": 2}}')
        async with async_client(api_server.url, READER) as reader:
            answer = await reader.get(f"/v1/topics/{topic}/entries")
    assert answer.status_code == 200, answer.text
    *bad, good = answer.json()["entries"]
    assert [e["entry_id"] for e in bad] == [i.decode() for i in ids]
    assert all(set(e) == {"entry_id", "unreadable"} for e in bad), bad
    assert bad[2]["unreadable"] == mistyped.decode()
    assert (good["id"], good["payload"]) == ("e-1", {"n": 2})
