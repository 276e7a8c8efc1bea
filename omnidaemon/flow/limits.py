"""What an agent declares about flow control: rate limits, token budgets, per-key concurrency.

These are plain values checked once, when `@app.agent(...)` runs; the worker enforces them
(`omnidaemon.flow.gate`) with state kept on the bus (`omnidaemon.flow.state`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

__all__ = ["Budget", "FlowSpec", "RateLimit", "build_flow_spec", "check_budgets"]

_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86_400.0,
    "day": 86_400.0,
}
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")


def _period(per: str | float | timedelta, what: str) -> float:
    """Seconds in `per`: a unit name (`"minute"`, `"m"`), a number of seconds or a timedelta."""
    if isinstance(per, timedelta):
        seconds = per.total_seconds()
    elif isinstance(per, str):
        unit = per.strip().lower()
        if unit not in _UNITS and len(unit) > 2 and unit.endswith("s"):
            unit = unit[:-1]  # a plural ("minutes"); never "ms", which is no minute
        if unit not in _UNITS:
            raise ValueError(
                f"{what}: unknown period {per!r}; use second, minute, hour, day "
                "(or s, m, h, d), a number of seconds or a timedelta"
            )
        seconds = _UNITS[unit]
    else:
        seconds = float(per)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what}: the period must be a positive time, not {per!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `count` handler starts per `per` seconds, fleet-wide, `burst` of them at once.

    The limit is a token bucket (GCRA) kept on the bus: starts are spaced `per / count`
    seconds apart on average, and up to `burst` may start back to back after a quiet spell.
    In any window of `w` seconds at most `burst + w * count / per` starts happen.

    Write it as a string, `"60/m"`, `"10/s"`, `"1000/h"`, `"5/10s"` (5 per 10 seconds), or
    build it for a burst: `RateLimit(60, per=60, burst=10)`.
    """

    count: float
    per: float = 1.0
    burst: int = 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.count) or self.count <= 0:
            raise ValueError(f"a rate limit's count must be > 0, not {self.count!r}")
        object.__setattr__(self, "per", _period(self.per, "rate limit"))
        if not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"a rate limit's burst must be an integer >= 1, not {self.burst!r}")

    @classmethod
    def parse(cls, value: str | RateLimit) -> RateLimit:
        """`"60/m"` -> `RateLimit(60, per=60.0)`; a `RateLimit` is returned as it is.

        Raises:
            ValueError: the string is not `<count>/<period>`.
        """
        if isinstance(value, RateLimit):
            return value
        match = _RATE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise ValueError(
                f"invalid rate limit {value!r}: write '<count>/<period>', e.g. '60/m', "
                "'10/s', '5/10s', or pass RateLimit(count, per=seconds, burst=n)"
            )
        count, multiple, unit = match.groups()
        per = _period(unit, f"rate limit {value!r}") * float(multiple or 1)
        return cls(float(count), per=per)

    @property
    def interval(self) -> float:
        """Seconds between two starts at the sustained rate."""
        return self.per / self.count

    def __str__(self) -> str:
        count = int(self.count) if self.count == int(self.count) else self.count
        burst = f" (burst {self.burst})" if self.burst > 1 else ""
        return f"{count}/{_format_period(self.per)}{burst}"


def _format_period(seconds: float) -> str:
    for name, unit in (("d", 86_400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds == unit:
            return name
    return f"{seconds:g}s"


@dataclass(frozen=True, slots=True)
class Budget:
    """A named budget of units (model tokens, dollars, calls) refilled continuously.

    `amount` units per `per` (a unit name, seconds or a timedelta) flow back in, up to
    `amount`. Every agent that names the same budget draws on the same amount, in every
    worker. A handler starts only while the budget is not in debt; `ctx.charge(name, n)`
    subtracts what was really used, which may put it in debt: new starts then wait until the
    refill has paid it back.

    Example:
        `Budget("openai.tokens", 90_000, per="minute")`
    """

    name: str
    amount: float
    per: str | float | timedelta = "minute"
    seconds: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if (
            not isinstance(self.name, str)
            or not re.fullmatch(r"[A-Za-z0-9_.:-]{1,100}", self.name)
            or self.name.startswith("flow:")  # the prefix of the rate limits' reservations
        ):
            raise ValueError(f"invalid budget name {self.name!r}: use 1 to 100 of [A-Za-z0-9_.:-]")
        if not math.isfinite(self.amount) or self.amount <= 0:
            raise ValueError(f"budget {self.name!r}: the amount must be > 0, not {self.amount!r}")
        object.__setattr__(self, "seconds", _period(self.per, f"budget {self.name!r}"))

    @property
    def rate(self) -> float:
        """Units refilled per second."""
        return self.amount / self.seconds

    def __str__(self) -> str:
        amount = int(self.amount) if self.amount == int(self.amount) else self.amount
        return f"{self.name} {amount:,}/{_format_period(self.seconds)}"


@dataclass(frozen=True, slots=True)
class FlowSpec:
    """An agent's flow control, as `@app.agent` checked it.

    Attributes:
        rate_limit: Starts allowed per period, fleet-wide (per key with `rate_limit_key`).
        rate_limit_key: Maps a payload to the key the rate limit applies to, or `None` for one
            limit for the whole agent.
        key_concurrency: Most handlers running at once per key of `concurrency_key`,
            fleet-wide, or `None`.
        concurrency_key: Maps a payload to its concurrency key.
        budgets: Budgets a start needs out of debt, by name.
        estimate: Maps a payload to the units it is expected to use, reserved at admission:
            a number (for a single budget) or `{budget name: units}`.
    """

    rate_limit: RateLimit | None = None
    rate_limit_key: Callable[[Any], Any] | None = None
    key_concurrency: int | None = None
    concurrency_key: Callable[[Any], Any] | None = None
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    estimate: Callable[[Any], float | Mapping[str, float]] | None = None

    def describe(self) -> dict[str, Any]:
        """The options as JSON data, for `omnidaemon agents --json` and the API."""
        return {
            "rate_limit": str(self.rate_limit) if self.rate_limit else None,
            "rate_limit_keyed": self.rate_limit_key is not None,
            "key_concurrency": self.key_concurrency,
            "budgets": [str(b) for b in self.budgets.values()],
            "estimate": self.estimate is not None,
        }


def build_flow_spec(
    qualname: str,
    *,
    rate_limit: str | RateLimit | None,
    rate_limit_key: Callable[[Any], Any] | None,
    key_concurrency: int | None,
    concurrency_key: Callable[[Any], Any] | None,
    budgets: Sequence[Budget] | None,
    estimate: Callable[[Any], float | Mapping[str, float]] | None,
) -> FlowSpec | None:
    """Check an agent's flow options; `None` when it declares none (the hot path skips it)."""
    limit = None
    if rate_limit is not None:
        try:
            limit = RateLimit.parse(rate_limit)
        except ValueError as exc:
            raise ValueError(f"{qualname}: {exc}") from None
    if rate_limit_key is not None and limit is None:
        raise ValueError(f"{qualname}: rate_limit_key needs a rate_limit")
    if rate_limit_key is not None and not callable(rate_limit_key):
        raise TypeError(f"{qualname}: rate_limit_key must be a function of the payload")
    if key_concurrency is not None:
        if not isinstance(key_concurrency, int) or key_concurrency < 1:
            raise ValueError(
                f"{qualname}: key_concurrency must be an integer >= 1, not {key_concurrency!r}"
            )
        if concurrency_key is None or not callable(concurrency_key):
            raise ValueError(
                f"{qualname}: key_concurrency needs concurrency_key, a function of the payload "
                "(lambda e: e.tenant_id)"
            )
    elif concurrency_key is not None:
        raise ValueError(f"{qualname}: concurrency_key needs key_concurrency=N")
    by_name: dict[str, Budget] = {}
    for budget in budgets or ():
        if not isinstance(budget, Budget):
            raise TypeError(f"{qualname}: budgets takes Budget(...) values, not {budget!r}")
        if budget.name in by_name:
            raise ValueError(f"{qualname}: budget {budget.name!r} is named twice")
        by_name[budget.name] = budget
    if estimate is not None and not by_name:
        raise ValueError(f"{qualname}: estimate= needs budgets=[...] to reserve from")
    if limit is None and key_concurrency is None and not by_name:
        return None
    return FlowSpec(
        rate_limit=limit,
        rate_limit_key=rate_limit_key,
        key_concurrency=key_concurrency,
        concurrency_key=concurrency_key,
        budgets=by_name,
        estimate=estimate,
    )


def check_budgets(known: Mapping[str, Budget], new: Iterable[Budget], agent: str) -> None:
    """Refuse a budget declared with another amount or period than an agent of the same app
    declared it with: they are one budget on the bus, so they must agree."""
    for budget in new:
        other = known.get(budget.name)
        if other is not None and (other.amount, other.seconds) != (budget.amount, budget.seconds):
            raise ValueError(
                f"agent {agent!r} declares budget {budget.name!r} as {budget}, but another "
                f"agent of the app declares it as {other}; a budget is shared, declare it once "
                "and pass the same Budget to each agent"
            )
