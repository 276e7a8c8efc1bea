"""Publishing from synchronous code (a Django or Flask view, a script): `app.publish_sync`.

    python examples/sync_publish.py

No event loop of your own: `publish_sync` blocks until the bus has the event and returns its
id. Here plain threads play the part of a web server's request threads; a worker running in
the background handles what they publish.
"""

from __future__ import annotations

import threading
import time

import anyio
from pydantic import BaseModel

from omnidaemon import App

app = App("signups")


class SignedUp(BaseModel):
    email: str


welcomed: list[str] = []


@app.agent("user.signed_up")
def send_welcome(event: SignedUp) -> None:
    """Send the welcome mail (a plain function: it runs in a worker thread)."""
    welcomed.append(event.email)


def signup_view(email: str) -> str:
    """What a Django view would do after saving the user."""
    return app.publish_sync("user.signed_up", SignedUp(email=email))


def main() -> None:
    stop = threading.Event()

    async def worker() -> None:
        async with app.running():
            await anyio.to_thread.run_sync(stop.wait)

    thread = threading.Thread(target=anyio.run, args=(worker,), daemon=True)
    thread.start()
    requests = [
        threading.Thread(target=signup_view, args=(f"user{n}@example.com",)) for n in range(5)
    ]
    for request in requests:
        request.start()
    for request in requests:
        request.join()
    deadline = time.monotonic() + 30
    while len(welcomed) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    print("welcomed:", ", ".join(sorted(welcomed)))


if __name__ == "__main__":
    main()
