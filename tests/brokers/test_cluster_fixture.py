"""The `redis_cluster` fixture itself, driven with redis-py's raw asyncio cluster client.

Groundwork for Redis Cluster support (issue 17): these tests pin what the fixture gives
(slots spread over masters, failover, resharding) before omnidaemon is run on top of it.
The tests share one cluster (module scope) and find nodes through `master_of(key)`, so the
kill in one test does not disturb the others.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from uuid import uuid4

import anyio
import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from tests.cluster import RedisCluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[AsyncRedisCluster]:
    client = AsyncRedisCluster.from_url(
        redis_cluster.url, decode_responses=True, socket_timeout=2, socket_connect_timeout=0.5
    )
    try:
        yield client
    finally:
        await client.aclose()


async def test_keys_land_on_different_masters(
    redis_cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    keys = [f"spread:{uuid4().hex}" for _ in range(30)]
    for key in keys:
        await client.set(key, key)
    owners = {key: redis_cluster.master_of(key) for key in keys}
    assert len({master.port for master in owners.values()}) == 3
    for key, master in owners.items():
        assert master.owns(client.keyslot(key))
        assert redis_cluster.client(master.port).get(key) == key  # stored where it belongs
    covered = sum(end - start + 1 for m in redis_cluster.masters() for start, end in m.slots)
    assert covered == 16384


async def test_a_hash_tagged_stream_works_with_xadd_and_xreadgroup(
    redis_cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    tag = uuid4().hex
    stream, dead = f"{{od:{tag}}}:stream", f"{{od:{tag}}}:dead"
    assert client.keyslot(stream) == client.keyslot(dead) == redis_cluster.keyslot(stream)
    await client.xgroup_create(stream, "workers", id="0", mkstream=True)
    sent = [await client.xadd(stream, {"n": str(n)}) for n in range(3)]
    got = await client.xreadgroup("workers", "c1", {stream: ">"}, count=10, block=200)
    assert [entry_id for entry_id, _ in got[0][1]] == sent
    assert await client.xack(stream, "workers", *sent) == 3
    # An empty BLOCK returns after its timeout on a cluster connection too.
    started = time.monotonic()
    assert not await client.xreadgroup("workers", "c1", {stream: ">"}, count=1, block=300)
    assert 0.25 < time.monotonic() - started < 2
    # A script over keys of one slot runs (EVALSHA, loaded on NOSCRIPT by register_script);
    # keys of two slots are refused by the client before anything is sent.
    move = client.register_script(
        "local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) "
        "redis.call('XADD', KEYS[2], '*', 'n', e[1][2][2]) return redis.call('XLEN', KEYS[2])"
    )
    assert await move(keys=[stream, dead], args=[sent[0]]) == 1
    assert await move(keys=[stream, dead], args=[sent[1]]) == 2
    other = next(k for k in ("{a}", "{b}") if client.keyslot(k) != client.keyslot(stream))
    with pytest.raises(redis.RedisClusterException, match="same key slot"):
        await move(keys=[stream, other], args=[sent[0]])
    with pytest.raises(redis.RedisClusterException, match="same key slot"):
        await client.sunion("{a}", "{b}")
    await client.delete(stream, dead)


async def test_killing_a_master_promotes_its_replica_and_the_client_recovers(
    redis_cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    stream = f"{{fail:{uuid4().hex}}}:stream"
    first = await client.xadd(stream, {"n": "before"})
    old = redis_cluster.master_of(stream)
    # Make the replica hold the entry before the crash (replication is asynchronous).
    assert redis_cluster.client(old.port).execute_command("WAIT", 1, 2000) == 1

    redis_cluster.kill(old.port)
    killed_at = time.monotonic()
    errors: list[str] = []
    while True:
        try:
            second = await client.xadd(stream, {"n": "after"})
            break
        except (redis.RedisError, OSError) as error:
            errors.append(type(error).__name__)
            assert time.monotonic() - killed_at < 15, f"no recovery; errors: {errors}"
            await anyio.sleep(0.05)
    recovered = time.monotonic() - killed_at
    print(f"\ncluster failover: client XADD recovered {recovered:.2f} s after SIGKILL "
          f"({len(errors)} failed attempts: {sorted(set(errors))})")  # fmt: skip

    new = redis_cluster.wait_failover(old.port)
    assert new.port != old.port and new.slots == old.slots
    assert redis_cluster.master_of(stream).port == new.port
    entries = await client.xrange(stream)
    assert [entry_id for entry_id, _ in entries] == [first, second]
    assert recovered < 10


async def test_a_migrated_slot_stays_readable_through_ask_and_moved(
    redis_cluster: RedisCluster, client: AsyncRedisCluster
) -> None:
    stream = f"{{move:{uuid4().hex}}}:stream"
    await client.xgroup_create(stream, "workers", id="0", mkstream=True)
    ids = [await client.xadd(stream, {"n": str(n)}) for n in range(5)]
    slot = client.keyslot(stream)
    source = redis_cluster.master_of(stream)
    target = next(m for m in redis_cluster.masters() if m.port != source.port)

    migration = redis_cluster.begin_migration(slot, target.port)
    # MIGRATING: the source still has the key, so it answers.
    got = await client.xreadgroup("workers", "c1", {stream: ">"}, count=2)
    assert [entry_id for entry_id, _ in got[0][1]] == ids[:2]

    assert redis_cluster.move_keys(migration) == 1
    # The key has left the source: it answers -ASK, the client follows with ASKING.
    with pytest.raises(redis.exceptions.AskError):
        redis_cluster.client(source.port).xrange(stream)
    got = await client.xreadgroup("workers", "c1", {stream: ">"}, count=10)
    assert [entry_id for entry_id, _ in got[0][1]] == ids[2:]
    assert len(await client.xrange(stream)) == 5

    redis_cluster.finish_migration(migration)
    assert redis_cluster.master_of(stream).port == target.port
    # The client still maps the slot to the source: -MOVED updates it, then XADD succeeds.
    with pytest.raises(redis.exceptions.MovedError):
        redis_cluster.client(source.port).xrange(stream)
    last = await client.xadd(stream, {"n": "after"})
    assert client.nodes_manager.get_node_from_slot(slot).port == target.port
    pending = await client.xpending(stream, "workers")
    assert pending["pending"] == 5
    assert [entry_id for entry_id, _ in await client.xrange(stream)] == [*ids, last]
    await client.delete(stream)
