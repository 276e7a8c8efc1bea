"""The NATS fixtures themselves, driven with nats-py's JetStream client (issue 18 groundwork).

Before a NATS broker is built on them, these pin what the fixtures give: a JetStream server
that keeps its stream across a SIGKILL and restart, and a three-node cluster whose R3 stream
elects a new leader when its leader is SIGKILLed, loses no acknowledged publish, and lets the
killed node catch up when it comes back.
"""

from __future__ import annotations

import signal
from pathlib import Path
from uuid import uuid4

import anyio
import nats
import pytest
from nats.js.api import StreamConfig

from tests.nats import running_nats, running_nats_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_a_stream_survives_a_sigkill_of_its_server(tmp_path: Path) -> None:
    with running_nats(tmp_path) as server:
        name = f"S{uuid4().hex[:8]}"
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=name, subjects=[f"{name}.>"]))
            for n in range(10):
                ack = await js.publish(f"{name}.t", str(n).encode())
                assert ack.seq == n + 1
        finally:
            await nc.close()
        server.restart(signal.SIGKILL)
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(name)
            assert info.state.messages == 10  # acknowledged publishes are on disk
            sub = await js.pull_subscribe(f"{name}.t", durable="agent")
            got = await sub.fetch(10, timeout=2)
            assert [m.data for m in got] == [str(n).encode() for n in range(10)]
            for message in got:
                await message.ack()
        finally:
            await nc.close()


async def test_an_r3_stream_moves_its_leader_when_it_is_killed_and_loses_nothing(
    tmp_path: Path,
) -> None:
    with running_nats_cluster(tmp_path) as cluster:
        name = f"R{uuid4().hex[:8]}"
        nc = await nats.connect(servers=cluster.urls, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=10)
            config = StreamConfig(name=name, subjects=[f"{name}.>"], num_replicas=3)
            with anyio.fail_after(30):  # a loaded machine may need a second try to place it
                while True:
                    try:
                        await js.add_stream(config)
                        break
                    except nats.errors.TimeoutError:
                        continue
            for n in range(50):
                await js.publish(f"{name}.t", str(n).encode())
            info = await js.stream_info(name)
            assert info.cluster is not None and info.cluster.leader
            leader = info.cluster.leader
            cluster.kill(leader)
            with anyio.fail_after(20):  # a new leader is elected by the two left
                while True:
                    try:
                        info = await js.stream_info(name)
                        if info.cluster and info.cluster.leader not in (None, leader):
                            break
                    except Exception:
                        pass
                    await anyio.sleep(0.1)
            for n in range(50, 100):
                await js.publish(f"{name}.t", str(n).encode())
            sub = await js.pull_subscribe(f"{name}.t", durable="agent")
            got = []
            with anyio.fail_after(20):
                while len(got) < 100:
                    batch = await sub.fetch(100, timeout=2)
                    for message in batch:
                        await message.ack()
                    got += batch
            assert [m.data for m in got] == [str(n).encode() for n in range(100)]
            await anyio.to_thread.run_sync(cluster.revive, leader)
            with anyio.fail_after(30):  # the killed node catches up as a follower
                while True:
                    info = await js.stream_info(name)
                    replicas = (
                        {r.name: r for r in (info.cluster.replicas or [])} if info.cluster else {}
                    )
                    back = replicas.get(leader)
                    if back is not None and back.current:
                        break
                    await anyio.sleep(0.2)
        finally:
            await nc.close()
