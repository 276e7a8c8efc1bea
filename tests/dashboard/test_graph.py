"""The Graph page (`/ui/graph`): the app's topology as server-rendered SVG and as a table.

The page is read as a user's browser would: the SVG is parsed (it is well-formed XML), its
nodes' links, edges and boxes checked; the layout itself (`omnidaemon.dashboard.graph`,
`omnidaemon.dashboard.layering`) is checked on the example pipeline, on cycles and on a
larger random graph."""

from __future__ import annotations

import itertools
import random
import re
import time
import xml.etree.ElementTree as ET
from typing import Any, Literal

from pydantic import BaseModel

import omnidaemon.api  # noqa: F401  (first: omnidaemon.dashboard alone is a circular import)
from omnidaemon import App
from omnidaemon.dashboard.graph import Drawing, draw
from omnidaemon.dashboard.layering import layer_graph
from tests.dashboard._support import READ_TOKEN, dashboard

SVG = "{http://www.w3.org/2000/svg}"


class Order(BaseModel):
    id: str


class Bill(BaseModel):
    order: str
    cents: int


def make_app() -> App:
    """A fan-out (`orders.placed` to three agents), a chain (bill -> pay -> receipt), a
    2-cycle (`retry` publishes to the topic it consumes), a 3-cycle with no source
    (ping -> pong -> pang -> ping), a schedule, and a payload type whose name needs escaping."""
    app = App("shop", broker="memory://")

    @app.agent("orders.placed", name="billing:invoice", publishes="orders.billed")
    async def invoice(event: Order) -> Bill:
        return Bill(order=event.id, cents=100)

    @app.agent("orders.placed", name="ship")
    async def ship(event: Order) -> None:
        pass

    @app.agent("orders.placed", name="audit")
    async def audit(event: dict[str, Any]) -> None:
        pass

    @app.agent("orders.billed", name="pay", publishes="orders.paid")
    async def pay(event: Bill) -> Bill:
        return event

    @app.agent("orders.paid", name="receipt")
    async def receipt(event: Literal["<b>paid</b>"]) -> None:
        pass

    @app.agent("jobs.todo", name="retry", publishes="jobs.todo")
    async def retry(event: Order) -> Order:
        return event

    for here, there in [("ping", "pong"), ("pong", "pang"), ("pang", "ping")]:

        async def bounce(event: dict[str, Any]) -> dict[str, Any]:
            return event

        app.agent(f"ball.{here}", name=here, publishes=f"ball.{there}")(bounce)

    app.every(60, topic="orders.placed", name="nightly", payload={"id": "tick"})
    return app


def svg_of(page: str) -> ET.Element:
    """The page's graph, parsed."""
    start = page.index("<svg")
    return ET.fromstring(page[start : page.index("</svg>", start) + len("</svg>")])


def nodes_of(svg: ET.Element) -> dict[str, ET.Element]:
    return {el.attrib["data-node"]: el for el in svg.iter() if "data-node" in el.attrib}


def edges_of(svg: ET.Element) -> set[str]:
    return {el.attrib["data-edge"] for el in svg.iter() if "data-edge" in el.attrib}


def box_of(node: ET.Element) -> tuple[float, float, float, float]:
    rect = node.find(f"{SVG}rect")
    assert rect is not None
    return tuple(float(rect.attrib[k]) for k in ("x", "y", "width", "height"))  # type: ignore[return-value]


def overlapping(boxes: list[tuple[float, float, float, float]]) -> list[Any]:
    return [
        (a, b)
        for a, b in itertools.combinations(boxes, 2)
        if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
    ]


def test_every_topic_and_agent_is_a_linked_node() -> None:
    app = make_app()
    with dashboard(app, token=READ_TOKEN) as client:
        answer = client.get("/ui/graph")
    assert answer.status_code == 200, answer.text
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    page = answer.text
    assert 'style="' not in page and "<script>" not in page
    svg = svg_of(page)
    assert svg.attrib["data-testid"] == "graph"
    assert svg.find(f"{SVG}title") is not None and svg.find(f"{SVG}desc") is not None
    nodes = nodes_of(svg)
    topology = app.topology()
    assert set(nodes) == {f"topic:{t}" for t in topology.topics} | {
        f"agent:{a}" for a in topology.agents
    } | {"schedule:nightly"}
    for topic in topology.topics:
        node = nodes[f"topic:{topic}"]
        assert node.tag == f"{SVG}a" and node.attrib["href"] == f"/ui/topics/{topic}"
        assert node.attrib["aria-label"] == f"Topic {topic}"
        assert "topic" in node.attrib["class"].split()
    for agent in topology.agents:
        node = nodes[f"agent:{agent}"]
        assert node.tag == f"{SVG}a" and "agent" in node.attrib["class"].split()
    # Names are URL-encoded in links, shown whole in the box and its tooltip.
    invoice = nodes["agent:billing:invoice"]
    assert invoice.attrib["href"] == "/ui/agents/billing%3Ainvoice"
    assert invoice.findtext(f"{SVG}text") == "billing:invoice"
    title = invoice.findtext(f"{SVG}title") or ""
    assert "consumes orders.placed (Order)" in title and "publishes orders.billed" in title
    assert nodes["schedule:nightly"].tag == f"{SVG}g"  # no page of its own: not a link

    edges = edges_of(svg)
    for expected in [
        "topic:orders.placed consumes agent:billing:invoice",
        "topic:orders.placed consumes agent:ship",
        "topic:orders.placed consumes agent:audit",
        "agent:billing:invoice publishes topic:orders.billed",
        "topic:orders.billed consumes agent:pay",
        "agent:pay publishes topic:orders.paid",
        "agent:retry publishes topic:jobs.todo",
        "topic:jobs.todo consumes agent:retry",
        "agent:pang publishes topic:ball.ping",
        "schedule:nightly publishes topic:orders.placed",
    ]:
        assert expected in edges
    assert len(edges) == len(topology.edges)
    # Edges are labelled with their types, escaped; each has an arrowhead.
    labels = [t.text for t in svg.iter(f"{SVG}text") if t.text]
    assert {"Order", "Bill", "Literal['<b>paid</b>']"} <= set(labels)
    assert "<b>paid" not in page and "&lt;b&gt;paid" in page
    assert all(
        p.attrib.get("marker-end") == "url(#graph-arrow)"
        for g in svg.iter()
        if "data-edge" in g.attrib
        for p in g.iter(f"{SVG}path")
    )
    # Cycles are drawn, their closing edges dashed (class `back`).
    back = [g for g in svg.iter() if "data-edge" in g.attrib and "back" in g.attrib["class"]]
    assert len(back) == 2
    assert not overlapping([box_of(n) for n in nodes.values()])


def test_the_table_says_the_same() -> None:
    with dashboard(make_app()) as client:
        page = client.get("/ui/graph").text
    table = page[page.index('data-testid="graph-table"') :]
    row = re.search(r'<tr data-topic="orders.placed">(.*?)</tr>', table, re.S)
    assert row is not None
    cells = row.group(1)
    assert '<a href="/ui/topics/orders.placed">orders.placed</a>' in cells
    assert "nightly" in cells  # published by the schedule
    assert '<a href="/ui/agents/billing%3Ainvoice">billing:invoice</a>' in cells
    assert '<a href="/ui/topics/orders.billed">orders.billed</a>' in cells
    assert '<a href="/ui/agents/ship">ship</a>' in cells
    paid = re.search(r'<tr data-topic="orders.paid">(.*?)</tr>', table, re.S)
    assert (
        paid is not None
        and "<code>Literal[&#39;&lt;b&gt;paid&lt;/b&gt;&#39;]</code>" in paid.group(1)
    )


def test_signed_out_and_empty() -> None:
    with dashboard(make_app(), token=None) as client:
        answer = client.get("/ui/graph", follow_redirects=False)
        assert answer.status_code == 303 and "/ui/login" in answer.headers["location"]
    with dashboard(App("empty", broker="memory://")) as client:
        answer = client.get("/ui/graph")
    assert answer.status_code == 200 and 'data-testid="graph-empty"' in answer.text
    assert '<svg class="graph"' not in answer.text


def check_layout(drawing: Drawing) -> None:
    """No two boxes or labels overlap, everything is inside the picture, every path starts
    at its source's box and ends at its target's."""
    boxes = [(b.x, b.y, b.width, b.height) for b in drawing.boxes]
    labels = [
        (line.label_x - line.label_width / 2, line.label_y - 8, line.label_width, 16.0)
        for line in drawing.lines
        if line.label
    ]
    assert not overlapping(boxes + labels)
    for x, y, w, h in labels:
        assert x >= 0 and x + w <= drawing.width and y >= 0 and y + h <= drawing.height
    for b in drawing.boxes:
        assert b.x >= 0 and b.x + b.width <= drawing.width
        assert b.y >= 0 and b.y + b.height <= drawing.height
    for line in drawing.lines:
        source, target = drawing.box(line.source), drawing.box(line.target)
        numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", line.path)]
        (x0, y0), (x1, y1) = numbers[:2], numbers[-2:]
        assert x0 == round(source.x if line.back else source.x + source.width, 1)
        assert x1 == round(target.x + target.width if line.back else target.x, 1)
        assert source.y <= y0 <= source.y + source.height
        assert target.y <= y1 <= target.y + target.height


def test_the_example_pipeline_is_a_chain_left_to_right() -> None:
    from examples.document_pipeline import app

    drawing = draw(app.topology())
    check_layout(drawing)
    chain = [
        "topic:document.uploaded",
        "agent:extract_text",
        "topic:text.extracted",
        "agent:analyze",
        "topic:analysis.completed",
        "agent:notify_user",
        "topic:user.notified",
    ]
    assert [drawing.box(n).layer for n in chain] == list(range(7))
    assert drawing.layers == 7
    # A chain is straight: every box on one line.
    assert len({drawing.box(n).cy for n in chain}) == 1
    assert not any(line.back for line in drawing.lines)
    assert {line.label for line in drawing.lines} >= {"Uploaded", "Extracted", "Analysis"}


def test_a_cycle_without_a_source_is_laid_out() -> None:
    # The layering module alone: a 3-cycle with no way in, and a self-contained 2-cycle.
    layering = layer_graph(["a", "b", "c", "x", "y"], [("a", "b"), ("b", "c"), ("c", "a"),
                                                       ("x", "y"), ("y", "x")])  # fmt: skip
    assert layering.back == [False, False, True, False, True]
    assert [layering.layer[n] for n in "abcxy"] == [0, 1, 2, 0, 1]
    assert layering.chains[2] == ["a", "~2:1", "c"]  # the back edge passes by b's layer
    drawing = draw(make_app().topology())
    check_layout(drawing)
    assert sum(line.back for line in drawing.lines) == 2


def test_crossings_are_removed() -> None:
    # Declared in an order that crosses: a -> d, b -> c with c above d.
    layering = layer_graph(["a", "b", "c", "d"], [("a", "d"), ("b", "c")])
    assert layering.columns[1] == ["d", "c"] and layering.crossings() == 0


def test_a_large_random_graph_is_quick_and_tidy() -> None:
    rng = random.Random(22)
    app = App("big", broker="memory://")
    topics = [f"t.n{i}" for i in range(40)]
    for i in range(120):

        async def handler(event: dict[str, Any]) -> dict[str, Any]:
            return event

        async def typed(event: Order) -> Bill:
            return Bill(order=event.id, cents=1)

        publishes = rng.choice(topics) if rng.random() < 0.7 else None
        chosen = typed if i % 3 == 0 else handler  # a label on a third of the edges
        app.agent(rng.choice(topics), name=f"agent{i}", publishes=publishes)(chosen)
    started = time.perf_counter()
    drawing = draw(app.topology())
    assert time.perf_counter() - started < 5
    check_layout(drawing)
    assert len(drawing.boxes) == len(app.topology().topics) + 120
