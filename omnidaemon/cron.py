"""Cron expressions: parse one, and find when it next fires in an explicit time zone.

What `@app.schedule` accepts (no third-party parser: the rules are short and ours to state):

- 5 fields, `minute hour day-of-month month day-of-week`, or 6 with `second` first.
- In each field: `*`, a value, `a-b`, `*/n`, `a-b/n`, `a/n` (from `a` to the field's end),
  and comma-separated lists of these. Months `JAN`-`DEC`, days `SUN`-`SAT` (any case);
  day-of-week 0 and 7 are both Sunday.
- `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`), `@hourly`.
- Day-of-month and day-of-week follow Vixie cron: when both are restricted (neither starts
  with `*`), a day matches if *either* does (`0 9 1 * MON`: the 1st, and every Monday);
  otherwise both must.
- Times are wall-clock times in the schedule's IANA time zone. A time that does not exist
  there (skipped when the clocks go forward) fires at the first instant after the gap, once;
  a time that exists twice (the clocks go back) fires once, at its first occurrence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

__all__ = ["Cron"]

_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (field name, lowest, highest, names for lowest.. or None)
_FIELDS: list[tuple[str, int, int, list[str] | None]] = [
    ("second", 0, 59, None),
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day-of-month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day-of-week", 0, 7, _DAYS),
]
_PART = re.compile(r"^(?:(?P<star>\*)|(?P<a>\w+)(?:-(?P<b>\w+))?)(?:/(?P<step>\d+))?$")
_SECOND = timedelta(seconds=1)
_SEARCH_YEARS = 30  # how far ahead a spec must fire (Feb 29 on a given weekday: 28 years)
_DAYS_IN_MONTH = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]  # 29: leap years count


def _value(text: str, field: str, low: int, high: int, names: list[str] | None) -> int:
    if text.isdigit():
        value = int(text)
    elif names is not None and text.upper() in names:
        value = names.index(text.upper()) + (1 if field == "month" else 0)
    else:
        raise ValueError(f"{field} {text!r} is not a number{' or a name' if names else ''}")
    if not low <= value <= high:
        raise ValueError(f"{field} {value} is outside {low}-{high}")
    return value


def _field(text: str, field: str, low: int, high: int, names: list[str] | None) -> frozenset[int]:
    values: set[int] = set()
    for part in text.split(","):
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"{field} {part!r} is not '*', 'a', 'a-b' or one with '/n'")
        step = int(match["step"]) if match["step"] else 1
        if step < 1:
            raise ValueError(f"{field} step must be at least 1, not {step}")
        if match["star"]:
            first, last = low, high
        else:
            first = _value(match["a"], field, low, high, names)
            has_end = match["b"] is not None or match["step"] is not None
            last = high if has_end else first
            if match["b"] is not None:
                last = _value(match["b"], field, low, high, names)
            if last < first:
                raise ValueError(f"{field} range {part!r} runs backwards")
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _next_in(values: Sequence[int], current: int) -> int | None:
    """The smallest of the sorted `values` that is >= `current`, else None."""
    return next((v for v in values if v >= current), None)


@dataclass(frozen=True, slots=True)
class Cron:
    """A parsed cron expression, with the time zone its times are read in.

    Example:
        ```python
        from datetime import datetime
        from zoneinfo import ZoneInfo

        cron = Cron.parse("0 9 * * MON-FRI", ZoneInfo("Europe/London"))
        london = ZoneInfo("Europe/London")
        friday = datetime(2026, 1, 2, 9, 0, tzinfo=london)
        assert cron.next_after(friday) == datetime(2026, 1, 5, 9, 0, tzinfo=london)
        ```
    """

    spec: str
    tz: tzinfo
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    either_day: bool  # Vixie's rule: both day fields restricted, so either one matches

    @classmethod
    def parse(cls, spec: str, tz: tzinfo = UTC) -> Cron:
        """Parse `spec` (see the module's documentation).

        Raises:
            ValueError: the spec is not valid, or it never fires (`0 0 30 2 *`); the message
                says why in one line.
        """
        if not isinstance(spec, str):
            raise ValueError(f"a cron spec is a string, not {type(spec).__name__}")
        text = " ".join(spec.split())
        if text.startswith("@"):
            if text.lower() not in _MACROS:
                raise ValueError(f"unknown cron macro {text!r} (known: {', '.join(_MACROS)})")
            text = _MACROS[text.lower()]
        parts = text.split(" ")
        if len(parts) == 5:
            parts = ["0", *parts]
        elif len(parts) != 6:
            raise ValueError(
                f"cron spec {spec!r} has {len(parts)} fields, not 5 (minute hour "
                "day-of-month month day-of-week) or 6 (second first)"
            )
        try:
            sets = [_field(p, *f) for p, f in zip(parts, _FIELDS, strict=True)]
        except ValueError as exc:
            raise ValueError(f"cron spec {spec!r}: {exc}") from None
        weekdays = frozenset(d % 7 for d in sets[5])
        cron = cls(
            spec=spec,
            tz=tz,
            seconds=tuple(sorted(sets[0])),
            minutes=tuple(sorted(sets[1])),
            hours=tuple(sorted(sets[2])),
            days=sets[3],
            months=sets[4],
            weekdays=weekdays,
            either_day=not parts[3].startswith("*") and not parts[5].startswith("*"),
        )
        if cron._next_wall(datetime(2000, 1, 1)) is None:
            raise ValueError(f"cron spec {spec!r} never fires")
        return cron

    def _day_matches(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        in_month = day.day in self.days
        in_week = (day.weekday() + 1) % 7 in self.weekdays
        return (in_month or in_week) if self.either_day else (in_month and in_week)

    def _next_wall(self, wall: datetime) -> datetime | None:
        """The first wall-clock time (naive, whole seconds) >= `wall` the fields match, or
        None within `_SEARCH_YEARS` years."""
        limit = wall.year + _SEARCH_YEARS
        while wall.year <= limit:
            if not self._day_matches(wall.date()):
                wall = datetime.combine(wall.date() + timedelta(days=1), datetime.min.time())
                continue
            hour = _next_in(self.hours, wall.hour)
            if hour is None:
                wall = datetime.combine(wall.date() + timedelta(days=1), datetime.min.time())
                continue
            if hour != wall.hour:
                wall = wall.replace(hour=hour, minute=0, second=0)
            minute = _next_in(self.minutes, wall.minute)
            if minute is None:
                wall = wall.replace(minute=0, second=0) + timedelta(hours=1)
                continue
            if minute != wall.minute:
                wall = wall.replace(minute=minute, second=0)
            second = _next_in(self.seconds, wall.second)
            if second is None:
                wall = wall.replace(second=0) + timedelta(minutes=1)
                continue
            return wall.replace(second=second)
        return None

    def _instant(self, wall: datetime) -> datetime:
        """When the wall-clock time `wall` happens in the time zone: its first occurrence if
        it happens twice, the first instant after the gap if it does not happen."""
        first = wall.replace(tzinfo=self.tz, fold=0).astimezone(UTC)
        if first.astimezone(self.tz).replace(tzinfo=None) == wall:
            return first
        # In a gap: bisect for the first whole second whose wall time is past `wall`.
        low, high = sorted([first, wall.replace(tzinfo=self.tz, fold=1).astimezone(UTC)])
        while high - low > _SECOND:
            middle = low + (high - low) // 2
            middle -= timedelta(microseconds=middle.microsecond)
            if middle.astimezone(self.tz).replace(tzinfo=None) >= wall:
                high = middle
            else:
                low = middle
        return high

    def next_after(self, after: datetime) -> datetime:
        """The first time strictly after `after` (timezone-aware) the spec fires, in the
        spec's time zone."""
        if after.tzinfo is None:
            raise ValueError("next_after needs a timezone-aware datetime")
        wall = after.astimezone(self.tz).replace(tzinfo=None, microsecond=0, fold=0) + _SECOND
        while True:
            found = self._next_wall(wall)
            if found is None:  # cannot happen for a parsed spec; a clear error if it does
                raise ValueError(f"cron spec {self.spec!r} does not fire after {after}")
            instant = self._instant(found)
            if instant > after:
                return instant.astimezone(self.tz)
            # A time that has already happened (the second hour of a repeated one).
            wall = found + _SECOND
