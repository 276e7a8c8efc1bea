"""Tokens and scopes, refusals, the OpenAPI schema, and errors of a bus that is down."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from omnidaemon import App
from omnidaemon.api import Scope, create_api, load_tokens, parse_tokens
from omnidaemon.api.auth import Authenticator, is_loopback
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.errors import ConfigurationError
from tests.api._support import ADMIN, PUBLISHER, READER, TOKENS_TEXT, running_api
from tests.servers import free_port

# --- reading tokens ---------------------------------------------------------------------------


def test_tokens_are_read_with_their_names_and_scopes() -> None:
    tokens = {t.name: t for t in parse_tokens(TOKENS_TEXT, source="x")}
    assert tokens["ops"].scopes == {Scope.admin}
    assert tokens["ci"].scopes == {Scope.read, Scope.publish}
    assert tokens["grafana"].allows(Scope.read)
    assert not tokens["grafana"].allows(Scope.publish)
    assert not tokens["ci"].allows(Scope.admin)
    assert tokens["ops"].allows(Scope.read) and tokens["ops"].allows(Scope.publish)
    # Only a digest is kept, and it is not shown.
    assert ADMIN not in repr(tokens["ops"])
    assert ADMIN.encode() != tokens["ops"].digest


def test_the_authenticator_finds_the_token_presented() -> None:
    authenticator = Authenticator(parse_tokens(TOKENS_TEXT, source="x"))
    found = authenticator.identify(PUBLISHER)
    assert found is not None and found.name == "ci"
    assert authenticator.identify(PUBLISHER[:-1]) is None
    assert authenticator.identify("") is None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("justatoken", "expected NAME:SCOPES:TOKEN"),
        ("ci:read", "expected NAME:SCOPES:TOKEN"),
        ("ci::" + "x" * 20, "expected NAME:SCOPES:TOKEN"),
        ("ci:write:" + "x" * 20, "an unknown scope"),
        # Fields out of order: the secret stands where the scopes go (issue 15).
        ("ci:Zx9Qk2LmNp8RtVw:read", "an unknown scope"),
        ("Zx9Qk2LmNp8RtVw:read:tiny9", "shorter than 16 characters"),
        ("ci:read:s3cr3t", "shorter than 16 characters"),
        ("c i:read:" + "x" * 20, "expected NAME:SCOPES:TOKEN"),
        ("c/i:read:" + "x" * 20, "a token's name is"),
        ("a:read:" + "x" * 20 + ",b:read:" + "y" * 20, "characters a bearer token cannot"),
    ],
)
def test_a_malformed_entry_is_an_error_that_does_not_show_the_token(
    text: str, fragment: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        parse_tokens(f"# comment\n{text}", source="tokens.txt")
    assert fragment in str(raised.value)
    assert "tokens.txt line 2, entry 1" in str(raised.value)
    for field in text.replace(",", ":").split(":"):  # no field is echoed: any may be a secret
        if len(field) >= 5:
            assert field not in str(raised.value)


def test_tokens_from_the_environment_and_a_file_together(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"ops:admin:{ADMIN}\n")
    tokens = load_tokens({"OMNIDAEMON_API_TOKENS": f"ci:read,publish:{PUBLISHER}"}, path)
    assert sorted(t.name for t in tokens) == ["ci", "ops"]
    with pytest.raises(ConfigurationError, match="two API tokens are named 'ops'"):
        load_tokens({"OMNIDAEMON_API_TOKENS": f"ops:read:{READER}"}, path)
    with pytest.raises(ConfigurationError, match="repeats another token's secret"):
        load_tokens({"OMNIDAEMON_API_TOKENS": f"other:read:{ADMIN}"}, path)
    with pytest.raises(ConfigurationError, match="cannot read tokens file"):
        load_tokens({}, tmp_path / "missing")


def test_create_api_needs_tokens_or_an_explicit_no_auth() -> None:
    app = App("x", broker="memory://")
    with pytest.raises(ConfigurationError, match="no API tokens"):
        create_api(app)
    with pytest.raises(ConfigurationError, match="not both"):
        create_api(app, tokens=parse_tokens(TOKENS_TEXT, source="x"), insecure_no_auth=True)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# --- refusals ---------------------------------------------------------------------------------

READ_ROUTES = [
    ("GET", "/v1/agents"),
    ("GET", "/v1/schedules"),
    ("GET", "/v1/health"),
    ("GET", "/v1/metrics"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/topics"),
    ("GET", "/v1/topics/some.topic"),
    ("GET", "/v1/topics/some.topic/entries"),
    ("GET", "/v1/topics/some.topic/groups"),
    ("GET", "/v1/dlq"),
    ("GET", "/v1/dlq/some.topic"),
    ("GET", "/v1/events/some-id/result"),
    ("GET", "/v1/traces/some-trace"),
    ("GET", "/v1/runs"),
    ("GET", "/v1/events/some-id/stream"),
    ("GET", "/v1/inspect"),
    ("GET", "/asyncapi.json"),
]
PUBLISH_ROUTES = [("POST", "/v1/events"), ("POST", "/v1/requests")]
ADMIN_ROUTES = [
    ("POST", "/v1/dlq/some.topic/replay"),
    ("DELETE", "/v1/dlq/some.topic"),
    ("DELETE", "/v1/topics/some.topic"),
    ("DELETE", "/v1/events/some-id"),
    ("DELETE", "/v1/runs/some-run"),
]
ALL_ROUTES = READ_ROUTES + PUBLISH_ROUTES + ADMIN_ROUTES


@pytest.mark.parametrize(("method", "path"), ALL_ROUTES)
def test_no_token_or_a_bad_one_is_401(
    client: Callable[..., httpx.Client], method: str, path: str
) -> None:
    body = {"json": {}} if method == "POST" else {}
    missing = client().request(method, path, **body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert missing.json()["code"] == "unauthorized"
    for header in (f"Bearer {ADMIN}x", "Bearer", f"Basic {ADMIN}", ADMIN):
        bad = client().request(method, path, headers={"Authorization": header}, **body)
        assert bad.status_code == 401, header
        assert bad.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), PUBLISH_ROUTES + ADMIN_ROUTES)
def test_a_read_token_cannot_publish_or_repair(
    client: Callable[..., httpx.Client], method: str, path: str
) -> None:
    body = {"json": {}} if method == "POST" else {}
    refused = client(READER).request(method, path, **body)
    assert refused.status_code == 403
    assert refused.json()["code"] == "forbidden"
    assert "lacks the" in refused.json()["message"]
    assert 'error="insufficient_scope"' in refused.headers["www-authenticate"]


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
def test_a_publish_token_cannot_replay_or_purge(
    client: Callable[..., httpx.Client], method: str, path: str
) -> None:
    body = {"json": {"agent": "a", "all": True}} if method == "POST" else {}
    refused = client(PUBLISHER).request(method, path, **body)
    assert refused.status_code == 403
    assert "'admin' scope" in refused.json()["message"]


def test_unknown_routes_and_methods_answer_json(client: Callable[..., httpx.Client]) -> None:
    missing = client(ADMIN).get("/v2/topics")
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    wrong = client(ADMIN).put("/v1/topics")
    assert wrong.status_code == 405
    assert wrong.json()["code"] == "method_not_allowed"


def test_answers_are_not_cached(client: Callable[..., httpx.Client]) -> None:
    answer = client(READER).get("/v1/agents")
    assert answer.headers["cache-control"] == "no-store"
    assert answer.headers["x-content-type-options"] == "nosniff"


# --- the schema -------------------------------------------------------------------------------


def test_openapi_lists_every_route_and_the_bearer_scheme(
    client: Callable[..., httpx.Client],
) -> None:
    schema = client().get("/openapi.json").json()
    listed = {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
    }
    expected = {(m, p.replace("some.topic", "{topic}").replace("some-id", "{event_id}")
                  .replace("some-run", "{correlation_id}")
                  .replace("some-trace", "{run_or_event_id}"))
                for m, p in ALL_ROUTES}  # fmt: skip
    assert listed == expected | {("GET", "/healthz")}
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            if path == "/healthz":
                assert "security" not in operation
            else:
                assert operation["security"] == [{"bearer": []}], path
                assert "401" in operation["responses"], path
    publish = schema["paths"]["/v1/events"]["post"]
    assert "202" in publish["responses"]
    assert "ErrorResponse" in str(publish["responses"]["422"])
    assert client().get("/docs").status_code == 200


# --- a bus that is down -----------------------------------------------------------------------


def test_a_bus_that_is_down_is_503() -> None:
    # Publishing waits up to `publish_timeout` for the bus to come back before it gives up.
    bus = RedisBroker(f"redis://127.0.0.1:{free_port()}/0", publish_timeout=0.5)
    down = App("down", broker=bus)
    with running_api(down) as server, httpx.Client(base_url=server.url) as http:
        headers = {"Authorization": f"Bearer {ADMIN}"}
        for path in ("/v1/topics", "/v1/dlq", "/v1/stats", "/v1/metrics"):
            answer = http.get(path, headers=headers)
            assert answer.status_code == 503, path
            assert answer.json()["code"] == "bus_unavailable"
            assert "Traceback" not in answer.text
        published = http.post("/v1/events", json={"topic": "a.b", "payload": 1}, headers=headers)
        assert published.status_code == 503
        health = http.get("/v1/health", headers=headers, params={"timeout": 2})
        assert health.status_code == 503
        assert health.json()["status"] == "down"
        assert health.json()["bus"]["reachable"] is False
        probe = http.get("/healthz")
        assert probe.status_code == 503
        assert probe.json() == {"status": "unavailable"}


# --- without authentication -------------------------------------------------------------------


def test_without_auth_only_loopback_host_names_are_answered() -> None:
    app = App("open", broker="memory://")
    with running_api(app, insecure_no_auth=True) as server, httpx.Client() as http:
        for host in ("127.0.0.1", "localhost", f"127.0.0.1:{server.port}", "[::1]:80"):
            answer = http.get(f"{server.url}/v1/agents", headers={"Host": host})
            assert answer.status_code == 200, host
        rebound = http.get(f"{server.url}/v1/agents", headers={"Host": "evil.example.com"})
        assert rebound.status_code == 403
        assert "answers only to localhost" in rebound.json()["message"]


async def _get_agents(api: Any, *, host: str, client: tuple[str, int] | None) -> httpx.Response:
    transport = httpx.ASGITransport(app=api, client=client)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.get("/v1/agents", headers={"Host": host})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("localhost", True),
        ("localhost:8765", True),
        ("127.0.0.1:80", True),
        ("[::1]", True),
        ("[::1]:8765", True),
        ("[::1]evil.com", False),
        ("[::1].evil.com:80", False),
        ("[::1]@evil.com", False),
        ("localhost@evil.com", False),
        ("localhost:80x", False),
        ("localhost:", False),
        ("[127.0.0.1]", False),
        ("", False),
    ],
)
async def test_without_auth_the_host_header_is_read_strictly(host: str, served: bool) -> None:
    api = create_api(App("open", broker="memory://"), insecure_no_auth=True)
    answer = await _get_agents(api, host=host, client=("127.0.0.1", 50000))
    assert answer.status_code == (200 if served else 403), host
    if not served:
        assert answer.json()["message"].endswith(f"not to Host {host!r}")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("client", "served"),
    [
        (("127.0.0.1", 50000), True),
        (("127.9.9.9", 50000), True),
        (("::1", 50000), True),
        (("203.0.113.9", 1234), False),
        (("::ffff:203.0.113.9", 1234), False),
        (("10.0.0.1", 1234), False),
    ],
)
async def test_without_auth_only_loopback_clients_are_answered(
    client: tuple[str, int], served: bool
) -> None:
    # The Host header is a loopback name: the client's address alone decides.
    api = create_api(App("open", broker="memory://"), insecure_no_auth=True)
    answer = await _get_agents(api, host="localhost", client=client)
    assert answer.status_code == (200 if served else 403), client
    if not served:
        assert answer.json()["message"] == (
            "this server runs without authentication and answers only to clients on this "
            f"machine, not to client {client[0]}"
        )


@pytest.mark.anyio
async def test_without_auth_no_client_address_is_answered_on_a_unix_socket_only() -> None:
    api = create_api(App("open", broker="memory://"), insecure_no_auth=True)

    async def get(server: tuple[str, int | None]) -> tuple[int, bytes]:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/v1/agents",
            "raw_path": b"/v1/agents",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"localhost")],
            "client": None,
            "server": server,
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await api(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], body

    status, body = await get(("127.0.0.1", 8765))
    assert status == 403
    assert b"not to a client of unknown address" in body
    status, _ = await get(("/run/omnidaemon/api.sock", None))
    assert status == 200
