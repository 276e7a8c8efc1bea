"""Logging with structlog: readable on a terminal, JSON lines everywhere else.

The library's loggers (`get_logger`) never configure anything in a user's program. Once
structlog is configured (by `configure_logging`, which the CLI calls, or by the program), they
log through structlog's configuration. Until then they log through the standard `logging`
module under their own names (`omnidaemon.worker`, ...), so the program's logging configuration
governs them. A program that configured neither gets WARNING and above on standard error, like
any library, or the level `OMNIDAEMON_LOG_LEVEL` names.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
import structlog

__all__ = ["Logger", "bound_logger", "configure_logging", "get_logger"]

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _orjson_dumps(value: Any, default: Any = None) -> str:
    # A log line must never raise into the code that logs (a supervisor stopping its
    # workers, a handler's outcome): keys that are not strings are written as text, and what
    # orjson cannot encode at all (an int past 64 bits) goes through the standard library.
    try:
        return orjson.dumps(value, default=default, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value, default=repr, ensure_ascii=False)


def configure_logging(
    level: str = "INFO",
    fmt: Literal["auto", "console", "json"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog (and the standard `logging` module) for a worker or the CLI.

    The CLI calls it; a program of its own may, to log like the CLI. Without it (or a
    `structlog.configure` of the program's), the library's lines go through the standard
    `logging` module under `omnidaemon.*` names: see "Logging in your own program" in
    docs/operations.md.

    Example:
        ```python
        from omnidaemon.observability import configure_logging

        configure_logging("INFO", "json")  # JSON lines on standard error from INFO up
        ```

    Args:
        level: The lowest level written: `DEBUG`, `INFO`, `WARNING` or `ERROR`.
        fmt: `console` for coloured key=value lines, `json` for one JSON object per line,
            `auto` for console on a terminal and JSON otherwise.
        stream: Where to write; default: standard error.
    """
    out = stream if stream is not None else sys.stderr
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if use_console:
        processors.append(structlog.dev.ConsoleRenderer(colors=out.isatty()))
    else:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line: `print` writes the line and its newline separately, which worker
        # processes sharing a stderr (`--processes N`) interleave when it is unbuffered.
        logger_factory=structlog.WriteLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=numeric, stream=out, format="%(levelname)s %(name)s: %(message)s")
    # httpx logs every request URL at INFO, query strings (webhook tokens) included.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))


class Logger:
    """One of the library's loggers: structlog's configuration once there is one, else the
    standard `logging` module (see the module's docstring).

    Decided at every call, not when the logger is made: modules make theirs at import, before
    a program had a chance to configure anything.
    """

    __slots__ = ("_context", "_name")

    def __init__(self, name: str, context: dict[str, Any] | None = None) -> None:
        self._name = name
        self._context = context or {}

    def bind(self, **fields: Any) -> Logger:
        """A logger that adds `fields` to every line."""
        return Logger(self._name, {**self._context, **fields})

    def debug(self, event: str, **fields: Any) -> None:
        """Log `event` at DEBUG."""
        bound_logger(self._name, self._context).debug(event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        """Log `event` at INFO."""
        bound_logger(self._name, self._context).info(event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        """Log `event` at WARNING."""
        bound_logger(self._name, self._context).warning(event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        """Log `event` at ERROR."""
        bound_logger(self._name, self._context).error(event, **fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log `event` at ERROR with the exception being handled."""
        bound_logger(self._name, self._context).exception(event, **fields)


def get_logger(name: str) -> Logger:
    """The library's logger called `name` (an `omnidaemon.*` name)."""
    return Logger(name)


def bound_logger(name: str, context: dict[str, Any]) -> Any:
    """A structlog logger for `name` with `context` bound, through structlog's configuration
    if there is one, else through the standard `logging` module."""
    if structlog.is_configured():
        return structlog.get_logger(name).bind(**context)
    if not _default_installed:
        _install_default()
    return structlog.stdlib.BoundLogger(logging.getLogger(name), _STDLIB_PROCESSORS, context)


def _to_record(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> Any:
    """The arguments of a `logging.Logger` call: the event with its fields as `key=value` for
    the message, and the fields themselves as `record.omnidaemon` for structured handlers."""
    exc_info = event_dict.pop("exc_info", None)
    event_dict.pop("positional_args", None)
    event = event_dict.pop("event", "")
    pairs = " ".join(f"{key}={_text(value)}" for key, value in event_dict.items())
    message = f"{event} {pairs}" if pairs else str(event)
    fields = {"event": event, **event_dict}
    return (message,), {"exc_info": exc_info, "extra": {"omnidaemon": fields}}


def _text(value: Any) -> str:
    # Text is quoted only where a reader could not tell where it ends; the rest as `repr`.
    if not isinstance(value, str):
        return repr(value)
    return repr(value) if not value or any(c.isspace() or c in "='\"" for c in value) else value


_STDLIB_PROCESSORS: list[Any] = [
    structlog.stdlib.filter_by_level,  # first: a dropped line costs one level check
    structlog.contextvars.merge_contextvars,
    _to_record,
]


class _UntilConfigured(logging.Handler):
    """Writes the library's records to standard error while the program has not configured
    logging (its root logger has no handler); after that, they reach the program's handlers
    by propagation, and this one stays silent so that no line appears twice."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self._json = fmt == "json"
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.root.handlers:
            return
        try:
            if self._json:
                fields = getattr(record, "omnidaemon", None) or {"event": record.getMessage()}
                stamp = datetime.fromtimestamp(record.created, UTC).isoformat()
                head = {"level": record.levelname.lower(), "logger": record.name}
                line = _orjson_dumps({**head, "timestamp": stamp, **fields}, default=repr)
            else:
                line = self.format(record)
            # Looked up at every line: a test runner or the program may swap `sys.stderr`.
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_default_installed = False
_install_lock = threading.Lock()


def _install_default() -> None:
    """Once, at the first line logged through `logging`: the level `OMNIDAEMON_LOG_LEVEL` names
    (if set) on the `omnidaemon` logger, and the standard-error handler for programs that
    configured no logging."""
    global _default_installed
    with _install_lock:
        if _default_installed:
            return
        root = logging.getLogger("omnidaemon")
        level = os.environ.get("OMNIDAEMON_LOG_LEVEL", "").upper()
        if level in _LEVELS:
            root.setLevel(level)
        root.addHandler(_UntilConfigured(os.environ.get("OMNIDAEMON_LOG_FORMAT", "").lower()))
        _default_installed = True
