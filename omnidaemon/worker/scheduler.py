"""ScheduleRunner: fires an app's schedules, once per tick across every worker that runs them.

There is no separate beat process: every worker runs every schedule of its app, and the bus
decides who fires each tick. A worker sleeps until a schedule's next tick; when it comes, every
worker asks for it (`schedule_state.claim`, one atomic step), and the one that gets the claim
computes the payload and publishes it with `Broker.publish_once` under a key naming the tick,
then records the tick as settled. A holder that dies loses its claim when its lease runs out,
and the next worker to ask takes the tick over: if the dead one had published already, the
same key makes the new publish a no-op, so the tick is neither lost nor doubled. Ticks are
settled in order. A tick that fell due while no worker ran (`schedule_state.watch`) is
*owed* (fired, late) if a worker claimed it, or if the first worker after the outage came
within its grace (`missed`); otherwise it was *missed*, and the schedule's `catch_up` decides
whether the latest missed tick fires once or none does. See docs/schedules.md.
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
    MISFIRE_GRACE,
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

__all__ = ["ScheduleRunner", "missed", "once_window"]

_log = get_logger("omnidaemon.schedules")


def once_window(period: float) -> float:
    """Seconds a tick's publish key is remembered (`Broker.publish_once`): 10,000 periods,
    at least an hour, at most a week. A tick whose holder died is fired by the next worker
    to run the schedule, after an outage of the whole fleet too (it is owed); if the dead
    holder had published it, the key refuses the second publish for this long (an outage
    longer than that may publish it twice). Counted in periods so that a schedule keeps at
    most about 10,000 keys on the bus, however often it fires."""
    return min(7 * 86_400.0, max(3600.0, 10_000 * period))


_RETRY = 1.0  # seconds before a schedule tries again after the bus failed it
_MAX_SLEEP = 60.0  # a schedule's task looks at the wall clock at least this often


def missed(spec: ScheduleSpec, tick: float, gap_end: float) -> bool:
    """Whether `tick`, which fell due in a gap (a time when no worker ran the schedule)
    that ended at `gap_end` (when the first worker after it ran the schedule), was missed:
    `gap_end` came more than the misfire grace after it, the shorter of `MISFIRE_GRACE`
    (60 s) and the schedule's period around the tick. Otherwise it is owed, and fires late:
    a worker restarted within seconds does not skip its daily report."""
    return gap_end - tick > min(MISFIRE_GRACE, spec.period_at(tick))


class ScheduleRunner:
    """Runs the schedules of `app` in one worker, named `holder` in the claims it makes.

    `run()` is the worker's task (it sleeps until the next tick of each schedule);
    `drive(now)` fires what is due at `now` without sleeping (`omnidaemon.testing`, whose
    clock only moves when the test says so).

    Raises:
        PayloadValidationError: a schedule's `payload=` contradicts the type an agent of the
            app declares for its topic.
        ConfigurationError: a schedule was declared without `payload=` and never decorated.
    """

    def __init__(self, app: App, holder: str) -> None:
        app.check_schedules()
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
            target, catching_up = tick, False
            held = state.claim
            gap = in_gap(tick, self._gaps.get(spec.name, ()))
            if held is not None and state.last < held.tick <= now:
                # Claimed and not settled: its holder is firing it, or died doing so. Owed,
                # whatever gap it fell in (the holder ran; its stamps may predate the tick).
                target = held.tick
            elif gap is not None and missed(spec, tick, gap[1]):
                after = await self._skip_missed(spec, state, tick, gap[1], now)
                if isinstance(after, ScheduleState):
                    state = after
                    continue
                target, catching_up = after, True
            answer, state = await self.broker.update_value(
                self._key(spec), states.claim(target, self.holder, now)
            )
            if answer == "done":
                continue
            if answer != "mine":
                # Another worker holds it: look again when the next tick is due (it has
                # settled this one by then) or when its lease runs out (it died).
                return min(float(answer), spec.next_after(target))
            if not catching_up and now - target > spec.period_at(target):
                # Logged by the worker that fires the tick, once: the next tick is due too.
                _log.warning(
                    "schedule behind",
                    schedule=spec.name,
                    tick=tick_time(target).isoformat(),
                    late=round(now - target, 3),
                )
            state = await self._fire(spec, target)

    async def _skip_missed(
        self, spec: ScheduleSpec, state: ScheduleState, tick: float, gap_end: float, now: float
    ) -> ScheduleState | float:
        """`tick` and maybe later ticks of its gap were missed: skip them (settled as
        `missed`) up to the last missed one, and answer the new state; or, with `catch_up`
        and no owed tick after them, answer the latest of them, to fire once."""
        latest = spec.latest_at_or_before(min(gap_end, now), state.last) or tick
        last_missed: float | None = latest
        # The owed ticks of a gap are its last one or two (see `missed`): a short walk back.
        while last_missed is not None and not missed(spec, last_missed, gap_end):
            last_missed = spec.previous(last_missed, state.last)
        last_missed = tick if last_missed is None else last_missed
        if spec.catch_up and last_missed == latest:
            return latest
        why = f"missed the ticks from {tick_time(tick).isoformat()} to " + (
            f"{tick_time(last_missed).isoformat()} (no worker ran; "
            + ("a later tick is owed and fires)" if spec.catch_up else "catch_up=False)")
        )
        _log.warning("schedule missed ticks", schedule=spec.name, reason=why)
        update = states.settle(last_missed, "missed", why)
        settled: ScheduleState = await self.broker.update_value(self._key(spec), update)
        return settled

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
        limit = spec.timeout_at(tick)
        try:
            payload: Any = None
            with anyio.move_on_after(limit) as scope:
                payload = await spec.make_payload(tick)
            if scope.cancelled_caught:
                why = f"TimeoutError: the function ran past its timeout of {limit:g} s"
                _log.error("schedule failed", schedule=spec.name, tick=at, reason=why)
                return "failed", why
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
        window = once_window(spec.period_at(tick))
        appended = await self.broker.publish_once(spec.topic, data, key, window=window)
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
            # At most a minute at a time: a long sleep on the monotonic clock drifts from the
            # wall clock the ticks are on (a suspended machine, a clock set by NTP).
            await anyio.sleep(min(_MAX_SLEEP, max(0.001, wake - clock())))
