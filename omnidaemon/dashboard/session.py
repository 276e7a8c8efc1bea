"""Who is looking at the dashboard: sign-in with an API token kept in a cookie, and the checks
that guard its actions.

The browser presents the token it was given at sign-in as the `omnidaemon_ui` cookie:
`HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it),
`Path=/ui` (the JSON API under `/v1` never accepts it: bearer headers only), `Secure` when
the page came over HTTPS. Every page needs a token with the `read` scope; every action (a
form `POST`) needs `admin`, a CSRF token and a same-origin `Origin` header.

The CSRF token is an HMAC of the session's token under a fixed label, so it needs no server
state and holds across API replicas: a page of another site can neither read it (no CORS)
nor compute it (it does not know the session's token). A server without authentication
(loopback only) uses a random key of its own instead: there is no cookie to steal, but a page
of another site could still make the browser post to 127.0.0.1, which the token stops.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from fastapi import Depends, Request

from omnidaemon.api.auth import ApiToken, Scope
from omnidaemon.api.dependencies import ANONYMOUS, ApiState
from omnidaemon.api.middleware import TOKEN_NAME_KEY

__all__ = [
    "COOKIE",
    "SESSION_SECONDS",
    "ActionRefused",
    "Admin",
    "SignInRequired",
    "UiUser",
    "Viewer",
    "csrf_token",
    "read_form",
    "safe_next",
    "same_origin",
    "signed_in",
]

COOKIE = "omnidaemon_ui"
"""The cookie holding the signed-in token."""

SESSION_SECONDS = 8 * 3600
"""How long a sign-in lasts (the cookie's `Max-Age`): a working day."""

_CSRF_LABEL = b"omnidaemon dashboard csrf v1"
_NO_AUTH_KEY = secrets.token_bytes(32)  # this process's CSRF key when there are no tokens
_MAX_FIELDS = 10_000  # fields of a posted form (replaying the selected dead letters: one each)


@dataclass(frozen=True, slots=True)
class UiUser:
    """The signed-in user of a page: their token (`ANONYMOUS` without authentication) and the
    CSRF token their forms carry."""

    token: ApiToken
    csrf: str

    @property
    def can_act(self) -> bool:
        """Whether the token may replay and purge (`admin`)."""
        return self.token.allows(Scope.admin)


class SignInRequired(Exception):
    """No valid token came with the request: pages redirect to the sign-in form, live
    fragments answer 401 (the page then reloads itself into that redirect)."""

    def __init__(self, next_path: str, *, fragment: bool) -> None:
        super().__init__("sign in to see the dashboard")
        self.next_path = next_path
        self.fragment = fragment


class ActionRefused(Exception):
    """A page or an action the user may not have (403), with the reason shown to them."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.omnidaemon
    return state


def csrf_token(presented: str | None) -> str:
    """The CSRF token of a session whose token is `presented` (`None`: no authentication)."""
    key = _NO_AUTH_KEY if presented is None else hashlib.sha256(presented.encode("utf-8")).digest()
    return hmac.new(key, _CSRF_LABEL, hashlib.sha256).hexdigest()[:40]


def signed_in(request: Request) -> UiUser | None:
    """The user whose cookie came with `request`, or `None` (no cookie, or a token that is
    not, or no longer, known)."""
    authenticator = _state(request).authenticator
    if authenticator is None:
        return UiUser(ANONYMOUS, csrf_token(None))
    presented = request.cookies.get(COOKIE)
    if not presented:
        return None
    token = authenticator.identify(presented)
    if token is None:
        return None
    return UiUser(token, csrf_token(presented))


def _back_after_sign_in(request: Request) -> str:
    """Where sign-in leads back to: the page asked for; for a form posted with an expired
    session, the page the form was on (the action's own path takes no GET), if this
    dashboard's, else the overview."""
    if request.method in ("GET", "HEAD"):
        return request.url.path + (f"?{request.url.query}" if request.url.query else "")
    referer = request.headers.get("referer", "")
    if not _from_here(request, referer):
        return "/ui/"
    parts = urlsplit(referer)
    return safe_next(parts.path + (f"?{parts.query}" if parts.query else ""))


def _viewer(request: Request) -> UiUser:
    user = signed_in(request)
    if user is None:
        # A live fragment, or an EventSource (which can set no header but sends this Accept):
        # 401, not a redirect to a page it could not show.
        fragment = request.headers.get("x-omnidaemon-fragment") == "1" or (
            "text/event-stream" in request.headers.get("accept", "")
        )
        raise SignInRequired(_back_after_sign_in(request), fragment=fragment)
    setattr(request.state, TOKEN_NAME_KEY, user.token.name)
    if not user.token.allows(Scope.read):
        raise ActionRefused(f"token {user.token.name!r} lacks the 'read' scope the dashboard needs")
    return user


def _from_here(request: Request, url: str) -> bool:
    """Whether `url` is on this server (its scheme and host are the request's)."""
    theirs = urlsplit(url)
    return (theirs.scheme, theirs.netloc) == (request.url.scheme, request.url.netloc)


def same_origin(request: Request) -> bool:
    """Whether the request's `Origin` (or, without one, its `Referer`) is this server."""
    source = request.headers.get("origin") or request.headers.get("referer")
    return bool(source) and source != "null" and _from_here(request, source or "")


async def read_form(request: Request) -> dict[str, list[str]]:
    """The fields of a form posted as `application/x-www-form-urlencoded` (the only kind the
    dashboard's forms send; its size is capped by the API's body limit), each with every
    value it was sent with."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise ActionRefused("the dashboard's actions are posted by its own forms", 415)
    body = await request.body()  # kept by the request: later reads get the same bytes
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ActionRefused("the form is not UTF-8 text", 400) from None
    try:
        return parse_qs(text, keep_blank_values=True, max_num_fields=_MAX_FIELDS)
    except ValueError:  # more fields than that: a 400, not a server error
        raise ActionRefused(f"the form has over {_MAX_FIELDS:,} fields", 400) from None


async def _actor(request: Request) -> UiUser:
    user = _viewer(request)
    form = await read_form(request)
    sent = (form.get("csrf") or [""])[0]
    if not hmac.compare_digest(sent.encode(), user.csrf.encode()):
        raise ActionRefused("the form is stale or came from elsewhere: reload the page and retry")
    if not same_origin(request):
        raise ActionRefused("actions are only taken from this dashboard's own pages")
    if not user.can_act:
        raise ActionRefused(
            f"token {user.token.name!r} may look but not act: replay and purge need 'admin'"
        )
    return user


Viewer = Annotated[UiUser, Depends(_viewer)]
"""A page's parameter: the signed-in user with the `read` scope (else the sign-in form)."""

Admin = Annotated[UiUser, Depends(_actor)]
"""An action's parameter: a signed-in `admin`, its form's CSRF token and origin checked."""


def safe_next(path: str | None) -> str:
    """Where to go after signing in: a path of the dashboard, never another site."""
    if not path or not path.startswith("/ui") or path.startswith("//") or "\\" in path:
        return "/ui/"
    return path
