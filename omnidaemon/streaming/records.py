"""The entries of an event's output log: what a worker appends and how a reader reads them.

One log per event, under the key `stream:<event_id>` (the broker namespaces it, like every
key). Each entry is one compact JSON object naming the agent and attempt that wrote it:

- a chunk: `{"agent": "chat", "attempt": 1, "data": <JSON value>}`;
- the truncation marker, written once when an attempt passes the bound:
  `{"agent": "chat", "attempt": 1, "truncated": "<why>"}`;
- an end marker, written when an attempt ends: `{"agent", "attempt", "end": <status>}` with
  `"result"` (`succeeded`) or `"error": {"type", "message"}` (`retrying`, `dead_lettered`,
  `cancelled`).

Entries are parsed as plain JSON and checked field by field: never unpickled, never evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import orjson

from omnidaemon.envelope import dumps

__all__ = [
    "END_STATUSES",
    "FINAL_END_STATUSES",
    "EndStatus",
    "OutputRecord",
    "chunk_entry",
    "end_entry",
    "output_key",
    "parse_entry",
    "truncated_entry",
]

EndStatus = Literal["succeeded", "retrying", "dead_lettered", "cancelled"]
"""How an attempt ended: `retrying` means another attempt follows (a new stream)."""

END_STATUSES: Final = frozenset(get_args(EndStatus))
FINAL_END_STATUSES: Final = frozenset({"succeeded", "dead_lettered", "cancelled"})


def output_key(event_id: str) -> str:
    """The output log of an event (the broker adds its own namespace)."""
    return f"stream:{event_id}"


def chunk_entry(agent: str, attempt: int, data: bytes) -> bytes:
    """A chunk entry around `data`, a JSON value already encoded."""
    head = dumps({"agent": agent, "attempt": attempt})
    return head[:-1] + b',"data":' + data + b"}"


def truncated_entry(agent: str, attempt: int, reason: str) -> bytes:
    """The marker written once an attempt's output passed its bound."""
    return dumps({"agent": agent, "attempt": attempt, "truncated": reason})


def end_entry(
    agent: str,
    attempt: int,
    status: EndStatus,
    *,
    result: Any = None,
    error: dict[str, str] | None = None,
) -> bytes:
    """The end marker of an attempt: its status, with the result or the error."""
    record: dict[str, Any] = {"agent": agent, "attempt": attempt, "end": status}
    if status == "succeeded":
        record["result"] = result
    else:
        record["error"] = error or {"type": "Error", "message": ""}
    return dumps(record)


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One entry of an output log, read.

    Attributes:
        kind: `chunk`, `truncated` or `end`.
        agent: The agent that wrote it.
        attempt: The attempt that wrote it (1, 2, ...).
        data: A chunk's JSON value; an end's result (`succeeded`).
        status: An end's status.
        error: An end's error (`{"type", "message"}`), or the reason of a truncation
            (`{"message"}`).
    """

    kind: Literal["chunk", "truncated", "end"]
    agent: str
    attempt: int
    data: Any = None
    status: EndStatus | None = None
    error: dict[str, str] | None = None


def _error(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {"type": "Error", "message": ""}
    return {
        "type": str(value.get("type", "Error")),
        "message": str(value.get("message", "")),
    }


def parse_entry(data: bytes) -> OutputRecord:
    """Read one entry of an output log.

    Raises:
        ValueError: the entry is not one a worker writes (not JSON, or missing or mistyped
            fields); the message says which.
    """
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"an output entry is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("an output entry is not a JSON object")
    agent, attempt = raw.get("agent"), raw.get("attempt")
    if not isinstance(agent, str) or not agent:
        raise ValueError("an output entry names no agent")
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise ValueError(f"an output entry of {agent!r} has no valid attempt number")
    if "data" in raw:
        return OutputRecord("chunk", agent, attempt, data=raw["data"])
    if "truncated" in raw:
        reason = {"message": str(raw["truncated"])}
        return OutputRecord("truncated", agent, attempt, error=reason)
    status = raw.get("end")
    if status not in END_STATUSES:
        raise ValueError(f"an output entry of {agent!r} is no chunk, truncation or end")
    if status == "succeeded":
        return OutputRecord("end", agent, attempt, data=raw.get("result"), status=status)
    return OutputRecord("end", agent, attempt, status=status, error=_error(raw.get("error")))
