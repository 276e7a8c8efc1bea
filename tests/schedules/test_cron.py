"""The cron parser: fields, names, macros, Vixie's day rule, time zones and DST, bad specs;
and the ticks of `every`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from omnidaemon.cron import Cron
from omnidaemon.schedules import Every

LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")


def fires(spec: str, after: datetime, count: int, tz: ZoneInfo | None = None) -> list[str]:
    cron = Cron.parse(spec, tz or UTC)
    found = []
    for _ in range(count):
        after = cron.next_after(after)
        found.append(after.isoformat())
    return found


START = datetime(2026, 1, 1, 0, 0, tzinfo=UTC)  # a Thursday


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("*/15 * * * *", ["00:15", "00:30", "00:45", "01:00"]),
        ("5-10/5 * * * *", ["00:05", "00:10", "01:05", "01:10"]),
        ("0 9,17 * * *", ["09:00", "17:00", "09:00", "17:00"]),
        ("50/5 * * * *", ["00:50", "00:55", "01:50", "01:55"]),
        ("@hourly", ["01:00", "02:00", "03:00", "04:00"]),
    ],
)
def test_fields(spec: str, expected: list[str]) -> None:
    assert [f[11:16] for f in fires(spec, START, 4)] == expected


def test_seconds_field_and_strictly_after() -> None:
    assert fires("*/20 * * * * *", START, 3) == [
        "2026-01-01T00:00:20+00:00",
        "2026-01-01T00:00:40+00:00",
        "2026-01-01T00:01:00+00:00",
    ]
    # An instant that is a fire time is not its own next one.
    assert fires("0 * * * *", datetime(2026, 1, 1, 5, tzinfo=UTC), 1) == [
        "2026-01-01T06:00:00+00:00"
    ]


def test_names_macros_and_sunday_as_7() -> None:
    assert fires("0 0 * feb SUN", START, 2) == fires("0 0 * 2 7", START, 2)
    assert fires("0 0 * * mon-fri", START, 3) == [
        "2026-01-02T00:00:00+00:00",
        "2026-01-05T00:00:00+00:00",
        "2026-01-06T00:00:00+00:00",
    ]
    assert fires("@weekly", START, 1) == ["2026-01-04T00:00:00+00:00"]  # Sunday
    assert fires("@monthly", START, 1) == ["2026-02-01T00:00:00+00:00"]
    assert fires("@yearly", START, 1) == ["2027-01-01T00:00:00+00:00"]
    assert fires("@daily", START, 1) == fires("@midnight", START, 1)


def test_vixie_or_rule_for_the_two_day_fields() -> None:
    # Both restricted: the 13th *or* a Friday.
    days = [f[:10] for f in fires("0 0 13 * FRI", START, 4)]
    assert days == ["2026-01-02", "2026-01-09", "2026-01-13", "2026-01-16"]
    # One starts with '*': both must match (odd days that are Mondays).
    days = [f[:10] for f in fires("0 0 */2 * MON", START, 3)]
    assert days == ["2026-01-05", "2026-01-19", "2026-02-09"]
    # Feb 29 only in leap years.
    assert fires("0 0 29 2 *", START, 1) == ["2028-02-29T00:00:00+00:00"]


def test_spring_forward_fires_once_after_the_gap() -> None:
    # New York, 2026-03-08: 02:00 EST becomes 03:00 EDT; 02:30 does not exist.
    after = datetime(2026, 3, 7, 12, tzinfo=NEW_YORK)
    assert fires("30 2 * * *", after, 3, NEW_YORK) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    # Every time in the gap lands on its end: one fire, not four.
    quarter = fires("*/15 * * * *", datetime(2026, 3, 8, 1, 40, tzinfo=NEW_YORK), 3, NEW_YORK)
    assert quarter == [
        "2026-03-08T01:45:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T03:15:00-04:00",
    ]


def test_fall_back_fires_an_ambiguous_time_once() -> None:
    # London, 2026-10-25: 02:00 BST becomes 01:00 GMT; 01:30 happens twice.
    after = datetime(2026, 10, 24, 12, tzinfo=LONDON)
    assert fires("30 1 * * *", after, 2, LONDON) == [
        "2026-10-25T01:30:00+01:00",  # the first one only
        "2026-10-26T01:30:00+00:00",
    ]
    # From inside the repeated hour, its times are past already.
    second = datetime(2026, 10, 25, 1, 10, fold=1, tzinfo=LONDON)
    assert fires("*/20 * * * *", second, 1, LONDON) == ["2026-10-25T02:00:00+00:00"]


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("* * * *", "has 4 fields"),
        ("60 * * * *", "minute 60 is outside 0-59"),
        ("* 24 * * *", "hour 24 is outside 0-23"),
        ("* * 0 * *", "day-of-month 0 is outside 1-31"),
        ("* * * 13 *", "month 13 is outside 1-12"),
        ("* * * * 8", "day-of-week 8 is outside 0-7"),
        ("* * * JUNE *", "not a number or a name"),
        ("10-5 * * * *", "runs backwards"),
        ("*/0 * * * *", "step must be at least 1"),
        ("1,,2 * * * *", "is not '*'"),
        ("0 0 31 4 *", "never fires"),
        ("@reboot", "unknown cron macro"),
    ],
)
def test_invalid_specs_say_why_in_one_line(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as caught:
        Cron.parse(spec)
    assert "\n" not in str(caught.value)


def test_next_after_needs_an_aware_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        Cron.parse("@daily").next_after(datetime(2026, 1, 1))


def test_every_ticks_on_multiples_of_the_interval() -> None:
    every = Every(300.0)
    assert every.next_after(0.0) == 300.0
    assert every.next_after(299.999) == 300.0
    assert every.next_after(300.0) == 600.0  # strictly after
    assert every.at_or_before(599.0) == 300.0
    tenth = Every(0.1)
    assert tenth.next_after(0.3) == pytest.approx(0.4)
    hourly = Every(timedelta(hours=1).total_seconds())
    moment = datetime(2026, 5, 1, 10, 17, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(hourly.next_after(moment), UTC).hour == 11
