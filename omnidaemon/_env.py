"""Reading `OMNIDAEMON_*` environment variables: numbers, counts and flags, each refused with
one line naming the variable when it does not parse. Unset or empty means the default."""

from __future__ import annotations

import math
from collections.abc import Mapping

from omnidaemon.errors import ConfigurationError

__all__ = ["env_count", "env_flag", "env_seconds"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_seconds(
    env: Mapping[str, str], name: str, default: float, *, zero_ok: bool = True
) -> float:
    """A finite, non-negative number of seconds (more than 0 unless `zero_ok`).

    `inf` would lift a bound (`max_delay`) or wait for ever (`shutdown_grace`), and `nan`
    compares false with everything, so every check of it would pass: both are refused.
    """
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = "at least 0" if zero_ok else "more than 0"
        raise ConfigurationError(f"{name}={raw!r} must be a finite number of seconds, {bound}")
    return value


def env_count(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    """A whole number of at least `minimum`."""
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    """On (`1`, `true`, `yes`, `on`) or off (`0`, `false`, `no`, `off`), in any case."""
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r}: use 1, true, yes or on; or 0, false, no or off")
