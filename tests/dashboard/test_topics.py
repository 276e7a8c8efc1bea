"""The topic pages (`/ui/topics`, `/ui/topics/{topic}`) and the agent page (`/ui/agents/{agent}`)
over a real Redis, with a worker running in-process (in a thread of its own) so that events
are held, dead-lettered and counted."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar
from uuid import uuid4

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi.testclient import TestClient

from omnidaemon import App
from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.fleet import live_workers
from omnidaemon.settings import Settings
from tests.dashboard._support import READ_TOKEN, dashboard

TOPIC = "orders.placed"
T = TypeVar("T")


def make_app(redis_url: str, prefix: str) -> App:
    """The shop: `work` fails `poison` for good (no retries) and holds `hold` for a minute;
    `audit` takes everything."""
    app = App(
        "shop",
        broker=RedisBroker(redis_url, prefix=prefix),
        settings=Settings(heartbeat_interval=0.2),
    )

    @app.agent(TOPIC, name="work", max_retries=0, timeout=30, publishes="orders.done")
    async def work(event: dict[str, Any]) -> dict[str, Any]:
        if event.get("kind") == "poison":
            raise RuntimeError("never works")
        if event.get("kind") == "hold":
            await anyio.sleep(60)
        return {"done": True}

    @app.agent(TOPIC, name="audit")
    async def audit(event: dict[str, Any]) -> None:
        pass

    @app.agent("refunds.asked", name="refund")
    async def refund(event: dict[str, Any]) -> None:
        pass

    return app


@pytest.fixture
def prefix() -> str:
    return f"dash{uuid4().hex[:10]}"


@contextmanager
def running_worker(app: App) -> Iterator[BlockingPortal]:
    """`app`'s worker running in a thread of its own, as another process would run it."""
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.running(shutdown_grace=0.1)),
    ):
        yield portal


def publish(client: TestClient, app: App, topic: str, payload: Any, **options: Any) -> str:
    """Publish through the API's app (connected on the client's event loop)."""
    event_id: str = loop_of(client).call(partial(app.publish, topic, payload, **options))
    return event_id


def loop_of(client: TestClient) -> BlockingPortal:
    """The event loop the client's API runs on (where its app's broker is connected)."""
    assert client.portal is not None
    return client.portal


def eventually(check: Callable[[], T | None], timeout: float = 10.0) -> T:
    """Poll `check` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def row(page: str, attribute: str, value: str) -> str:
    """The table row whose `data-<attribute>` is `value`."""
    match = re.search(rf'<tr data-{attribute}="{re.escape(value)}"[^>]*>(.*?)</tr>', page, re.S)
    assert match is not None, f"no row {attribute}={value}"
    return match.group(1)


def cell(row_html: str, field: str) -> str:
    """The text of a row's cell `data-field="<field>"`, tags and spaces dropped."""
    match = re.search(rf'data-field="{field}">(.*?)</(?:td|th|dd)>', row_html, re.S)
    assert match is not None, f"no field {field}"
    return html.unescape(re.sub(r"<[^>]+>|\s+", " ", match.group(1))).strip()


def test_topic_and_agent_pages_show_entries_groups_and_held_deliveries(
    redis_url: str, prefix: str
) -> None:
    api_app, worker_app = make_app(redis_url, prefix), make_app(redis_url, prefix)
    with dashboard(api_app) as client, running_worker(worker_app) as portal:
        [worker] = portal.call(live_workers, worker_app.broker)
        script = publish(
            client, api_app, TOPIC, {"note": "<script>alert(1)</script>"}, priority="high"
        )
        publish(client, api_app, TOPIC, {"kind": "poison"})
        held = publish(client, api_app, TOPIC, {"kind": "hold"}, correlation_id="corr-7")

        def settled() -> str | None:
            page = client.get(f"/ui/topics/{TOPIC}").text
            work, audit = row(page, "group", "work"), row(page, "group", "audit")
            ready = cell(work, "dead_letters") == "1" and cell(audit, "lag") == "0"
            ready = ready and cell(audit, "pending") == "0"
            return page if ready and f'data-held="{held}"' in page else None

        page = eventually(settled)
        # The payload is shown as text, never as markup; newest first; the lane is named.
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert "<script>alert" not in page
        assert page.index(held) < page.index(script)
        entry = page[page.index('<li data-entry="') :]
        assert "high priority" in page[page.index(script) :][:2000]
        assert "corr-7" in entry
        # Both groups, with what they hold and a link to the dead letters.
        work, audit = row(page, "group", "work"), row(page, "group", "audit")
        assert cell(work, "pending") == "1" and cell(audit, "pending") == "0"
        assert cell(work, "lag") == "0" == cell(audit, "lag")
        assert cell(work, "oldest_pending") != "—"
        assert f'href="/ui/dead-letters/{TOPIC}"' in work
        assert f'data-consumer="{worker.id}"' in work and "1 held" in work
        holder = row(page, "held", held)
        assert worker.id in holder and cell(holder, "attempt") == "1" and "corr-7" in holder
        assert 'href="/ui/agents/work"' in page and 'href="/ui/agents/audit"' in page

        def counted() -> str | None:
            # Counts reach the bus with the worker's batched acknowledgements: soon, not at once.
            agent = client.get("/ui/agents/work")
            assert agent.status_code == 200
            counts = row(agent.text, "topic", TOPIC)
            return agent.text if cell(counts, "dead_lettered") == "1" else None

        text = eventually(counted)
        assert cell(text, "max_retries").startswith("0: ")
        assert cell(text, "timeout") == "30.0 s"
        assert cell(text, "concurrency") == "16 per worker"
        assert 'href="/ui/topics/orders.done"' in text  # what it publishes
        counts = row(text, "topic", TOPIC)
        assert int(cell(counts, "received")) >= 2 and cell(counts, "in_flight") == "1"
        assert worker.id in row(text, "worker", worker.id)
        assert worker.id in row(text, "held", held)

    # The worker is gone: what is published now waits, as lag.
    with dashboard(api_app) as client:
        publish(client, api_app, TOPIC, {"kind": "late"})
        publish(client, api_app, TOPIC, {"kind": "later"})
        page = client.get(f"/ui/topics/{TOPIC}").text
        assert cell(row(page, "group", "audit"), "lag") == "2"
        assert "No live worker runs any of its events now." in page
        assert 'data-field="consumers"' in page and "gone" not in row(page, "group", "audit")


def test_topics_index_and_entries_without_a_worker(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix)
    with dashboard(app, token=READ_TOKEN) as client:  # reading needs the `read` scope only
        assert "No topic on the bus yet" in client.get("/ui/topics").text
        for n in range(3):
            publish(client, app, TOPIC, {"n": n})
        raw = b"<b>not an envelope</b>"
        loop_of(client).call(app.broker.publish, "refunds.asked", raw)
        loop_of(client).call(app.broker.subscribe, Subscription("refunds.asked", "billing"))

        index = client.get("/ui/topics")
        assert index.status_code == 200
        orders = row(index.text, "topic", TOPIC)
        assert f'href="/ui/topics/{TOPIC}"' in orders and cell(orders, "entries") == "3"
        refunds = row(index.text, "topic", "refunds.asked")
        assert cell(refunds, "entries") == "1" and cell(refunds, "groups") == "billing"

        page = client.get("/ui/topics/orders.placed?limit=2").text
        assert page.count("<li data-entry=") == 2
        shown = html.unescape(page)
        assert shown.index('"n": 2') < shown.index('"n": 1') and '"n": 0' not in shown
        assert "No agent reads this topic yet" in page
        assert 'href="/ui/agents/work"' in page  # the app's agents consuming it

        refunds_page = client.get("/ui/topics/refunds.asked").text
        assert "&lt;b&gt;not an envelope&lt;/b&gt;" in refunds_page and "<b>not" not in refunds_page
        assert "not an event" in refunds_page
        assert "other app" in row(refunds_page, "group", "billing")

        # Another app's agent is shown from the bus; a declared agent never run, as such.
        billing = client.get("/ui/agents/billing")
        assert billing.status_code == 200 and 'data-testid="not-declared"' in billing.text
        assert row(billing.text, "group", "billing")
        refund = client.get("/ui/agents/refund").text
        assert "Nothing counted yet" in refund and "No live worker runs it" in refund
        assert "No consumer group yet" in refund


def test_unknown_topics_and_agents_are_not_found(redis_url: str, prefix: str) -> None:
    app = make_app(redis_url, prefix)
    with dashboard(app) as client:
        for path, name in (("/ui/agents/nobody", "nobody"), ("/ui/topics/no.such", "no.such")):
            answer = client.get(path)
            assert answer.status_code == 404
            assert "Not found" in answer.text and name in answer.text
        assert client.get("/ui/agents/" + "x" * 300).status_code == 404
    with dashboard(app, token=None) as client:
        answer = client.get(f"/ui/topics/{TOPIC}", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/ui/login?next=")


def test_a_declared_topic_nothing_was_published_to_has_an_empty_page(
    redis_url: str, prefix: str
) -> None:
    app = make_app(redis_url, prefix)
    with dashboard(app, token=READ_TOKEN) as client:
        done = client.get("/ui/topics/orders.done")  # `work` publishes to it: the graph links it
        assert done.status_code == 200
        assert 'data-testid="no-entries"' in done.text and "No events yet" in done.text
        assert "No agent reads this topic yet" in done.text
        assert 'href="/ui/agents/work"' in done.text and "Published to by" in done.text
        asked = client.get("/ui/topics/refunds.asked")  # consumed by `refund`, never run
        assert asked.status_code == 200 and 'href="/ui/agents/refund"' in asked.text
        missing = client.get("/ui/topics/orders.nowhere")
        assert missing.status_code == 404 and "orders.nowhere" in missing.text
