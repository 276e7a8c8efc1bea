"""The windows of one debounce key: a JSON value on the bus, changed only by the pure functions
here, run through `Broker.update_value` (atomic on every bus; a function may run more than once).

A key's value holds:

- `open`: the window collecting messages now, or none: its id `w`, the token `t` of the check
  that currently owns it, when that check is due (`at`), the token `p` of the check that
  handed it on (so that check, delivered again, publishes `t` again), when its first and
  last messages were collected (`first`, `last`, by the bus's clock) and the messages;
- `sealed`: windows closed for flushing whose batch is not yet confirmed published, each
  with the token of the check that publishes it;
- `done`: the ids of messages flushed recently, with when: a redelivered message (its first
  collect crashed before its ack) is not collected twice.

A message is `{"id", "c": created_at (epoch seconds), "p": payload, "cid": correlation id,
"tid": tenant id, "n": payload bytes}`. No I/O here; see `omnidaemon.debounce.handlers`.
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
    "remove_sealed",
    "reschedule",
    "seal_due",
]

State = dict[str, Any]
HOLD_TTL = 30 * 86_400.0
"""Seconds a key's value lives while it holds messages (renewed by every change): only a
fleet stopped for longer than this loses an open window."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A debounced agent's timing and bounds, in seconds and counts."""

    debounce: float
    max_wait: float
    max_messages: int
    max_bytes: int
    retention: float  # seconds a flushed message's id is remembered
    max_done: int  # most flushed ids remembered per key
    heal_after: float  # seconds past its due time before a collect republishes a check


@dataclass(frozen=True, slots=True)
class Added:
    """What collecting one message did: whether it was already there, and the checks to
    publish as `(token, due at)`."""

    duplicate: bool
    checks: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """What a check should do: `"drop"` (not its window any more), `"wait"` until `due`,
    `"seal"` the window now, `"publish"` the sealed window `sealed`, or `"resend"` the check
    `token` due at `due` (it handed the window on to that check, which may not have been
    published: its worker may have died in between)."""

    action: str
    due: float = 0.0
    sealed: dict[str, Any] | None = None
    token: str = ""


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
    state["done"] = kept


def _due(window: dict[str, Any], limits: Limits) -> float:
    return float(min(window["last"] + limits.debounce, window["first"] + limits.max_wait))


def _seal(state: State, now: float) -> dict[str, Any]:
    """Close the open window: its messages in publish order (created_at, then id: ids of
    one publisher grow in publish order), remembered as done."""
    window = state["open"]
    state["open"] = None
    messages = sorted(window["msgs"], key=lambda m: (m["c"], m["id"]))
    sealed = {"w": window["w"], "t": window["t"], "msgs": messages}
    state["sealed"].append(sealed)
    for m in messages:
        state["done"][m["id"]] = now
    return sealed


def _full(window: dict[str, Any], limits: Limits) -> bool:
    return len(window["msgs"]) >= limits.max_messages or window["bytes"] >= limits.max_bytes


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
    if message_id in state["done"] or any(
        m["id"] == message_id for s in state["sealed"] for m in s["msgs"]
    ):
        return *_encode(state, limits), Added(True, ())
    window = state["open"]
    if window is not None and any(m["id"] == message_id for m in window["msgs"]):
        # A redelivery: its first collect may have died before publishing the window's
        # check. Publishing it again is harmless (a duplicate check dies out).
        return *_encode(state, limits), Added(True, ((window["t"], window["at"]),))
    checks: dict[str, float] = {}
    if window is not None and now > window["at"] + limits.heal_after:
        checks[window["t"]] = now  # its check is long overdue: lost, or a dead letter
    if (
        window is not None
        and window["msgs"]
        and (
            len(window["msgs"]) >= limits.max_messages
            or window["bytes"] + message["n"] > limits.max_bytes
        )
    ):
        sealed = _seal(state, now)  # it cannot take this message: flush it at once
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
    if _full(window, limits):
        sealed = _seal(state, now)
        checks[sealed["t"]] = now
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
    return Decision("seal") if now >= due else Decision("wait", due=due)


def seal_due(
    value: bytes | None, token: str, now: float, limits: Limits
) -> tuple[bytes, float, Decision]:
    """Seal the open window if the check `token` owns it and it is due; an `update_value`
    function whose answer is `decide`'s, with `"seal"` done (answered as `"publish"`)."""
    state = decode(value)
    decision = decide(state, token, now, limits)
    if decision.action == "seal":
        decision = Decision("publish", sealed=_seal(state, now))
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
