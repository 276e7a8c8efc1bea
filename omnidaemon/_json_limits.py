"""What JSON the bus carries: how deep it may nest, which integers and which text.

The publisher encodes with orjson and the worker decodes with pydantic-core; each has limits
of its own, and a value one of them refuses must be refused where it is published, with a
message that says what and where, rather than crash the publisher (a 500 in the HTTP API) or
be dead-lettered by the worker as malformed:

- nesting: pydantic-core's parser reads at most 200 levels, orjson writes at most 254, so a
  payload between the two was published and never read. `MAX_NESTING` is below both.
- integers: orjson writes 64-bit integers only (-2**63 to 2**64 - 1).
- text: a string holding a lone surrogate (`"\\ud800"`, which Python's `json` module reads)
  is no Unicode text, and cannot be written as UTF-8.
- numbers: `NaN` and `Infinity` are no JSON; orjson writes them as `null`. Only a request body
  is checked for them (Python's `json` module reads them): `App.publish` keeps orjson's way.

This module does no I/O.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["MAX_NESTING", "find_json_problem", "nesting_exceeds", "too_deep", "unfit_for_json"]

MAX_NESTING = 128
"""The deepest a payload may nest arrays and objects: `[[1]]` is 2 deep, `1` is 0.

serde_json's default limit, so that consumers in Rust read what omnidaemon publishes; it leaves
room, under pydantic-core's 200, for the documents that carry a payload or a handler's return
value inside them (the envelope, a stored result, a reply, a webhook body).
"""

_MIN_INT, _MAX_INT = -(2**63), 2**64 - 1
_SURROGATE = re.compile("[\ud800-\udfff]")
# A JSON string as orjson writes it (every `"` and `\` inside escaped).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Keeps only brackets, as `[` and `]`: the shape of the nesting.
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_exceeds(data: bytes, limit: int) -> bool:
    """Whether the JSON document `data` (as orjson writes it) nests arrays and objects more
    than `limit` levels deep.

    Cheap for what publishing sees: a document with no more than `limit` brackets in all
    cannot nest deeper, and is answered after two `count`s.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    # The strings gone (they may hold brackets), only brackets are left: then each pass
    # removes the innermost level everywhere at once, so the document nests as deep as the
    # number of passes that empty it. Each pass runs in C, and the text shrinks as it goes.
    shape = _STRING.sub(b"", data).translate(_BRACKETS, _NOT_BRACKETS)
    for _ in range(limit):
        if not shape:
            return False
        shape = shape.replace(b"[]", b"")
    return bool(shape)


def _text_problem(text: str, what: str = "the string") -> str | None:
    if text.isascii():
        return None
    found = _SURROGATE.search(text)
    if found is None:
        return None
    return (
        f"{what} holds a lone surrogate ({found.group()!a} at index {found.start()}), "
        "which is not Unicode text; send text that encodes as UTF-8"
    )


def _path(where: str, trail: tuple[Any, ...] | None) -> str:
    keys = []
    while trail is not None:
        key, trail = trail
        keys.append(f"[{key!r}]")
    return where + "".join(reversed(keys))


def find_json_problem(
    value: Any, where: str, *, limit: int = MAX_NESTING, finite: bool = False
) -> str | None:
    """What makes `value` unfit for the bus, with where it is (`payload['items'][3]: ...`),
    or `None`.

    Looks into dicts, lists and tuples, and checks strings (and keys), integers and, with
    `finite`, floats; other values (models, dataclasses) are left to the encoder. Walks
    without recursion and stops at `limit` levels, so any depth is answered.

    Args:
        value: The value, as it would be encoded.
        where: Names `value` in the message (`payload`, `headers`).
        limit: The deepest `value` may nest.
        finite: Refuse `NaN` and infinities (no JSON number can hold them).
    """
    # Each item's keys from `value` down are a linked list `(key, parent's)`, made into a
    # path only for the message: most walks find nothing.
    stack: list[tuple[Any, tuple[Any, ...] | None, int]] = [(value, None, 0)]
    while stack:
        item, trail, depth = stack.pop()
        problem: str | None = None
        if isinstance(item, str):
            problem = _text_problem(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not _MIN_INT <= item <= _MAX_INT:
                problem = (
                    f"an integer of {len(str(abs(item)))} digits is outside the 64-bit range "
                    "JSON numbers are carried in (-2**63 to 2**64 - 1); send it as a string"
                )
        elif isinstance(item, float):
            if finite and not math.isfinite(item):
                name = "NaN" if math.isnan(item) else ("-" if item < 0 else "") + "Infinity"
                problem = f"{name} is not a JSON number"
        elif isinstance(item, dict | list | tuple):
            if depth >= limit:
                return too_deep(where, limit)
            if isinstance(item, dict):
                for key, child in item.items():
                    if isinstance(key, str) and (key_problem := _text_problem(key, "a key")):
                        return f"{_path(where, trail)}: {key_problem}"
                    stack.append((child, (key, trail), depth + 1))
            else:
                stack.extend((child, (index, trail), depth + 1) for index, child in enumerate(item))
        if problem is not None:
            return f"{_path(where, trail)}: {problem}"
    return None


def unfit_for_json(fields: dict[str, Any]) -> str | None:
    """The first of `fields` (an event's payload, headers, ids, by name) found unfit for the
    bus, and why; `None` if none is. For the error path: when encoding failed."""
    for name, value in fields.items():
        problem = find_json_problem(value, name)
        if problem is not None:
            return problem
    return None


def too_deep(where: str, limit: int = MAX_NESTING) -> str:
    """The message for a value in `where` nested deeper than `limit`."""
    return f"{where}: arrays and objects are nested more than {limit} levels deep (the limit)"
