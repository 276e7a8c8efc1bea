"""Response bodies of `GET /v1/inspect` (what each live worker runs now), apart from `models`,
which is near its size limit."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["ActiveWorker", "ActivityResponse", "RunningEvent"]


class RunningEvent(BaseModel):
    """A delivery a worker's handler runs now."""

    topic: str
    agent: str
    event_id: str | None = Field(description="null for an entry that is not an event.")
    correlation_id: str | None
    entry_id: str = Field(description="Its entry on the bus.")
    attempt: int = Field(description="1 for the first attempt.")
    started_at: datetime = Field(description="When its handling began.")
    entry_bytes: int
    payload: Any = Field(
        default=None, description="With `payload=true`: the payload, if the worker listed it."
    )
    payload_listed: bool | None = Field(
        default=None,
        description="With `payload=true`: whether `payload` is the payload (workers list "
        "payloads of entries up to 8 KiB).",
    )


class ActiveWorker(BaseModel):
    """A live worker and the deliveries it runs now, the oldest first."""

    worker: str = Field(description="The worker's id (its consumer name).")
    app: str
    host: str
    pid: int
    count: int = Field(description="How many it runs; `running` lists at most 100.")
    running: list[RunningEvent]


class ActivityResponse(BaseModel):
    """What each live worker runs now (`omnidaemon inspect --json`)."""

    workers: list[ActiveWorker]
