"""A three-node NATS JetStream cluster under real worker processes (issue 18).

Every stream the broker makes is R3 (`OMNIDAEMON_NATS_REPLICAS=3`). Two `python -m omnidaemon
worker` processes, given every node as seeds, handle a topic while the test process publishes
numbered events; the topic stream's leader (its `cluster.leader` in stream info) is SIGKILLed
mid-run. A publish returns once a majority stored the entry, so nothing acknowledged may be
lost: every such event must be handled, the stream's leadership must move to a live node, and
the killed node, started again with its store, must catch up as a current replica.

The workers, the app they run, the publisher and the checks of what was handled are those of
the Redis Cluster fault tests (`tests/brokers/test_cluster_faults.py`); only the bus differs.
The figures (leader election, longest publish gap) are printed: `pytest -s` shows them.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import nats
import pytest
from nats.js.api import StreamInfo

from omnidaemon.brokers.nats import NatsBroker
from omnidaemon.brokers.nats._names import Names
from tests.brokers.test_cluster_faults import APP, SETTLE, Fleet, Publisher, _until_published
from tests.e2e._support import WorkerProcess, cli_env, write_module
from tests.nats import NatsCluster, NatsServer, running_nats_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ELECTION = 20.0  # seconds the two nodes left may take to elect the stream's new leader


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with running_nats_cluster(tmp_path / "cluster") as cluster:
        yield cluster


class NatsFleet(Fleet):
    """The Redis fault tests' two workers and checks, on a topic of a NATS cluster."""

    def __init__(  # no super().__init__: that one picks a Redis master for the topic
        self, cluster: NatsCluster, tmp_path: Path, spawn: Callable[..., WorkerProcess]
    ) -> None:
        self.log = tmp_path / "handled.log"
        self.topic = f"r3-{uuid4().hex[:8]}"
        write_module(tmp_path, "faults_app", APP)
        env = cli_env(
            OMNIDAEMON_BROKER_URL=cluster.url,
            OMNIDAEMON_NATS_REPLICAS="3",
            T_LOG=str(self.log),
            T_TOPIC=self.topic,
        )
        self.workers = [spawn(["faults_app:app"], tmp_path, env) for _ in range(2)]


async def _stream(js: Any, stream: str) -> StreamInfo | None:
    """The stream's info as its leader gives it, or None while nobody answers for it."""
    try:
        info: StreamInfo = await js.stream_info(stream)
    except Exception:  # no leader yet, or this connection is moving to another node
        return None
    return info


async def _until_stream(
    js: Any, stream: str, ready: Callable[[StreamInfo], object], timeout: float, what: str
) -> StreamInfo:
    deadline = anyio.current_time() + timeout
    last = None
    while anyio.current_time() < deadline:
        last = await _stream(js, stream)
        if last is not None and ready(last):
            return last
        await anyio.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout} s; last seen {last}")


def _leader(info: StreamInfo) -> str | None:
    return info.cluster.leader if info.cluster else None


def _last_stored_on(node: NatsServer, stream: str) -> int | None:
    """The last sequence `node`'s own replica of the stream holds (its monitoring port)."""
    with contextlib.suppress(OSError, ValueError):
        for account in node.monitor("/jsz?streams=true").get("account_details") or []:
            for found in account.get("stream_detail") or []:
                if found.get("name") == stream:
                    return int(found["state"]["last_seq"])
    return None


def _longest_pause(times: Iterable[float], since: float) -> float:
    """The longest time without any of `times`, from the last one before `since` on."""
    ordered = sorted(times)
    after = [t for t in ordered if t > since]
    before = [t for t in ordered if t <= since][-1:] or [since]
    moments = before + after
    return round(max((b - a for a, b in itertools.pairwise(moments)), default=0.0), 2)


async def test_the_topic_leader_killed_under_load_loses_nothing_and_catches_up(
    nats_cluster: NatsCluster, tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    fleet = NatsFleet(nats_cluster, tmp_path, spawn)
    stream = Names().stream(fleet.topic)
    broker = NatsBroker(nats_cluster.url, publish_timeout=30, replicas=3)
    nc = await nats.connect(servers=nats_cluster.urls, max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=2)
        await broker.connect()
        await fleet.wait_ready(broker)  # type: ignore[arg-type]  # any broker's describe
        before = await _until_stream(js, stream, _leader, ELECTION, "the topic stream's leader")
        assert before.config.num_replicas == 3
        assert before.cluster is not None and len(before.cluster.replicas or []) == 2
        leader = _leader(before)
        assert leader is not None
        publisher = Publisher(broker, fleet.topic)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher.run)
            await _until_published(publisher, 150)
            killed_at = time.time()
            nats_cluster.kill(leader)
            after = await _until_stream(
                js,
                stream,
                lambda info: _leader(info) not in (None, leader),
                ELECTION,
                f"a new leader of the topic stream once {leader} was killed",
            )
            elected_at = time.time()
            mark = len(publisher.acknowledged)
            await _until_published(publisher, mark + 150)
            publisher.stop.set()
        missing = await fleet.wait_handled(set(publisher.acknowledged))
        figures = {
            "election_s": round(elected_at - killed_at, 2),
            "publish_pause_s": _longest_pause(publisher.acknowledged.values(), killed_at),
            "handling_pause_s": _longest_pause(fleet.handled().values(), killed_at),
            "acknowledged": len(publisher.acknowledged),
            "lost": len(missing),
            "failed_publishes": len(publisher.failed),
        }
        print(f"\nR3 stream leader {leader} killed, {_leader(after)} took over: {figures}")
        assert not missing, f"lost {sorted(missing)[:20]} of {len(publisher.acknowledged)}"
        assert not publisher.failed, publisher.failed[:5]  # the outage is under publish_timeout
        for worker in fleet.workers:
            assert worker.proc.poll() is None, worker.stderr
            assert "Traceback" not in worker.stderr, worker.stderr

        # The killed node comes back with its store and catches up as a follower: the leader
        # says it is current, and its own replica holds the stream's last entry.
        last = (await _until_stream(js, stream, _leader, ELECTION, "the stream")).state.last_seq
        revived_at = time.time()
        await anyio.to_thread.run_sync(nats_cluster.revive, leader)

        def caught_up(info: StreamInfo) -> bool:
            back = (
                [r for r in (info.cluster.replicas or []) if r.name == leader]
                if info.cluster
                else []
            )
            current = _leader(info) == leader or bool(back and back[0].current)
            return current and _last_stored_on(nats_cluster.node(leader), stream) == last

        await _until_stream(js, stream, caught_up, SETTLE, f"{leader} caught up to {last}")
        print(f"{leader} restarted and caught up in {time.time() - revived_at:.1f} s")
    finally:
        await nc.close()
        await broker.close()
