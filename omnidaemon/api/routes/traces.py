"""Runs: `GET /v1/traces/{run_or_event_id}`, a whole run as a causal tree of its events,
agents and attempts (`omnidaemon trace`), and `GET /v1/runs`, the recent runs with their
status (`omnidaemon runs`)."""

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Path, Query

from omnidaemon.api.auth import Scope
from omnidaemon.api.dependencies import CurrentApp, require
from omnidaemon.api.errors import ApiError, documented
from omnidaemon.traces import RunStatus, RunSummary, Trace

__all__ = ["router"]

router = APIRouter(tags=["events"])

_YEAR = 366 * 86_400.0


@router.get(
    "/traces/{run_or_event_id}",
    dependencies=[require(Scope.read)],
    responses=documented(401, 403, 404, 422, 503),
)
async def run_trace(
    run_or_event_id: Annotated[
        str,
        Path(
            min_length=1,
            max_length=200,
            description="The run's correlation id, or the id of any event of the run.",
        ),
    ],
    app: CurrentApp,
) -> Trace:
    """A whole run (`omnidaemon trace --json`): every event sharing one correlation id as a
    causal tree, each with every agent's handling of it and each attempt (worker, times,
    outcome, error, the events it published, its OpenTelemetry ids), and the run's status,
    duration and failures.

    404 when the bus holds no trace of the id (unknown, not started by a worker yet, or
    expired after `OMNIDAEMON_TRACE_TTL`). Needs the `read` scope.
    """
    found = await app.trace(run_or_event_id)
    if found is None:
        raise ApiError(
            404,
            "not_found",
            f"no trace of {run_or_event_id!r} (an unknown id, an event no worker has started "
            "yet, or a run whose trace expired)",
        )
    return found


@router.get("/runs", dependencies=[require(Scope.read)], responses=documented(401, 403, 422, 503))
async def recent_runs(
    app: CurrentApp,
    since: Annotated[
        float,
        Query(gt=0, le=_YEAR, description="How far back, in seconds, by each run's last write."),
    ] = 3600.0,
    status: Annotated[RunStatus | None, Query(description="Only runs with this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="The most runs answered.")] = 50,
) -> list[RunSummary]:
    """Recent runs, the most recently active first (`omnidaemon runs --json`): each with its
    status, start, duration, number of events, and the first agent that failed with its
    error. Needs the `read` scope."""
    return await app.runs(since=timedelta(seconds=since), status=status, limit=limit)
