"""The dashboard's runs (`/ui/runs`), a run's timeline (`/ui/runs/{id}`) and an event's
streamed output (`/ui/events/{id}`, its SSE at `/ui/events/{id}/stream`): in process, the
API's own app running its agents on the memory bus (in the test client's event loop)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
import orjson
import pytest
from fastapi.testclient import TestClient

from omnidaemon import App, Context
from omnidaemon.traces import Trace
from tests.dashboard._support import READ_TOKEN, dashboard

T = TypeVar("T")


def make_app() -> App:
    app = App("shop", broker="memory://")

    @app.agent("order.placed", publishes="order.checked", max_retries=1, retry_backoff=0.05)
    async def check(order: dict[str, Any]) -> dict[str, Any]:
        await anyio.sleep(0.05)  # bars with a width
        if order["card"] == "bad":
            raise RuntimeError("card declined <b>twice</b>")
        return order

    @app.agent("order.checked")
    async def ship(order: dict[str, Any]) -> None:
        await anyio.sleep(0.02)

    @app.agent("slow.asked")
    async def slow(_: Any) -> None:
        await anyio.sleep(2.0)  # its start is recorded after 0.5 s: a run seen running

    @app.agent("chat.asked", stream=str, store_results=True)
    async def chat(question: dict[str, Any], ctx: Context) -> str:
        words = [f"w{i} " for i in range(question["words"])]
        for word in words:
            await ctx.emit(word)
        return "".join(words)

    return app


@contextmanager
def running(token: str | None = READ_TOKEN) -> Iterator[tuple[App, TestClient]]:
    """A signed-in client of the dashboard over an app whose agents run meanwhile."""
    app = make_app()
    with (
        dashboard(app, token=token) as client,
        client.portal.wrap_async_context_manager(app.running()),  # type: ignore[union-attr]
    ):
        yield app, client


def poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            assert done(value), f"still {value!r} after {timeout} s"
            return value
        time.sleep(0.02)


def finished_trace(app: App, client: TestClient, run_id: str, attempts: int) -> Trace:
    """The run's trace once it is over with `attempts` attempts recorded."""

    def read() -> Trace | None:
        return client.portal.call(app.trace, run_id)  # type: ignore[union-attr]

    trace = poll(
        read, lambda t: t is not None and t.status != "running" and t.attempt_count == attempts
    )
    assert trace is not None
    return trace


def publish(app: App, client: TestClient, topic: str, payload: Any) -> str:
    async def send() -> str:
        return await app.publish(topic, payload)

    return client.portal.call(send)  # type: ignore[union-attr]


def rows(html: str, **attrs: str) -> list[str]:
    """The `<tr>` elements of `html` carrying every attribute of `attrs` (data-*)."""
    found = []
    for row in re.findall(r"<tr [^>]*>.*?</tr>", html, re.S):
        head = row[: row.index(">")]
        if all(f'data-{k}="{v}"' in head for k, v in attrs.items()):
            found.append(row)
    return found


def bar(row: str) -> tuple[float, float]:
    found = re.search(r'<rect class="bar [^"]*" x="([\d.]+)" y="\d+" width="([\d.]+)"', row)
    assert found, row
    return float(found.group(1)), float(found.group(2))


def test_runs_list_their_status_and_a_run_its_timeline() -> None:
    with running() as (app, client):
        good = publish(app, client, "order.placed", {"card": "good"})
        bad = publish(app, client, "order.placed", {"card": "bad"})
        good_trace = finished_trace(app, client, good, attempts=2)
        bad_trace = finished_trace(app, client, bad, attempts=2)
        assert (good_trace.status, bad_trace.status) == ("succeeded", "failed")

        listing = client.get("/ui/runs?since=15m")
        assert listing.status_code == 200
        assert "style=" not in listing.text and "<script>" not in listing.text
        assert 'data-live="/ui/live/runs?since=15m" data-every="3000"' in listing.text
        (good_row,) = rows(listing.text, run=good)
        (bad_row,) = rows(listing.text, run=bad)
        assert 'data-status="succeeded"' in good_row and "status-succeeded" in good_row
        assert 'data-status="failed"' in bad_row and "<strong>check</strong>" in bad_row
        assert "card declined &lt;b&gt;twice&lt;/b&gt;" in bad_row  # escaped
        assert re.findall(r'<td class="num">(\d+)</td>', good_row) == ["2", "2"]  # events, tries

        failed_only = client.get("/ui/live/runs?since=1h&status=failed").text
        assert rows(failed_only, run=bad) and not rows(failed_only, run=good)
        opened = client.get(f"/ui/runs?id={bad}", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == f"/ui/runs/{bad}"

        # The failed run: both attempts of `check`, their outcomes, the error in <details>.
        page = client.get(f"/ui/runs/{bad}")
        assert page.status_code == 200 and "style=" not in page.text
        assert 'data-testid="run-status"><span class="status status-failed">' in page.text
        assert "data-live" not in page.text  # over: no refresh
        attempts = rows(page.text, kind="attempt", agent="check")
        assert len(attempts) == 2
        assert 'data-outcome="retrying"' in attempts[0]
        assert 'data-outcome="dead_lettered"' in attempts[1]
        for attempt in attempts:
            assert "<details" in attempt and "RuntimeError" in attempt
            assert "card declined &lt;b&gt;twice&lt;/b&gt;" in attempt
        assert rows(page.text, kind="handling", agent="check", outcome="dead_lettered")
        assert f'<a href="/ui/events/{bad}">order.placed</a>' in page.text
        assert 'data-testid="failure"' in page.text

        # The bars: placed from the run's start, as long as each attempt, on a 1000-wide axis.
        origin, span = bad_trace.started_at, bad_trace.duration
        assert origin is not None and span
        handling = bad_trace.events[0].handlings[0]
        for row, attempt in zip(attempts, handling.attempts, strict=True):
            assert attempt.started_at is not None and attempt.duration is not None
            x, width = bar(row)
            assert x == pytest.approx(
                (attempt.started_at - origin).total_seconds() / span * 1000, abs=0.5
            )
            assert width == pytest.approx(max(2.0, attempt.duration / span * 1000), abs=0.5)
            assert f"status-{attempt.outcome}" in row
        assert bar(attempts[1])[0] > sum(bar(attempts[0]))  # the retry after the backoff

        # The succeeded run, opened by its second event's id: the event it published nested
        # under the handling that published it, and each event linked to its stream page.
        child = good_trace.events[0].children[0]
        page = client.get(f"/ui/runs/{child.id}").text
        assert good in page and f"The run of event <code>{child.id}</code>" in page
        depths = re.findall(r'<tr class="row-(\w+)".*?class="label depth-(\d+)"', page, re.S)
        assert depths == [
            ("event", "0"),  # order.placed
            ("handling", "1"),  # check
            ("attempt", "2"),
            ("event", "2"),  # order.checked, published by check
            ("handling", "3"),  # ship
            ("attempt", "4"),
        ]
        assert f'<a href="/ui/events/{child.id}">order.checked</a>' in page
        assert len(rows(page, kind="attempt", outcome="succeeded")) == 2


def test_a_running_run_refreshes_until_it_ends() -> None:
    with running() as (app, client):
        run_id = publish(app, client, "slow.asked", {})
        answer = poll(lambda: client.get(f"/ui/runs/{run_id}"), lambda a: a.status_code == 200)
        page = answer.text
        assert (
            f'data-live="/ui/live/runs/{run_id}" data-every="2000" '
            'data-stop-when="[data-finished]"' in page
        )
        assert rows(page, kind="attempt", agent="slow", outcome="running")
        assert "<span data-finished hidden>" not in page
        # Its event's stream waits as long as a handling may still start streaming.
        event_page = client.get(f"/ui/events/{run_id}").text
        assert f'data-stream="/ui/events/{run_id}/stream"' in event_page
        fragment = poll(
            lambda: client.get(f"/ui/live/runs/{run_id}").text,
            lambda text: "<span data-finished hidden>" in text,
        )
        assert rows(fragment, kind="attempt", agent="slow", outcome="succeeded")


def sse_events(body: str) -> list[dict[str, Any]]:
    events = []
    for block in body.split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.splitlines() if not line.startswith(":")
        )
        if fields:
            events.append({**fields, "data": orjson.loads(fields["data"])})
    return events


def test_an_event_streams_its_output_and_shows_its_result() -> None:
    with running() as (app, client):
        event_id = publish(app, client, "chat.asked", {"words": 5})
        with client.stream("GET", f"/ui/events/{event_id}/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            body = "".join(response.iter_text())
        events = sse_events(body)
        assert [(e["event"], e["data"].get("data")) for e in events] == [
            *[("chunk", f"w{i} ") for i in range(5)],
            ("end", None),
        ]
        assert [e["data"]["index"] for e in events[:-1]] == [0, 1, 2, 3, 4]
        assert events[-1]["data"] == {
            "agent": "chat",
            "attempt": 1,
            "status": "succeeded",
            "result": "w0 w1 w2 w3 w4 ",
        }
        # Resumed after the end (an EventSource reconnecting): nothing more.
        again = client.get(
            f"/ui/events/{event_id}/stream", headers={"Last-Event-ID": events[-1]["id"]}
        )
        assert again.status_code == 204

        # Its page, once its result is stored and its handling traced: the result, and the
        # element ui.js follows (its handling is over: the stream need not wait long).
        page = poll(
            lambda: client.get(f"/ui/events/{event_id}"),
            lambda a: 'data-testid="results"' in a.text and 'data-agent="chat"><th' in a.text,
        )
        assert page.status_code == 200 and "style=" not in page.text
        assert f'data-stream="/ui/events/{event_id}/stream?timeout=2"' in page.text
        assert "<pre data-chunks></pre>" in page.text
        assert '<p data-stream-state aria-live="polite"' in page.text
        (result,) = rows(page.text, agent="chat")[-1:]
        assert "status-succeeded" in result and '<pre>"w0 w1 w2 w3 w4 "</pre>' in result
        chosen = client.get(f"/ui/events/{event_id}?agent=chat").text
        assert f'data-stream="/ui/events/{event_id}/stream?agent=chat&amp;timeout=2"' in chosen


def test_unknown_ids_are_not_found() -> None:
    with running() as (_, client):
        for path in ("/ui/runs/no-such-run", "/ui/events/no-such-event"):
            answer = client.get(path)
            assert answer.status_code == 404, path
            assert "Not found" in answer.text and "no-such-" in answer.text
        assert client.get("/ui/live/runs/no-such-run").status_code == 404
        assert client.get("/ui/events/no-such-event/stream?timeout=0.2").status_code == 404


def test_signing_in_is_needed() -> None:
    with running(token=None) as (_, client):
        for path in ("/ui/runs", "/ui/runs/x", "/ui/events/x"):
            answer = client.get(path, follow_redirects=False)
            assert answer.status_code == 303, path
            assert answer.headers["location"].startswith("/ui/login?next=")
        fragment = {"X-Omnidaemon-Fragment": "1"}
        assert client.get("/ui/live/runs", headers=fragment).status_code == 401
        assert client.get("/ui/live/runs/x", headers=fragment).status_code == 401
        # An EventSource sends no custom header, but this Accept.
        stream = client.get("/ui/events/x/stream", headers={"Accept": "text/event-stream"})
        assert stream.status_code == 401


def test_a_run_whose_id_holds_a_slash_opens() -> None:
    with running() as (app, client):

        async def send() -> str:
            return await app.publish("order.placed", {"card": "ok"}, correlation_id="order/7")

        client.portal.call(send)  # type: ignore[union-attr]
        finished_trace(app, client, "order/7", attempts=2)
        html = client.get("/ui/runs").text
        assert 'href="/ui/runs/order/7"' in html
        for path in ("/ui/runs/order/7", "/ui/live/runs/order/7", "/ui/runs?id=order/7"):
            answer = client.get(path)
            assert answer.status_code == 200, path
            assert 'data-testid="timeline"' in answer.text, path
