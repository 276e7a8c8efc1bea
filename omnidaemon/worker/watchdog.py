"""A watchdog that notices when something blocks the worker's event loop, and says what.

A handler that blocks the loop (an `async def` calling `time.sleep`, a sync HTTP client, a
CPU-bound loop) stops everything else the worker does on it: lease renewal above all, so after
`reclaim_idle` another worker takes its events over and runs them a second time. Nothing on the
loop can report that while it happens, so a task on the loop ticks a timestamp and a daemon
thread checks it. When the loop has not ticked for longer than the threshold, the thread logs
one warning per stall, naming what is running on the loop at that moment.

To name it, the thread reads the loop thread's current Python stack (`sys._current_frames`):
the frame of `AgentConsumer._run_handler` on it says which agent and which event, and the
innermost frame says where the blocking call is. That costs nothing per event, and it names
the culprit alone where a registry of running handlers would name every handler in flight.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

import anyio

from omnidaemon.observability.logging import get_logger

__all__ = ["LoopWatchdog"]

_log = get_logger("omnidaemon.worker")
_MAX_TICK = 0.25  # seconds between ticks of the loop side, and between checks of the thread
_FIX = (
    "make the handler a plain `def` (the worker runs it in a thread), or move the blocking "
    "call off the loop with `await anyio.to_thread.run_sync(...)`"
)
_PACKAGE_DIR = str(Path(__file__).parents[1])  # omnidaemon/: the framework's frames


class LoopWatchdog:
    """Warns once per stall when the event loop it runs on is blocked for over `threshold` s.

    Args:
        threshold: Seconds without a tick that count as a blocked loop (`OMNIDAEMON_BLOCKED_LOOP`,
            1 s by default).
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._tick = min(_MAX_TICK, threshold / 4)
        self._last_tick = time.monotonic()
        self._loop_thread = 0
        # (monotonic end, seconds) of the last stall over the threshold, seen from the loop.
        self._last_stall: tuple[float, float] | None = None

    async def run(self) -> None:
        """Tick on the loop, with the checking thread alive, until cancelled."""
        self._loop_thread = threading.get_ident()
        self._last_tick = time.monotonic()
        stop = threading.Event()
        thread = threading.Thread(
            target=self._watch, args=(stop,), name="omnidaemon-loop-watchdog", daemon=True
        )
        thread.start()
        try:
            while True:
                await anyio.sleep(self._tick)
                now = time.monotonic()
                gap = now - self._last_tick
                if gap > self.threshold:
                    self._last_stall = (now, gap)
                self._last_tick = now
        finally:
            stop.set()

    def recent_stall(self, within: float) -> float | None:
        """How long the loop was last blocked, if that stall ended less than `within` s ago
        (or still goes on); else None. For log lines about what a stall may have caused."""
        now = time.monotonic()
        ongoing = now - self._last_tick
        if ongoing > self.threshold:
            return ongoing
        if self._last_stall is not None and now - self._last_stall[0] <= within:
            return self._last_stall[1]
        return None

    def _watch(self, stop: threading.Event) -> None:
        reported = 0.0  # the tick whose stall has been reported: one warning per stall
        while not stop.wait(self._tick):
            last = self._last_tick
            if last != reported and time.monotonic() - last > self.threshold:
                reported = last
                self._report()

    def _report(self) -> None:
        # Logged from this thread: the loop is blocked, and cannot log anything itself.
        frame = sys._current_frames().get(self._loop_thread)
        fields = _describe(frame) if frame is not None else {}
        if "agent" in fields:
            _log.warning(
                f"the event loop has been blocked for over {self.threshold:g} s by a handler; "
                "nothing else on it runs meanwhile, leases included, so another worker may "
                f"run this event again: {_FIX}",
                **fields,
            )
        else:
            _log.warning(
                f"the event loop has been blocked for over {self.threshold:g} s; nothing else "
                "on it runs meanwhile, handlers and lease renewal included: move blocking "
                "calls off the loop with `await anyio.to_thread.run_sync(...)`",
                **fields,
            )


def _describe(top: FrameType) -> dict[str, Any]:
    """What runs on a stack: where (the innermost frame) and, when a handler is running, its
    agent, event and handler function (the frame the handler's runner called)."""
    from omnidaemon.worker.consumer import AgentConsumer  # the consumer imports this module

    runner = AgentConsumer._run_handler.__code__
    fields: dict[str, Any] = {
        "where": f"{top.f_code.co_filename}:{top.f_lineno} in {top.f_code.co_name}"
    }
    handler_frame: FrameType | None = None
    frame: FrameType | None = top
    while frame is not None:
        if frame.f_code is runner:
            try:
                consumer = frame.f_locals["self"]
                envelope = frame.f_locals["envelope"]
                fields["agent"] = consumer.subscription.group
                fields["topic"] = envelope.topic
                fields["event_id"] = envelope.id
                handler = consumer._spec.handler
                fields["handler"] = f"{handler.__module__}.{handler.__qualname__}"
            except (KeyError, AttributeError):  # pragma: no cover - a frame caught mid-change
                pass
            if handler_frame is not None:
                code = handler_frame.f_code
                fields["where"] = f"{code.co_filename}:{handler_frame.f_lineno} in {code.co_name}"
            break
        # The outermost frame below the runner that is not the framework's: the user's code.
        if not frame.f_code.co_filename.startswith(_PACKAGE_DIR):
            handler_frame = frame
        frame = frame.f_back
    return fields
