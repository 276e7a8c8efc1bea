"""The app and the fleet: agents (`omnidaemon agents`), health (`omnidaemon health`), metrics
(`omnidaemon metrics`) and the bus at a glance (`omnidaemon bus stats`)."""

from typing import Annotated

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from omnidaemon.activity import fleet_activity
from omnidaemon.api.activity_models import ActivityResponse
from omnidaemon.api.auth import Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import documented
from omnidaemon.api.models import (
    AgentInfo,
    AgentList,
    BusStatsResponse,
    HealthResponse,
    MetricsResponse,
    ProbeResponse,
)
from omnidaemon.fleet import bus_stats, check_health, fleet_metrics
from omnidaemon.topology import describe_agent

__all__ = ["probe_router", "router"]

router = APIRouter(tags=["fleet"])

probe_router = APIRouter(tags=["probes"])
"""`/healthz`, outside `/v1` and without authentication, for load balancers."""

_PROBE_TIMEOUT = 2.0  # seconds: a load balancer's probe should not hang on a stuck bus


@probe_router.get(
    "/healthz",
    response_model=ProbeResponse,
    responses={503: {"model": ProbeResponse, "description": "The bus does not answer."}},
)
async def probe(app: CurrentApp) -> ProbeResponse | JSONResponse:
    """Whether this server can serve requests: it runs and the bus answers a ping within
    2 s. Needs no token and says nothing more, so load balancers and orchestrators can call
    it; use `/v1/health` for the fleet's state."""
    try:
        with anyio.fail_after(_PROBE_TIMEOUT):
            await app.broker.ping()
    except Exception:
        return JSONResponse({"status": "unavailable"}, status_code=503)
    return ProbeResponse(status="ok")


@router.get("/agents", dependencies=[require(Scope.read)], responses=documented(401, 403))
async def list_agents(app: CurrentApp) -> AgentList:
    """The agents the app declares: topics, payload and return types, what each publishes,
    policies (`omnidaemon agents --json`). Needs the `read` scope."""
    return AgentList(
        app=app.name,
        agents=[AgentInfo.model_validate(describe_agent(s)) for s in app.agents.values()],
    )


@router.get(
    "/health",
    response_model=HealthResponse,
    dependencies=[require(Scope.read)],
    responses={
        **documented(401, 403, 422),
        503: {"model": HealthResponse, "description": "Down: the bus does not answer."},
    },
)
async def get_health(
    app: CurrentApp,
    max_lag: Annotated[int, Query(ge=0, description="Degraded above this lag.")] = 10_000,
    max_pending_age: Annotated[
        float, Query(ge=0, description="Degraded when a pending event is older (seconds).")
    ] = 300.0,
    max_dead_letters: Annotated[
        int | None,
        Query(ge=0, description="Degraded when a dead-letter queue holds more (default: off)."),
    ] = None,
    timeout: Annotated[
        float, Query(ge=0.1, le=60, description="Seconds the bus may take to answer.")
    ] = 5.0,
) -> HealthResponse | JSONResponse:
    """The bus and the fleet: `healthy`, `degraded` (the bus answers, something needs a
    look: `problems` says what) or `down` (503) (`omnidaemon health`). Needs the `read`
    scope."""
    report = await check_health(
        app.broker,
        max_lag=max_lag,
        max_pending_age=max_pending_age,
        max_dead_letters=max_dead_letters,
        timeout=timeout,
    )
    body = HealthResponse.model_validate(report.to_json())
    if report.status == "down":
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return body


@router.get(
    "/metrics", dependencies=[require(Scope.read)], responses=documented(401, 403, 422, 503)
)
async def get_metrics(
    app: CurrentApp,
    topic: Annotated[str | None, Query(max_length=255, description="Only this topic.")] = None,
    agent: Annotated[str | None, Query(max_length=200, description="Only this agent.")] = None,
) -> MetricsResponse:
    """Per agent, summed over every worker: received, succeeded, failed, retried,
    dead-lettered, in flight, handler duration and end-to-end latency histograms
    (`omnidaemon metrics --json`). Needs the `read` scope."""
    snapshots = await fleet_metrics(app.broker, topic=topic, agent=agent)
    return MetricsResponse.model_validate({"metrics": [s.to_json() for s in snapshots]})


@router.get("/stats", dependencies=[require(Scope.read)], responses=documented(401, 403, 503))
async def get_stats(app: CurrentApp) -> BusStatsResponse:
    """The bus at a glance: its server, totals over every topic and agent, and every live
    worker (`omnidaemon bus stats --json`). Needs the `read` scope."""
    return BusStatsResponse.model_validate((await bus_stats(app.broker)).to_json())


@router.get(
    "/inspect", dependencies=[require(Scope.read)], responses=documented(401, 403, 422, 503)
)
async def inspect_workers(
    app: CurrentApp,
    agent: Annotated[str | None, Query(max_length=200, description="Only this agent.")] = None,
    payload: Annotated[bool, Query(description="Include each event's payload.")] = False,
) -> ActivityResponse:
    """The events each live worker runs now: agent, event id, attempt and when it started,
    with `payload=true` the payload too (`omnidaemon inspect --json`). Every worker on the
    bus is listed, whatever its app. Needs the `read` scope."""
    found = await fleet_activity(app.broker, agent=agent)
    return ActivityResponse.model_validate({"workers": [w.to_json(payload=payload) for w in found]})
