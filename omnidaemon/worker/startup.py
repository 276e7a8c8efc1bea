"""Waiting for the bus at start: a worker started before its bus (docker-compose, a reboot)
retries with backoff, one log line per attempt, instead of crashing; settings the bus refuses
(a wrong password) end the wait at once, since retrying cannot fix them."""

from __future__ import annotations

import anyio
import structlog
from redis.exceptions import (
    AuthenticationError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
)

from omnidaemon.brokers.base import Broker
from omnidaemon.errors import BusUnavailable, ConfigurationError
from omnidaemon.retry import Backoff

__all__ = ["CONNECT_BACKOFF", "wait_for_bus"]

_log = structlog.get_logger("omnidaemon.worker")

CONNECT_BACKOFF = Backoff(initial=0.5, factor=2.0, maximum=10.0, jitter=True)
"""Delays between attempts to reach the bus at start: 0.5 s after the first failure, doubling,
at most 10 s (with jitter, so a fleet restarted together does not knock in lockstep)."""

# What a bus that is not (yet) there looks like: refused or timed-out connections, a server
# still loading its data (`BusyLoadingError` is a `ConnectionError`), a Redis Cluster none of
# whose seeds answers or whose slots are not all served yet (`RedisClusterException`, which is
# no `RedisError`).
_NOT_YET = (ConnectionError, TimeoutError, OSError, RedisError, RedisClusterException)


async def wait_for_bus(
    broker: Broker, *, timeout: float | None, backoff: Backoff = CONNECT_BACKOFF
) -> None:
    """Return once `broker` answers a ping; retry with `backoff` while it cannot be reached.

    Every failed attempt logs one warning naming the bus, the attempt and the next delay.

    Args:
        broker: A connected broker (for Redis: its client exists; no connection is made yet).
        timeout: Seconds to keep trying; `None` for as long as it takes, `0` for one attempt.
        backoff: The delay after the n-th failed attempt.

    Raises:
        ConfigurationError: the bus refused the credentials or the commands of the broker URL.
        BusUnavailable: the bus did not answer within `timeout`.
    """
    deadline = None if timeout is None else anyio.current_time() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            await broker.ping()
        except (AuthenticationError, NoPermissionError) as exc:
            # Wrong credentials or ACLs will not fix themselves: stop at once (exit status 2).
            raise ConfigurationError(
                f"the bus at {broker.url} refused the broker URL's credentials: {exc}"
            ) from None
        except _NOT_YET as exc:
            delay = backoff.delay(attempt)
            error = f"{type(exc).__name__}: {exc}"
            if deadline is not None:
                # The last attempt is made at the deadline, so the whole bound is used.
                delay = min(delay, deadline - anyio.current_time())
            if deadline is not None and delay <= 0:
                raise BusUnavailable(
                    f"the bus at {broker.url} did not answer within {timeout:g} s "
                    f"({attempt} attempt{'s' if attempt > 1 else ''}; {error})"
                ) from None
            _log.warning(
                "cannot reach the bus; retrying",
                bus=broker.url,
                attempt=attempt,
                retry_in=round(delay, 2),
                error=error,
            )
            await anyio.sleep(delay)
        else:
            if attempt > 1:
                _log.info("reached the bus", bus=broker.url, attempts=attempt)
            return
