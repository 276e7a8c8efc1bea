"""The OmniDaemon SDK's message and configuration models, as pydantic v2 models.

They keep the field names and defaults OmniDaemon users know, so their code constructs them
unchanged; `OmniDaemonSDK` translates them into omnidaemon's own envelope and agent options.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AgentConfig", "EventEnvelope", "PayloadBase", "SubscriptionConfig"]


class PayloadBase(BaseModel):
    """What an event carries: the content, and where its outcome goes.

    Attributes:
        content: The event's data: any JSON value (the seed's samples send objects). It is the
            event's payload on the bus, so App-API agents on the same topic receive it as is.
        webhook: A URL the outcome is POSTed to when the event is finished.
        reply_to: A topic the handling callback's return value is published to.
        correlation_id: Ties the events of one workflow together; the seed's request-reply
            sample sets it here. Used when the envelope has none of its own.
    """

    content: Any
    webhook: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None


class EventEnvelope(BaseModel):
    """An event to publish with `OmniDaemonSDK.publish_task`.

    Attributes:
        topic: Where to publish, e.g. `"file.uploaded"`.
        payload: The content and the reply/webhook targets.
        id: Ignored for routing: the bus gives every event its own time-ordered id, which
            `publish_task` returns. A given id travels in the `omnidaemon-compat-id` header.
        tenant_id: Carried unchanged to callbacks.
        correlation_id: Ties the events of one workflow together.
        causation_id: The id of the event that caused this one; set automatically when a
            callback publishes.
        source: Who published it; carried to callbacks (the bus records the SDK's app name).
        created_at: Unix time the envelope was made.
        delivery_attempts: Accepted for compatibility; callbacks get the real attempt number.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    topic: str
    payload: PayloadBase
    id: str | None = None
    tenant_id: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    source: str | None = None
    created_at: float = Field(default_factory=time.time)
    delivery_attempts: int = Field(default=1, ge=1)

    @field_validator("topic")
    @classmethod
    def _strip_topic(cls, value: str) -> str:
        # OmniDaemon strips blanks around topic names; omnidaemon validates the rest on publish.
        value = value.strip()
        if not value:
            raise ValueError("topic must be a non-empty string")
        return value


class SubscriptionConfig(BaseModel):
    """How an agent consumes its topic.

    Attributes:
        max_retries: Retries after the first attempt before the event is dead-lettered.
        reclaim_idle_ms: Milliseconds after which a delivery whose worker died is taken over;
            `None` keeps omnidaemon's default (30 s).
        dlq_enabled: Accepted for compatibility. omnidaemon always keeps the events an agent
            gave up on in its dead-letter queue (so nothing is lost silently); `False` only logs
            a warning when the agent is registered.
        dlq_retry_limit: Accepted for compatibility and unused: dead letters are re-delivered
            only on request (`omnidaemon bus replay`, `App.replay_dead_letters`).
        consumer_count: Events of this agent handled at once in this process (the agent's
            `concurrency`).
    """

    max_retries: int = Field(default=3, ge=0)
    reclaim_idle_ms: int | None = Field(default=None, gt=0)
    dlq_enabled: bool = True
    dlq_retry_limit: int | None = Field(default=None, ge=0)
    consumer_count: int = Field(default=1, ge=1)


class AgentConfig(BaseModel):
    """An agent to register with `OmniDaemonSDK.register_agent`.

    Attributes:
        topic: The topic the agent consumes.
        callback: Called with the message dict for each event (`async def` or plain `def`);
            its return value is the event's result.
        name: The agent's name, which is its consumer group. Default: the callback's name, so
            every instance of the same program shares one group (OmniDaemon generated a random
            name, which would make each restart a new group that re-reads the topic).
        tools: Free-form list shown by `list_agents`.
        description: Free text; default: the callback's docstring.
        config: How the agent consumes its topic.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    topic: str
    callback: Callable[..., Any]
    name: str | None = None
    tools: list[Any] = Field(default_factory=list)
    description: str = ""
    config: SubscriptionConfig = Field(default_factory=SubscriptionConfig)
