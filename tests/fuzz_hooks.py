"""schemathesis hooks of `tests.fuzz_api`: waits are kept short, so that a few minutes test many
inputs instead of waiting out a 300 s `timeout` or `wait` (their bounds are tested by the
schema: values past them are still generated and refused with 422)."""

from __future__ import annotations

from typing import Any

import schemathesis

_LONGEST_WAIT = 2.0


def _shortened(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 300:
        return min(value, _LONGEST_WAIT)
    return value


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
