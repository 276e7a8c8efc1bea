"""Retry policy: how long to wait before the next attempt, and the exceptions handlers raise."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

__all__ = ["Backoff", "Reject", "Retry", "RetryPolicy"]


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


class Retry(Exception):
    """Raise from a handler to ask for another attempt.

    The attempt counts toward the agent's `max_retries`; when none are left the event goes to
    the dead-letter queue.

    Args:
        delay: Seconds (or a `timedelta`) to wait before the next attempt; `None` uses the
            agent's backoff.
        reason: Why, for the logs and the dead-letter record.

    Example:
        ```python
        if response.status_code == 429:
            raise Retry(delay=float(response.headers["Retry-After"]), reason="rate limited")
        ```
    """

    def __init__(self, delay: float | timedelta | None = None, reason: str = "retry requested"):
        super().__init__(reason)
        self.delay = None if delay is None else max(0.0, _seconds(delay))
        self.reason = reason

    def __reduce__(self) -> tuple[type[Retry], tuple[float | None, str]]:
        # Exceptions are rebuilt from their args when copied or pickled; ours are (delay, reason).
        return (type(self), (self.delay, self.reason))


class Reject(Exception):
    """Raise from a handler to send the event straight to the dead-letter queue.

    Use it for permanent failures that no retry can fix (a malformed document, a missing
    record). The reason is kept in the dead-letter record.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter.

    The delay before attempt `n + 1` (after `n` failed attempts) is
    `min(maximum, initial * factor ** (n - 1))`, then, with jitter, a uniformly random value
    between half of that and all of it, so that a fleet of failing workers does not retry in
    lockstep.

    Args:
        initial: Delay after the first failure, in seconds.
        factor: Growth per failed attempt.
        maximum: Upper bound of any delay, in seconds.
        jitter: Randomise each delay between 50% and 100% of its nominal value.
    """

    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial < 0 or self.maximum < 0 or self.factor < 1:
            raise ValueError("Backoff needs initial >= 0, maximum >= 0 and factor >= 1")

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait after `failed_attempts` failures (1 for the first)."""
        exponent = max(0, failed_attempts - 1)
        try:
            nominal = min(self.maximum, self.initial * float(self.factor) ** exponent)
        except OverflowError:  # a long run of failures: the cap applies
            nominal = self.maximum if self.initial > 0 else 0.0
        if self.jitter:
            return random.uniform(nominal / 2, nominal)
        return nominal


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often an agent's failing event is tried, and how long apart.

    An event is attempted at most `max_retries + 1` times: the first delivery and up to
    `max_retries` retries. A delivery to a worker that died while handling it counts as an
    attempt too.
    """

    max_retries: int = 3
    backoff: Backoff = Backoff()

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def max_attempts(self) -> int:
        """The total number of attempts: the first delivery plus the retries."""
        return self.max_retries + 1
