"""Idempotency keys: run a handler at most once per key among successful runs.

`@app.agent(..., idempotency_key=lambda e: e.payment_id)` makes the worker claim the key on the
bus before running the handler:

- no claim yet: the key is claimed (for `lease` seconds) and the handler runs; on success the
  claim becomes the stored result (kept `idempotency_ttl`), on failure it is released;
- the key already succeeded: the handler does not run; the stored result is used as its return
  value (published to `publishes=`, sent as the reply, stored as the result);
- another event holds the claim: the delivery waits until that run finishes or its lease ends;
- this same event holds the claim (its earlier attempt died mid-handler): it takes the claim over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.envelope import dumps

__all__ = ["NOT_STORED", "Idempotency"]

NOT_STORED: Any = object()
"""Returned by `claim` when the handler must run (no stored result for the key)."""


class Idempotency:
    """The claims and stored results of one agent's idempotency keys."""

    def __init__(
        self,
        broker: Broker,
        agent: str,
        key_of: Callable[[Any], Any],
        *,
        ttl: float,
        lease: float,
    ) -> None:
        self._broker = broker
        self._agent = agent
        self._key_of = key_of
        self._ttl = ttl
        self._lease = lease

    def key(self, payload: Any) -> str:
        """The bus key for `payload` (the user's key function may raise)."""
        return f"idempotency:{self._agent}:{self._key_of(payload)}"

    async def claim(self, key: str, event_id: str) -> Any:
        """Claim `key` for `event_id`; return `NOT_STORED` to run the handler, or the result
        a successful run stored for the key."""
        claim = dumps({"state": "running", "event_id": event_id})
        delay = 0.05
        while True:
            if await self._broker.set_value(key, claim, self._lease, only_if_absent=True):
                return NOT_STORED
            existing = await self._broker.get_value(key)
            if existing is None:
                continue  # released or expired just now: claim again
            record = orjson.loads(existing)
            if record.get("state") == "succeeded":
                return record.get("result")
            if record.get("event_id") == event_id:
                await self._broker.set_value(key, claim, self._lease)
                return NOT_STORED
            # Another event with the same key is being handled: wait for its outcome.
            await anyio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def succeeded(self, key: str, event_id: str, output: Any) -> None:
        """Store the successful run's result under `key` for `ttl`."""
        record = dumps({"state": "succeeded", "event_id": event_id, "result": output})
        await self._broker.set_value(key, record, self._ttl)

    async def release(self, key: str) -> None:
        """Give up the claim after a failed run, so that a retry or another event may run."""
        await self._broker.delete_value(key)
