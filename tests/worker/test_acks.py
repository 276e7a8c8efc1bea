"""Batched acknowledgements: nothing finished is left unacknowledged."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anyio
import pytest

from omnidaemon.brokers import Delivery, MemoryBroker, Subscription
from omnidaemon.brokers.traces import TraceWrite
from omnidaemon.metrics import AgentMetrics
from omnidaemon.worker.acks import AckBatcher
from omnidaemon.worker.lanes import AgentQueue

pytestmark = pytest.mark.anyio


class SlowAcks(MemoryBroker):
    """Records every ack and takes a while over each, so sends overlap."""

    def __init__(self) -> None:
        super().__init__(None)
        self.acked: list[str] = []
        self.counted: dict[str, int] = {}

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        await anyio.sleep(0.05)
        self.acked += [d.id for d in deliveries]
        for name, increment in (stats or {}).items():
            self.counted[name] = self.counted.get(name, 0) + increment


async def test_a_flush_during_a_send_drops_nothing() -> None:
    broker = SlowAcks()
    acks = AckBatcher(AgentQueue(broker, Subscription("a.b", "g")), max_delay=0.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.run)
        acks.add(Delivery("1", b"", 1), urgent=True)
        await anyio.sleep(0.01)  # the background send of "1" is under way
        async with anyio.create_task_group() as inner:
            inner.start_soon(acks.flush)
            await anyio.sleep(0.01)
            acks.add(Delivery("2", b"", 1))  # arrives while the flush waits
        await acks.flush()
        tg.cancel_scope.cancel()
    assert sorted(set(broker.acked)) == ["1", "2"]


async def test_batches_are_sent_together_after_the_delay() -> None:
    broker = SlowAcks()
    acks = AckBatcher(AgentQueue(broker, Subscription("a.b", "g")), max_delay=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.run)
        for i in range(5):
            acks.add(Delivery(str(i), b"", 1))
        with anyio.fail_after(2):
            while len(broker.acked) < 5:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert broker.acked == ["0", "1", "2", "3", "4"]


async def test_counts_that_change_during_a_send_reach_the_bus_without_another_ack() -> None:
    broker = SlowAcks()
    metrics = AgentMetrics("a.b", "g")
    acks = AckBatcher(
        AgentQueue(broker, Subscription("a.b", "g")),
        max_delay=0.0,
        metrics=metrics,
        stats_interval=0.1,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.run)
        metrics.succeeded += 1
        acks.add(Delivery("1", b"", 1))
        await anyio.sleep(0.02)  # the send of "1" is on its way
        metrics.succeeded += 1
        acks.add(Delivery("2", b"", 1))  # joins the send under way; sets off nothing new
        with anyio.fail_after(2):
            while broker.counted.get("succeeded", 0) < 2:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert broker.acked == ["1", "2"]
    assert broker.counted["succeeded"] == 2


class CountingAcks(SlowAcks):
    """Also records how many sends there were, and what each carried."""

    def __init__(self) -> None:
        super().__init__()
        self.sends: list[tuple[int, bool]] = []  # (deliveries, carried counts)

    async def ack(
        self,
        sub: Subscription,
        deliveries: Sequence[Delivery],
        *,
        stats: Mapping[str, int] | None = None,
        trace: TraceWrite | None = None,
    ) -> None:
        self.sends.append((len(deliveries), bool(stats)))
        await super().ack(sub, deliveries, stats=stats, trace=trace)


async def test_deliveries_finished_during_a_send_go_out_together_in_the_next_one() -> None:
    broker = CountingAcks()
    acks = AckBatcher(AgentQueue(broker, Subscription("a.b", "g")), max_delay=0.01)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.run)
        acks.add(Delivery("0", b"", 1))
        with anyio.fail_after(2):
            while not broker.sends:
                await anyio.sleep(0.001)
        for i in range(1, 6):  # all while the first send (50 ms) is on its way
            acks.add(Delivery(str(i), b"", 1))
        with anyio.fail_after(2):
            while len(broker.acked) < 6:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert broker.acked == [str(i) for i in range(6)]
    assert [size for size, _ in broker.sends] == [1, 5]


async def test_counts_are_written_once_per_interval_and_without_any_ack() -> None:
    broker = CountingAcks()
    metrics = AgentMetrics("a.b", "g")
    acks = AckBatcher(
        AgentQueue(broker, Subscription("a.b", "g")),
        max_delay=0.0,
        metrics=metrics,
        stats_interval=0.3,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(acks.run)
        for i in range(3):  # three sends in a row, well within one interval
            metrics.succeeded += 1
            acks.add(Delivery(str(i), b"", 1))
            with anyio.fail_after(2):
                while len(broker.acked) < i + 1:
                    await anyio.sleep(0.005)
        metrics.retried += 1  # a count that no ack will carry
        with anyio.fail_after(2):
            while broker.counted.get("retried", 0) < 1:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert broker.acked == ["0", "1", "2"]
    assert [carried for _, carried in broker.sends[:3]] == [True, False, False]
    assert broker.counted["succeeded"] == 3
    assert broker.counted["retried"] == 1
