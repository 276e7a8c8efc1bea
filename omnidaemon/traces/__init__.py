"""Traces of whole runs: what every agent did with every event that shares a correlation id
(`omnidaemon trace`, `omnidaemon runs`, `App.trace`, `App.runs`, `GET /v1/traces/{id}`)."""

from omnidaemon.traces.reading import RunSummary, find_trace, list_runs
from omnidaemon.traces.tree import AttemptTrace, EventTrace, HandlingTrace, RunStatus, Trace

__all__ = [
    "AttemptTrace",
    "EventTrace",
    "HandlingTrace",
    "RunStatus",
    "RunSummary",
    "Trace",
    "find_trace",
    "list_runs",
]
