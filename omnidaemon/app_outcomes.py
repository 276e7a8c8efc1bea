"""What became of events, and stopping them: `cancel`, `result`, `trace`, `runs`,
`dead_letters` and `replay_dead_letters`. `App` inherits it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from omnidaemon.agents import AgentSpec
from omnidaemon.brokers import Broker, Subscription
from omnidaemon.dead_letters import DeadLetter, warn_undecodable
from omnidaemon.results import Result, wait_result
from omnidaemon.settings import Settings

if TYPE_CHECKING:
    from omnidaemon.cancellation import Cancellation
    from omnidaemon.traces import RunStatus, RunSummary, Trace
    from omnidaemon.worker.cancels import CancelWatch

__all__ = ["EventOutcomes"]


class EventOutcomes:
    """The outcomes side of `App`."""

    # Set by App.__init__, or defined by App.
    settings: Settings
    _cancel_watches: set[CancelWatch]

    if TYPE_CHECKING:  # defined by App

        @property
        def broker(self) -> Broker: ...

        async def connect(self) -> None: ...

        def get_agent(self, name: str) -> AgentSpec: ...

    async def cancel(
        self,
        event_id: str | None = None,
        *,
        correlation_id: str | None = None,
        reason: str = "cancelled",
        agent: str | Iterable[str] | None = None,
    ) -> Cancellation:
        """Cancel one event, or every event of a run, across the whole fleet.

        An event not started yet (waiting, delayed, retrying, held back by flow control) is
        never started; a running `async def` handler is stopped within about a second on
        whichever worker runs it (`CancelledError` at its next `await`), a plain `def` one is
        told through `ctx.cancelled`. Either way the delivery is settled as `cancelled`, not
        retried: recorded (`store_results`), counted, sent to its webhook, and a waiting
        `request()` raises `Cancelled`. A handler that finishes before its worker learns of
        the cancellation keeps its outcome: each event gets exactly one.

        Args:
            event_id: The event to cancel (what `publish` returned).
            correlation_id: Instead, cancel the whole run: every event with this correlation
                id not finished yet, including those its handlers publish later.
            reason: Why; recorded with the outcome.
            agent: Only this agent's (or these agents') handling of the event; default: all.

        Returns:
            The cancellation as stored (merged with an earlier one of the same event). It is
            kept for `cancel_ttl` (OMNIDAEMON_CANCEL_TTL, 7 days).

        Raises:
            ValueError: neither or both of `event_id` and `correlation_id`, or `agent` with
                `correlation_id`.
        """
        from omnidaemon.cancellation import cancellation_for, record_cancellation

        await self.connect()
        cancellation = cancellation_for(
            event_id,
            correlation_id=correlation_id,
            reason=reason,
            agents=agent,
            now=self.broker.clock(),
            ttl=self.settings.cancel_ttl,
        )
        stored = await record_cancellation(self.broker, cancellation)
        for watch in list(self._cancel_watches):
            watch.learn([stored])  # workers of this process: at once, not at their next look
        return stored

    async def result(
        self, event_id: str, *, agent: str | None = None, timeout: float | None = None
    ) -> Result:
        """The stored status and result of an event, from agents with `store_results=True`.

        Args:
            event_id: The id `publish` returned.
            agent: Which agent's result, when several agents store results for the event.
            timeout: Wait up to this many seconds for the event to finish (`succeeded` or
                `dead_lettered`); `None` returns the current status at once.

        Returns:
            The result; status `pending` while nothing is stored yet (or the id is unknown,
            or its result expired).

        Raises:
            TimeoutError: `timeout` passed before the event finished.
            ValueError: several agents stored results and `agent` was not given.
        """
        await self.connect()
        return await wait_result(self.broker, event_id, agent, timeout)

    async def trace(self, run_or_event_id: str) -> Trace | None:
        """The trace of a whole run: every event sharing one correlation id, as a causal
        tree of events, each agent's handling of them with every attempt (worker, times,
        outcome, error), and the events each handling published.

        Workers write it with their acknowledgements, and the bus keeps each record
        `OMNIDAEMON_TRACE_TTL` (24 h) after its write.

        Args:
            run_or_event_id: The run's correlation id, or the id of any of its events
                (the first event's id is the run's id unless the publisher chose one).

        Returns:
            The trace, or `None` when the bus holds none (unknown id, nothing handled yet,
            or expired).
        """
        from omnidaemon.traces.reading import find_trace

        await self.connect()
        return await find_trace(self.broker, run_or_event_id)

    async def runs(
        self,
        *,
        since: timedelta = timedelta(hours=1),
        status: RunStatus | None = None,
        limit: int = 50,
    ) -> list[RunSummary]:
        """Recent runs, the most recently active first: each with its status, start,
        duration, size and the agent that failed (`omnidaemon runs`).

        Args:
            since: How far back to look (by each run's last activity).
            status: Only runs with this status (`running`, `succeeded`, `failed`,
                `cancelled`).
            limit: The most runs returned.
        """
        from omnidaemon.traces.reading import list_runs

        await self.connect()
        start = time.time() - since.total_seconds()
        return await list_runs(self.broker, since=start, status=status, limit=limit)

    async def dead_letters(self, agent: str, *, limit: int = 100) -> list[DeadLetter]:
        """The `limit` most recent events in `agent`'s dead-letter queue, oldest first: its
        queues on the topic's priority lanes included, merged by the time the agent gave up.

        A record among them that cannot be read (not written by a worker) is skipped and
        logged as a warning with its id and why (`omnidaemon bus dlq` lists them too)."""
        from omnidaemon.lanes_view import dead_letters_with_lanes, read_lane_dead_letters

        spec = self.get_agent(agent)
        await self.connect()
        sub = Subscription(spec.topic, spec.name)
        records = await dead_letters_with_lanes(self.broker, sub, limit)
        letters, undecodable = read_lane_dead_letters(records, spec.topic, spec.name)
        if spec.debounce is not None:
            from omnidaemon.debounce.view import merge_dead_letters

            letters, undecodable = await merge_dead_letters(
                self.broker, spec, letters, undecodable, limit
            )
        warn_undecodable(undecodable, "skipped")
        return letters

    async def replay_dead_letters(
        self, agent: str, *, event_ids: Iterable[str] | None = None
    ) -> int:
        """Deliver dead-lettered events to `agent` again, each as a new first attempt.

        Only `agent` sees them again; other agents on the topic are not disturbed. The records
        leave the dead-letter queue as they are re-queued; an event of a priority lane goes
        back into that lane, keeping its priority.

        Args:
            agent: Whose dead-letter queue.
            event_ids: Replay only these events; default: every record in the queue.

        Returns:
            How many events were re-queued. A record that cannot be read is not: it stays in
            the queue and is logged as a warning.
        """
        from omnidaemon.lanes_view import LaneSelections, replay_with_lanes

        spec = self.get_agent(agent)
        ids = None if event_ids is None else set(event_ids)
        select = LaneSelections(spec.topic, spec.name, ids)
        await self.connect()
        moved = await replay_with_lanes(self.broker, Subscription(spec.topic, spec.name), select)
        warn_undecodable(select.undecodable, "not replayable, left in the queue")
        if spec.debounce is not None:
            from omnidaemon.debounce.view import replay_internal

            batches, undecodable = await replay_internal(self.broker, spec, ids)
            warn_undecodable(undecodable, "not replayable, left in the queue")
            moved += batches
        return moved
