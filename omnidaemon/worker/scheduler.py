"""ScheduleRunner: fires an app's schedules, once per tick across every worker that runs them.

There is no separate beat process: every worker runs every schedule of its app, and the bus
decides who fires each tick. A worker sleeps until a schedule's next tick; when it comes, every
worker asks for it (`schedule_state.claim`, one atomic step), and the one that gets the claim
computes the payload and publishes it with `Broker.publish_once` under a key naming the tick,
then records the tick as settled. A holder that dies loses its claim when its lease runs out,
and the next worker to ask takes the tick over: if the dead one had published already, the
same key makes the new publish a no-op, so the tick is neither lost nor doubled. Ticks are
settled in order; a tick that fell due while no worker ran was *missed*, and the schedule's
`catch_up` decides whether its latest missed tick fires once or none does
(`schedule_state.watch`). See docs/schedules.md.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import anyio

from omnidaemon.observability.logging import get_logger
from omnidaemon.schedules import SCHEDULE_HEADER, TICK_HEADER, ScheduleSpec, tick_time
from omnidaemon.worker import schedule_state as states
from omnidaemon.worker.schedule_state import (
    GAP_AFTER,
    LEASE,
    WATCH_EVERY,
    Outcome,
    ScheduleState,
    in_gap,
    state_key,
    watch_key,
)

if TYPE_CHECKING:
    from omnidaemon.app import App
    from omnidaemon.brokers.base import Broker

__all__ = ["ONCE_WINDOW", "ScheduleRunner"]

_log = get_logger("omnidaemon.schedules")

ONCE_WINDOW = 3600.0
"""Seconds a tick's publish key is remembered (`Broker.publish_once`): longer than any
takeover of a dead holder's tick (its lease, then the new holder's function) can take."""
_RETRY = 1.0  # seconds before a schedule tries again after the bus failed it


class ScheduleRunner:
    """Runs the schedules of `app` in one worker, named `holder` in the claims it makes.

    `run()` is the worker's task (it sleeps until the next tick of each schedule);
    `drive(now)` fires what is due at `now` without sleeping (`omnidaemon.testing`, whose
    clock only moves when the test says so).

    Raises:
        PayloadValidationError: a schedule's `payload=` contradicts the type an agent of the
            app declares for its topic.
    """

    def __init__(self, app: App, holder: str) -> None:
        self.app = app
        self.holder = holder
        self.specs = list(app.schedules.values())
        for spec in self.specs:
            if spec.function is None:
                app.check_payload(spec.topic, spec.payload)
        self._gaps: dict[str, list[tuple[float, float]]] = {}
        self._watched_at = -math.inf

    @property
    def broker(self) -> Broker:
        return self.app.broker

    def _key(self, spec: ScheduleSpec) -> str:
        return state_key(self.app.name, spec.name)

    async def refresh_watch(self, now: float, gap_after: float = GAP_AFTER) -> None:
        """Stamp this worker's schedules as run at `now`, learning of the gaps (spans without
        any worker) that concern them; with `gap_after=0` the time since the last stamp is a
        gap whatever its length (a test's `advance(..., offline=True)`)."""
        names = [spec.name for spec in self.specs]
        update = states.watch(names, now, gap_after)
        self._gaps = await self.broker.update_value(watch_key(self.app.name), update)
        self._watched_at = now

    async def state(self, spec: ScheduleSpec, now: float) -> ScheduleState:
        """The schedule's state, made if it has none: a new schedule starts from `now`."""
        data = await self.broker.get_value(self._key(spec))
        if data is not None:
            return ScheduleState.decode(data)
        state: ScheduleState = await self.broker.update_value(self._key(spec), states.start(now))
        return state

    async def process(self, spec: ScheduleSpec, now: float) -> float:
        """Settle every tick of `spec` due at `now` that this worker can get; return when to
        look again (the next tick, or when another worker's claim runs out)."""
        state = await self.state(spec, now)
        while True:
            tick = spec.next_after(state.last)
            if tick > now:
                return tick
            target = tick
            gap = in_gap(tick, self._gaps.get(spec.name, ()))
            if gap is not None:
                # Missed while no worker ran: the latest of them fires once, or none does.
                latest = spec.latest_at_or_before(min(gap[1], now), state.last) or tick
                if not spec.catch_up:
                    why = f"missed the ticks from {tick_time(tick).isoformat()} to " + (
                        f"{tick_time(latest).isoformat()} (no worker ran; catch_up=False)"
                    )
                    _log.warning("schedule missed ticks", schedule=spec.name, reason=why)
                    update = states.settle(latest, "missed", why)
                    state = await self.broker.update_value(self._key(spec), update)
                    continue
                target = latest
            answer, state = await self.broker.update_value(
                self._key(spec), states.claim(target, self.holder, now)
            )
            if answer == "done":
                continue
            if answer != "mine":
                # Another worker holds it: look again when the next tick is due (it has
                # settled this one by then) or when its lease runs out (it died).
                return min(float(answer), spec.next_after(target))
            state = await self._fire(spec, target)

    async def _fire(self, spec: ScheduleSpec, tick: float) -> ScheduleState:
        """Publish `tick`'s event while holding its claim, then settle the tick."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._renew, spec, tick)
            outcome, error = await self._publish(spec, tick)
            tg.cancel_scope.cancel()
        state: ScheduleState = await self.broker.update_value(
            self._key(spec), states.settle(tick, outcome, error)
        )
        return state

    async def _renew(self, spec: ScheduleSpec, tick: float) -> None:
        while True:
            await anyio.sleep(LEASE / 3)
            update = states.renew(tick, self.holder, self.broker.clock())
            if not await self.broker.update_value(self._key(spec), update):
                return  # taken over: the publish key keeps the tick from firing twice

    async def _publish(self, spec: ScheduleSpec, tick: float) -> tuple[Outcome, str | None]:
        """Make the tick's payload and publish it once. A function that raises, or a payload
        the app refuses, fails the tick (logged, not retried); the bus failing raises."""
        app, at = self.app, tick_time(tick).isoformat()
        try:
            payload: Any = await spec.make_payload(tick)
            if payload is None:
                return "empty", None
            app.check_payload(spec.topic, payload)
            _, data = app._encode(
                spec.topic,
                payload,
                f"schedule:{spec.name}:{at}",
                None,
                None,
                None,
                None,
                {SCHEDULE_HEADER: spec.name, TICK_HEADER: at},
            )
        except Exception as exc:
            _log.exception("schedule failed", schedule=spec.name, tick=at, topic=spec.topic)
            return "failed", f"{type(exc).__name__}: {exc}"
        key = f"{self._key(spec)}:{tick!r}"
        appended = await self.broker.publish_once(spec.topic, data, key, window=ONCE_WINDOW)
        _log.info("schedule fired", schedule=spec.name, tick=at, topic=spec.topic, new=appended)
        return "fired", None

    # Running ------------------------------------------------------------------------------

    async def drive(self, now: float, *, gap_after: float = math.inf) -> None:
        """Settle every tick due at `now`, in order, without sleeping. The time since the
        last call is a gap only if longer than `gap_after` (never, by default)."""
        await self.refresh_watch(now, gap_after)
        for spec in self.specs:
            await self.process(spec, now)

    async def next_due(self, now: float) -> float | None:
        """The earliest tick of any schedule not settled yet (None without schedules)."""
        dues = [spec.next_after((await self.state(spec, now)).last) for spec in self.specs]
        return min(dues, default=None)

    async def run(self) -> None:
        """Run every schedule until cancelled: one task per schedule, each asleep until its
        next tick, and one that refreshes this worker's watch stamps."""
        if not self.specs:
            return
        clock = self.broker.clock
        while True:
            try:
                await self.refresh_watch(clock())
                break
            except Exception:
                _log.exception("schedules could not reach the bus; retrying")
                await anyio.sleep(_RETRY)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_loop)
            for spec in self.specs:
                tg.start_soon(self._schedule_loop, spec)

    async def _watch_loop(self) -> None:
        while True:
            await anyio.sleep(WATCH_EVERY)
            try:
                await self.refresh_watch(self.broker.clock())
            except Exception:
                _log.exception("schedules could not refresh their watch stamps")

    async def _schedule_loop(self, spec: ScheduleSpec) -> None:
        clock = self.broker.clock
        while True:
            try:
                now = clock()
                if now - self._watched_at > 2 * WATCH_EVERY:
                    # This worker was paused (or its watch failed): learn of a gap first.
                    await self.refresh_watch(now)
                wake = await self.process(spec, now)
            except Exception:
                _log.exception("schedule could not run", schedule=spec.name)
                wake = clock() + _RETRY
            await anyio.sleep(max(0.001, wake - clock()))
