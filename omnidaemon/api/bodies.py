"""The HTTP API's request bodies, as pydantic models, and the checks every body gets.

Every body is checked as a whole before its fields are: JSON the bus cannot carry (nested more
than `MAX_NESTING` levels, integers beyond 64 bits, lone surrogates, `NaN` and `Infinity`,
which Python's `json` module reads) is a 422 naming the field and the place in it, for every
route that takes a body, rather than a 500 from the encoder or an event the worker cannot read.
"""

from typing import Annotated, Any, Literal, Self

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from omnidaemon._json_limits import MAX_NESTING, find_json_problem, nesting_exceeds
from omnidaemon.agents import validate_agent_name
from omnidaemon.envelope import validate_topic

__all__ = ["AgentName", "PublishRequest", "ReplayRequest", "ReplyRequest", "TopicName"]

TopicName = Annotated[
    str,
    AfterValidator(validate_topic),
    Field(
        max_length=255,
        description="Dot-separated words of [a-z0-9_-], e.g. `document.uploaded`.",
        examples=["document.uploaded"],
    ),
]
"""A topic name, checked as publishing checks it."""

AgentName = Annotated[
    str,
    AfterValidator(validate_agent_name),
    Field(max_length=200, description="An agent's name (its consumer group).", examples=["ocr"]),
]

_Id = Annotated[str, Field(min_length=1, max_length=200)]
PriorityValue = Literal["high", "normal", "low"] | Annotated[int, Field(ge=0, le=9, strict=True)]


def _unfit(value: Any, where: str) -> str | None:
    """Why `value` (a body's field, named `where`) cannot go on the bus, or `None`."""
    # orjson refuses what it cannot write, in C, quickly; the walk that says where is run only
    # when it did, when the value is nested too deep, or when it may hold `NaN` or `Infinity`
    # (which orjson writes as `null`).
    try:
        data = orjson.dumps(value)
    except TypeError as exc:
        return find_json_problem(value, where, finite=True) or f"{where}: {exc}"
    if nesting_exceeds(data, MAX_NESTING) or b"null" in data:
        return find_json_problem(value, where, finite=True)
    return None


class _Body(BaseModel):
    # A misspelt option must not be dropped silently: `delai: 60` would publish at once.
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _fit_for_the_bus(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                problem = _unfit(name, "a field name") or _unfit(value, str(name))
                if problem is not None:
                    raise ValueError(problem)
        return data


class PublishRequest(_Body):
    """An event to publish (`omnidaemon publish`)."""

    topic: TopicName
    payload: Any = Field(description="The event's payload: any JSON value.")
    correlation_id: _Id | None = Field(
        default=None, description="Ties the events of one workflow together."
    )
    reply_to: TopicName | None = Field(
        default=None, description="A topic the handling agent's return value is sent to."
    )
    webhook: Annotated[str, Field(max_length=2048)] | None = Field(
        default=None, description="A URL the outcome is POSTed to when the event is finished."
    )
    tenant_id: _Id | None = Field(default=None, description="Carried unchanged to handlers.")
    delay: float | None = Field(
        default=None, ge=0, description="Seconds before agents see the event (held on the bus)."
    )
    headers: dict[str, str] | None = Field(
        default=None, description="String metadata carried unchanged."
    )
    priority: PriorityValue | None = Field(
        default=None,
        description="high, normal (default) or low, or 0 (low) to 9 (high): agents of the "
        "topic start higher ones first.",
    )


class ReplyRequest(_Body):
    """A request: an event published with a reply topic of its own, waited on
    (`omnidaemon publish --wait`)."""

    topic: TopicName
    payload: Any = Field(description="The request's payload: any JSON value.")
    correlation_id: _Id | None = None
    tenant_id: _Id | None = None
    headers: dict[str, str] | None = None
    priority: PriorityValue | None = None
    timeout: float = Field(
        default=30.0, gt=0, le=300, description="Seconds to wait for the reply (504 after)."
    )


class ReplayRequest(_Body):
    """Which dead letters to deliver again (`omnidaemon bus replay`): name them, or all."""

    agent: AgentName
    event_ids: Annotated[list[_Id], Field(min_length=1, max_length=10_000)] | None = Field(
        default=None, description="Replay these events."
    )
    all: bool = Field(default=False, description="Replay every dead letter of the agent.")
    dry_run: bool = Field(default=False, description="Say what would be replayed; change nothing.")

    @model_validator(mode="after")
    def _events_or_all(self) -> Self:
        if self.event_ids is None and not self.all:
            raise ValueError("name events with event_ids, or replay every one with all: true")
        if self.event_ids is not None and self.all:
            raise ValueError("give event_ids or all: true, not both")
        return self
