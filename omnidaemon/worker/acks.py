"""Batched acknowledgements: one broker round trip for many finished deliveries."""

from __future__ import annotations

import time

import anyio

from omnidaemon.brokers.base import Delivery
from omnidaemon.brokers.traces import TraceNotWritten
from omnidaemon.metrics import AgentMetrics
from omnidaemon.observability.logging import get_logger
from omnidaemon.traces.records import TraceBook
from omnidaemon.worker.lanes import AgentQueue

__all__ = ["AckBatcher"]

_log = get_logger("omnidaemon.worker")


class AckBatcher:
    """Collects finished deliveries and acknowledges them in batches.

    A batch is sent when it holds `max_batch` deliveries or `max_delay` seconds after its first
    one, whichever comes first; deliveries that finish while a batch is on its way start the
    next batch, so a busy agent sends one ack per `max_delay`, not one per fetch. A failed ack
    is kept and tried again; an ack that never reaches the broker only means the event is
    delivered again (at least once), never lost.

    The agent's `metrics` ride along: what changed in them since the last write goes out with
    the first send after `stats_interval` seconds, or on its own once that time has passed
    with no ack to carry it. Writing them with every batch would cost a busy worker more than
    the acks themselves.
    """

    def __init__(
        self,
        queue: AgentQueue,
        *,
        max_batch: int = 256,
        max_delay: float = 0.002,
        metrics: AgentMetrics | None = None,
        stats_interval: float = 1.0,
        trace: TraceBook | None = None,
        trace_delay: float = 0.05,
    ) -> None:
        self._queue = queue
        self._metrics = metrics
        self._trace = trace if trace is not None and trace.enabled else None
        self._trace_delay = trace_delay
        self._trace_failures = 0  # writes of trace records failed in a row
        self._sub = queue.subscription
        self._max_batch = max_batch
        self._max_delay = max_delay
        self._stats_interval = stats_interval
        self._stats_due = -float("inf")  # loop time from which counts go out with a send
        self._pending: list[Delivery] = []
        self._ready = anyio.Event()
        self._urgent = False
        # One send at a time: `flush()` may run while `run()` is sending, and two sends of the
        # same batch would each remove a batch's worth from the queue, dropping acks unsent.
        self._sending = anyio.Lock()

    def add(self, delivery: Delivery, *, urgent: bool = False) -> None:
        """Queue a delivery whose handler finished and whose outputs are written.

        `urgent` sends the batch without waiting for more.
        """
        self._pending.append(delivery)
        self._urgent = self._urgent or urgent
        if len(self._pending) == 1 or len(self._pending) >= self._max_batch or urgent:
            self._ready.set()

    def traced(self) -> None:
        """A trace record was added to the agent's `TraceBook`: it goes with the next batch,
        or on its own `trace_delay` seconds after the first of them if no ack comes."""
        if not self._pending and self._trace is not None and len(self._trace) == 1:
            self._ready.set()

    @property
    def traces_unsent(self) -> bool:
        """Whether trace records wait in the book or are on their way to the bus."""
        return self._trace is not None and (len(self._trace) > 0 or self._sending.locked())

    def waiting(self) -> set[tuple[str, str]]:
        """`(origin, id)` of the deliveries queued or on their way, not acknowledged yet."""
        return {(d.origin, d.id) for d in self._pending}

    def unsettled(self) -> list[Delivery]:
        """The deliveries queued or on their way, not acknowledged yet (their leases must be
        renewed like running handlers': an ack that waits for replicas can take seconds)."""
        return list(self._pending)

    async def run(self) -> None:
        """Send batches until cancelled."""
        failures = 0
        while True:
            # With metrics to keep up to date, wake when they are due even if nothing is acked.
            wait = None
            if self._metrics is not None:
                wait = max(0.0, self._stats_due - anyio.current_time())
            # A long handler's start record falls due while nothing else may be sent.
            start_due = self._trace.start_due() if self._trace is not None else None
            if start_due is not None:
                until = max(0.0, start_due - time.time())
                wait = until if wait is None else min(wait, until)
            with anyio.move_on_after(wait):
                await self._ready.wait()
            self._ready = anyio.Event()
            if not self._pending and self._trace is not None and len(self._trace):
                # Woken for trace records alone: more may come, and an ack to carry them.
                with anyio.move_on_after(self._trace_delay):
                    await self._ready.wait()
                self._ready = anyio.Event()
            if self._pending and len(self._pending) < self._max_batch and not self._urgent:
                await anyio.sleep(self._max_delay)
            self._urgent = False
            try:
                await self._send(everything=False)
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1:
                    _log.warning(
                        "acknowledgements failed; retrying",
                        agent=self._sub.group,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                await anyio.sleep(min(5.0, 0.05 * 2**failures))
                self._ready.set()

    async def flush(self, attempts: int = 5) -> None:
        """Send everything queued and every count, shielded from cancellation; used on
        shutdown and before a delivery that might kill the worker runs."""
        with anyio.CancelScope(shield=True):
            for attempt in range(attempts):
                if not self._pending and not self._metrics_delta() and not self._traces_waiting():
                    return
                try:
                    await self._send(everything=True)
                except Exception as exc:
                    if attempt == attempts - 1:
                        _log.error(
                            "could not acknowledge finished events before exit; "
                            "they will be delivered again",
                            agent=self._sub.group,
                            count=len(self._pending),
                            error=f"{type(exc).__name__}: {exc}",
                        )
                        return
                    await anyio.sleep(0.1 * 2**attempt)

    def _metrics_delta(self) -> dict[str, int]:
        return self._metrics.delta() if self._metrics is not None else {}

    def _trace_failed(self, exc: TraceNotWritten) -> None:
        self._trace_failures += 1
        if self._trace_failures == 1:
            _log.warning(
                "trace records not written; they go again with the next acknowledgements",
                agent=self._sub.group,
                error=f"{type(exc.__cause__).__name__}: {exc.__cause__}",
            )

    def _traces_waiting(self) -> bool:
        return self._trace is not None and len(self._trace) > 0

    async def _send(self, *, everything: bool) -> None:
        """Send one batch (with the counts, when due), or with `everything` all that is
        queued and every count."""
        async with self._sending:
            while True:
                # Taken afresh for every batch: counts that changed while the previous batch
                # was on its way go out with this one.
                stats: dict[str, int] = {}
                now = anyio.current_time()
                if everything or now >= self._stats_due:
                    stats = self._metrics_delta()
                    if not stats:
                        self._stats_due = now + self._stats_interval
                trace = self._trace.take() if self._trace is not None else None
                if not self._pending and not stats and trace is None:
                    break
                batch = self._pending[: self._max_batch]
                try:
                    await self._queue.ack(batch, stats=stats, trace=trace)
                except TraceNotWritten as exc:
                    # Acked and counted: only the records go again, with the next batch.
                    assert self._trace is not None and trace is not None
                    self._trace.restore(trace)
                    self._trace_failed(exc)
                except BaseException:
                    if trace is not None:
                        assert self._trace is not None
                        self._trace.restore(trace)
                    raise
                else:
                    self._trace_failures = 0
                del self._pending[: len(batch)]  # appends happen at the end only
                if stats and self._metrics is not None:
                    self._metrics.commit(stats)
                    self._stats_due = anyio.current_time() + self._stats_interval
                if not everything:
                    break
        if self._pending:
            # What finished while this batch was on its way is the start of the next one.
            self._ready.set()
