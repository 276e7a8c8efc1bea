"""Settings from the environment: one object, read once, every name prefixed `OMNIDAEMON_`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from omnidaemon._env import env_count, env_flag, env_seconds
from omnidaemon.errors import ConfigurationError

__all__ = ["Settings"]

LogFormat = Literal["auto", "console", "json"]


@dataclass(frozen=True, slots=True)
class Settings:
    """omnidaemon's configuration.

    Attributes:
        broker_url: `OMNIDAEMON_BROKER_URL`; `None` selects the default bus.
        app: `OMNIDAEMON_APP`, the `module:attribute` the worker runs when none is given.
        log_level: `OMNIDAEMON_LOG_LEVEL` (`DEBUG`, `INFO`, `WARNING`, `ERROR`).
        log_format: `OMNIDAEMON_LOG_FORMAT`: `console`, `json`, or `auto` (console on a
            terminal, JSON lines otherwise).
        shutdown_grace: `OMNIDAEMON_SHUTDOWN_GRACE`, seconds in-flight handlers get to finish
            after a stop signal.
        stream_maxlen: `OMNIDAEMON_STREAM_MAXLEN`, entries each topic stream keeps
            (approximately) on Redis; an unread entry is trimmed only after this many newer
            ones.
        store_results: `OMNIDAEMON_STORE_RESULTS`, the default of every agent's
            `store_results`.
        heartbeat_interval: `OMNIDAEMON_HEARTBEAT_INTERVAL`, seconds between a worker's
            heartbeats; a worker is presumed gone after three intervals without one.
        max_payload_bytes: `OMNIDAEMON_MAX_PAYLOAD_BYTES`, the largest encoded event (envelope
            included) publishing accepts and a worker reads, 1 MiB by default (Kafka's
            default message size). Larger events raise `PayloadTooLarge` when published; a
            worker dead-letters a larger entry unread, as `PayloadTooLarge`.
        trust_trace_context: `OMNIDAEMON_TRUST_TRACE_CONTEXT`, whether a handled event's trace
            context (the `traceparent` its publisher put in its headers) becomes the parent of
            the handling span, as it does by default: the publisher's trace continues, and its
            sampling decision stands. Set it off (`0`) when publishers are not trusted: each
            handling then starts a trace of its own, sampled by the worker's sampler, with a
            span link to the publisher's context.
        max_delay: `OMNIDAEMON_MAX_DELAY`, the longest `delay=` (or `at=`) publishing
            accepts, in seconds; 30 days by default. A delayed event is held on the bus outside
            the topic's `stream_maxlen`; a longer delay raises `DelayTooLong`.
        blocked_loop_warning: `OMNIDAEMON_BLOCKED_LOOP_WARNING`, seconds a worker's event loop
            may be blocked (an `async def` handler calling `time.sleep`, say) before the worker
            logs a warning naming the agent, the event and the fix; 1 s by default, 0 turns
            the check off.
        connect_timeout: `OMNIDAEMON_CONNECT_TIMEOUT`, seconds a starting worker keeps trying
            to reach the bus before it gives up (`BusUnavailable`); `None` (unset, the
            default) waits for as long as it takes, and `0` tries once.
        cancel_ttl: `OMNIDAEMON_CANCEL_TTL`, seconds a cancellation (`App.cancel`) is kept on
            the bus, 7 days by default: an event that comes due later (a delayed event, a
            retry) is no longer stopped by it.
        output_max_chunks: `OMNIDAEMON_OUTPUT_MAX_CHUNKS`, the most chunks one attempt of a
            handler may stream with `ctx.emit` (10,000 by default); past it (or past
            `output_max_bytes`) the stream is truncated: one `truncated` marker, nothing more.
        output_max_bytes: `OMNIDAEMON_OUTPUT_MAX_BYTES`, the most bytes of JSON one attempt
            may stream (4 MiB by default).
        trace_ttl: `OMNIDAEMON_TRACE_TTL`, seconds a run's trace records (`omnidaemon trace`)
            are kept after their write, 24 h by default; `0` turns the traces off.
        trace_max_records: `OMNIDAEMON_TRACE_MAX_RECORDS`, the most attempt records one run's
            trace keeps (1,000 by default); later ones are counted, not kept.
    """

    broker_url: str | None = None
    app: str | None = None
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    shutdown_grace: float = 30.0
    stream_maxlen: int = 100_000
    store_results: bool = False
    heartbeat_interval: float = 5.0
    max_payload_bytes: int = 1_048_576
    trust_trace_context: bool = True
    max_delay: float = 2_592_000.0
    blocked_loop_warning: float = 1.0
    connect_timeout: float | None = None
    cancel_ttl: float = 604_800.0
    output_max_chunks: int = 10_000
    output_max_bytes: int = 4_194_304
    trace_ttl: float = 86_400.0
    trace_max_records: int = 1_000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the settings from `env` (default: `os.environ`)."""
        env = os.environ if env is None else env
        log_format = env.get("OMNIDAEMON_LOG_FORMAT", "auto").lower()
        if log_format not in ("auto", "console", "json"):
            raise ConfigurationError(
                f"OMNIDAEMON_LOG_FORMAT={log_format!r}: use 'auto', 'console' or 'json'"
            )
        log_level = env.get("OMNIDAEMON_LOG_LEVEL", "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigurationError(
                f"OMNIDAEMON_LOG_LEVEL={log_level!r}: use DEBUG, INFO, WARNING, ERROR or CRITICAL"
            )
        return cls(
            broker_url=env.get("OMNIDAEMON_BROKER_URL") or None,
            app=env.get("OMNIDAEMON_APP") or None,
            log_level=log_level,
            log_format=log_format,  # type: ignore[arg-type]
            shutdown_grace=env_seconds(env, "OMNIDAEMON_SHUTDOWN_GRACE", 30.0),
            stream_maxlen=env_count(env, "OMNIDAEMON_STREAM_MAXLEN", 100_000),
            store_results=env_flag(env, "OMNIDAEMON_STORE_RESULTS", False),
            heartbeat_interval=env_seconds(env, "OMNIDAEMON_HEARTBEAT_INTERVAL", 5.0) or 5.0,
            max_payload_bytes=env_count(env, "OMNIDAEMON_MAX_PAYLOAD_BYTES", 1_048_576),
            trust_trace_context=env_flag(env, "OMNIDAEMON_TRUST_TRACE_CONTEXT", True),
            max_delay=env_seconds(env, "OMNIDAEMON_MAX_DELAY", 2_592_000.0),
            blocked_loop_warning=env_seconds(env, "OMNIDAEMON_BLOCKED_LOOP_WARNING", 1.0),
            connect_timeout=(
                env_seconds(env, "OMNIDAEMON_CONNECT_TIMEOUT", 0.0)
                if env.get("OMNIDAEMON_CONNECT_TIMEOUT")
                else None
            ),
            cancel_ttl=env_seconds(env, "OMNIDAEMON_CANCEL_TTL", 604_800.0) or 604_800.0,
            output_max_chunks=env_count(env, "OMNIDAEMON_OUTPUT_MAX_CHUNKS", 10_000),
            output_max_bytes=env_count(env, "OMNIDAEMON_OUTPUT_MAX_BYTES", 4_194_304),
            trace_ttl=env_seconds(env, "OMNIDAEMON_TRACE_TTL", 86_400.0),
            trace_max_records=env_count(env, "OMNIDAEMON_TRACE_MAX_RECORDS", 1_000) or 1_000,
        )
