"""The Graph page's data: an app's topology laid out left to right as SVG geometry (boxes,
curves, labels; `omnidaemon.dashboard.layering` does the layout), and the same as table rows.

Topics are pills, agents boxes, schedules dashed boxes; an edge goes from a topic to each
agent that consumes it and from an agent to the topic it `publishes=` to, labelled with its
type. Text widths are estimated from the number of characters: the page sets the graph's
text in the monospace font, so the estimate holds.
"""

from __future__ import annotations

import itertools
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

from omnidaemon.dashboard.layering import layer_graph, place
from omnidaemon.topology import Edge, Topology, type_name

__all__ = [
    "Box",
    "Consumer",
    "Drawing",
    "Line",
    "Ref",
    "TopicRow",
    "draw",
    "link",
    "text_width",
    "topic_rows",
]

NodeKind = Literal["topic", "agent", "schedule"]

MARGIN = 16.0
NODE_HEIGHT = 34.0
NODE_PAD = 14.0  # between a box's side and its label
NODE_FONT = 13.0
LABEL_FONT = 11.0
ROW_GAP = 18.0  # between two boxes of a column
PASS_HEIGHT = 6.0  # the room an edge passing through a column takes
MIN_GAP = 56.0  # between two columns
MIN_CURVE = 40.0  # the least room across a gap for the curves
LABEL_PAD = 6.0  # between a label and the column beside it
BACK_OFFSET = 9.0  # a back edge leaves and enters a box this far below its middle
BACK_LABEL_DROP = 12.0  # and its label sits this far below its line
MAX_NODE_CHARS = 32
MAX_LABEL_CHARS = 40


def text_width(text: str, font_px: float) -> float:
    """The estimated width of `text` in the monospace font at `font_px`: wide (East Asian)
    characters count twice, combining marks not at all."""
    cells = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        cells += 2 if unicodedata.east_asian_width(char) in "WF" else 1
    return cells * font_px * 0.62


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def link(kind: NodeKind, name: str) -> str | None:
    """The dashboard page of a topic or agent (`None` for a schedule: it has no page)."""
    if kind == "schedule":
        return None
    return f"/ui/{kind}s/{quote(name, safe='')}"


@dataclass(frozen=True, slots=True)
class Box:
    """A node, placed: `id` is `topic:<name>`, `agent:<name>` or `schedule:<name>`."""

    id: str
    kind: NodeKind
    name: str
    label: str  # what the box shows (a long name shortened; `title` has it whole)
    title: str
    href: str | None
    layer: int
    x: float
    y: float
    width: float
    height: float

    @property
    def cx(self) -> float:
        """The middle of the box, across."""
        return self.x + self.width / 2

    @property
    def cy(self) -> float:
        """The middle of the box, down."""
        return self.y + self.height / 2

    @property
    def radius(self) -> float:
        """Its corners' radius: topics are pills, agents and schedules boxes."""
        return self.height / 2 if self.kind == "topic" else 4.0

    @property
    def aria_label(self) -> str:
        """Its accessible name: its kind and name."""
        return f"{self.kind.capitalize()} {self.name}"


@dataclass(frozen=True, slots=True)
class Line:
    """An edge, drawn: an SVG path from `source` to `target` (node ids), and its label."""

    source: str
    target: str
    kind: Literal["consumes", "publishes"]
    label: str
    title: str
    path: str
    label_x: float
    label_y: float
    label_width: float
    back: bool  # closes a cycle: drawn right to left


@dataclass(frozen=True, slots=True)
class Drawing:
    """A topology laid out: its boxes, its lines and the size of the picture."""

    boxes: tuple[Box, ...]
    lines: tuple[Line, ...]
    width: float
    height: float
    layers: int

    def box(self, node: str) -> Box:
        """The box of node id `node`."""
        return next(b for b in self.boxes if b.id == node)


def _title(kind: NodeKind, name: str, topology: Topology) -> str:
    if kind == "topic":
        spec = topology.topics[name]
        parts = [f"Topic {name}"]
        if spec.producers:
            parts.append("published by " + ", ".join(spec.producers))
        parts.append("consumed by " + (", ".join(spec.consumers) or "no agent"))
        return "; ".join(parts)
    mine = [e for e in topology.edges if e.agent == name and e.schedule == (kind == "schedule")]
    said = [
        f"{e.kind} {e.topic}" + (f" ({_edge_label(e)})" if _edge_label(e) else "") for e in mine
    ]
    return f"{kind.capitalize()} {name}: " + "; ".join(said)


_UNTYPED = (Any, dict, dict[str, Any], object)


def _edge_label(edge: Edge) -> str:
    """An edge's label in the graph: its type (nothing for `Any` or a plain dict: it says
    nothing there), and how it is debounced."""
    if not any(edge.payload_type is t or edge.payload_type == t for t in _UNTYPED):
        return edge.label
    if edge.debounce is None:
        return ""
    seconds, max_wait = edge.debounce
    return f"debounced {seconds:g}s (max {max_wait:g}s)"


def _edge_title(edge: Edge) -> str:
    source = ("schedule " if edge.schedule else "agent ") + edge.agent
    typed = f": {edge.label}"
    if edge.kind == "consumes":
        return f"topic {edge.topic} is consumed by {source}{typed}"
    return f"{source} publishes to topic {edge.topic}{typed}"


def _agent_id(edge: Edge) -> str:
    return ("schedule:" if edge.schedule else "agent:") + edge.agent


def _ends(edge: Edge) -> tuple[str, str]:
    topic, agent = f"topic:{edge.topic}", _agent_id(edge)
    return (topic, agent) if edge.kind == "consumes" else (agent, topic)


def _path(points: list[tuple[float, float]], curved: list[bool]) -> str:
    """An SVG path through `points`: piece `i` a curve (level at both ends) or a line."""
    path = [f"M{points[0][0]:.1f},{points[0][1]:.1f}"]
    for bend, ((x1, y1), (x2, y2)) in zip(curved, itertools.pairwise(points), strict=True):
        if x1 == x2 and y1 == y2:
            continue  # a zero-length piece would turn the arrowhead at random
        middle = (x1 + x2) / 2
        path.append(
            f"C{middle:.1f},{y1:.1f} {middle:.1f},{y2:.1f} {x2:.1f},{y2:.1f}"
            if bend
            else f"L{x2:.1f},{y2:.1f}"
        )
    return " ".join(path)


def draw(topology: Topology) -> Drawing:
    """Lay out `topology` left to right: topics, agents and schedules as boxes, its edges as
    curves labelled with their types (an edge that closes a cycle is `back`)."""
    kinds: dict[str, tuple[NodeKind, str]] = {}
    kinds.update({f"topic:{t}": ("topic", t) for t in topology.topics})
    kinds.update({f"agent:{a}": ("agent", a) for a in topology.agents})
    kinds.update({f"schedule:{s}": ("schedule", s) for s in topology.schedules})
    if not kinds:
        return Drawing(boxes=(), lines=(), width=2 * MARGIN, height=2 * MARGIN, layers=0)
    edges = topology.edges
    layering = layer_graph(list(kinds), [_ends(e) for e in edges])
    layer, columns, count = layering.layer, layering.columns, len(layering.columns)

    shown = {n: _shorten(name, MAX_NODE_CHARS) for n, (_, name) in kinds.items()}
    widths = {n: max(60.0, text_width(shown[n], NODE_FONT) + 2 * NODE_PAD) for n in kinds}
    col_width = [max((widths[n] for n in c if n in kinds), default=0.0) for c in columns]
    # A label sits on the straight stretch of its edge beside the edge's agent, which has
    # one input and at most one output: labels there keep the agents' spacing, never crowd.
    labels = [_shorten(_edge_label(e), MAX_LABEL_CHARS) for e in edges]
    label_width = [text_width(t, LABEL_FONT) + 8 if t else 0.0 for t in labels]
    agent_low = [chain[0] == _agent_id(e) for e, chain in zip(edges, layering.chains, strict=True)]
    label_gap = [
        layer[_agent_id(e)] - (0 if low else 1) for e, low in zip(edges, agent_low, strict=True)
    ]
    inset = [[0.0, 0.0] for _ in range(max(count - 1, 0))]  # each gap's straight stretches
    for gap, low, w in zip(label_gap, agent_low, label_width, strict=True):
        if w:
            side = 0 if low else 1
            inset[gap][side] = max(inset[gap][side], w + 2 * LABEL_PAD)
    gaps = [max(MIN_GAP, a + b + MIN_CURVE) for a, b in inset]
    left = [MARGIN]
    for k in range(1, count):
        left.append(left[-1] + col_width[k - 1] + gaps[k - 1])
    right = [x + w for x, w in zip(left, col_width, strict=True)]

    def height(node: str) -> float:
        return NODE_HEIGHT if node in kinds else PASS_HEIGHT

    top = {n: t + MARGIN for n, t in place(layering, height, ROW_GAP).items()}
    boxes = {}
    for n, (kind, name) in kinds.items():
        k = layer[n]
        boxes[n] = Box(
            id=n,
            kind=kind,
            name=name,
            label=shown[n],
            title=_title(kind, name, topology),
            href=link(kind, name),
            layer=k,
            x=left[k] + (col_width[k] - widths[n]) / 2,
            y=top[n],
            width=widths[n],
            height=NODE_HEIGHT,
        )
    lines = []
    for index, (edge, chain) in enumerate(zip(edges, layering.chains, strict=True)):
        back = layering.back[index]
        drop = BACK_OFFSET if back else 0.0  # apart from the forward edge of a 2-cycle
        ys = [boxes[n].cy + drop if n in boxes else top[n] + PASS_HEIGHT / 2 for n in chain]
        first, last = layer[chain[0]], layer[chain[-1]]
        start, end = boxes[chain[0]], boxes[chain[-1]]
        # Low layer to high: out of a box's right side, level to its column's edge and on
        # through the gap's left stretch, a curve, the right stretch, then level through each
        # column between, into the last box's left side.
        points, curved = [(start.x + start.width, ys[0]), (right[first], ys[0])], [False]
        for k in range(first, last):
            y1, y2 = ys[k - first], ys[k - first + 1]
            points += [(right[k] + inset[k][0], y1), (left[k + 1] - inset[k][1], y2)]
            points += [(left[k + 1], y2), (right[k + 1] if k + 1 < last else end.x, y2)]
            curved += [False, True, False, False]
        if back:  # the arrowhead goes at the end: at the edge's real target
            points.reverse()
            curved.reverse()
        gap, low = label_gap[index], agent_low[index]
        label_x = (
            right[gap] + LABEL_PAD + label_width[index] / 2
            if low
            else left[gap + 1] - LABEL_PAD - label_width[index] / 2
        )
        label_y = ys[gap - first] if low else ys[gap - first + 1]
        source, target = _ends(edge)
        lines.append(
            Line(
                source=source,
                target=target,
                kind=edge.kind,
                label=labels[index],
                title=_edge_title(edge),
                path=_path(points, curved),
                label_x=label_x,
                label_y=label_y + (BACK_LABEL_DROP if back else 0.0),  # below its line
                label_width=label_width[index],
                back=back,
            )
        )
    bottom = max((t + height(n) for n, t in top.items()), default=0.0)
    return Drawing(
        boxes=tuple(boxes[n] for column in columns for n in column if n in boxes),
        lines=tuple(lines),
        width=round(right[-1] + MARGIN, 1),
        height=round(bottom + MARGIN + (BACK_LABEL_DROP if any(layering.back) else 0.0), 1),
        layers=count,
    )


@dataclass(frozen=True, slots=True)
class Ref:
    """A topic, agent or schedule named in the table, with its page (`None`: none)."""

    kind: NodeKind
    name: str
    href: str | None


@dataclass(frozen=True, slots=True)
class Consumer:
    """An agent consuming a topic: the type it takes, and where its result goes."""

    agent: Ref
    payload: str
    publishes: Ref | None
    returns: str


@dataclass(frozen=True, slots=True)
class TopicRow:
    """A topic: its declared types, who publishes to it, and who consumes it."""

    topic: Ref
    types: tuple[str, ...]
    producers: tuple[Ref, ...]
    consumers: tuple[Consumer, ...]


def _ref(kind: NodeKind, name: str) -> Ref:
    return Ref(kind, name, link(kind, name))


def topic_rows(topology: Topology) -> list[TopicRow]:
    """The graph as a table: a row per topic, in the order the app declares them."""
    outputs = {e.agent: e for e in topology.edges if e.kind == "publishes" and not e.schedule}
    rows = []
    for name, spec in topology.topics.items():
        on_topic = [e for e in topology.edges if e.topic == name]
        consumers = []
        for e in on_topic:
            if e.kind != "consumes":
                continue
            out = outputs.get(e.agent)
            consumers.append(
                Consumer(
                    agent=_ref("agent", e.agent),
                    payload=_edge_label(e),
                    publishes=None if out is None else _ref("topic", out.topic),
                    returns="" if out is None else _edge_label(out),
                )
            )
        producers = [
            _ref("schedule" if e.schedule else "agent", e.agent)
            for e in on_topic
            if e.kind == "publishes"
        ]
        rows.append(
            TopicRow(
                topic=_ref("topic", name),
                types=tuple(type_name(t) for t in spec.payload_types),
                producers=tuple(producers),
                consumers=tuple(consumers),
            )
        )
    return rows
