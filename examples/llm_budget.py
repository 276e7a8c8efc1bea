"""Flow control for model calls: per-tenant rate limits and concurrency, a shared token budget.

    python examples/llm_budget.py

`research` summarises a topic with a (fake) model and `translate` translates each summary.
A model provider counts tokens per minute for the whole account, so both agents draw on one
`Budget("model.tokens", 20_000, per="minute")`: each start reserves its estimate, and each
handler pays what the model really used with `ctx.charge`. Each tenant may start 30 research
runs a minute, 2 at a time, so one tenant's burst waits its turn while the others go ahead.
An event over a limit waits on the bus (no attempt counted, no handler slot held).
"""

from __future__ import annotations

from collections import defaultdict

import anyio
from pydantic import BaseModel

from omnidaemon import App, Budget, Context

app = App("llm-budget")

# One budget, passed to every agent that calls the model: one amount on the bus, shared by
# both agents in every worker of the fleet, as the provider's quota is.
TOKENS = Budget("model.tokens", 20_000, per="minute")
REPLY_TOKENS = 150  # the most the model writes back


class Usage(BaseModel):
    total_tokens: int


class Reply(BaseModel):
    text: str
    usage: Usage


async def fake_model(prompt: str) -> Reply:
    """Stands in for a model API (no network): a short wait, a reply, the tokens it used."""
    await anyio.sleep(0.2)
    used = len(prompt) // 4 + REPLY_TOKENS // 2  # about 4 characters a token
    return Reply(text=f"<{prompt.splitlines()[0]}>", usage=Usage(total_tokens=used))


def estimate(prompt: str) -> int:
    """The tokens a prompt may use, reserved when its handler starts, so that handlers that
    start together cannot overdraw the budget before any of them has charged."""
    return len(prompt) // 4 + REPLY_TOKENS


class ResearchRequested(BaseModel):
    tenant_id: str
    topic: str
    notes: str  # the material to summarise


class Summary(BaseModel):
    tenant_id: str
    topic: str
    text: str


def research_prompt(event: ResearchRequested) -> str:
    return f"Summarise these notes on {event.topic}.\n{event.notes}"


def translate_prompt(summary: Summary) -> str:
    return f"Translate into French.\n{summary.text}"


started: dict[str, list[float]] = defaultdict(list)
charged: dict[str, int] = defaultdict(int)
translated: list[Summary] = []
all_translated = anyio.Event()


@app.agent(
    "research.requested",
    publishes="research.summarized",
    # Per tenant, not for the agent: a tenant sending a burst delays only its own requests.
    rate_limit="30/m",
    rate_limit_key=lambda e: e.tenant_id,
    # Model calls are slow; 2 at a time per tenant keeps one tenant from taking every slot.
    key_concurrency=2,
    concurrency_key=lambda e: e.tenant_id,
    budgets=[TOKENS],
    estimate=lambda e: estimate(research_prompt(e)),
)
async def research(event: ResearchRequested, ctx: Context) -> Summary:
    """Summarise the notes with the model; the summary goes to `research.summarized`."""
    started[event.tenant_id].append(anyio.current_time())
    reply = await fake_model(research_prompt(event))
    # Pay what was really used: this settles the reservation. Going over it may put the
    # budget in debt; new starts of both agents then wait until the refill has repaid it.
    await ctx.charge("model.tokens", reply.usage.total_tokens)
    charged["research"] += reply.usage.total_tokens
    return Summary(tenant_id=event.tenant_id, topic=event.topic, text=reply.text)


@app.agent(
    "research.summarized",
    budgets=[TOKENS],  # the same Budget: the two agents share its 20,000 tokens a minute
    estimate=lambda s: estimate(translate_prompt(s)),
)
async def translate(summary: Summary, ctx: Context) -> None:
    """Translate a summary with the same model, paying from the same budget."""
    reply = await fake_model(translate_prompt(summary))
    await ctx.charge("model.tokens", reply.usage.total_tokens)
    charged["translate"] += reply.usage.total_tokens
    translated.append(summary)
    if len(translated) == len(REQUESTS):
        all_translated.set()


NOTES = "Cells, costs, supply chains and recycling, with figures from 2020 to 2024. " * 100
REQUESTS = [
    ResearchRequested(tenant_id=tenant, topic=topic, notes=NOTES)
    for tenant, topic in [("acme", "batteries"), ("acme", "solar"), ("acme", "wind"),
                          ("globex", "tides")]
]  # fmt: skip


async def main() -> None:
    async with app.running():
        start = anyio.current_time()
        for request in REQUESTS:  # acme's three arrive at once: its limit spaces them out
            await app.publish("research.requested", request)
        with anyio.fail_after(60):
            await all_translated.wait()
    for tenant, times in sorted(started.items()):
        at = ", ".join(f"{t - start:.1f}" for t in times)
        print(f"{tenant}: {len(times)} research run(s), started after {at} s")
    print(f"translated {len(translated)} summaries")
    total = charged["research"] + charged["translate"]
    print(
        f"model.tokens charged: research {charged['research']:,} + translate "
        f"{charged['translate']:,} = {total:,} of the {TOKENS.amount:,.0f} a minute they share"
    )
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
