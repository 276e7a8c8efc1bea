"""Delays: events that agents see later, held durably on the bus meanwhile.

    python examples/delayed_reminders.py

A booking publishes a reminder for later (`delay=`) and a deadline at a fixed time (`at=`).
The bus keeps both until they fall due, across restarts of every process; the agent only
ever sees them on time.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
from pydantic import BaseModel

from omnidaemon import App, Context

app = App("reminders")


class Reminder(BaseModel):
    booking_id: str
    text: str


seen: list[tuple[str, float]] = []
all_seen = anyio.Event()


@app.agent("booking.reminder_due")
async def remind(event: Reminder, ctx: Context) -> None:
    """Send the reminder (here: record when it arrived)."""
    seen.append((event.text, anyio.current_time()))
    if len(seen) == 3:
        all_seen.set()
    ctx.log.info("reminder", booking_id=event.booking_id, text=event.text)


async def main() -> None:
    async with app.running():
        start = anyio.current_time()
        await app.publish(
            "booking.reminder_due",
            Reminder(booking_id="b1", text="in 2 seconds"),
            delay=timedelta(seconds=2),
        )
        await app.publish(
            "booking.reminder_due",
            Reminder(booking_id="b1", text="at a fixed time, 1 second from now"),
            at=datetime.now(UTC) + timedelta(seconds=1),
        )
        await app.publish("booking.reminder_due", Reminder(booking_id="b1", text="right away"))
        with anyio.fail_after(30):
            await all_seen.wait()
    for text, when in seen:
        print(f"after {when - start:4.1f} s: {text}")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
