"""What the dashboard's in-process tests share: an API over an app, and signed-in clients."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi.testclient import TestClient

from omnidaemon import App
from omnidaemon.api import create_api, parse_tokens

ADMIN_TOKEN = "adm-" + "a" * 32
READ_TOKEN = "ro-" + "b" * 32
ORIGIN = "http://127.0.0.1:8765"
TOKENS = f"ops:admin:{ADMIN_TOKEN} viewer:read:{READ_TOKEN}"


@contextmanager
def dashboard(app: App, *, token: str | None = ADMIN_TOKEN) -> Iterator[TestClient]:
    """A client of `app`'s API (its lifespan run), signed in to the dashboard with `token`
    (`None`: not signed in). POSTs carry this server's `Origin`, as a browser's do."""
    api = create_api(app, tokens=parse_tokens(TOKENS, source="tests"))
    with TestClient(api, base_url=ORIGIN, headers={"Origin": ORIGIN}) as client:
        if token is not None:
            answer = client.post(
                "/ui/login", data={"token": token, "next": "/ui/"}, follow_redirects=False
            )
            assert answer.status_code == 303, answer.text
        yield client


def csrf_of(page_html: str) -> str:
    """The CSRF token a page's forms carry (every page has it in `<meta name="csrf">`)."""
    marker = '<meta name="csrf" content="'
    start = page_html.index(marker) + len(marker)
    return page_html[start : page_html.index('"', start)]
