"""`omnidaemon worker --reload`: run the worker as a child process and start it again whenever
a `.py` file it may import changes. For development only: a restart drops nothing (in-flight
events get the worker's graceful stop, and anything unacknowledged is delivered again), but it
is slow next to a real deploy."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import FrameType

import structlog

__all__ = [
    "child_command",
    "drop_cached_bytecode",
    "reload_available",
    "run_with_reload",
    "watched_folders",
]

_log = structlog.get_logger("omnidaemon.reload")

# After the worker's own shutdown grace, a child that has not exited is killed: the next
# version of the code is what the developer is waiting for.
_KILL_MARGIN = 5.0


def reload_available() -> bool:
    """True when `watchfiles` (the `reload` extra) is installed and imports."""
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return False
    return True


def watched_folders(target: str, cwd: Path) -> list[Path]:
    """The current folder, and the app file's folder when `target` is a path outside it."""
    folders = [cwd.resolve()]
    head = target.rpartition(":")[0] if target.count(":") == 1 else target
    if head.endswith(".py") or "/" in head:
        folder = (cwd / head).resolve().parent
        if not folder.is_relative_to(folders[0]):
            folders.append(folder)
    return folders


def run_with_reload(child_argv: Sequence[str], folders: Sequence[Path], grace: float) -> int:
    """Run `child_argv` until SIGINT or SIGTERM, restarting it after each change to a `.py`
    file under `folders`; return the last child's exit status (0 if it had to be killed)."""
    from watchfiles import PythonFilter, watch

    # Its own "N changes detected" lines would repeat ours, outside the chosen log format.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    stop = threading.Event()
    stop_signal: list[int] = []
    child = _start(child_argv)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop_signal.append(signum)
        stop.set()  # wakes the watcher; the child gets the signal below

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _log.info("watching for changes", folders=[str(f) for f in folders], pid=child.pid)
        for changes in watch(
            *folders, watch_filter=PythonFilter(), stop_event=stop, raise_interrupt=False
        ):
            files = sorted({os.path.relpath(path) for _, path in changes})
            _log.info("files changed; restarting the worker", files=files)
            _stop(child, signal.SIGTERM, grace)
            drop_cached_bytecode(path for _, path in changes)
            child = _start(child_argv)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return _stop(child, stop_signal[0] if stop_signal else signal.SIGTERM, grace)


def drop_cached_bytecode(paths: Iterable[str]) -> None:
    """Delete the cached bytecode (`.pyc`) of the `.py` files among `paths`, where this
    process's settings put it (`__pycache__`, or `PYTHONPYCACHEPREFIX`), so the next worker
    compiles them afresh.

    Python trusts a `.pyc` whose recorded source mtime (whole seconds) and size match the
    file's: an edit within the second of the last compile that keeps the size (`v1` to `v2`)
    would otherwise run the old code."""
    for path in paths:
        if not path.endswith(".py"):
            continue
        for optimization in ("", 1, 2):  # whatever the worker was started with (`-O`...)
            with contextlib.suppress(OSError, NotImplementedError, ValueError):
                os.remove(importlib.util.cache_from_source(path, optimization=optimization))


def _start(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    # Its own session: a Ctrl-C on the terminal reaches the reloader alone, which passes on
    # exactly one signal (two would make the worker exit at once).
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, start_new_session=True)


def _stop(child: subprocess.Popen[bytes], signum: int, grace: float) -> int:
    """Stop `child` gracefully with `signum`; kill it if it outlives its grace."""
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signum)
        try:
            child.wait(timeout=grace + _KILL_MARGIN)
        except subprocess.TimeoutExpired:
            _log.warning("killing a worker that did not stop in time", pid=child.pid)
            child.kill()
            child.wait()
    status = child.returncode
    # Ended by the stop signal itself (still importing, no handler yet): a clean stop.
    return 0 if status in (-signum, 128 + signum) else status


def child_command(argv: Sequence[str]) -> list[str]:
    """This command line without `--reload`, run as `python -m omnidaemon worker ...`."""
    args = [a for a in argv[1:] if a != "--reload"]
    head = args.index("worker") if "worker" in args else 0
    return [sys.executable, "-m", "omnidaemon", *args[head:]]
