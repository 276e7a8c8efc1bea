"""Idempotency keys: run a handler at most once per key among successful runs.

`@app.agent(..., idempotency_key=lambda e: e.payment_id)` makes the worker claim the key on the
bus before running the handler. A claim names its holder (the worker's consumer name) and is a
lease of `lease` seconds (the agent's `timeout`, else 10 minutes):

- no claim yet: the key is claimed and the handler runs; on success the claim becomes the
  stored result (kept `idempotency_ttl`), on failure it is released;
- the key already succeeded: the handler does not run; the stored result is used as its return
  value (published to `publishes=`, sent as the reply, stored as the result);
- another run holds the claim and its worker is alive (its heartbeat is on the bus): the
  delivery waits (`HELD`), whichever event it is, including a redelivery of the same event
  (the holder may only be paused, and will finish);
- the holder's worker is gone (no heartbeat: it died, or was silent for three heartbeat
  intervals) or the lease ran out: the claim is taken over, atomically, by one run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.envelope import dumps

__all__ = ["HELD", "NOT_STORED", "Idempotency"]

NOT_STORED: Any = object()
"""Returned by `claim` when the handler must run (no stored result for the key)."""

HELD: Any = object()
"""Returned by `claim` when a live run of another delivery holds the key: try again later."""

_TAKEOVER_TRIES = 5  # claims that change between reading and replacing them; then wait


class Idempotency:
    """The claims and stored results of one agent's idempotency keys.

    Args:
        broker: The bus holding claims and results.
        agent: The agent's name (keys are per agent).
        key_of: The user's function from payload to key.
        ttl: Seconds a stored result is kept.
        lease: Seconds a claim lasts if its holder never finishes.
        holder: The claiming worker's consumer name, whose heartbeat says it is alive.
    """

    def __init__(
        self,
        broker: Broker,
        agent: str,
        key_of: Callable[[Any], Any],
        *,
        ttl: float,
        lease: float,
        holder: str,
    ) -> None:
        self._broker = broker
        self._agent = agent
        self._key_of = key_of
        self._ttl = ttl
        self._lease = lease
        self._holder = holder

    def key(self, payload: Any) -> str:
        """The bus key for `payload` (the user's key function may raise)."""
        return f"idempotency:{self._agent}:{self._key_of(payload)}"

    async def claim(self, key: str, event_id: str) -> tuple[Any, bytes | None]:
        """Claim `key` for a run of `event_id`.

        Returns `(NOT_STORED, claim)` to run the handler (pass `claim` to `release`), `(HELD,
        None)` when a live run holds the key, or `(result, None)` with the result a
        successful run stored.
        """
        # The random part makes each run's claim its own: a release or takeover compares it.
        claim = dumps(
            {
                "state": "running",
                "event_id": event_id,
                "holder": self._holder,
                "run": os.urandom(8).hex(),
            }
        )
        for _ in range(_TAKEOVER_TRIES):
            if await self._broker.set_value(key, claim, self._lease, only_if_absent=True):
                return NOT_STORED, claim
            existing = await self._broker.get_value(key)
            if existing is None:
                continue  # released or expired just now: claim again
            record = orjson.loads(existing)
            if record.get("state") == "succeeded":
                return record.get("result"), None
            holder = record.get("holder")
            if isinstance(holder, str):
                if await self._alive(holder):
                    return HELD, None
            elif record.get("event_id") != event_id:
                # A claim from before holders were recorded: only the same event's redelivery
                # takes it over (as it did then); another event waits for it to end.
                return HELD, None
            # The holder's worker is gone: take its claim over, unless another run just did.
            if await self._broker.replace_value(key, existing, claim, self._lease):
                return NOT_STORED, claim
        return HELD, None

    async def _alive(self, holder: str) -> bool:
        # Imported here: the worker package imports this module.
        from omnidaemon.worker.heartbeat import worker_alive

        return await worker_alive(self._broker, holder)

    async def succeeded(self, key: str, event_id: str, output: Any) -> None:
        """Store the successful run's result under `key` for `ttl`."""
        record = dumps({"state": "succeeded", "event_id": event_id, "result": output})
        await self._broker.set_value(key, record, self._ttl)

    async def release(self, key: str, claim: bytes) -> None:
        """Give up `claim` after a failed run, so that a retry or another event may run; a
        claim another run has taken over since is left alone."""
        await self._broker.replace_value(key, claim, None, self._lease)
