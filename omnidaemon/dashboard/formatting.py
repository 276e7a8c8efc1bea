"""Data from the bus as text a page shows: payloads and schemas as indented JSON, long text
cut to what a page can hold."""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["cut", "pretty_json"]


def pretty_json(data: Any) -> str:
    """`data` as indented JSON text; what JSON cannot hold is written as `str`."""
    try:
        return orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits, which another producer's payload may hold:
        # the standard library writes them as the numbers they are, and a page must not fail.
        return json.dumps(data, indent=2, default=str, ensure_ascii=False)


def cut(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to `limit` characters, and whether it was."""
    if len(text) > limit:
        return text[:limit], True
    return text, False
