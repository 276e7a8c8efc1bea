"""Request-reply: `App.request` publishes an event and waits for the handler's return value.

Each request gets a reply topic of its own (`omni-reply.<random>`), subscribed before the
request is published and deleted once the reply is read (or the wait ends), so a reply can only
reach the request that asked for it, and nothing is left behind on the bus: workers send replies
with `Broker.publish_if_exists`, so a reply that comes after the deletion (a second agent's, or
one after the timeout) is dropped instead of recreating the topic, and the topic expires on the
bus (the request's timeout plus a minute) should the requester die before deleting it. When the
agent gives up on the request (dead-lettered), the worker sends a failure reply, marked by a
header, so the caller raises `AgentFailed` at once instead of waiting for its timeout. That
holds for every dead letter, also those of entries the worker could not read as an envelope
(`reply_target`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import TypeAdapter

from omnidaemon.brokers.base import Broker, Subscription
from omnidaemon.envelope import Envelope
from omnidaemon.errors import AgentFailed, Cancelled

__all__ = [
    "FAILURE_HEADER",
    "REPLY_PREFIX",
    "ReplyTarget",
    "is_request_reply",
    "new_reply_topic",
    "reply_target",
    "wait_reply",
]

REPLY_PREFIX = "omni-reply."
FAILURE_HEADER = "omni-failed"

_ANY_ENVELOPE: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[Any])


def is_request_reply(topic: str | None) -> bool:
    """True for the reply topic of an `App.request`."""
    return topic is not None and topic.startswith(REPLY_PREFIX)


@dataclass(frozen=True, slots=True)
class ReplyTarget:
    """Where a failure reply goes, and what it answers: a request's event id and reply topic."""

    event_id: str
    reply_to: str
    correlation_id: str | None = None
    tenant_id: str | None = None


# A reply topic as `new_reply_topic` makes it, and the event id at the head of an entry as
# `encode_new` writes it (`{"v":1,"id":"...`).
_REPLY_TO = re.compile(rb'"reply_to":"(omni-reply\.[0-9a-f]{32})"')
_HEAD_ID = re.compile(rb'\{"v":\d{1,3},"id":"([0-9A-Za-z_.:-]{1,100})"')


def reply_target(data: bytes, parse_limit: int) -> ReplyTarget | None:
    """The request an entry the worker could not read as an envelope asks for, if any.

    An entry up to `parse_limit` bytes is read as plain JSON, so an invalid payload, a
    malformed envelope or one of an unsupported version still answers its request. A larger
    entry is refused unread (parsing it is the cost the limit bounds), so its request is found
    by searching the bytes as `encode_new` lays them out: the id at the head, `reply_to` after
    the payload (the last match, since a payload may hold the same text). A wrong match costs
    nothing: a requester ignores replies whose causation id is not its request's id.
    """
    if len(data) <= parse_limit:
        try:
            raw = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(raw, dict):
            return None
        event_id, reply_to = raw.get("id"), raw.get("reply_to")
        if not isinstance(event_id, str) or not isinstance(reply_to, str):
            return None
        if not is_request_reply(reply_to):
            return None
        correlation_id, tenant_id = raw.get("correlation_id"), raw.get("tenant_id")
        return ReplyTarget(
            event_id,
            reply_to,
            correlation_id if isinstance(correlation_id, str) else None,
            tenant_id if isinstance(tenant_id, str) else None,
        )
    head = _HEAD_ID.match(data)
    at = data.rfind(b'"reply_to":"omni-reply.')
    reply = _REPLY_TO.match(data, at) if at >= 0 else None
    if head is None or reply is None:
        return None
    return ReplyTarget(head.group(1).decode(), reply.group(1).decode())


def new_reply_topic() -> str:
    """A fresh reply topic for one request."""
    return f"{REPLY_PREFIX}{uuid.uuid4().hex}"


async def wait_reply(broker: Broker, sub: Subscription, event_id: str) -> Any:
    """Wait (until cancelled) for the reply on `sub` and return its payload as JSON data.

    Raises:
        AgentFailed: the reply says the agent gave up on the request.
        Cancelled: the reply says the request's event was cancelled (`App.cancel`).
    """
    while True:
        for delivery in await broker.fetch(sub, "requester", 1, 5.0):
            await broker.ack(sub, [delivery])
            reply = _ANY_ENVELOPE.validate_json(delivery.data)
            if reply.causation_id != event_id:
                continue  # not an answer to this request (cannot happen on a fresh topic)
            if reply.headers.get(FAILURE_HEADER):
                error = reply.payload if isinstance(reply.payload, dict) else {}
                failure = Cancelled if error.get("type") == "Cancelled" else AgentFailed
                raise failure(
                    str(error.get("type", "Error")),
                    str(error.get("message", "")),
                    agent=str(error.get("agent", "?")),
                    event_id=event_id,
                )
            return reply.payload
