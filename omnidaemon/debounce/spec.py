"""What `@app.agent(..., debounce=...)` declares, checked at decoration time, and the three
agents a debounced agent runs as underneath (see `omnidaemon.debounce`).

A debounced agent `A` on topic `T` whose handler takes `list[X]` is registered as one agent
(topic `T`, payload type `X`: what the topic carries), and runs as three consumers, all of
consumer group `A`:

- *collect*, on `T`: validates each message as `X` and adds it to its key's window;
- *checks*, on `T#debounce-checks.A`: the window timers (delayed events), which seal a due
  window and publish its batch;
- *batches*, on `T#debounce.A`: the user's handler, run with `list[X]`, with every policy of
  the agent (retries, dead letters, timeout, results, idempotency, flow control).

`#` is never part of a topic name, so no user topic collides with these (priority lanes use
`T#high` and `T#low` the same way).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, WrapValidator

from omnidaemon.debounce.window import Limits
from omnidaemon.envelope import Envelope
from omnidaemon.retry import Backoff, RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable

    from omnidaemon.agents import AgentSpec

__all__ = [
    "BATCH_IDS_HEADER",
    "BATCH_KEY_HEADER",
    "MAX_WINDOW_MESSAGES",
    "Check",
    "Collected",
    "DebounceSpec",
    "batch_topic",
    "check_topic",
    "consumer_specs",
    "debounced_spec",
    "is_internal_topic",
]

MAX_WINDOW_MESSAGES = 500
"""Most messages one window holds: the window that reaches it is flushed at once."""
WINDOW_BYTES_SHARE = 4
"""A window holds at most `max_payload_bytes // 4` of messages (256 KiB by default; a message
counts its payload and ids), so that its batch, and the key's value on the bus (at most two
windows and the flushed ids), stay well under the bus's size limits."""
MAX_DONE = 2000  # flushed message ids remembered per key, for duplicate redeliveries
DONE_BYTES_SHARE = 8
"""The flushed ids of a key take at most `max_payload_bytes // 8` (128 KiB by default): the
key's value is at most 5/8 of `max_payload_bytes`, and a few hundred bytes."""
MIN_RETENTION = 600.0  # seconds a flushed message's id is remembered, at least
BATCH_IDS_HEADER = "omnidaemon-batch-ids"
"""Header of a batch: the ids of its messages, comma-separated, in the batch's order."""
BATCH_KEY_HEADER = "omnidaemon-batch-key"
"""Header of a batch: its debounce key."""
_CHECKS = "#debounce-checks."
_BATCHES = "#debounce."
# A check's failure is the bus failing: try for long (about an hour) before giving up, since
# a dead-lettered check leaves its window waiting for the key's next message.
_CHECK_POLICY = RetryPolicy(max_retries=120, backoff=Backoff(initial=0.5, maximum=30.0))


def check_topic(topic: str, agent: str) -> str:
    """The bus topic of the agent's window checks."""
    return f"{topic}{_CHECKS}{agent}"


def batch_topic(topic: str, agent: str) -> str:
    """The bus topic of the agent's batches."""
    return f"{topic}{_BATCHES}{agent}"


def is_internal_topic(name: str) -> bool:
    """Whether a bus topic is a debounced agent's checks or batches."""
    return _BATCHES in name or _CHECKS in name


def is_check_topic(name: str) -> bool:
    """Whether `name` is a debounced agent's topic of window timers (never cancelled: a check
    serves every message of its window, whatever run each belongs to)."""
    return _CHECKS in name


class Check(BaseModel):
    """A window check: the key, and the token of the check (which owns the window if the
    window still records it)."""

    model_config = ConfigDict(frozen=True)

    key: str
    token: str


@dataclass(frozen=True, slots=True)
class Collected:
    """A message as the collector receives it: the payload as published (JSON data, what the
    batch carries) and validated (what the key function sees)."""

    raw: Any
    value: Any


def _keep_raw(value: Any, handler: Any) -> Collected:
    return Collected(value, handler(value))


@dataclass(frozen=True, slots=True)
class DebounceSpec:
    """An agent's debounce options and the agents it runs as.

    Attributes:
        seconds: Quiet seconds after a key's last message before its window is flushed.
        max_wait: Seconds after a window's first message by which it is flushed anyway.
        key: The payload's key function (`None`: one window for the agent).
        message_type: The type of one message (`X` of the handler's `list[X]`).
        check_topic: The bus topic of the window checks.
        batch_topic: The bus topic of the batches.
        limits: Timing and bounds of the windows.
        parts: The collect, check and batch agents a worker runs for it.
    """

    seconds: float
    max_wait: float
    key: Callable[[Any], Any] | None
    message_type: Any
    check_topic: str
    batch_topic: str
    limits: Limits
    parts: tuple[AgentSpec, ...] = ()

    def describe(self) -> dict[str, Any]:
        """The options as JSON data (`agents --json`, the topology)."""
        return {
            "seconds": self.seconds,
            "max_wait": self.max_wait,
            "keyed": self.key is not None,
            "max_messages": self.limits.max_messages,
            "max_bytes": self.limits.max_bytes,
            "batch_topic": self.batch_topic,
            "check_topic": self.check_topic,
        }


def _seconds(value: float | timedelta, what: str, qualname: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise TypeError(f"{qualname}: {what} takes seconds or a timedelta, not {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0 or seconds == float("inf"):
        raise ValueError(f"{qualname}: {what} must be a positive duration, not {value!r}")
    return seconds


def _element_type(spec: AgentSpec) -> Any:
    tp = spec.payload_type
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is not list or len(args) != 1:
        raise TypeError(
            f"{spec.handler.__qualname__}: a debounced handler takes the whole burst: annotate "
            f"its payload parameter `list[X]` (X: the type of one message), not {tp!r}"
        )
    return args[0]


def debounced_spec(
    spec: AgentSpec,
    *,
    debounce: float | timedelta | None,
    key: Callable[[Any], Any] | None,
    max_wait: float | timedelta | None,
    max_payload_bytes: int,
) -> AgentSpec:
    """`spec` with its debounce options (unchanged without them); raise `TypeError` or
    `ValueError` for unusable ones."""
    qualname = spec.handler.__qualname__
    if debounce is None:
        if key is not None or max_wait is not None:
            raise ValueError(f"{qualname}: debounce_key and debounce_max_wait need debounce=")
        return spec
    seconds = _seconds(debounce, "debounce", qualname)
    wait = seconds if max_wait is None else _seconds(max_wait, "debounce_max_wait", qualname)
    if wait < seconds:
        raise ValueError(
            f"{qualname}: debounce_max_wait ({wait:g} s) must be at least debounce ({seconds:g} s)"
        )
    if key is not None and not callable(key):
        raise TypeError(f"{qualname}: debounce_key must be a function of the payload")
    message_type = _element_type(spec)
    try:
        message_adapter: TypeAdapter[Envelope[Any]] = TypeAdapter(Envelope[message_type])  # type: ignore[valid-type]
        collect_adapter: TypeAdapter[Envelope[Any]] = TypeAdapter(
            Envelope[Annotated[message_type, WrapValidator(_keep_raw)]]  # type: ignore[valid-type]
        )
    except Exception as exc:  # pydantic's schema errors, as build_agent_spec reports them
        raise TypeError(f"{qualname}: cannot validate messages of type {message_type!r}") from exc
    limits = Limits(
        debounce=seconds,
        max_wait=wait,
        max_messages=MAX_WINDOW_MESSAGES,
        max_bytes=max(1, max_payload_bytes // WINDOW_BYTES_SHARE),
        retention=max(MIN_RETENTION, 10 * spec.reclaim_idle, 2 * wait),
        max_done=MAX_DONE,
        heal_after=max(60.0, 2 * spec.reclaim_idle),
        max_done_bytes=max(1, max_payload_bytes // DONE_BYTES_SHARE),
    )
    options = DebounceSpec(
        seconds=seconds,
        max_wait=wait,
        key=key,
        message_type=message_type,
        check_topic=check_topic(spec.topic, spec.name),
        batch_topic=batch_topic(spec.topic, spec.name),
        limits=limits,
    )
    from omnidaemon.debounce.handlers import Checker, Collector

    collector, checker = Collector(spec, options), Checker(spec, options)
    internal = {
        "publishes": None,
        "return_type": type(None),
        "return_adapter": None,
        "is_async": True,
        "timeout": None,
        "store_results": False,
        "idempotency_key": None,
        "flow": None,
    }
    collect = replace(
        spec,
        handler=collector.collect,
        payload_type=message_type,
        envelope_adapter=collect_adapter,
        invoke=collector.collect,
        **internal,  # type: ignore[arg-type]
    )
    check = replace(
        spec,
        topic=options.check_topic,
        handler=checker.check,
        payload_type=Check,
        envelope_adapter=TypeAdapter(Envelope[Check]),
        invoke=checker.check,
        policy=_CHECK_POLICY,
        start="earliest",
        **internal,  # type: ignore[arg-type]
    )
    batches = replace(spec, topic=options.batch_topic, start="earliest")
    return replace(
        spec,
        payload_type=message_type,
        envelope_adapter=message_adapter,
        debounce=replace(options, parts=(collect, check, batches)),
    )


def consumer_specs(specs: typing.Iterable[AgentSpec]) -> list[AgentSpec]:
    """The specs a worker runs consumers for: a debounced agent's three parts in its place."""
    return [part for spec in specs for part in (spec.debounce.parts if spec.debounce else (spec,))]
