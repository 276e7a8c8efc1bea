"""The app the chaos suite's workers run: `python -m omnidaemon worker tests.chaos.app:app`.

Two agents consume `chaos.events`, so every event is handled twice, once per consumer group:

- `record` handles every kind of event: it logs the attempt, works for a few milliseconds (so
  that a worker killed at a random time is often killed mid-handler), then logs success;
- `audit` handles the same events and does the same for ordinary ones, so that losses in one
  group cannot hide behind the other.

Poison events make both agents fail on every attempt: `raise` raises, `exit` kills its own
worker process. Both must end in the agent's dead-letter queue after `max_retries + 1`
attempts.

Every attempt is appended, as one JSON line, to `$OMNI_CHAOS_LOG/<pid>.jsonl`: `{"e": event
id, "seq": publisher sequence, "agent", "attempt", "pid", "phase": "begin"|"done"|"fail"}`.
Lines are written with `O_APPEND` and flushed before the handler goes on, so a line is on disk
before the effect it describes; a killed process loses nothing it logged.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Literal

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context

TOPIC = "chaos.events"
AGENTS = ("record", "audit")
MAX_RETRIES = 2
"""Poison events are dead-lettered after MAX_RETRIES + 1 attempts."""
RECLAIM_IDLE = 2.0
"""Seconds before a killed worker's deliveries are taken over."""


class ChaosEvent(BaseModel):
    """What the chaos publisher sends."""

    seq: int
    kind: Literal["ok", "raise", "exit"] = "ok"
    body: str = ""


class AttemptLog:
    """This process's append-only log of handler attempts."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(folder / f"{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def write(self, ctx: Context, event: ChaosEvent, phase: str) -> None:
        line = {
            "e": ctx.event_id,
            "seq": event.seq,
            "agent": ctx.agent,
            "attempt": ctx.attempt,
            "pid": os.getpid(),
            "phase": phase,
        }
        # One write(2) per line with O_APPEND: whole lines, in order, even if killed after.
        os.write(self._fd, (json.dumps(line) + "\n").encode())


_log: AttemptLog | None = None


def _attempts() -> AttemptLog:
    global _log
    if _log is None:
        _log = AttemptLog(Path(os.environ.get("OMNI_CHAOS_LOG", "chaos-log")))
    return _log


async def _handle(event: ChaosEvent, ctx: Context) -> None:
    log = _attempts()
    log.write(ctx, event, "begin")
    await anyio.sleep(random.uniform(0.0, 0.01))  # be mid-handler when a kill comes
    if event.kind == "raise":
        log.write(ctx, event, "fail")
        raise RuntimeError(f"poison event {event.seq}: this handler always fails")
    if event.kind == "exit":
        log.write(ctx, event, "fail")
        os._exit(17)  # kills the worker: the poison that crash-loops naive queues
    log.write(ctx, event, "done")


app = App("chaos")

for _name in AGENTS:
    app.agent(
        TOPIC,
        name=_name,
        max_retries=MAX_RETRIES,
        retry_backoff=0.05,
        reclaim_idle=RECLAIM_IDLE,
        concurrency=16,
    )(_handle)
