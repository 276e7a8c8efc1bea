"""Supervisor: runs N worker processes, restarts the ones that die, and stops them all gracefully.

`omnidaemon worker APP --processes N` runs one `Supervisor` whose children are ordinary
single-process workers. The supervisor does no event handling itself: it only starts children,
waits on them, and forwards stop signals, so a crash in a handler (or the interpreter) costs one
child, never the whole fleet; the bus's reclaim hands the dead child's in-flight events on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from collections.abc import Callable, Mapping, Sequence

import anyio
from anyio.abc import Process, TaskStatus

from omnidaemon.observability.logging import get_logger
from omnidaemon.retry import Backoff

__all__ = ["RESTART_BACKOFF", "WORKER_INDEX_ENV", "Supervisor"]

_log = get_logger("omnidaemon.supervisor")

WORKER_INDEX_ENV = "OMNIDAEMON_WORKER_INDEX"
"""The environment variable that tells a child which slot (0 to N-1) it runs in."""

RESTART_BACKOFF = Backoff(initial=0.5, factor=2.0, maximum=30.0, jitter=False)
"""The default delay before restarting a slot: 0.5 s after its first death, doubling, capped
at 30 s."""

# The exit status of `omnidaemon worker` on a bad command line or app (argparse's convention).
_CONFIG_ERROR = 2
# After the second signal children exit at once; one that does not is hung, not busy.
_HARD_STOP_KILL_AFTER = 5.0
# Children get this long past their own shutdown grace before they are SIGKILLed: enough to
# flush acknowledgements and close connections after the grace ran out.
_GRACE_MARGIN = 10.0


def _describe(returncode: int | None) -> dict[str, object]:
    """Log fields for an exit status: the exit code, or the name of the signal that killed it."""
    if returncode is None:
        return {"exit_code": None}
    if returncode < 0:
        try:
            return {"signal": signal.Signals(-returncode).name}
        except ValueError:
            return {"signal": -returncode}
    return {"exit_code": returncode}


class Supervisor:
    """Keeps `processes` worker processes running until stopped.

    Each child runs in a numbered slot (0 to `processes - 1`). When a child dies while the
    supervisor is not stopping, its slot waits out a capped exponential backoff and starts a
    replacement; the backoff restarts from `restart_backoff.initial` once a child of the slot
    stayed up for `restart_reset_after` seconds. A child that exits with status 2 (a
    configuration error: a bad app path or option, credentials the bus refuses) is not
    replaced, since the same command would fail the same way; once every slot has ended so,
    `run()` returns 2.

    The first SIGINT or SIGTERM is forwarded to every child, which finishes its in-flight
    handlers within its own shutdown grace; children still alive `shutdown_grace + 10` seconds
    later are SIGKILLed. A second signal is forwarded too (children exit at once) and `run()`
    returns `128 + signum`.

    Children are started in sessions of their own, so a Ctrl-C on a terminal reaches the
    supervisor alone and each child gets exactly one signal per signal the supervisor gets.

    Args:
        command: Returns the argv of the child of a slot, given the slot's index.
        processes: How many children to keep running.
        shutdown_grace: Seconds the children's graceful stop may take (their own
            `--shutdown-grace`); they are killed 10 s after it.
        env: Variables added to the supervisor's environment for every child, which also gets
            `OMNIDAEMON_WORKER_INDEX` set to its slot's index.
        restart_backoff: The delay before restarting a slot after its n-th death in a row.
        restart_reset_after: Seconds a child must stay up for its slot's backoff to restart
            from the beginning.

    Raises:
        ValueError: `processes` < 1, or a negative duration.

    Example:
        ```python
        command = lambda i: [sys.executable, "-m", "omnidaemon", "worker", "myapp:app"]
        sys.exit(anyio.run(Supervisor(command, 4).run))
        ```
    """

    def __init__(
        self,
        command: Callable[[int], Sequence[str]],
        processes: int,
        *,
        shutdown_grace: float = 30.0,
        env: Mapping[str, str] | None = None,
        restart_backoff: Backoff = RESTART_BACKOFF,
        restart_reset_after: float = 60.0,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, not {processes}")
        if min(shutdown_grace, restart_reset_after) < 0:
            raise ValueError("durations must be >= 0")
        self.command = command
        self.processes = processes
        self.shutdown_grace = shutdown_grace
        self.env = dict(env or {})
        self.restart_backoff = restart_backoff
        self.restart_reset_after = restart_reset_after
        self._procs: dict[int, Process] = {}
        self._stopping = False
        self._stop_signals: set[int] = set()
        self._hard_signal: int | None = None
        self._failed_during_stop = False
        # Slots whose child exited with status 2 (a configuration error): not restarted.
        self._config_errors: set[int] = set()
        self._argv: dict[int, list[str]] = {}
        # Created by run(): anyio primitives need the event loop.
        self._stop_event: anyio.Event | None = None
        self._hard_event: anyio.Event | None = None

    @property
    def children(self) -> dict[int, int]:
        """The pids of the live children, by slot index."""
        return {i: p.pid for i, p in sorted(self._procs.items()) if p.returncode is None}

    def stop(self) -> None:
        """Stop gracefully, as on a first SIGTERM: forward SIGTERM to every child and return
        from `run()` once they are gone. Call it from the event loop `run()` runs in."""
        self._begin_stop(signal.SIGTERM, "stop requested")

    async def run(self) -> int:
        """Start the children and keep them running until SIGINT, SIGTERM or `stop()`.

        Returns:
            The exit status: 0 after a graceful stop, 1 if a child exited with a failure (or
            had to be killed) during it, `128 + signum` after a second signal, 2 when every
            child exited with status 2, a configuration error.
        """
        self._stop_event = anyio.Event()
        self._hard_event = anyio.Event()
        if self._stopping:  # stop() before run(): nothing to start
            return 0
        try:
            async with anyio.create_task_group() as tg:
                # Signals are handled before any child exists, so no signal can end the
                # supervisor's process by default and orphan a child.
                await tg.start(self._watch_signals)
                tg.start_soon(self._enforce_deadlines)
                async with anyio.create_task_group() as slots:
                    for index in range(self.processes):
                        slots.start_soon(self._run_slot, index)
                tg.cancel_scope.cancel()
        finally:
            if self._procs:
                with anyio.CancelScope(shield=True):
                    await self._terminate_all()
        if len(self._config_errors) == self.processes:
            return _CONFIG_ERROR
        if self._hard_signal is not None:
            return 128 + self._hard_signal
        return 1 if self._failed_during_stop else 0

    # Stopping ------------------------------------------------------------------------------

    def _begin_stop(self, signum: int, reason: str) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._stop_signals.add(signum)
        if self._stop_event is None:
            return
        _log.info(
            "stopping: workers finish their in-flight handlers (signal again to exit now)",
            reason=reason,
            signal=signal.Signals(signum).name,
            children=len(self.children),
            grace=self.shutdown_grace,
        )
        self._forward(signum)
        self._stop_event.set()

    def _hard_stop(self, signum: int) -> None:
        self._hard_signal = signum
        self._stop_signals.add(signum)
        _log.warning(
            "exiting now: workers abandon their in-flight handlers",
            signal=signal.Signals(signum).name,
            children=len(self.children),
        )
        self._forward(signum)
        assert self._hard_event is not None
        self._hard_event.set()

    def _forward(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is not None:
                continue  # reaped: its pid may already belong to another process
            # It may have exited since it was last reaped.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.Signals(signum))

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if not self._stopping:
                    self._begin_stop(signum, "signal")
                else:
                    self._hard_stop(signum)

    async def _enforce_deadlines(self) -> None:
        """SIGKILL the children that outlive the stop: `shutdown_grace + 10` s after the first
        signal, or a few seconds after the second, whichever comes first."""
        assert self._stop_event is not None and self._hard_event is not None
        await self._stop_event.wait()
        with anyio.move_on_after(self.shutdown_grace + _GRACE_MARGIN):
            await self._hard_event.wait()
            await anyio.sleep(_HARD_STOP_KILL_AFTER)
        if self.children:
            _log.error(
                "killing worker processes that did not stop in time",
                pids=sorted(self.children.values()),
            )
            self._forward(signal.SIGKILL)

    async def _terminate_all(self) -> None:
        """Stop the children without leaving orphans: SIGTERM, then SIGKILL if they linger."""
        _log.warning("terminating worker processes", pids=sorted(self.children.values()))
        self._forward(signal.SIGTERM)
        with anyio.move_on_after(_HARD_STOP_KILL_AFTER):
            for proc in list(self._procs.values()):
                await proc.wait()
        self._forward(signal.SIGKILL)
        for proc in list(self._procs.values()):
            await proc.wait()
        self._procs.clear()

    # Slots ---------------------------------------------------------------------------------

    async def _run_slot(self, index: int) -> None:
        """Keep a child running in slot `index` until the supervisor stops, or the child
        exits with a configuration error."""
        failures = 0
        while not self._stopping:
            started = anyio.current_time()
            proc = await self._spawn(index)
            returncode: int | None = None
            if proc is not None:
                returncode = await proc.wait()
                del self._procs[index]
                if self._stopping:
                    self._note_exit_during_stop(index, proc.pid, returncode)
                    return
            uptime = anyio.current_time() - started
            if returncode == _CONFIG_ERROR or proc is None:
                self._give_up_slot(index, None if proc is None else proc.pid)
                return
            failures = 1 if uptime >= self.restart_reset_after else failures + 1
            delay = self.restart_backoff.delay(failures)
            _log.warning(
                "worker process exited; restarting it",
                index=index,
                pid=proc.pid,
                **_describe(returncode),
                uptime=round(uptime, 3),
                restart_in=round(delay, 3),
            )
            assert self._stop_event is not None
            with anyio.move_on_after(delay):
                await self._stop_event.wait()

    def _give_up_slot(self, index: int, pid: int | None) -> None:
        """Leave slot `index` empty: its child exited with status 2 (or could not start), and
        the same command would fail the same way again."""
        self._config_errors.add(index)
        last = len(self._config_errors) == self.processes
        _log.error(
            "worker process exited with status 2, a configuration error (see its message "
            "above); not restarting it" + ("; no worker process is left" if last else ""),
            index=index,
            pid=pid,
            argv=_shown(self._argv.get(index)),
        )

    async def _spawn(self, index: int) -> Process | None:
        """Start the child of slot `index`; None (logged) if it could not be started."""
        argv = self._argv[index] = list(self.command(index))
        env = {**os.environ, **self.env, WORKER_INDEX_ENV: str(index)}
        try:
            # stdout and stderr are inherited, so the children's logs go where the
            # supervisor's go; stdin too (workers never read it).
            proc = await anyio.open_process(
                argv, stdin=None, stdout=None, stderr=None, env=env, start_new_session=True
            )
        except OSError as exc:
            _log.error(
                "cannot start worker process", index=index, argv=_shown(argv), error=repr(exc)
            )
            return None
        self._procs[index] = proc
        _log.info("worker process started", index=index, pid=proc.pid)
        # A stop that began while this child was being started has not reached it.
        for signum in sorted(self._stop_signals):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.Signals(signum))
        return proc

    def _note_exit_during_stop(self, index: int, pid: int, returncode: int) -> None:
        # Dying of the forwarded signal itself is a clean stop: a child still importing has no
        # handler installed yet.
        by_stop_signal = any(returncode in (-s, 128 + s) for s in self._stop_signals)
        if returncode == 0 or by_stop_signal:
            _log.info("worker process stopped", index=index, pid=pid, **_describe(returncode))
            return
        self._failed_during_stop = True
        _log.warning(
            "worker process failed while stopping", index=index, pid=pid, **_describe(returncode)
        )


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*$")


def _shown(argv: Sequence[str] | None) -> list[str] | None:
    """`argv` as it may be logged: broker URLs (`--broker URL`, `--broker=URL`) with their
    credentials masked."""
    if argv is None:
        return None
    from omnidaemon.brokers import redact_url

    shown = []
    for arg in argv:
        option, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        if _URL.match(value):
            try:
                value = redact_url(value)
            except ValueError:  # not parseable as a URL: shown not at all
                value = "***"
            arg = f"{option}{equals}{value}"
        shown.append(arg)
    return shown
