"""The app the supervisor tests run in their worker processes.

Its one agent records every step it takes as a JSON line (key, attempt, phase, pid and the
`OMNIDAEMON_WORKER_INDEX` its process got) in the file named by `T_LOG`: one `O_APPEND` write
followed by `fsync`, so a SIGKILL loses nothing already recorded. An event with `"block": true`
blocks its first attempt until the file named by `T_RELEASE` exists (forever without one), so a
test can kill the process handling it, or stop one that is busy; a reclaimed delivery of it
runs straight through.
"""

from __future__ import annotations

import json
import os
from typing import Any

import anyio

from omnidaemon import App, Context

app = App("supervised")

# Defaults keep the module importable outside a test (by a linter or an IDE).
TOPIC = os.environ.get("T_TOPIC", "supervised.jobs")
LOG = os.environ.get("T_LOG", os.devnull)
RELEASE = os.environ.get("T_RELEASE", "")
SLEEP = float(os.environ.get("T_SLEEP", "0"))
CONCURRENCY = int(os.environ.get("T_CONCURRENCY", "4"))


def note(key: str, ctx: Context, phase: str) -> None:
    line = json.dumps(
        {
            "key": key,
            "attempt": ctx.attempt,
            "phase": phase,
            "pid": os.getpid(),
            "index": os.environ.get("OMNIDAEMON_WORKER_INDEX"),
        }
    )
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def released() -> bool:
    return bool(RELEASE) and os.path.exists(RELEASE)


@app.agent(TOPIC, name="work", reclaim_idle=1.0, concurrency=CONCURRENCY)
async def work(event: dict[str, Any], ctx: Context) -> None:
    note(event["k"], ctx, "start")
    if event.get("block") and ctx.attempt == 1:
        while not released():
            await anyio.sleep(0.02)
    await anyio.sleep(SLEEP)
    note(event["k"], ctx, "done")
