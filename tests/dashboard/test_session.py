"""Signing in to the dashboard, and what guards its pages and actions: the token kept in an
HttpOnly, SameSite=Strict cookie for `/ui` only; the sign-in form for pages and 401 for live
fragments without one; CSRF token, same origin and `admin` for actions; no sign-in only on a
loopback server without authentication."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from omnidaemon import App
from omnidaemon.api import create_api
from omnidaemon.dashboard.session import COOKIE, Admin
from tests.dashboard._support import ADMIN_TOKEN, ORIGIN, READ_TOKEN, csrf_of, dashboard


def _app() -> App:
    app = App("docs", broker="memory://")

    @app.agent("doc.uploaded")
    async def extract(event: dict[str, Any]) -> None:
        """Reads a document."""

    return app


def _with_action(client: TestClient) -> None:
    """Give the API under test an action, as the dashboard's pages declare theirs."""

    async def act(user: Admin) -> dict[str, str]:
        return {"done_by": user.token.name}

    client.app.add_api_route("/ui/test-action", act, methods=["POST"])  # type: ignore[attr-defined]


def test_pages_send_a_visitor_without_a_token_to_the_sign_in_form() -> None:
    with dashboard(_app(), token=None) as client:
        answer = client.get("/ui/?since=1h", follow_redirects=False)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui/login?next=/ui/%3Fsince%3D1h"
        form = client.get("/ui/login")
        assert form.status_code == 200 and 'name="token"' in form.text
        assert "script-src 'self'" in form.headers["content-security-policy"]
        # A live part answers 401: the page's script reloads into the redirect.
        live = client.get("/ui/live/overview", headers={"X-Omnidaemon-Fragment": "1"})
        assert live.status_code == 401


def test_signing_in_keeps_the_token_in_a_strict_http_only_cookie_for_the_dashboard_only() -> None:
    with dashboard(_app(), token=None) as client:
        answer = client.post(
            "/ui/login", data={"token": ADMIN_TOKEN, "next": "/ui/graph"}, follow_redirects=False
        )
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/graph"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        for flag in ("HttpOnly", "Path=/ui", "SameSite=strict", "Max-Age=28800"):
            assert flag in cookie
        assert "Secure" not in cookie  # plain HTTP here; set when the page came over HTTPS
        overview = client.get("/ui/")
        assert overview.status_code == 200 and "extract" in overview.text and "ops" in overview.text
        # The JSON API never takes the cookie: a page of another site cannot use it there.
        assert client.get("/v1/agents").status_code == 401
        client.post("/ui/logout")
        assert client.get("/ui/", follow_redirects=False).status_code == 303


def test_a_wrong_token_is_refused_and_sets_no_cookie() -> None:
    with dashboard(_app(), token=None) as client:
        answer = client.post("/ui/login", data={"token": "x" * 40}, follow_redirects=False)
        assert answer.status_code == 401
        assert "not one this server knows" in answer.text
        assert "set-cookie" not in answer.headers
        assert "x" * 40 not in answer.text  # the typed token is never echoed


def test_after_sign_in_only_dashboard_paths_are_followed() -> None:
    with dashboard(_app(), token=None) as client:
        for target in ("//evil.example/ui", "https://evil.example/", "/v1/agents", "/ui\\@x"):
            answer = client.post(
                "/ui/login", data={"token": READ_TOKEN, "next": target}, follow_redirects=False
            )
            assert answer.headers["location"] == "/ui/", target


def test_sign_in_from_another_site_is_refused() -> None:
    with dashboard(_app(), token=None) as client:
        answer = client.post(
            "/ui/login",
            data={"token": ADMIN_TOKEN},
            headers={"Origin": "https://evil.example"},
            follow_redirects=False,
        )
        assert answer.status_code == 403 and "set-cookie" not in answer.headers


def test_an_action_needs_admin_its_csrf_token_and_this_origin() -> None:
    with dashboard(_app(), token=ADMIN_TOKEN) as client:
        _with_action(client)
        csrf = csrf_of(client.get("/ui/").text)
        ok = client.post("/ui/test-action", data={"csrf": csrf})
        assert ok.status_code == 200 and ok.json() == {"done_by": "ops"}
        no_token = client.post("/ui/test-action", data={"other": "1"})
        assert no_token.status_code == 403 and "stale" in no_token.text
        wrong = client.post("/ui/test-action", data={"csrf": csrf[:-1] + "0"})
        assert wrong.status_code == 403
        foreign = client.post(
            "/ui/test-action", data={"csrf": csrf}, headers={"Origin": "https://evil.example"}
        )
        assert foreign.status_code == 403
        as_json = client.post("/ui/test-action", json={"csrf": csrf})
        assert as_json.status_code == 415
    with dashboard(_app(), token=READ_TOKEN) as client:
        _with_action(client)
        page = client.get("/ui/").text
        assert "read only" in page
        refused = client.post("/ui/test-action", data={"csrf": csrf_of(page)})
        assert refused.status_code == 403 and "may look but not act" in refused.text


def test_each_session_has_its_own_csrf_token() -> None:
    with (
        dashboard(_app(), token=ADMIN_TOKEN) as admin,
        dashboard(_app(), token=READ_TOKEN) as reader,
    ):
        assert csrf_of(admin.get("/ui/").text) != csrf_of(reader.get("/ui/").text)


def test_without_authentication_the_dashboard_opens_on_loopback_only() -> None:
    api = create_api(_app(), insecure_no_auth=True)
    local = TestClient(api, base_url=ORIGIN, client=("127.0.0.1", 50000))
    with local:
        page = local.get("/ui/")
        assert page.status_code == 200 and "extract" in page.text
        # Actions still need the page's CSRF token: another site's page could make the
        # browser post to 127.0.0.1.
        _with_action(local)
        refused = local.post("/ui/test-action", data={"x": "1"}, headers={"Origin": ORIGIN})
        assert refused.status_code == 403
        done = local.post(
            "/ui/test-action", data={"csrf": csrf_of(page.text)}, headers={"Origin": ORIGIN}
        )
        assert done.status_code == 200
        # A name that resolves to 127.0.0.1 (DNS rebinding) is not this server.
        rebound = local.get("/ui/", headers={"Host": "evil.example"})
        assert rebound.status_code == 403


def test_a_form_of_too_many_fields_is_refused() -> None:
    with dashboard(_app(), token=None) as client:
        body = "&".join(f"f{i}=1" for i in range(10_001))
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        answer = client.post("/ui/login", content=body, headers=form)
        assert answer.status_code == 400
        assert "over 10,000 fields" in answer.text


def test_pages_of_a_bus_that_is_down_say_so() -> None:
    app = App("down", broker="redis://127.0.0.1:1/0")  # nothing listens there
    with dashboard(app) as client:
        for path in ("/ui/dead-letters", "/ui/dead-letters/a.b", "/ui/runs", "/ui/events/x"):
            answer = client.get(path)
            assert answer.status_code == 503, path
            assert answer.headers["content-type"].startswith("text/html"), path
            assert "The bus does not answer" in answer.text
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        api = client.get("/v1/topics", headers=bearer)
        assert api.status_code == 503
        assert api.json()["code"] == "bus_unavailable", "the JSON API answers as before"


def test_a_bad_query_value_is_a_page_saying_so_and_the_api_answers_as_before() -> None:
    with dashboard(_app()) as client:
        for path, name in (
            ("/ui/dead-letters/doc.uploaded?limit=0", "limit"),
            ("/ui/dead-letters/doc.uploaded?limit=abc", "limit"),
            ("/ui/topics/doc.uploaded?limit=abc", "limit"),
            ("/ui/events/x/stream?timeout=-1", "timeout"),
        ):
            answer = client.get(path)
            assert answer.status_code == 400, path
            assert answer.headers["content-type"].startswith("text/html"), path
            assert "Bad request" in answer.text and name in answer.text, path
        bearer = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        api = client.get("/v1/dlq?limit=abc", headers=bearer)
        assert api.status_code == 422 and api.json()["code"] == "invalid_request"
    with dashboard(_app(), token=None) as client:  # signing in comes first
        answer = client.get("/ui/dead-letters/doc.uploaded?limit=0", follow_redirects=False)
        assert answer.status_code == 303


def test_an_action_with_an_expired_session_signs_in_back_to_the_form_s_page() -> None:
    with dashboard(_app(), token=None) as client:
        _with_action(client)
        sent = {
            f"{ORIGIN}/ui/dead-letters/doc.uploaded?agent=extract": (
                "/ui/dead-letters/doc.uploaded%3Fagent%3Dextract"
            ),
            "": "/ui/",  # no Referer
            "https://evil.example/ui/x": "/ui/",  # another site's
            f"{ORIGIN}/v1/topics": "/ui/",  # not the dashboard's
        }
        for referer, back in sent.items():
            headers = {"Referer": referer} if referer else {}
            answer = client.post(
                "/ui/test-action", data={"csrf": "x"}, headers=headers, follow_redirects=False
            )
            assert answer.status_code == 303, referer
            assert answer.headers["location"] == f"/ui/login?next={back}", referer
        # Signing in then leads to the page, not to the action's POST-only path.
        form = {"token": ADMIN_TOKEN, "next": "/ui/dead-letters/doc.uploaded?agent=extract"}
        signed = client.post("/ui/login", data=form, follow_redirects=False)
        assert signed.headers["location"] == "/ui/dead-letters/doc.uploaded?agent=extract"
