"""The AsyncAPI 3.0 document of an app: its topics as channels, its agents as operations.

Each topic is a channel (its `address` is the topic); each agent is a `receive` operation on
the topic it consumes and, with `publishes=`, a `send` operation on the topic its return value
goes to. Each distinct type declared for a topic is one message of the channel, whose payload
is the JSON Schema pydantic makes of the type; the models those schemas name are written once,
under `components/schemas`, and referenced. `omnidaemon asyncapi APP` prints it and the HTTP
API serves it at `/asyncapi.json`.

The message payload is the event's `payload`, as agents declare it: on the bus it travels
inside omnidaemon's envelope (id, topic, correlation, ...), which every topic shares.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from pydantic.errors import PydanticUserError

from omnidaemon.schedules import describe_schedule
from omnidaemon.topology import type_name

if TYPE_CHECKING:
    from omnidaemon.agents import AgentSpec
    from omnidaemon.app import App

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
"""The version of the AsyncAPI specification the documents follow."""

_REF = "#/components/schemas/{model}"


def _identifier(name: str, taken: Iterable[str]) -> str:
    """`name` as an AsyncAPI key (letters, digits, `_`, `-`), unique among `taken`."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", name) or "_"
    used, candidate, n = set(taken), base, 2
    while candidate in used:
        candidate, n = f"{base}_{n}", n + 1
    return candidate


def _schemas(types: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON Schema of each type (referring to models under `components/schemas`), and
    those models' schemas, each written once. A type pydantic cannot describe (an arbitrary
    class) gets the empty schema, which accepts anything, rather than no document at all."""
    adapters = []
    for tp in types:
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(tp)
            adapter.json_schema()
        except (PydanticUserError, TypeError, ValueError):
            adapter = TypeAdapter(Any)
        adapters.append(adapter)
    by_key, definitions = TypeAdapter.json_schemas(
        [(i, "validation", adapter) for i, adapter in enumerate(adapters)], ref_template=_REF
    )
    schemas = [by_key[(i, "validation")] for i in range(len(types))]
    return schemas, dict(definitions.get("$defs", {}))


def _schedule_operation(app: App, name: str, channel: str, message: str) -> dict[str, Any]:
    """A schedule as a `send` operation, its timing in the `x-omnidaemon-schedule`
    extension (AsyncAPI has no word for a publisher driven by the clock)."""
    timed = app.schedules[name]
    operation: dict[str, Any] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": f"schedule {name} publishes to {timed.topic} on every tick of "
        f"{timed.spec!r} ({timed.timezone})",
        "x-omnidaemon-schedule": describe_schedule(timed),
    }
    if timed.description:
        operation["description"] = timed.description
    return operation


def asyncapi_document(app: App, *, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `app`'s agents, as JSON data.

    Args:
        version: The document's `info.version` (the version of the app's event API).
    """
    from omnidaemon import __version__

    specs: list[AgentSpec] = list(app.agents.values())
    # (topic, type) for each edge: what an agent consumes, and what it publishes.
    edges: list[tuple[str, str, Any, str]] = []
    for spec in specs:
        edges.append((spec.topic, spec.name, spec.payload_type, "receive"))
        if spec.publishes is not None:
            edges.append((spec.publishes, spec.name, spec.return_type, "send"))
    # A schedule sends to its topic on every tick: an operation of its own.
    scheduled = [e for e in app.topology().edges if e.schedule]
    edges += [(e.topic, e.agent, e.payload_type, "schedule") for e in scheduled]
    types: list[Any] = []
    for _, _, tp, _ in edges:
        if not any(tp == seen for seen in types):
            types.append(tp)
    schemas, definitions = _schemas(types)

    channels: dict[str, dict[str, Any]] = {}
    channel_ids: dict[str, str] = {}
    message_ids: dict[tuple[str, int], str] = {}
    for topic, _, tp, _ in edges:
        if topic not in channel_ids:
            channel_ids[topic] = _identifier(topic, channel_ids.values())
            channels[channel_ids[topic]] = {"address": topic, "messages": {}}
        index = next(i for i, seen in enumerate(types) if seen == tp)
        messages = channels[channel_ids[topic]]["messages"]
        if (topic, index) not in message_ids:
            message_id = _identifier(type_name(tp), messages)
            message_ids[(topic, index)] = message_id
            messages[message_id] = {
                "name": type_name(tp),
                "contentType": "application/json",
                "payload": schemas[index],
            }

    operations: dict[str, dict[str, Any]] = {}
    for topic, agent, tp, action in edges:
        channel = channel_ids[topic]
        message = message_ids[(topic, next(i for i, seen in enumerate(types) if seen == tp))]
        if action == "schedule":
            timed = _schedule_operation(app, agent, channel, message)
            operations[_identifier(f"{agent}.schedule", operations)] = timed
            continue
        spec = app.agents[agent]
        operation: dict[str, Any] = {
            "action": action,
            "channel": {"$ref": f"#/channels/{channel}"},
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
            "summary": f"{agent} {'consumes' if action == 'receive' else 'publishes to'} {topic}",
        }
        if spec.description:
            operation["description"] = spec.description
        if action == "receive" and spec.debounce is not None:
            # A specification extension: AsyncAPI has no word for a handler run per burst.
            operation["x-omnidaemon-debounce"] = spec.debounce.describe()
        operations[_identifier(f"{agent}.{action}", operations)] = operation

    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": app.name,
            "version": version,
            "description": f"The events of the omnidaemon app {app.name!r} (omnidaemon "
            f"{__version__}). Each message travels as the `payload` of an omnidaemon envelope.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"schemas": definitions},
    }
