"""Bodies JSON cannot carry onto the bus are refused with a 422 that names the problem, on
every route that takes a body (issue 15, item 6); never a 500."""

from __future__ import annotations

import pytest

from tests.api._support import ADMIN, ServerThread, async_client

pytestmark = pytest.mark.anyio


def deep(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


EVENT = '{"topic": "bad.body", "payload": %s}'
REQUEST = '{"topic": "bad.body", "timeout": 0.5, "payload": %s}'
REPLAY = '{"agent": "handled", "event_ids": [%s]}'


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "delay": Infinity}',
            "delay: Infinity is not a JSON number",
        ),
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "delay": NaN}',
            "delay: NaN is not a JSON number",
        ),
        (
            "/v1/events",
            EVENT % "123456789012345678901234567890",
            "payload: an integer of 30 digits is outside the 64-bit range",
        ),
        (
            "/v1/events",
            EVENT % '{"a": [1, -Infinity]}',
            "payload['a'][1]: -Infinity is not a JSON number",
        ),
        (
            "/v1/events",
            EVENT % '"\\ud800"',
            "payload: the string holds a lone surrogate ('\\ud800' at index 0)",
        ),
        ("/v1/events", EVENT % '{"\\udfff": 1}', "payload: a key holds a lone surrogate"),
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "headers": {"k": "\\ud800"}}',
            "headers['k']: the string holds a lone surrogate",
        ),
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "headers": {"\\ud800": "v"}}',
            "headers: a key holds a lone surrogate",
        ),
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "correlation_id": "\\ud800"}',
            "correlation_id: the string holds a lone surrogate",
        ),
        (
            "/v1/events",
            '{"topic": "bad.body", "payload": 1, "webhook": "http://x/\\udc00"}',
            "webhook: the string holds a lone surrogate ('\\udc00' at index 9)",
        ),
        (
            "/v1/events",
            EVENT % deep(129),
            "payload: arrays and objects are nested more than 128 levels deep",
        ),
        (
            "/v1/events",
            EVENT % deep(230),
            "payload: arrays and objects are nested more than 128 levels deep",
        ),
        (
            "/v1/events",
            EVENT % deep(260),
            "payload: arrays and objects are nested more than 128 levels deep",
        ),
        ("/v1/requests", REQUEST % '"\\ud800"', "payload: the string holds a lone surrogate"),
        (
            "/v1/requests",
            REQUEST % "-123456789012345678901234567890",
            "payload: an integer of 30 digits",
        ),
        ("/v1/requests", REQUEST % deep(260), "payload: arrays and objects are nested more"),
        (
            "/v1/requests",
            '{"topic": "bad.body", "payload": 1, "timeout": NaN}',
            "timeout: NaN is not a JSON number",
        ),
        (
            "/v1/requests",
            '{"topic": "bad.body", "payload": 1, "tenant_id": "\\ud800"}',
            "tenant_id: the string holds a lone surrogate",
        ),
        (
            "/v1/dlq/bad.body/replay",
            REPLAY % '"\\ud800"',
            "event_ids[0]: the string holds a lone surrogate",
        ),
    ],
)
async def test_a_body_json_cannot_carry_is_422_naming_the_problem(
    api_server: ServerThread, path: str, body: str, message: str
) -> None:
    async with async_client(api_server.url, ADMIN) as http:
        answer = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "invalid_request"
    assert answer.json()["message"].startswith(f"body: {message}")


async def test_a_body_nested_past_what_the_parser_reads_is_422(api_server: ServerThread) -> None:
    async with async_client(api_server.url, ADMIN) as http:
        answer = await http.post(
            "/v1/events",
            content=EVENT % deep(100_000),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert answer.json() == {
        "code": "invalid_request",
        "message": "body: arrays and objects are nested too deep to read (a payload may nest "
        "at most 128 levels)",
    }


async def test_a_payload_at_the_limit_is_published(api_server: ServerThread) -> None:
    async with async_client(api_server.url, ADMIN) as http:
        answer = await http.post(
            "/v1/events",
            content=EVENT % deep(128),
            headers={"Content-Type": "application/json"},
        )
    assert answer.status_code == 202, answer.text


@pytest.mark.parametrize("delay", ["1e308", "1e12", "2592001"])
async def test_a_delay_over_max_delay_is_422(api_server: ServerThread, delay: str) -> None:
    async with async_client(api_server.url, ADMIN) as http:
        answer = await http.post(
            "/v1/events",
            content=f'{{"topic": "bad.delay", "payload": 1, "delay": {delay}}}',
            headers={"Content-Type": "application/json"},
        )
        topic = await http.get("/v1/topics/bad.delay")
    assert answer.status_code == 422, answer.text
    assert answer.json()["code"] == "invalid_request"
    assert answer.json()["message"].startswith("body.delay: cannot publish to 'bad.delay': a delay")
    assert answer.json()["message"].endswith(
        "is over max_delay (2,592,000 s = 30 days; OMNIDAEMON_MAX_DELAY)"
    )
    assert topic.status_code == 404  # nothing was held


async def test_stats_and_topics_show_what_delayed_events_hold(api_server: ServerThread) -> None:
    blob = "x" * 50_000
    async with async_client(api_server.url, ADMIN) as http:
        for _ in range(3):
            published = await http.post(
                "/v1/events", json={"topic": "held.back", "payload": blob, "delay": 86_400}
            )
            assert published.status_code == 202, published.text
        stats = (await http.get("/v1/stats")).json()
        topic = (await http.get("/v1/topics/held.back")).json()
    assert stats["totals"]["delayed"] == 3
    assert 150_000 <= stats["totals"]["delayed_bytes"] <= 200_000
    assert topic["delayed"] == 3
    assert 150_000 <= topic["delayed_bytes"] <= 200_000
