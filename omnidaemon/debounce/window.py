"""The windows of one debounce key: a JSON value on the bus, changed only by the pure functions
here, run through `Broker.update_value` (atomic on every bus; a function may run more than once).

A key's value holds:

- `open`: the window collecting messages now, or none: its id `w`, the token `t` of the check
  that currently owns it, when that check is due (`at`), the token `p` of the check that
  handed it on (so that check, delivered again, publishes `t` again), when its first and
  last messages were collected (`first`, `last`, by the bus's clock), the bytes its messages
  take (`bytes`), whether it is `full`, when a collect last re-sent its overdue check (`h`)
  and the messages;
- `sealed`: the window closed for flushing whose batch is not yet confirmed published, with
  the token of the check that publishes it, when it was sealed (`at`) and last healed (`h`).
  A list, but of at most one: a window is sealed only once the one sealed before it is
  published (whoever wants to seal publishes that one first: `Added.flush`, `"flush"`);
- `done`: the ids of messages flushed recently, with when: a redelivered message (its first
  collect crashed before its ack) is not collected twice. At most `max_done` ids and
  `max_done_bytes` bytes of them, the newest.

So the value is at most two windows of `max_bytes` (each message counts its whole record,
`n`), plus `max_done_bytes`, plus a few hundred bytes of ids and times.

A message is `{"id", "c": created_at (epoch seconds), "p": payload, "cid": correlation id,
"tid": tenant id, "n": the bytes it takes in the value}` (made by `record`). No I/O here; see
`omnidaemon.debounce.handlers`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

__all__ = [
    "Added",
    "Decision",
    "Limits",
    "add",
    "decide",
    "decode",
    "record",
    "remove_sealed",
    "reschedule",
    "seal_due",
]

State = dict[str, Any]
HOLD_TTL = 30 * 86_400.0
"""Seconds a key's value lives while it holds messages (renewed by every change): only a
fleet stopped for longer than this loses an open window."""
_N_BYTES = 16  # what `,"n":<up to 10 digits>` and the list's comma add to a record


@dataclass(frozen=True, slots=True)
class Limits:
    """A debounced agent's timing and bounds, in seconds, counts and bytes."""

    debounce: float
    max_wait: float
    max_messages: int
    max_bytes: int  # of a window's message records (their `n`)
    retention: float  # seconds a flushed message's id is remembered
    max_done: int  # most flushed ids remembered per key
    heal_after: float  # seconds overdue before a collect re-sends a check (at most this often)
    max_done_bytes: int = 131_072  # most bytes of flushed ids remembered per key


@dataclass(frozen=True, slots=True)
class Added:
    """What collecting one message did: whether it was already there, the checks to publish
    as `(token, due at)`, and `flush`: a sealed window to publish (and forget) before the
    message can be collected, which was not collected yet (call `add` again after)."""

    duplicate: bool
    checks: tuple[tuple[str, float], ...]
    flush: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    """What a check should do: `"drop"` (not its window any more), `"wait"` until `due`,
    `"seal"` the window now, `"publish"` the sealed window `sealed`, `"flush"` the sealed
    window `sealed` of an earlier check (publish and forget it, then look again: a window is
    sealed only once the one before it is published), or `"resend"` the check `token` due at
    `due` (it handed the window on to that check, which may not have been published: its
    worker may have died in between)."""

    action: str
    due: float = 0.0
    sealed: dict[str, Any] | None = None
    token: str = ""


def record(
    message_id: str,
    created: float,
    payload: Any,
    correlation_id: str | None,
    tenant_id: str | None,
) -> dict[str, Any]:
    """A message as a window stores it, with `n`: the bytes it takes in the key's value."""
    message = {"id": message_id, "c": created, "p": payload, "cid": correlation_id,
               "tid": tenant_id}  # fmt: skip
    message["n"] = len(orjson.dumps(message)) + _N_BYTES
    return message


def decode(value: bytes | None) -> State:
    """A key's state from its value (an absent value is an empty state)."""
    state: State = orjson.loads(value) if value else {}
    state.setdefault("open", None)
    state.setdefault("sealed", [])
    state.setdefault("done", {})
    return state


def _encode(state: State, limits: Limits) -> tuple[bytes, float]:
    holds = state["open"] is not None or bool(state["sealed"])
    return orjson.dumps(state), HOLD_TTL if holds else limits.retention


def _prune_done(state: State, now: float, limits: Limits) -> None:
    done: dict[str, float] = state["done"]
    horizon = now - limits.retention
    kept = {i: at for i, at in done.items() if at > horizon}
    if len(kept) > limits.max_done:  # the oldest go first (dicts keep insertion order)
        kept = dict(list(kept.items())[-limits.max_done :])
    if len(orjson.dumps(kept)) > limits.max_done_bytes:  # long ids: the newest that fit
        budget, newest = limits.max_done_bytes - 2, []  # 2: the braces
        for i, at in reversed(kept.items()):
            budget -= len(orjson.dumps(i)) + len(orjson.dumps(at)) + 2  # `:` and `,`
            if budget < 0:
                break
            newest.append((i, at))
        kept = dict(reversed(newest))
    state["done"] = kept


def _due(window: dict[str, Any], limits: Limits) -> float:
    if window.get("full"):
        return float(window["last"])
    return float(min(window["last"] + limits.debounce, window["first"] + limits.max_wait))


def _seal(state: State, now: float) -> dict[str, Any]:
    """Close the open window: its messages in publish order (created_at, then id: ids of
    one publisher grow in publish order), remembered as done."""
    window = state["open"]
    state["open"] = None
    messages = sorted(window["msgs"], key=lambda m: (m["c"], m["id"]))
    sealed = {"w": window["w"], "t": window["t"], "at": now, "msgs": messages}
    state["sealed"].append(sealed)
    at = round(now, 3)  # a flushed id costs less in the value
    for m in messages:
        state["done"][m["id"]] = at
    return sealed


def _overdue(window: dict[str, Any], now: float, limits: Limits) -> bool:
    """Whether a window's check is `heal_after` overdue and was not re-sent in the last
    `heal_after` (recording that it is now): lost, or dead-lettered."""
    heal_after = limits.heal_after
    if now <= window.get("at", 0.0) + heal_after or now <= window.get("h", 0.0) + heal_after:
        return False
    window["h"] = now
    return True


def add(
    value: bytes | None,
    message: dict[str, Any],
    now: float,
    fresh: tuple[str, str],
    limits: Limits,
) -> tuple[bytes, float, Added]:
    """Collect `message` into the key's open window (opening one, with `fresh` = (window id,
    token), if none is open); an `update_value` function."""
    state = decode(value)
    _prune_done(state, now, limits)
    message_id = message["id"]
    window = state["open"]
    if (
        message_id in state["done"]
        or any(m["id"] == message_id for s in state["sealed"] for m in s["msgs"])
        or (window is not None and any(m["id"] == message_id for m in window["msgs"]))
    ):
        # A redelivery: its first collect may have died before publishing the checks it
        # asked for (the open window's, or the one of the window it sealed). Publishing them
        # again is harmless (a duplicate check dies out).
        again = [(s["t"], now) for s in state["sealed"]]
        if window is not None:
            again.append((window["t"], window["at"]))
        return *_encode(state, limits), Added(True, tuple(again))
    checks: dict[str, float] = {}
    for sealed in state["sealed"]:
        if _overdue(sealed, now, limits):
            checks[sealed["t"]] = now
    if window is not None and _overdue(window, now, limits):
        checks[window["t"]] = now
    if (
        window is not None
        and window["msgs"]
        and (
            len(window["msgs"]) >= limits.max_messages
            or window["bytes"] + message["n"] > limits.max_bytes
        )
    ):
        if state["sealed"]:  # one sealed window at a time: it goes out first
            return *_encode(state, limits), Added(False, (), flush=state["sealed"][0])
        sealed = _seal(state, now)  # it cannot take this message: flush it at once
        _prune_done(state, now, limits)
        checks[sealed["t"]] = now
        window = None
    if window is None:
        window_id, token = fresh
        window = {
            "w": window_id,
            "t": token,
            "at": now + limits.debounce,
            "first": now,
            "last": now,
            "bytes": 0,
            "msgs": [],
        }
        state["open"] = window
        checks[token] = window["at"]
    window["msgs"].append(message)
    window["last"] = now
    window["bytes"] += message["n"]
    if len(window["msgs"]) >= limits.max_messages or window["bytes"] >= limits.max_bytes:
        # Full: its check is due now (it seals the window, after publishing any sealed one).
        window["full"] = True
        window["at"] = now
        checks[window["t"]] = now
    return *_encode(state, limits), Added(False, tuple(checks.items()))


def decide(state: State, token: str, now: float, limits: Limits) -> Decision:
    """What the check `token` should do with the key's state, at `now`."""
    for sealed in state["sealed"]:
        if sealed["t"] == token:
            return Decision("publish", sealed=sealed)
    window = state["open"]
    if window is not None and window["t"] != token and window.get("p") == token:
        return Decision("resend", due=window["at"], token=window["t"])
    if window is None or window["t"] != token:
        return Decision("drop")
    due = _due(window, limits)
    if now < due:
        return Decision("wait", due=due)
    if state["sealed"]:
        return Decision("flush", sealed=state["sealed"][0])
    return Decision("seal")


def seal_due(
    value: bytes | None, token: str, now: float, limits: Limits
) -> tuple[bytes, float, Decision]:
    """Seal the open window if the check `token` owns it and it is due; an `update_value`
    function whose answer is `decide`'s, with `"seal"` done (answered as `"publish"`)."""
    state = decode(value)
    decision = decide(state, token, now, limits)
    if decision.action == "seal":
        decision = Decision("publish", sealed=_seal(state, now))
        _prune_done(state, now, limits)
    return *_encode(state, limits), decision


def reschedule(
    value: bytes | None, token: str, new_token: str, due: float, limits: Limits
) -> tuple[bytes, float, bool]:
    """Hand the open window from the check `token` to the check `new_token`, due at `due`,
    if `token` still owns it (a compare-and-set: of duplicate checks, one goes on). The new
    check is published after this: published before, it could come, find the window not yet
    its own, and stop."""
    state = decode(value)
    window = state["open"]
    if window is None or window["t"] != token:
        return *_encode(state, limits), False
    window["p"] = token
    window["t"] = new_token
    window["at"] = due
    return *_encode(state, limits), True


def remove_sealed(value: bytes | None, window_id: str, limits: Limits) -> tuple[bytes, float, None]:
    """Forget the sealed window `window_id`: its batch is on the bus."""
    state = decode(value)
    state["sealed"] = [s for s in state["sealed"] if s["w"] != window_id]
    return *_encode(state, limits), None
