"""schemathesis hooks of `tests.fuzz_api`: waits are kept short, so that a few minutes test many
inputs instead of waiting out a 300 s `timeout` or `wait` (their bounds are tested by the
schema: values past them are still generated and refused with 422)."""

from __future__ import annotations

from typing import Any

import schemathesis

_LONGEST_WAIT = 2.0


def _shortened(value: Any) -> Any:
    """`value` cut to 2 s when it is a wait the API accepts (also given as text, as query
    parameters may be)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return value
    if isinstance(value, bool) or not 0 < seconds <= 300:
        return value
    return min(seconds, _LONGEST_WAIT) if not isinstance(value, str) else str(min(seconds, 2))


@schemathesis.hook
def map_query(ctx: Any, query: Any) -> Any:
    """`wait` and `timeout` query parameters of at most 2 s."""
    if isinstance(query, dict):
        for name in ("wait", "timeout"):
            if name in query:
                query[name] = _shortened(query[name])
    return query


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    """A request-reply `timeout` of at most 2 s."""
    if isinstance(body, dict) and "timeout" in body:
        body["timeout"] = _shortened(body["timeout"])
    return body
