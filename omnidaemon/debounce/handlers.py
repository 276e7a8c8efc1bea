"""The framework handlers of a debounced agent: collecting a message into its key's window, and
a window's check, which waits, seals, or publishes the window's batch.

Why nothing is lost (docs/debounce.md has the whole argument): a message is acknowledged only
after it is in its window on the bus and the window's check is published; a check is
acknowledged only after the window was handed to a later check, or its batch is on the bus and
the window forgotten. A crash anywhere leaves the message or the check unacknowledged: it is
delivered again, and every step repeats safely (a message already in a window or flushed is
not added twice; the batch goes through `Broker.publish_once`, keyed by the window). A key's
value holds one sealed window at most: a collect or a check that would seal a second one
first publishes the one sealed before it (whose own check then finds nothing to do).
"""

from __future__ import annotations

import hashlib
import secrets
from functools import partial
from typing import TYPE_CHECKING, Any

from omnidaemon.debounce import window
from omnidaemon.debounce.spec import BATCH_IDS_HEADER, BATCH_KEY_HEADER
from omnidaemon.envelope import encode_new
from omnidaemon.retry import Reject

if TYPE_CHECKING:
    from omnidaemon.agents import AgentSpec
    from omnidaemon.brokers.base import Broker
    from omnidaemon.context import Context
    from omnidaemon.debounce.spec import Check, Collected, DebounceSpec

__all__ = ["Checker", "Collector", "value_key"]

_MAX_KEY_CHARS = 200  # longer debounce keys are hashed: bus keys stay short
_ROUNDS = 5  # tries of a check whose window changes under it between its read and its write
# Tries of a collect that finds its window full and a sealed window before it. Each try
# publishes a window, so every try of every collector of the key makes progress; concurrent
# collectors of small windows (a few large messages each) may take several.
_FLUSH_ROUNDS = 100


def value_key(topic: str, agent: str, key: str) -> str:
    """The bus key of the windows of debounce key `key`."""
    if len(key) > _MAX_KEY_CHARS:
        key = "sha256=" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"debounce:{topic}:{agent}:{key}"


def _new_id() -> str:
    return secrets.token_hex(8)


class _Part:
    """What the collector and the checker share: the agent, its options, and publishing a
    check event to the agent's check topic."""

    def __init__(self, spec: AgentSpec, options: DebounceSpec) -> None:
        self._topic = spec.topic
        self._agent = spec.name
        self._options = options
        self._limits = options.limits

    def _value_key(self, key: str) -> str:
        return value_key(self._topic, self._agent, key)

    async def _publish_check(
        self, ctx: Context, broker: Broker, key: str, token: str, at: float
    ) -> None:
        _, data = encode_new(
            self._topic,
            {"key": key, "token": token},
            ctx.event.correlation_id,
            ctx.event.id,
            None,
            None,
            ctx.app.name,
            ctx.event.tenant_id,
        )
        await broker.publish(self._options.check_topic, data, delay=max(0.0, at - broker.clock()))

    async def _flush(self, ctx: Context, broker: Broker, key: str, sealed: dict[str, Any]) -> None:
        """Publish a sealed window's batch, then forget the window."""
        await self._publish_batch(ctx, broker, key, sealed)
        await broker.update_value(
            self._value_key(key),
            partial(window.remove_sealed, window_id=sealed["w"], limits=self._limits),
        )

    async def _publish_batch(
        self, ctx: Context, broker: Broker, key: str, sealed: dict[str, Any]
    ) -> None:
        messages = sealed["msgs"]
        first = messages[0]
        # The messages' run, if they are all of one: a batch mixing runs is a run of its own
        # (its own id), so cancelling one of those runs does not cancel the others' messages.
        runs = {m["cid"] for m in messages}
        _, data = encode_new(
            self._topic,
            [m["p"] for m in messages],
            runs.pop() if len(runs) == 1 else None,
            first["id"],
            None,
            None,
            ctx.app.name,
            first["tid"],
            {BATCH_IDS_HEADER: ",".join(m["id"] for m in messages), BATCH_KEY_HEADER: key},
        )
        # Keyed by the window: a check delivered again after a crash between this and
        # forgetting the window does not publish the batch twice.
        await broker.publish_once(
            self._options.batch_topic,
            data,
            f"debounce:{self._topic}:{self._agent}:{sealed['w']}",
            window=self._limits.retention,
        )


class Collector(_Part):
    """Adds each message of the agent's topic to its key's open window."""

    async def collect(self, payload: Collected, ctx: Context) -> None:
        """Collect one message (the handler of the agent's topic)."""
        key_of = self._options.key
        key = "" if key_of is None else str(key_of(payload.value))
        event = ctx.event
        message = window.record(
            event.id,
            event.created_at.timestamp(),
            payload.raw,
            event.correlation_id,
            event.tenant_id,
        )
        if message["n"] > self._limits.max_bytes:
            raise Reject(
                f"the message takes {message['n']:,} bytes in a window (its payload and ids), "
                f"more than a debounce window holds ({self._limits.max_bytes:,}: a quarter of "
                "OMNIDAEMON_MAX_PAYLOAD_BYTES)"
            )
        broker = ctx.app.broker
        name = self._value_key(key)
        fresh = (_new_id(), _new_id())
        for _ in range(_FLUSH_ROUNDS):
            added: window.Added = await broker.update_value(
                name,
                partial(
                    _add, message=message, now=broker.clock(), fresh=fresh, limits=self._limits
                ),
            )
            if added.flush is None:
                for token, at in added.checks:
                    await self._publish_check(ctx, broker, key, token, at)
                return
            # The window is full and the one sealed before it is not published yet (its
            # check is behind, or was lost): publish that one first, so that the key's value
            # holds one sealed window at most.
            await self._flush(ctx, broker, key, added.flush)
        raise RuntimeError(f"debounce window {key!r} kept changing; will try again")


def _add(
    value: bytes | None,
    *,
    message: dict[str, Any],
    now: float,
    fresh: tuple[str, str],
    limits: window.Limits,
) -> tuple[bytes, float, window.Added]:
    return window.add(value, message, now, fresh, limits)


class Checker(_Part):
    """Runs a window's checks: a due window is sealed and its batch published; one that is
    not due yet is handed to a new check, delayed until it is."""

    async def check(self, payload: Check, ctx: Context) -> None:
        """Handle one check (the handler of the agent's check topic)."""
        broker = ctx.app.broker
        name, limits = self._value_key(payload.key), self._limits
        for _ in range(_ROUNDS):
            now = broker.clock()
            decision = window.decide(
                window.decode(await broker.get_value(name)), payload.token, now, limits
            )
            if decision.action == "drop":
                return
            if decision.action == "resend":
                # Only a check delivered again (its worker died, or its handling failed) may
                # not have published its successor; a duplicate's first delivery, sending it
                # again, would keep a duplicate alive in every generation of the window.
                if ctx.attempt > 1:
                    await self._publish_check(
                        ctx, broker, payload.key, decision.token, decision.due
                    )
                return
            if decision.action == "wait":
                # The window records its new check before it is published: published first,
                # the check could come, find the window not yet its own, and stop. Should
                # this worker die in between, the check it handles is delivered again and
                # publishes the new one ("resend").
                token = _new_id()
                moved = await broker.update_value(
                    name,
                    partial(
                        window.reschedule,
                        token=payload.token,
                        new_token=token,
                        due=decision.due,
                        limits=limits,
                    ),
                )
                if moved:
                    await self._publish_check(ctx, broker, payload.key, token, decision.due)
                    return
                continue  # sealed, or handed on by a duplicate: look again
            if decision.action == "seal":
                decision = await broker.update_value(
                    name, partial(window.seal_due, token=payload.token, now=now, limits=limits)
                )
                if decision.action not in ("publish", "flush"):
                    continue
            assert decision.sealed is not None
            await self._flush(ctx, broker, payload.key, decision.sealed)
            if decision.action == "publish":
                return
            # "flush": the window sealed before this one went out first; now seal this one.
        raise RuntimeError(f"debounce window {payload.key!r} kept changing; will try again")
