"""Schedules: events published by the clock, once per tick across every worker.

    python examples/scheduled_report.py

A report is due every second (every five minutes in real life), and another each weekday at
9:00, London time. Run three workers of this app and each tick is still published once: the
bus gives it to one of them. `omnidaemon schedules examples.scheduled_report:app` shows when
each fires next and last.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import anyio

from omnidaemon import App

app = App("scheduled-report")
received: list[str] = []
two_reports = anyio.Event()


@app.every(timedelta(seconds=1), topic="report.due")
async def report_due(tick: datetime) -> dict[str, str]:
    """A report of the period that ended at this tick."""
    return {"period_end": tick.isoformat()}


@app.schedule("0 9 * * MON-FRI", topic="report.due", timezone="Europe/London")
def morning_report(tick: datetime) -> dict[str, str]:
    """The morning report, on weekdays."""
    return {"period_end": tick.isoformat()}


@app.agent("report.due")
async def write_report(event: dict[str, str]) -> None:
    received.append(event["period_end"])
    if len(received) == 2:
        two_reports.set()


async def main() -> None:
    async with app.running():
        with anyio.fail_after(30):
            await two_reports.wait()
    for end in received[:2]:
        print(f"report for the period ending {end}")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
