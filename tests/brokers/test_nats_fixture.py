"""The NATS fixture itself, driven with nats-py's JetStream client: a JetStream server that
keeps its stream across a SIGKILL and restart. (The three-node cluster is exercised through
the broker, with workers, in `test_nats_cluster.py`.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from uuid import uuid4

import nats
import pytest
from nats.js.api import StreamConfig

from tests.nats import running_nats

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
