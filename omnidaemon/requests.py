"""Request-reply: `App.request` publishes an event and waits for the handler's return value.

Each request gets a reply topic of its own (`omni-reply.<random>`), subscribed before the
request is published and deleted once the reply is read (or the wait ends), so a reply can only
reach the request that asked for it, and nothing is left behind on the bus: workers send replies
with `Broker.publish_if_exists`, so a reply that comes after the deletion (a second agent's, or
one after the timeout) is dropped instead of recreating the topic, and the topic expires on the
bus (the request's timeout plus a minute) should the requester die before deleting it. When the
agent gives up on the request (dead-lettered), the worker sends a failure reply, marked by a
header, so the caller raises `AgentFailed` at once instead of waiting for its timeout.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import TypeAdapter

from omnidaemon.brokers.base import Broker, Subscription
from omnidaemon.envelope import Envelope
from omnidaemon.errors import AgentFailed

__all__ = ["FAILURE_HEADER", "REPLY_PREFIX", "is_request_reply", "new_reply_topic", "wait_reply"]

REPLY_PREFIX = "omni-reply."
FAILURE_HEADER = "omni-failed"

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])


def is_request_reply(topic: str | None) -> bool:
    """True for the reply topic of an `App.request`."""
    return topic is not None and topic.startswith(REPLY_PREFIX)


def new_reply_topic() -> str:
    """A fresh reply topic for one request."""
    return f"{REPLY_PREFIX}{uuid.uuid4().hex}"


async def wait_reply(broker: Broker, sub: Subscription, event_id: str) -> Any:
    """Wait (until cancelled) for the reply on `sub` and return its payload as JSON data.

    Raises:
        AgentFailed: the reply says the agent gave up on the request.
    """
    while True:
        for delivery in await broker.fetch(sub, "requester", 1, 5.0):
            await broker.ack(sub, [delivery])
            reply = _ANY_ENVELOPE.validate_json(delivery.data)
            if reply.causation_id != event_id:
                continue  # not an answer to this request (cannot happen on a fresh topic)
            if reply.headers.get(FAILURE_HEADER):
                error = reply.payload if isinstance(reply.payload, dict) else {}
                raise AgentFailed(
                    str(error.get("type", "Error")),
                    str(error.get("message", "")),
                    agent=str(error.get("agent", "?")),
                    event_id=event_id,
                )
            return reply.payload
