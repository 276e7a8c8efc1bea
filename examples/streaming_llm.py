"""Streaming output: a (fake) language model's tokens, read as they come over HTTP.

    python examples/streaming_llm.py

The agent calls a model that yields tokens slowly and emits each one with `ctx.emit`; its
return value (the whole answer) ends the stream. A client reads the stream from the HTTP API
(`GET /v1/events/{id}/stream`, Server-Sent Events) and prints the tokens as they arrive. A
reader that comes after the answer is finished (`app.stream`) still gets every token: the
stream is kept on the bus for the agent's `result_ttl`.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator

import anyio
import httpx
import orjson
import uvicorn
from pydantic import BaseModel

from omnidaemon import App, Context
from omnidaemon.api import create_api

app = App("chat")

ANSWER = "Event buses keep work durable: a crash loses nothing, and a retry starts over."


class Question(BaseModel):
    text: str


async def fake_model(prompt: str) -> AsyncIterator[str]:
    """A stand-in for a model client: one token every 50 ms."""
    for token in ANSWER.split(" "):
        await anyio.sleep(0.05)
        yield token + " "


@app.agent("chat.asked", stream=str)
async def answer(question: Question, ctx: Context) -> str:
    """Stream the model's tokens as they come; return the whole answer."""
    tokens = []
    async for token in fake_model(question.text):
        await ctx.emit(token)
        tokens.append(token)
    return "".join(tokens).strip()


async def read_over_http(base_url: str, event_id: str) -> int:
    """Print the stream's tokens as the SSE endpoint sends them; return how many came."""
    started = time.monotonic()
    count = 0
    first_at = 0.0
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=30) as http,
        http.stream("GET", f"/v1/events/{event_id}/stream", params={"timeout": 30}) as response,
    ):
        response.raise_for_status()
        kind = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = orjson.loads(line.removeprefix("data: "))
                if kind == "chunk":
                    count += 1
                    first_at = first_at or time.monotonic() - started
                    print(data["data"], end="", flush=True)
                elif kind == "restart":
                    print("\n[the model failed; retrying from the start]")
                elif kind == "end":
                    print(f"\nstatus: {data['status']}")
    took = time.monotonic() - started
    print(f"streamed {count} tokens over HTTP: first after {first_at:.2f} s, all in {took:.2f} s")
    return count


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def main() -> None:
    # The HTTP API on a connection of its own (its lifespan opens and closes it), without
    # tokens: it answers only this machine.
    api = create_api(App("chat-api"), insecure_no_auth=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=port, log_level="warning"))
    async with app.running(), anyio.create_task_group() as tasks:
        tasks.start_soon(server.serve)
        while not server.started:  # noqa: ASYNC110 - uvicorn has no event to wait on
            await anyio.sleep(0.05)
        event_id = await app.publish("chat.asked", Question(text="Why use an event bus?"))
        await read_over_http(f"http://127.0.0.1:{port}", event_id)

        late = app.stream(event_id)
        tokens = [chunk.data async for chunk in late]
        print(f"a late reader got all {len(tokens)} tokens; result: {late.result}")
        server.should_exit = True
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
