"""Argument types shared by the commands: each bad value is one line of help."""

from __future__ import annotations

import argparse
from collections.abc import Callable

__all__ = ["positive_int", "seconds"]


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def seconds(*, zero_ok: bool) -> Callable[[str], float]:
    """A number of seconds: at least 0 with `zero_ok`, else more than 0."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if value < 0 or (value == 0 and not zero_ok):
            bound = "must not be negative" if zero_ok else "must be more than 0"
            raise argparse.ArgumentTypeError(f"{text!r} {bound}")
        return value

    return parse
