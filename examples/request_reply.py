"""Request-reply: publish an event and wait for the handler's return value.

    python examples/request_reply.py

`app.request` waits for the reply (validated into `response_type`) and raises `AgentFailed`
with the remote error as soon as the agent gives up, instead of waiting for its timeout.
"""

from __future__ import annotations

import anyio
from pydantic import BaseModel

from omnidaemon import AgentFailed, App, Reject

app = App("pricing")


class QuoteRequest(BaseModel):
    sku: str
    quantity: int


class Quote(BaseModel):
    sku: str
    total_cents: int


PRICES = {"A1": 250, "B2": 1999}


@app.agent("quote.requested")
async def quote(event: QuoteRequest) -> Quote:
    """Price a quote; unknown products are rejected for good."""
    if event.sku not in PRICES:
        raise Reject(f"unknown sku {event.sku}")
    return Quote(sku=event.sku, total_cents=PRICES[event.sku] * event.quantity)


async def main() -> None:
    async with app.running():
        answer = await app.request(
            "quote.requested", QuoteRequest(sku="A1", quantity=4), response_type=Quote
        )
        print(f"quote: {answer.sku} x4 = {answer.total_cents / 100:.2f}")
        try:
            await app.request("quote.requested", QuoteRequest(sku="ZZ", quantity=1), timeout=10)
        except AgentFailed as exc:
            print(f"failed: {exc.error_type}: {exc.message} (agent {exc.agent})")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
