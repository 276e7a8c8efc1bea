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
def before_call(ctx: Any, case: Any, **kwargs: Any) -> None:
    """`wait` and `timeout` (query or body) of at most 2 s, in every phase: the phases that
    try the schema's boundary values (a `timeout` of 299) do not go through `map_*` hooks."""
    for part in (case.query, case.body):
        if isinstance(part, dict):
            for name in ("wait", "timeout"):
                if name in part:
                    part[name] = _shortened(part[name])
