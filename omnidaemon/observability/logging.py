"""Logging with structlog: readable on a terminal, JSON lines everywhere else."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal, TextIO

import orjson
import structlog

__all__ = ["configure_logging"]


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
