"""Output of the commands: Rich tables and colours on a terminal, plain text when piped, JSON
on request. Rich is imported only when a terminal is there to show it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import orjson

__all__ = [
    "Progress",
    "age",
    "emit_json",
    "fail",
    "is_terminal",
    "json_text",
    "number",
    "plural",
    "print_table",
    "progress",
    "say",
]


def is_terminal() -> bool:
    """True when standard output is a terminal (tables and colours), False when piped."""
    return sys.stdout.isatty()


def json_text(data: Any, *, indent: bool = False) -> str:
    """`data` as JSON text, compact or indented; what JSON cannot hold is written as `str`."""
    try:
        return orjson.dumps(
            data, option=orjson.OPT_INDENT_2 if indent else None, default=str
        ).decode()
    except TypeError:
        # orjson refuses integers beyond 64 bits, which a payload read from the bus may hold
        # (a producer other than omnidaemon wrote it): showing a dead letter must not crash.
        import json

        separators = None if indent else (",", ":")
        return json.dumps(
            data,
            indent=2 if indent else None,
            separators=separators,
            ensure_ascii=False,
            default=str,
        )


def emit_json(data: Any) -> None:
    """Print `data` as indented JSON."""
    sys.stdout.write(json_text(data, indent=True))
    sys.stdout.write("\n")


def say(text: str, *, style: str | None = None) -> None:
    """Print a line; in `style` (a Rich style) on a terminal."""
    if style and is_terminal():
        from rich.console import Console

        Console(highlight=False).print(text, style=style, markup=False)
    else:
        print(text)


def fail(command: str, message: str, status: int = 1) -> int:
    """Print `omnidaemon COMMAND: error: MESSAGE` (first line only) to stderr; return `status`."""
    first = message.splitlines()[0] if message else "failed"
    print(f"omnidaemon {command}: error: {first}", file=sys.stderr)
    return status


def number(value: int | None) -> str:
    """A count for a table cell; `-` when unknown."""
    return "-" if value is None else f"{value:,}"


def plural(count: int, word: str) -> str:
    """`count` and `word`, with an `s` unless it is one: `1 agent`, `2 agents`, `1,000 entries`
    (a word ending in `y` after a consonant takes `ies`)."""
    if count != 1:
        ies = word.endswith("y") and word[-2:-1] not in "aeiou"
        word = word[:-1] + "ies" if ies else word + "s"
    return f"{count:,} {word}"


def age(seconds: float | None) -> str:
    """A duration for a table cell: `850ms`, `12.0s`, `4m10s`, `3h02m`; `-` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def print_table(
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    title: str | None = None,
    numeric: Sequence[str] = (),
    empty: str = "(none)",
    styles: Mapping[str, Callable[[str], str | None]] | None = None,
    whole: Sequence[str] = (),
) -> None:
    """Print rows under column headings: a Rich table on a terminal, aligned plain text (no
    box, no colour) when piped. Columns named in `numeric` are right-aligned; `styles` maps a
    column to what gives each of its cells a Rich style (`None`: none), on a terminal; columns
    named in `whole` are never cut on a narrow terminal (ids to copy)."""
    if not is_terminal():
        if title:
            print(f"{title}:")
        if not rows:
            print(empty)
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

        def line(cells: Sequence[str]) -> str:
            parts = [
                cell.rjust(width) if name in numeric else cell.ljust(width)
                for name, cell, width in zip(columns, cells, widths, strict=True)
            ]
            return "  ".join(parts).rstrip()

        print(line(columns))
        for row in rows:
            print(line(row))
        return
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    if not rows:
        if title:
            console.print(f"[bold]{title}[/bold]")
        console.print(empty, style="dim", markup=False)
        return
    # No vertical rules, and names kept on one line (cut with an ellipsis on a narrow
    # terminal): a table is read by its rows. Only free text (errors, payloads) wraps.
    table = Table(
        title=title,
        title_justify="left",
        header_style="bold cyan",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for index, name in enumerate(columns):
        free_text = name in _FREE_TEXT
        least = len(name) if name in numeric else None
        if name in whole:
            least = max(len(name), *(len(r[index]) for r in rows))
        table.add_column(
            name,
            justify="right" if name in numeric else "left",
            no_wrap=not free_text,
            overflow="fold" if free_text else "ellipsis",
            min_width=least,
        )
    given = styles or {}
    styled = [(i, given[name]) for i, name in enumerate(columns) if name in given]
    for row in rows:
        # Text, not markup: a cell holds what the bus holds (an error's `[...]` stays as is).
        cells = [Text(cell) for cell in row]
        for index, style in styled:
            cells[index].stylize(style(row[index]) or "")
        table.add_row(*cells)
    console.print(table)


_FREE_TEXT = frozenset({"ERROR", "PAYLOAD", "RESULT / ERROR", "AGENTS", "FAILURE"})


class Progress(Protocol):
    """Advances a progress display by a number of steps."""

    def __call__(self, steps: int = 1) -> None: ...


@contextmanager
def progress(description: str, total: int | None) -> Iterator[Progress]:
    """A progress bar on stderr while the block walks `total` items; nothing when stderr is
    not a terminal."""
    if not sys.stderr.isatty():
        yield lambda steps=1: None
        return
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    with RichProgress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(steps: int = 1) -> None:
            bar.advance(task, steps)

        yield advance
