"""Topology: an app's topics, agents and the edges between them, read from the agents' types.

An agent consumes one topic (its payload type is that topic's declared type for it) and, with
`publishes=`, produces another (its return annotation is what it puts there). Together these
edges are the app's pipelines; `App.topology()` returns them, and publishing checks payloads
against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import TypeAdapter, ValidationError
from pydantic.errors import PydanticUserError

from omnidaemon.agents import AgentSpec
from omnidaemon.envelope import dumps
from omnidaemon.errors import PayloadValidationError

if TYPE_CHECKING:
    from omnidaemon.schedules import ScheduleSpec

__all__ = [
    "Edge",
    "TopicSpec",
    "Topology",
    "TopicTypes",
    "describe_agent",
    "json_schema",
    "type_name",
]

_RAW = (Any, dict, dict[str, Any], object)


def type_name(tp: Any) -> str:
    """A short readable name of a type, for messages and diagrams."""
    if tp is None or tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) else repr(tp).replace("typing.", "")


def json_schema(tp: Any) -> dict[str, Any] | None:
    """The JSON Schema pydantic makes of a type (its models under `$defs`), or `None` for a
    type it cannot describe (an arbitrary class)."""
    try:
        schema: dict[str, Any] = TypeAdapter(tp).json_schema()
    except (PydanticUserError, TypeError, ValueError):
        return None
    return schema


def describe_agent(spec: AgentSpec) -> dict[str, Any]:
    """An agent as JSON data: its topic, types (with their JSON Schemas), what it publishes
    and every policy (`omnidaemon agents --json`, `GET /v1/agents`)."""
    backoff = spec.policy.backoff
    return {
        "name": spec.name,
        "topic": spec.topic,
        "payload_type": type_name(spec.payload_type),
        "return_type": type_name(spec.return_type),
        "payload_schema": json_schema(spec.payload_type),
        "return_schema": json_schema(spec.return_type),
        "publishes": spec.publishes,
        "description": spec.description,
        "handler": f"{spec.handler.__module__}.{spec.handler.__qualname__}",
        "max_retries": spec.policy.max_retries,
        "backoff": {
            "initial": backoff.initial,
            "factor": backoff.factor,
            "maximum": backoff.maximum,
            "jitter": backoff.jitter,
        },
        "concurrency": spec.concurrency,
        "timeout": spec.timeout,
        "reclaim_idle": spec.reclaim_idle,
        "start": spec.start,
        "store_results": spec.store_results,
        "idempotent": spec.idempotency_key is not None,
        "flow": spec.flow.describe() if spec.flow is not None else None,
        "debounce": spec.debounce.describe() if spec.debounce is not None else None,
    }


@dataclass(frozen=True, slots=True)
class Edge:
    """One edge of the graph: an agent consumes or publishes to a topic.

    `debounce` is `(seconds, max_wait)` when the agent consumes the topic debounced (its
    handler runs once per burst: see `omnidaemon.debounce`)."""

    agent: str
    topic: str
    kind: Literal["consumes", "publishes"]
    payload_type: Any
    debounce: tuple[float, float] | None = None
    schedule: bool = False  # `agent` names a schedule (which publishes on its ticks)

    @property
    def label(self) -> str:
        """The edge's label in a diagram: its type, and how it is debounced."""
        if self.debounce is None:
            return type_name(self.payload_type)
        seconds, max_wait = self.debounce
        return f"{type_name(self.payload_type)}, debounced {seconds:g}s (max {max_wait:g}s)"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic as the app's agents declare it.

    Attributes:
        name: The topic.
        consumers: Agents that consume it.
        producers: Agents whose return value is published to it (`publishes=`), and
            schedules that publish to it.
        payload_types: The types declared for its payloads, raw `dict`/`Any` left out.
    """

    name: str
    consumers: tuple[str, ...]
    producers: tuple[str, ...]
    payload_types: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Topology:
    """The topics, agents and edges of an app; a schedule is an edge `publishes` from its
    name (listed in `schedules`) to its topic."""

    topics: Mapping[str, TopicSpec]
    agents: tuple[str, ...]
    edges: tuple[Edge, ...]
    schedules: tuple[str, ...] = ()

    @classmethod
    def of(cls, agents: Iterable[AgentSpec], schedules: Iterable[ScheduleSpec] = ()) -> Topology:
        """Build the topology of these agents and schedules."""
        specs = list(agents)
        timed = list(schedules)
        edges: list[Edge] = []
        for spec in specs:
            debounce = spec.debounce
            edges.append(
                Edge(
                    spec.name,
                    spec.topic,
                    "consumes",
                    spec.payload_type,
                    None if debounce is None else (debounce.seconds, debounce.max_wait),
                )
            )
            if spec.publishes is not None:
                edges.append(Edge(spec.name, spec.publishes, "publishes", spec.return_type))
        edges += [
            Edge(s.name, s.topic, "publishes", _schedule_type(s), schedule=True) for s in timed
        ]
        topics: dict[str, TopicSpec] = {}
        for name in dict.fromkeys(e.topic for e in edges):
            on_topic = [e for e in edges if e.topic == name]
            declared = [e.payload_type for e in on_topic if not _is_raw(e.payload_type)]
            topics[name] = TopicSpec(
                name=name,
                consumers=tuple(e.agent for e in on_topic if e.kind == "consumes"),
                producers=tuple(e.agent for e in on_topic if e.kind == "publishes"),
                payload_types=tuple(dict.fromkeys(declared)),
            )
        return cls(
            topics=topics,
            agents=tuple(s.name for s in specs),
            edges=tuple(edges),
            schedules=tuple(s.name for s in timed),
        )

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart: topics as rounded nodes, agents as boxes."""
        ids = {t: f"t{i}" for i, t in enumerate(self.topics)}
        lines = ["flowchart LR"]
        lines += [f'    {ids[t]}(["{t}"])' for t in self.topics]
        lines += [f'    a_{a.replace(".", "_").replace(":", "_").replace("-", "_")}["{a}"]'
                  for a in self.agents]  # fmt: skip
        # A schedule: a hexagon, its node id prefixed so it cannot meet an agent's.
        lines += [f'    a_{_node(s)}{{{{"{s}"}}}}' for s in self.schedules]
        for e in self.edges:
            name = e.agent.replace(".", "_").replace(":", "_").replace("-", "_")
            agent = "a_" + (_node(e.agent) if e.schedule else name)
            label = e.label
            if e.kind == "consumes":
                lines.append(f"    {ids[e.topic]} -->|{label}| {agent}")
            else:
                lines.append(f"    {agent} -->|{label}| {ids[e.topic]}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The graph in Graphviz DOT: topics as ellipses, agents as boxes, edges labelled with
        their payload types."""

        def quote(text: str) -> str:
            return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["digraph omnidaemon {", "    rankdir=LR;"]
        lines += [
            f"    {quote('topic:' + t)} [label={quote(t)}, shape=ellipse];" for t in self.topics
        ]
        lines += [f"    {quote('agent:' + a)} [label={quote(a)}, shape=box];" for a in self.agents]
        lines += [
            f"    {quote('schedule:' + s)} [label={quote(s)}, shape=hexagon];"
            for s in self.schedules
        ]
        for e in self.edges:
            kind = "schedule:" if e.schedule else "agent:"
            topic, agent = quote("topic:" + e.topic), quote(kind + e.agent)
            source, target = (topic, agent) if e.kind == "consumes" else (agent, topic)
            lines.append(f"    {source} -> {target} [label={quote(e.label)}];")
        lines.append("}")
        return "\n".join(lines)


def _node(schedule: str) -> str:
    """A schedule's Mermaid node id (after `a_`): apart from every agent's."""
    return "schedule__" + schedule.replace(".", "_").replace(":", "_").replace("-", "_")


def _schedule_type(spec: ScheduleSpec) -> Any:
    """What a schedule publishes, as far as its declaration says: its function's return
    annotation (Optional stripped: None publishes nothing), else the payload's type."""
    import typing

    if spec.function is None:
        return type(spec.payload)
    try:
        hints = typing.get_type_hints(spec.function)
    except Exception:  # unresolvable annotations: say nothing rather than fail
        return Any
    tp = hints.get("return", Any)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if type(None) in typing.get_args(tp) and len(args) == 1:
        return args[0]
    return tp


def _is_raw(tp: Any) -> bool:
    return any(tp is raw or tp == raw for raw in _RAW) or tp is type(None)


class TopicTypes:
    """Checks payloads against the types an app's agents declare for each topic."""

    def __init__(self, agents: Iterable[AgentSpec]) -> None:
        self._checks: dict[str, list[tuple[Any, TypeAdapter[Any], str]]] = {}
        for spec in agents:
            declared = [(spec.payload_type, spec.name, "consumes")]
            if spec.publishes is not None:
                declared.append((spec.return_type, spec.name, "publishes to"))
            for tp, agent, verb in declared:
                topic = spec.topic if verb == "consumes" else spec.publishes
                if _is_raw(tp) or topic is None:
                    continue
                checks = self._checks.setdefault(topic, [])
                if all(tp != seen for seen, _, _ in checks):
                    checks.append((tp, TypeAdapter(tp), f"agent {agent!r} {verb} it"))

    def check(self, topic: str, payload: Any, *, validated_as: Any = None) -> None:
        """Raise `PayloadValidationError` if `payload` contradicts a type declared for `topic`.

        `validated_as` is a type the payload was already validated against (a handler's
        return annotation): it is not checked twice."""
        checks = self._checks.get(topic)
        if not checks:
            return
        plain: Any = None
        for tp, adapter, why in checks:
            if (isinstance(tp, type) and isinstance(payload, tp)) or (
                validated_as is not None and tp == validated_as
            ):
                continue
            if plain is None:
                # What a consumer will see: the payload as JSON data.
                plain = (
                    payload if isinstance(payload, dict | list) else orjson.loads(dumps(payload))
                )
            try:
                adapter.validate_python(plain)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}"
                    for e in exc.errors(include_url=False)[:5]
                )
                raise PayloadValidationError(
                    f"cannot publish to {topic!r}: the payload is not a valid "
                    f"{type_name(tp)} ({why}): {problems}"
                ) from None
