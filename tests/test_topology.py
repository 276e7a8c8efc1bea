"""Typed pipelines: the topology read from the agents' types, and publish-time type checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel

from omnidaemon import App, Context, PayloadValidationError
from omnidaemon.brokers import MemoryBroker
from omnidaemon.testing import TestApp

pytestmark = pytest.mark.anyio


class Uploaded(BaseModel):
    file_path: str


class Extracted(BaseModel):
    file_path: str
    text: str


@dataclass
class Scored:
    file_path: str
    score: float


def pipeline() -> App:
    app = App("docs", broker=MemoryBroker(None))

    @app.agent("document.uploaded", publishes="text.extracted")
    async def extract(event: Uploaded) -> Extracted:
        return Extracted(file_path=event.file_path, text="hello")

    @app.agent("text.extracted", publishes="text.scored")
    async def score(event: Extracted) -> Scored:
        return Scored(event.file_path, 0.9)

    @app.agent("text.extracted")
    async def archive(event: dict[str, Any], ctx: Context) -> None: ...

    return app


def test_topology_lists_topics_agents_and_typed_edges() -> None:
    topo = pipeline().topology()
    assert topo.agents == ("extract", "score", "archive")
    assert set(topo.topics) == {"document.uploaded", "text.extracted", "text.scored"}
    extracted = topo.topics["text.extracted"]
    assert extracted.producers == ("extract",)
    assert extracted.consumers == ("score", "archive")
    assert extracted.payload_types == (Extracted,)  # the raw dict consumer declares nothing
    assert [(e.agent, e.kind, e.topic) for e in topo.edges] == [
        ("extract", "consumes", "document.uploaded"),
        ("extract", "publishes", "text.extracted"),
        ("score", "consumes", "text.extracted"),
        ("score", "publishes", "text.scored"),
        ("archive", "consumes", "text.extracted"),
    ]
    mermaid = topo.to_mermaid()
    assert mermaid.startswith("flowchart LR")
    assert '(["text.extracted"])' in mermaid and "|Extracted|" in mermaid


async def test_publishing_a_payload_that_contradicts_the_topic_type_fails_at_once() -> None:
    app = pipeline()
    with pytest.raises(PayloadValidationError, match="not a valid Uploaded") as info:
        await app.publish("document.uploaded", {"path": "a.pdf"})
    assert "file_path" in str(info.value) and "agent 'extract' consumes it" in str(info.value)
    with pytest.raises(PayloadValidationError, match="not a valid Scored"):
        await app.publish("text.scored", {"file_path": "a", "score": "high"})
    with pytest.raises(PayloadValidationError):
        await app.publish_many([("document.uploaded", {"file_path": "ok"}), ("text.extracted", {})])


async def test_payloads_that_fit_are_published_whatever_form_they_take() -> None:
    app = pipeline()
    await app.publish("document.uploaded", Uploaded(file_path="a.pdf"))
    await app.publish("document.uploaded", {"file_path": "b.pdf"})
    await app.publish("text.scored", Scored("a", 1.0))
    await app.publish("undeclared.topic", {"anything": [1, 2]})  # no agent declares a type


async def test_context_publish_is_checked_too() -> None:
    app = pipeline()
    failures: list[str] = []

    @app.agent("document.uploaded", name="forwarder")
    async def forward(event: Uploaded, ctx: Context) -> None:
        try:
            await ctx.publish("text.extracted", {"file_path": event.file_path})  # no text
        except PayloadValidationError as exc:
            failures.append(str(exc))

    async with TestApp(app, agents=["forwarder"]) as bus:
        await bus.publish("document.uploaded", {"file_path": "a.pdf"})
        await bus.drain()
    assert len(failures) == 1 and "text" in failures[0]


async def test_fan_out_and_chain_end_to_end() -> None:
    app = pipeline()
    async with TestApp(app) as bus:
        first = await bus.publish("document.uploaded", {"file_path": "a.pdf"})
        await bus.drain()
        [scored] = bus.published("text.scored")
    assert scored.payload == {"file_path": "a.pdf", "score": 0.9}
    assert scored.correlation_id == first
