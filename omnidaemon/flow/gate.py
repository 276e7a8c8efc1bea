"""Admission of one agent's events in one worker: rate limits, budgets and per-key slots.

Before a handler starts, `FlowGate.admit` asks each of the agent's limits, on the bus, in one
atomic step each (`Broker.update_value`): the key's concurrency slots first, then the rate
limit, then each budget. The first that refuses gives the time to ask again; what the ones
before it granted is given back, so a refused event holds nothing. The consume loop then puts
the event back on the bus for that long (`Broker.retry` with the same attempt): it waits
there without a lease, without counting an attempt, and without a handler slot, so the
agent's events of other keys go on. Its copy carries `WAITED_HEADER`, so that when it comes
back it goes before events that have not waited yet (see `omnidaemon.flow.state`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from omnidaemon.brokers.base import Broker
from omnidaemon.brokers.stores import R
from omnidaemon.flow import state
from omnidaemon.flow.batching import StateUpdates
from omnidaemon.flow.limits import Budget, FlowSpec
from omnidaemon.flow.starts import FetchStarts
from omnidaemon.observability.logging import Logger

if TYPE_CHECKING:
    from omnidaemon.envelope import Envelope

__all__ = ["WAITED_HEADER", "Admission", "FlowGate", "Refusal", "mark_waited", "state_key"]

WAITED_HEADER = "omnidaemon-waited"
"""Header of an event put back by flow control: when it was first refused (`Broker.clock`
seconds). Set on the agent's own copy only; handlers may read it."""

_QUIET = 10.0  # seconds without a refusal before an agent counts as no longer throttled
_MAX_KEY = 120  # longer keys are hashed: they name values on the bus


def state_key(kind: str, *parts: str) -> str:
    """The bus key of a limit's state: `flow:<kind>:<part>:...` (long parts hashed)."""
    # ':' is escaped inside a part: agent `a` with key `b` and agent `a:b` are two states.
    safe = [
        part.replace("%", "%25").replace(":", "%3A")
        if len(part) <= _MAX_KEY
        else "sha256-" + hashlib.sha256(part.encode()).hexdigest()
        for part in parts
    ]
    return ":".join(("flow", kind, *safe))


def mark_waited(data: bytes, since: float) -> bytes:
    """The event's bytes with `WAITED_HEADER` set (kept from an earlier refusal)."""
    envelope = orjson.loads(data)
    headers = envelope.get("headers") or {}
    headers.setdefault(WAITED_HEADER, f"{since:.6f}")
    envelope["headers"] = headers
    return orjson.dumps(envelope)


@dataclass(slots=True)
class Admission:
    """What a started event holds until its handler ends.

    Attributes:
        started: When it was admitted (`Broker.clock` seconds).
        slot: `(state key, token)` of its concurrency slot, if the agent has key_concurrency.
        reserved: Budget units reserved at admission, by budget name; a charge settles them.
        waited: Seconds it waited on the bus before it was admitted.
    """

    started: float
    slot: tuple[str, str] | None = None
    reserved: dict[str, float] = field(default_factory=dict)
    waited: float = 0.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an event may not start yet, and when to ask again.

    Attributes:
        wait: Seconds to wait on the bus.
        reason: `"rate_limit"`, `"budget"` or `"key_concurrency"`.
        detail: For the log: which limit, and which key or budget.
        since: When the event was first refused (`Broker.clock` seconds).
    """

    wait: float
    reason: str
    detail: str
    since: float


class FlowGate:
    """Admits one agent's events in one worker, and tracks what the admitted ones hold."""

    def __init__(
        self,
        broker: Broker,
        agent: str,
        flow: FlowSpec,
        *,
        lease: float,
        consumer: str,
        budgets: Mapping[str, Budget],
        log: Logger,
    ) -> None:
        self._broker = broker
        self._agent = agent
        self._flow = flow
        self._lease = lease
        self._consumer = consumer
        self._budgets = budgets  # every budget of the app, for charges of undeclared ones
        self._log = log
        self._held: dict[str, set[str]] = {}  # slot state key -> tokens this worker holds
        self._throttled: str | None = None
        self._updates = StateUpdates(broker)
        self._rate_key = state_key("rate", agent)  # the agent-wide rate limit's state
        self.starts: FetchStarts | None = None
        """The agent-wide rate limit's starts, taken before each fetch, on a bus that may
        leave events unread while they wait (`Broker.waits_unread`); else `None`."""
        if flow.rate_limit is not None and flow.rate_limit_key is None and broker.waits_unread:
            self.starts = FetchStarts(
                flow.rate_limit,
                self._rate_key,
                self._updates,
                on_refused=self._starts_refused,
                on_granted=lambda: self._quiet(self._broker.clock()),
            )
        self._last_refusal = 0.0

    # Admission ----------------------------------------------------------------------------

    @property
    def only_rate_limit(self) -> bool:
        """Whether an agent-wide rate limit taken before the fetch (`starts`) is all the agent
        declares: an event whose start was taken is then admitted with no more to ask."""
        flow = self._flow
        return self.starts is not None and flow.key_concurrency is None and not flow.budgets

    def _starts_refused(self, wait: float) -> None:
        now = self._broker.clock()
        if self._throttled is None:
            self._refused(state.Decision(False, wait), "rate_limit", self._rate_key, now)
        else:
            self._last_refusal = now

    async def admit(self, envelope: Envelope[Any], *, paid: bool = False) -> Admission | Refusal:
        """Ask every limit of the agent for this event, in order; give back what was granted
        if a later one refuses. `paid`: the event's start of the agent-wide rate limit was
        taken before it was fetched (`starts`).

        Raises:
            Exception: whatever a key or estimate function raised (a bug, or a payload they do
                not expect); the caller fails the attempt like a handler's exception.
        """
        flow = self._flow
        payload = envelope.payload
        now = self._broker.clock()
        since_header = envelope.headers.get(WAITED_HEADER)
        waited = since_header is not None
        since = now if since_header is None else _float(since_header, now)
        admission = Admission(started=now, waited=max(0.0, now - since) if waited else 0.0)
        # An event that would expire before its turn must not take a turn from the others.
        deadline = envelope.expires_at.timestamp() if envelope.expires_at else math.inf
        # Every key and estimate first: a function that raises must find nothing taken.
        slot_key = rate_key = None
        if flow.key_concurrency is not None:
            assert flow.concurrency_key is not None
            slot_key = state_key("slots", self._agent, str(flow.concurrency_key(payload)))
        if flow.rate_limit is not None and not paid:
            parts = [self._agent]
            if flow.rate_limit_key is not None:
                parts.append(str(flow.rate_limit_key(payload)))
            rate_key = state_key("rate", *parts)
        estimates = self._estimates(payload) if flow.budgets else {}
        if paid:
            admission.reserved[self._rate_key] = 1.0  # given back if another limit refuses
        try:
            refusal = await self._take_all(
                admission, envelope.id, slot_key, rate_key, estimates, waited, deadline, since
            )
        except BaseException:
            # The bus failed (or the task was cancelled) between two limits: what the first
            # ones granted goes back, or a slot would stay taken for as long as this worker
            # lives (its renewals would keep it).
            with anyio.CancelScope(shield=True):
                await self.release(admission, ran=False)
            raise
        if refusal is not None:
            return refusal
        self._quiet(now)
        return admission

    async def _take_all(
        self,
        admission: Admission,
        event_id: str,
        slot_key: str | None,
        rate_key: str | None,
        estimates: dict[str, float],
        waited: bool,
        deadline: float,
        since: float,
    ) -> Refusal | None:
        """Take the event's slot, rate-limit start and budget reservations, in that order,
        into `admission`; the refusal of the first limit that says no (after giving back
        what the earlier ones granted), else `None`."""
        flow = self._flow
        if slot_key is not None:
            token = f"{self._consumer}:{event_id}:{os.urandom(3).hex()}"
            decision = await self._take_slot(slot_key, token, waited, deadline)
            if not decision.admitted:
                await self.release(admission, ran=False)
                return self._refused(decision, "key_concurrency", slot_key, since)
            admission.slot = (slot_key, token)
        if rate_key is not None:
            limit = flow.rate_limit
            assert limit is not None
            decision = await self._take(
                rate_key, 1.0, 1.0 / limit.interval, limit.burst, waited, deadline
            )
            if not decision.admitted:
                await self.release(admission, ran=False)
                return self._refused(decision, "rate_limit", rate_key, since)
            admission.reserved[rate_key] = decision.cost  # given back if a budget refuses
        for name, budget in flow.budgets.items():
            key = state_key("budget", name)
            decision = await self._take(
                key, estimates.get(name), budget.rate, budget.amount, waited, deadline
            )
            if not decision.admitted:
                await self.release(admission, ran=False)
                return self._refused(decision, "budget", key, since)
            admission.reserved[name] = decision.cost
        if flow.rate_limit is not None:
            # Kept only to give it back above: a start, once made, is never refunded.
            admission.reserved = {
                name: cost for name, cost in admission.reserved.items() if name in flow.budgets
            }
        return None

    def _quiet(self, now: float) -> None:
        if self._throttled is not None and now - self._last_refusal > _QUIET:
            self._log.info("no longer throttled", was=self._throttled)
            self._throttled = None

    def _estimates(self, payload: Any) -> dict[str, float]:
        estimate = self._flow.estimate
        if estimate is None:
            return {}
        value = estimate(payload)
        units = (
            {str(name): float(v) for name, v in value.items()}
            if isinstance(value, Mapping)
            else dict.fromkeys(self._flow.budgets, float(value))
        )
        for name, amount in units.items():
            if not math.isfinite(amount) or amount < 0:
                raise ValueError(f"estimate= gave {amount!r} units of {name!r}: not a number >= 0")
        return units

    def _refused(self, decision: state.Decision, reason: str, key: str, since: float) -> Refusal:
        refusal = Refusal(decision.wait, reason, key.split(":", 2)[-1], since)
        self._last_refusal = self._broker.clock()
        self._log.debug(
            "not started yet: waits on the bus",
            reason=reason,
            key=refusal.detail,
            wait=round(decision.wait, 3),
            waiting_since=round(self._last_refusal - since, 3),
        )
        if self._throttled is None:
            self._throttled = f"{reason} {refusal.detail}"
            self._log.info(
                "throttled: events wait on the bus until the limit allows them",
                reason=reason,
                limit=self._describe(reason),
                key=refusal.detail,
            )
        return refusal

    def _describe(self, reason: str) -> str:
        flow = self._flow
        if reason == "rate_limit":
            return str(flow.rate_limit)
        if reason == "key_concurrency":
            return f"{flow.key_concurrency} per key"
        return ", ".join(str(b) for b in flow.budgets.values())

    async def _update(
        self, key: str, step: Callable[[bytes | None, float], tuple[bytes, float, R]]
    ) -> R:
        return await self._updates.apply(key, step)

    async def _take(
        self,
        key: str,
        cost: float | None,
        rate: float,
        capacity: float,
        waited: bool,
        deadline: float,
    ) -> state.Decision:
        def step(data: bytes | None, now: float) -> tuple[bytes, float, state.Decision]:
            new, decision = state.bucket_take(
                data,
                now,
                cost=cost,
                rate=rate,
                capacity=capacity,
                waited=waited,
                deadline=deadline,
            )
            return new, state.bucket_ttl(new, now, rate=rate, capacity=capacity), decision

        return await self._update(key, step)

    async def _take_slot(
        self, key: str, token: str, waited: bool, deadline: float
    ) -> state.Decision:
        limit = self._flow.key_concurrency
        assert limit is not None
        lease = self._lease

        def step(data: bytes | None, now: float) -> tuple[bytes, float, state.Decision]:
            new, decision = state.slots_take(
                data, now, token=token, limit=limit, lease=lease, waited=waited, deadline=deadline
            )
            return new, state.slots_ttl(new, now, lease=lease), decision

        decision = await self._update(key, step)
        if decision.admitted:
            self._held.setdefault(key, set()).add(token)
        return decision

    # While and after it runs ---------------------------------------------------------------

    async def release(self, admission: Admission, *, ran: bool = True) -> None:
        """Free the event's slot. With `ran=False` (a later limit refused it), also give back
        the rate limit's and budgets' reservations."""
        now = self._broker.clock()
        if admission.slot is not None:
            key, token = admission.slot
            admission.slot = None
            held = now - admission.started if ran else None
            tokens = self._held.get(key)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._held[key]

            def free(data: bytes | None, now: float) -> tuple[bytes, float, None]:
                new = state.slots_release(data, now, token=token, held=held)
                return new, state.slots_ttl(new, now, lease=self._lease), None

            await self._update(key, free)
        if ran:
            return
        for name, cost in admission.reserved.items():
            rate, capacity = self._bucket_of(name)
            key = name if name.startswith("flow:") else state_key("budget", name)

            def refund(
                data: bytes | None,
                now: float,
                cost: float = cost,
                rate: float = rate,
                capacity: float = capacity,
            ) -> tuple[bytes, float, None]:
                new = state.bucket_refund(data, now, cost=cost, rate=rate)
                return new, state.bucket_ttl(new, now, rate=rate, capacity=capacity), None

            await self._update(key, refund)
        admission.reserved.clear()

    def _bucket_of(self, name: str) -> tuple[float, float]:
        """`(rate, capacity)` of a reservation's bucket: a budget by name, or the rate limit
        by its state key."""
        if name.startswith("flow:"):
            limit = self._flow.rate_limit
            assert limit is not None
            return 1.0 / limit.interval, float(limit.burst)
        budget = self._budgets[name]
        return budget.rate, budget.amount

    async def charge(self, admission: Admission | None, name: str, used: float) -> None:
        """Subtract `used` units from budget `name`, settling what the event reserved of it.

        Raises:
            ValueError: no agent of the app declares a budget called `name`, or `used` is
                negative or not a number.
        """
        budget = self._budgets.get(name)
        if budget is None:
            known = ", ".join(sorted(self._budgets)) or "none"
            raise ValueError(f"no agent of this app declares a budget {name!r} (budgets: {known})")
        if not isinstance(used, int | float) or used != used or used < 0:
            raise ValueError(f"a charge is a number of units >= 0, not {used!r}")
        reserved = admission.reserved.pop(name, 0.0) if admission is not None else 0.0

        def settle(data: bytes | None, now: float) -> tuple[bytes, float, None]:
            new = state.bucket_charge(
                data, now, used=float(used), reserved=reserved, rate=budget.rate
            )
            return new, state.bucket_ttl(new, now, rate=budget.rate, capacity=budget.amount), None

        await self._update(state_key("budget", name), settle)

    async def renew(self) -> list[str]:
        """Renew the leases of the slots this worker holds; return the tokens it lost (a
        pause longer than the lease let them run out)."""
        lost: list[str] = []
        for key, tokens in list(self._held.items()):
            held = sorted(tokens)

            def extend(
                data: bytes | None, now: float, held: list[str] = held
            ) -> tuple[bytes, float, list[str]]:
                new, gone = state.slots_renew(data, now, tokens=held, lease=self._lease)
                return new, state.slots_ttl(new, now, lease=self._lease), gone

            lost.extend(await self._update(key, extend))
        return lost


def _float(text: str, default: float) -> float:
    try:
        value = float(text)
    except ValueError:
        return default
    return value if value == value else default
