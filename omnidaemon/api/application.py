"""`create_api`: the control-plane HTTP API of an app, as an ASGI application (FastAPI)."""

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute

from omnidaemon import __version__
from omnidaemon.api.auth import ApiToken, Authenticator
from omnidaemon.api.dependencies import ApiState
from omnidaemon.api.errors import install_error_handlers
from omnidaemon.api.middleware import RequestGuard
from omnidaemon.api.routes import probe_router, v1_router
from omnidaemon.api.routes.asyncapi import router as asyncapi_router
from omnidaemon.api.waiting import DEFAULT_MAX_WAITING, WaitingRequests
from omnidaemon.app import App
from omnidaemon.errors import ConfigurationError
from omnidaemon.observability.logging import get_logger

__all__ = ["create_api"]

_log = get_logger("omnidaemon.api")

_DESCRIPTION = """\
The operations of the `omnidaemon` command line as JSON over HTTP: publish events and wait for
replies, read stored results, look into topics, groups and dead letters, replay and purge, and
read the fleet's health and metrics.

Every `/v1` endpoint needs `Authorization: Bearer <token>`; a token's scopes (`read`,
`publish`, `admin`) say what it may do. `/healthz` needs none. Errors answer
`{"code": ..., "message": ...}`.
"""

_TAGS = [
    {"name": "events", "description": "Publish, request-reply, results."},
    {"name": "fleet", "description": "Agents, health, metrics, the bus at a glance."},
    {"name": "topics", "description": "Topics, their entries and consumer groups."},
    {"name": "dead letters", "description": "Dead letters: list, replay, purge."},
    {"name": "probes", "description": "For load balancers; no token needed."},
]

_BODY_MARGIN = 64 * 1024  # bytes of a request body beyond the payload: its other fields


def _operation_id(route: APIRoute) -> str:
    return route.name


def create_api(
    app: App,
    *,
    tokens: Iterable[ApiToken] | None = None,
    insecure_no_auth: bool = False,
    max_body: int | None = None,
    max_waiting: int = DEFAULT_MAX_WAITING,
) -> FastAPI:
    """The HTTP API of `app`: its bus, its agents, and publishing with its payload types.

    The API connects `app` when it starts (its ASGI lifespan) and closes it when it stops;
    every request shares that connection. Serve it with any ASGI server
    (`uvicorn.run(api, host="127.0.0.1", port=8765)`) or with `omnidaemon api`.

    Args:
        app: The app to serve.
        tokens: The bearer tokens requests may present (`load_tokens`, `parse_tokens`).
        insecure_no_auth: Serve without authentication: every request may do everything.
            Only for a server that nothing but this machine can reach.
        max_body: The largest request body accepted, in bytes; default: twice the app's
            `max_payload_bytes` plus 64 KiB.
        max_waiting: Requests that may wait at once (`POST /v1/requests`, results with
            `wait`); more are answered 503 with `Retry-After` at once. Each holds a bus
            connection while it waits: keep it under half the broker's `max_connections`.

    Raises:
        ConfigurationError: no tokens were given and `insecure_no_auth` is not set, or both
            were.

    Example:
        ```python
        from omnidaemon import App
        from omnidaemon.api import create_api, parse_tokens

        app = App("shop", broker="memory://")
        api = create_api(app, tokens=parse_tokens("ci:read,publish:" + "x" * 32, source="env"))
        ```
    """
    known = list(tokens or ())
    if insecure_no_auth and known:
        raise ConfigurationError("give API tokens or insecure_no_auth=True, not both")
    if not insecure_no_auth and not known:
        raise ConfigurationError(
            "no API tokens: set OMNIDAEMON_API_TOKENS or pass --tokens-file "
            "(entries NAME:SCOPES:TOKEN, see docs/http-api.md)"
        )
    authenticator = None if insecure_no_auth else Authenticator(known)
    body_limit = (
        max_body if max_body is not None else (2 * app.settings.max_payload_bytes + _BODY_MARGIN)
    )

    @asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        # One connection for the server's life, shared by every request.
        await app.connect()
        _log.info(
            "api started",
            app=app.name,
            bus=app.broker.url,
            auth="off" if authenticator is None else f"{len(authenticator)} tokens",
        )
        try:
            yield
        finally:
            await app.close()
            _log.info("api stopped", app=app.name)

    api = FastAPI(
        title="omnidaemon control plane",
        version=__version__,
        description=_DESCRIPTION,
        openapi_tags=_TAGS,
        lifespan=lifespan,
        # Operation ids are the route functions' names (`publish_event`), for client
        # generators, instead of FastAPI's names made of the path and method.
        generate_unique_id_function=_operation_id,
    )
    api.state.omnidaemon = ApiState(app, authenticator, WaitingRequests(max_waiting))
    install_error_handlers(api)
    api.add_middleware(RequestGuard, max_body=body_limit, loopback_only=insecure_no_auth)
    api.include_router(probe_router)
    api.include_router(v1_router())
    api.include_router(asyncapi_router)
    # Imported here: the dashboard's modules build on this package's (auth, dependencies).
    from omnidaemon.dashboard import install_dashboard

    install_dashboard(api)
    return api
