"""Bodies of the control routes: cancellation."""

from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["CancelResponse"]


class CancelResponse(BaseModel):
    """A cancellation as the bus keeps it (`omnidaemon cancel`)."""

    kind: Literal["event", "run"] = Field(
        description="`event`: one event; `run`: every event of a correlation id."
    )
    target: str = Field(description="The event id, or the correlation id.")
    reason: str
    agents: list[str] | None = Field(
        description="Only these agents' handling is cancelled; null: every agent's."
    )
    at: float = Field(description="When it was recorded (seconds since the epoch).")
    until: float = Field(description="When the bus forgets it (OMNIDAEMON_CANCEL_TTL).")
