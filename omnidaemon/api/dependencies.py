"""What routes depend on: the shared `App`, and a token with the scope a route needs."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from omnidaemon.api.auth import ApiToken, Authenticator, Scope
from omnidaemon.api.errors import ApiError
from omnidaemon.api.middleware import TOKEN_NAME_KEY
from omnidaemon.api.waiting import WaitingRequests
from omnidaemon.app import App

__all__ = [
    "ANONYMOUS",
    "ApiState",
    "CurrentApp",
    "Waiting",
    "bearer",
    "current_app",
    "require",
    "waiting_requests",
]

bearer = HTTPBearer(
    auto_error=False,  # refusals are ours: 401 with WWW-Authenticate, in our error format
    scheme_name="bearer",
    description=(
        "A token from OMNIDAEMON_API_TOKENS or --tokens-file, as `Authorization: Bearer "
        "<token>`. Scopes: `read` (GET), `publish` (events, requests), `admin` (replay, "
        "purge; implies both)."
    ),
)
"""The bearer security scheme, declared in the OpenAPI schema."""

ANONYMOUS = ApiToken("anonymous", frozenset({Scope.admin}), b"")
"""Who a request is when the server runs with `--insecure-no-auth`."""


@dataclass(frozen=True, slots=True)
class ApiState:
    """What the API shares between requests (in `FastAPI.state.omnidaemon`).

    Attributes:
        app: The app whose bus and agents the API serves; connected during the lifespan.
        authenticator: Checks bearer tokens; `None` serves without authentication.
        waiting: Bounds the requests that wait (request-reply, results with `wait`).
    """

    app: App
    authenticator: Authenticator | None
    waiting: WaitingRequests


def _state(request: Request) -> ApiState:
    state: ApiState = request.app.state.omnidaemon
    return state


def current_app(request: Request) -> App:
    """The shared `App` (connected once, in the lifespan)."""
    return _state(request).app


CurrentApp = Annotated[App, Depends(current_app)]
"""A route parameter receiving the shared `App`."""


def waiting_requests(request: Request) -> WaitingRequests:
    """The bound on requests that wait."""
    return _state(request).waiting


Waiting = Annotated[WaitingRequests, Depends(waiting_requests)]
"""A route parameter receiving the bound on requests that wait."""


def _unauthorized(message: str, error: str | None) -> ApiError:
    challenge = 'Bearer realm="omnidaemon"'
    if error is not None:
        challenge += f', error="{error}"'
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": challenge})


def require(scope: Scope) -> Any:
    """A dependency admitting requests whose bearer token has `scope` (401 without a known
    token, 403 without the scope); the route's OpenAPI entry gets the bearer scheme."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> ApiToken:
        authenticator = _state(request).authenticator
        if authenticator is None:
            token = ANONYMOUS
        elif credentials is None:
            raise _unauthorized(
                "this endpoint needs a token: send 'Authorization: Bearer <token>'", None
            )
        else:
            found = authenticator.identify(credentials.credentials)
            if found is None:
                raise _unauthorized("the bearer token is not valid", "invalid_token")
            token = found
        setattr(request.state, TOKEN_NAME_KEY, token.name)
        if not token.allows(scope):
            raise ApiError(
                403,
                "forbidden",
                f"token {token.name!r} lacks the {scope.value!r} scope this needs",
                {"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope.value}"'},
            )
        return token

    check.__name__ = f"require_{scope.value}"
    dependency: Callable[..., Awaitable[ApiToken]] = check
    return Depends(dependency)
