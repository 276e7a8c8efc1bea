"""The dead-letter pages over a real Redis: dead letters made by a worker whose agent raises
(`max_retries=0`), listed with their error, traceback and payload; replayed one at a time,
selected or all, and handled by the worker once it stops failing; edited and replayed;
purged behind a typed confirmation; and every action refused to a read-only token, to a form
without its CSRF token and to another site's page."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import anyio
import httpx
import orjson
import pytest
from fastapi.testclient import TestClient
from markupsafe import escape
from pydantic import BaseModel

from omnidaemon import App, admin
from omnidaemon.api import create_api, parse_tokens
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.dead_letters import DeadLetter
from omnidaemon.envelope import Envelope
from tests.api._support import apoll
from tests.dashboard._support import ADMIN_TOKEN, ORIGIN, READ_TOKEN, TOKENS, csrf_of, dashboard


class Job(BaseModel):
    """The tests' payload: a job fails while its bus is `failing`, or when `n` < 0."""

    n: int


@dataclass
class Bus:
    """A test's own bus (a key prefix on the session's redis-server), topic and agent."""

    url: str
    prefix: str = field(default_factory=lambda: f"dlqui{uuid.uuid4().hex[:8]}")
    topic: str = field(default_factory=lambda: f"jobs.t{uuid.uuid4().hex[:8]}")
    failing: bool = True
    handled: list[int] = field(default_factory=list)

    def app(self) -> App:
        """The app of the worker and of the dashboard: agent `keeper` on `topic`."""
        app = App("dlqui", broker=RedisBroker(self.url, prefix=self.prefix))

        @app.agent(self.topic, max_retries=0)
        async def keeper(job: Job) -> None:
            if self.failing or job.n < 0:
                raise RuntimeError(f"job {job.n} failed <b>loudly</b>")
            self.handled.append(job.n)

        return app

    def dead_letter(self, *ns: int) -> list[str]:
        """Publish a job per `n` to the failing agent; their event ids once dead-lettered."""

        async def run() -> list[str]:
            app = self.app()
            try:
                async with app.running():
                    ids = [await app.publish(self.topic, {"n": n}) for n in ns]

                    async def dead() -> bool:
                        found = {d.event_id for d in await app.dead_letters("keeper")}
                        return found >= set(ids)

                    await apoll(dead, message="the dead letters")
                return ids
            finally:
                await app.close()

        return anyio.run(run)

    def handle(self, *ns: int) -> None:
        """Run the worker, no longer failing, until it has handled every `n`."""
        self.failing = False

        async def run() -> None:
            app = self.app()
            try:
                async with app.running():

                    async def done() -> bool:
                        return sorted(self.handled) == sorted(ns)

                    await apoll(done, message=f"jobs {ns} handled")
            finally:
                await app.close()

        anyio.run(run)

    def letters(self) -> list[DeadLetter]:
        """The topic's dead letters, read from the bus."""

        async def read() -> list[DeadLetter]:
            async with RedisBroker(self.url, prefix=self.prefix) as broker:
                found = await admin.find_dead_letters(broker, topic=self.topic, limit=100)
            return list(found.letters)

        return anyio.run(read)


@pytest.fixture
def bus(redis_url: str) -> Bus:
    return Bus(redis_url)


@pytest.fixture
def client(bus: Bus) -> Iterator[TestClient]:
    with dashboard(bus.app()) as signed_in:
        yield signed_in


def _rows(html: str) -> list[str]:
    """The event ids of the rows of a topic's page, top to bottom."""
    return re.findall(r'data-testid="dead-letter-row" data-event-id="([^"]+)"', html)


def _after(answer: httpx.Response) -> str:
    """The page an action redirected to (303 back to the topic's dead letters), as the
    client followed it."""
    assert [r.status_code for r in answer.history] == [303], answer.text
    assert answer.status_code == 200
    assert answer.url.path.startswith("/ui/dead-letters/")
    return answer.text


def test_the_pages_list_dead_letters_with_their_error_traceback_and_payload(
    bus: Bus, client: TestClient
) -> None:
    first, second = bus.dead_letter(7, 8)

    index = client.get("/ui/dead-letters")
    assert index.status_code == 200
    assert f'href="/ui/dead-letters/{bus.topic}"' in index.text
    assert re.search(r'data-count="dead_letters">2<', index.text)

    page = client.get(f"/ui/dead-letters/{bus.topic}")
    assert page.status_code == 200
    html = page.text
    assert _rows(html) == [second, first], "newest first"
    assert "RuntimeError" in html
    # The error comes from the bus: escaped, never markup.
    assert "job 7 failed &lt;b&gt;loudly&lt;/b&gt;" in html
    assert "<b>loudly</b>" not in html
    assert "Traceback (most recent call last)" in html
    assert "raise RuntimeError" in html
    assert '<details data-testid="traceback">' in html
    assert "&#34;n&#34;: 7" in html, "the payload, as indented JSON"
    assert html.count('data-testid="replay-one"') == 2
    assert 'data-select-all="id"' in html
    assert f'value="keeper/{first}" form="replay-selected"' in html
    assert 'data-testid="purge"' in html
    assert f'href="/ui/dead-letters/{bus.topic}/{first}/edit?agent=keeper"' in html

    flashed = client.get(f"/ui/dead-letters/{bus.topic}", params={"done": "<i>x</i>"}).text
    assert 'data-testid="flash">&lt;i&gt;x&lt;/i&gt;<' in flashed

    missing = client.get("/ui/dead-letters/no.such.topic")
    assert missing.status_code == 404
    assert "no topic" in missing.text
    assert client.get("/ui/dead-letters/Not A Topic").status_code == 404


def test_replay_one_selected_and_all_then_the_worker_handles_them(
    bus: Bus, client: TestClient
) -> None:
    ids = bus.dead_letter(1, 2, 3, 4)
    html = client.get(f"/ui/dead-letters/{bus.topic}").text
    csrf = csrf_of(html)
    replay = f"/ui/dead-letters/{bus.topic}/replay"

    html = _after(client.post(replay, data={"csrf": csrf, "id": f"keeper/{ids[0]}"}))
    assert 'data-testid="flash">replayed 1<' in html
    assert ids[0] not in _rows(html)
    assert {d.event_id for d in bus.letters()} == set(ids[1:])

    chosen = {"csrf": csrf, "id": [f"keeper/{ids[1]}", f"keeper/{ids[2]}"]}
    html = _after(client.post(replay, data=chosen))
    assert 'data-testid="flash">replayed 2<' in html
    assert _rows(html) == [ids[3]]

    again = _after(client.post(replay, data=chosen))
    assert 'data-testid="flash">replayed 0<' in again
    assert "2 no longer in the dead letters" in again

    nothing = _after(client.post(replay, data={"csrf": csrf}))
    assert "nothing selected" in nothing

    html = _after(client.post(replay, data={"csrf": csrf, "all": "1"}))
    assert 'data-testid="flash">replayed 1<' in html
    assert _rows(html) == []
    assert bus.letters() == []

    bus.handle(1, 2, 3, 4)
    assert bus.letters() == []


def test_edit_and_replay_checks_the_payload_and_keeps_what_was_typed(
    bus: Bus, client: TestClient
) -> None:
    [event_id] = bus.dead_letter(-1)
    edit = f"/ui/dead-letters/{bus.topic}/{event_id}/edit"
    form = client.get(edit, params={"agent": "keeper"})
    assert form.status_code == 200
    assert "&#34;n&#34;: -1" in form.text, "the textarea holds the payload"
    assert "Job" in form.text
    csrf = csrf_of(form.text)
    assert client.get(edit).status_code == 200, "the agent is found without ?agent="

    broken = '{"n": 5,'
    answer = client.post(edit, data={"csrf": csrf, "agent": "keeper", "payload": broken})
    assert answer.status_code == 400
    assert "not valid JSON" in answer.text
    assert f">{escape(broken)}</textarea>" in answer.text, "what was typed is kept"

    refused = '{"n": "five"}'
    answer = client.post(edit, data={"csrf": csrf, "agent": "keeper", "payload": refused})
    assert answer.status_code == 400
    assert "not a valid Job" in answer.text
    assert f">{escape(refused)}</textarea>" in answer.text
    assert [d.event_id for d in bus.letters()] == [event_id], "nothing changed"

    answer = client.post(edit, data={"csrf": csrf, "agent": "keeper", "payload": '{"n": 5}'})
    html = _after(answer)
    assert "replayed 1 with a corrected payload" in html
    assert bus.letters() == []
    bus.handle(5)

    gone = client.get(edit, params={"agent": "keeper"})
    assert gone.status_code == 404


def test_purge_needs_the_topic_typed(bus: Bus, client: TestClient) -> None:
    bus.dead_letter(1, 2)
    purge = f"/ui/dead-letters/{bus.topic}/purge"
    confirm = client.get(purge)
    assert confirm.status_code == 200
    assert re.search(r'data-testid="purge-count"><strong>2</strong> dead letters', confirm.text)
    csrf = csrf_of(confirm.text)

    wrong = client.post(purge, data={"csrf": csrf, "confirm": "jobs"})
    assert wrong.status_code == 400
    assert "nothing was purged" in wrong.text
    assert len(bus.letters()) == 2

    html = _after(client.post(purge, data={"csrf": csrf, "confirm": bus.topic, "count": "2"}))
    assert 'data-testid="flash">purged 2<' in html
    assert bus.letters() == []
    assert bus.topic not in client.get("/ui/dead-letters").text


def test_actions_are_refused_to_readers_stale_forms_and_other_sites(bus: Bus) -> None:
    # Imported here: importing the dashboard before `omnidaemon.api` (as _support does) is
    # circular.
    from omnidaemon.dashboard.session import csrf_token

    [event_id] = bus.dead_letter(1)
    key = f"keeper/{event_id}"
    replay = f"/ui/dead-letters/{bus.topic}/replay"
    purge = f"/ui/dead-letters/{bus.topic}/purge"

    with dashboard(bus.app(), token=READ_TOKEN) as reader:
        html = reader.get(f"/ui/dead-letters/{bus.topic}").text
        assert _rows(html) == [event_id]
        for testid in ("replay-one", "replay-selected", "replay-all", "purge", "edit"):
            assert f'data-testid="{testid}"' not in html
        assert 'data-select-all="id"' not in html
        csrf = csrf_token(READ_TOKEN)  # what a reader's forms would carry
        refused = reader.post(replay, data={"csrf": csrf, "id": key})
        assert refused.status_code == 403
        assert "may look but not act" in refused.text
        assert reader.post(purge, data={"csrf": csrf, "confirm": bus.topic}).status_code == 403
        assert reader.get(purge).status_code == 403
        assert reader.get(f"/ui/dead-letters/{bus.topic}/{event_id}/edit").status_code == 403

    with dashboard(bus.app(), token=ADMIN_TOKEN) as admin_client:
        csrf = csrf_of(admin_client.get(f"/ui/dead-letters/{bus.topic}").text)
        stale = admin_client.post(replay, data={"id": key})
        assert stale.status_code == 403
        assert "stale" in stale.text
        wrong = admin_client.post(replay, data={"csrf": "0" * 40, "id": key})
        assert wrong.status_code == 403
        elsewhere = admin_client.post(
            replay, data={"csrf": csrf, "id": key}, headers={"Origin": "http://evil.example"}
        )
        assert elsewhere.status_code == 403
        assert "only taken from this dashboard" in elsewhere.text
        assert (
            admin_client.post(purge, data={"csrf": csrf}, headers={"Origin": "null"}).status_code
            == 403
        )

    # An app that does not declare the agent cannot check a corrected payload: no editing.
    bare = App("other", broker=RedisBroker(bus.url, prefix=bus.prefix))
    with dashboard(bare) as other:
        html = other.get(f"/ui/dead-letters/{bus.topic}").text
        assert 'data-testid="replay-one"' in html
        assert 'data-testid="edit"' not in html
        refused = other.get(f"/ui/dead-letters/{bus.topic}/{event_id}/edit")
        assert refused.status_code == 404
        assert "does not declare agent" in refused.text.replace("&#39;", "'")

    assert [d.event_id for d in bus.letters()] == [event_id], "nothing was replayed or purged"


def test_purge_deletes_only_what_its_confirmation_counted(bus: Bus, client: TestClient) -> None:
    bus.dead_letter(1)
    purge = f"/ui/dead-letters/{bus.topic}/purge"
    confirm = client.get(purge).text
    assert 'name="count" value="1"' in confirm
    bus.dead_letter(2)  # arrives while the user reads the confirmation

    late = client.post(purge, data={"csrf": csrf_of(confirm), "confirm": bus.topic, "count": "1"})
    assert late.status_code == 400
    assert "nothing was purged" in late.text
    assert re.search(r'data-testid="purge-count"><strong>2</strong>', late.text)
    assert len(bus.letters()) == 2

    again = client.post(purge, data={"csrf": csrf_of(confirm), "confirm": bus.topic, "count": "2"})
    assert 'data-testid="flash">purged 2<' in _after(again)
    assert bus.letters() == []


def test_an_event_id_holding_url_characters_is_edited_and_replayed(bus: Bus) -> None:
    odd = "ev%41/?#é 1"  # another producer's envelope: an id is any text

    async def run() -> None:
        app = bus.app()
        api = create_api(app, tokens=parse_tokens(TOKENS, source="tests"))
        # httpx's own ASGI transport, not TestClient: TestClient decodes a path twice, so a
        # `%` in it could not be tested.
        transport = httpx.ASGITransport(app=api)
        try:
            async with (
                app.running(),
                httpx.AsyncClient(
                    transport=transport, base_url=ORIGIN, headers={"Origin": ORIGIN}
                ) as client,
            ):
                fields = orjson.loads(Envelope.new(bus.topic, {"n": -1}).encode())
                await app.broker.publish(bus.topic, orjson.dumps({**fields, "id": odd}))

                async def dead() -> bool:
                    return [d.event_id for d in await app.dead_letters("keeper")] == [odd]

                await apoll(dead, message="the dead letter")
                await client.post("/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui/"})
                html = (await client.get(f"/ui/dead-letters/{bus.topic}")).text
                [edit] = re.findall(r'href="([^"]+/edit)\?agent=keeper"', html)
                form = await client.get(edit, params={"agent": "keeper"})
                assert form.status_code == 200, form.text
                [action] = re.findall(r'action="([^"]+)" data-testid="edit-form"', form.text)
                assert action == edit
                fields = {"csrf": csrf_of(form.text), "agent": "keeper", "payload": '{"n": 5}'}
                answer = await client.post(action, data=fields)
                assert answer.status_code == 303, answer.text
                assert "replayed+1+with+a+corrected+payload" in answer.headers["location"]
        finally:
            await app.close()

    anyio.run(run)
    assert bus.letters() == []


def test_a_debounced_agents_batches_have_a_dead_letter_page() -> None:
    app = App("burst", broker="memory://")

    @app.agent("signal.in", debounce=0.05, max_retries=0)
    async def burst(items: list[Job]) -> None:
        raise RuntimeError("the batch failed")

    with (
        dashboard(app) as client,
        client.portal.wrap_async_context_manager(app.running()),  # type: ignore[union-attr]
    ):
        client.portal.call(app.publish, "signal.in", {"n": 1})  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while 'data-testid="dead-letter-topic"' not in (
            index := client.get("/ui/dead-letters").text
        ):
            assert time.monotonic() < deadline, "no dead letter of the batch"
            time.sleep(0.02)
        [link] = re.findall(r'<th scope="row"><a href="([^"]+)">', index)
        assert link == "/ui/dead-letters/signal.in%23debounce.burst"
        page = client.get(link)
        assert page.status_code == 200
        assert "the batch failed" in page.text
        assert 'data-testid="edit"' in page.text, "a corrected batch is checked as list[Job]"
        replayed = client.post(f"{link}/replay", data={"csrf": csrf_of(page.text), "all": "1"})
        assert 'data-testid="flash">replayed 1<' in _after(replayed)
