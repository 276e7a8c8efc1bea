"""Type-level checks of the public API, run by `mypy --strict` in the test command (not pytest).

A user's editor must know what the decorator returns, what publishing returns, and what a
handler's context holds.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from pydantic import BaseModel

from omnidaemon import App, Context, DeadLetter, Envelope, Result

app = App("typing", broker="memory://typing")


class Uploaded(BaseModel):
    file_path: str


class Extracted(BaseModel):
    text: str


@app.agent("document.uploaded", publishes="text.extracted")
async def extract(event: Uploaded, ctx: Context) -> Extracted:
    assert_type(event.file_path, str)
    assert_type(ctx.event, Envelope[Any])
    assert_type(ctx.attempt, int)
    assert_type(await ctx.publish("audit.logged", {"ok": True}), str)
    return Extracted(text="")


@app.agent("text.extracted")
def count(event: Extracted) -> int:
    return len(event.text)


# The decorator returns the handler unchanged, so it can be called and type-checked directly.
assert_type(count(Extracted(text="abc")), int)


async def publishing() -> None:
    assert_type(await app.publish("document.uploaded", Uploaded(file_path="a.pdf")), str)
    assert_type(await app.publish_many([("document.uploaded", {})]), list[str])
    assert_type(await app.dead_letters("extract"), list[DeadLetter])
    assert_type(await app.request("document.uploaded", {}, response_type=Extracted), Extracted)
    assert_type(await app.request("document.uploaded", {}), Any)
    assert_type(await app.result("some-id"), Result)
    assert_type(app.publish_sync("document.uploaded", {"file_path": "a"}), str)


_: Coroutine[Any, Any, Extracted] = extract(Uploaded(file_path="a.pdf"), Context.__new__(Context))


async def testing() -> None:
    from omnidaemon.testing import TestApp

    async with TestApp(app, shutdown_grace=0.5) as bus:
        assert_type(bus, TestApp)
        assert_type(await bus.publish("document.uploaded", {"file_path": "a"}), str)
        assert_type(await bus.advance(30), None)
        assert_type(await bus.drain(), None)
        assert_type(bus.published("text.extracted"), list[Envelope[Any]])
        assert_type(bus.dead_letters("extract"), list[DeadLetter])
