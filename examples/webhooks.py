"""Webhooks: the outcome of an event POSTed, signed, to a URL when the event is finished.

    python examples/webhooks.py

Starts a tiny HTTP receiver on 127.0.0.1 that checks each signature with
`omnidaemon.webhooks.verify`, runs an agent, and publishes two events with `webhook=`: one
succeeds, one is dead-lettered after its retries. Each produces exactly one POST. (The receiver
is on loopback, which omnidaemon refuses by default against SSRF; this example allows it.)
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anyio

os.environ.setdefault("OMNIDAEMON_WEBHOOK_SECRET", "example-secret")
os.environ.setdefault("OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", "1")  # loopback receiver, example only

from omnidaemon import App
from omnidaemon.webhooks import verify

app = App("hooks-demo")
received: list[dict[str, Any]] = []
both_received = threading.Event()


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ok = verify(
            body,
            self.headers.get("X-Omnidaemon-Signature"),
            self.headers.get("X-Omnidaemon-Timestamp"),
            os.environ["OMNIDAEMON_WEBHOOK_SECRET"],
            event_id=self.headers.get("X-Omnidaemon-Event-Id"),
        )
        received.append({"signature_ok": ok, **json.loads(body)})
        if len(received) == 2:
            both_received.set()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@app.agent("report.requested", max_retries=1, retry_backoff=0.1)
async def build_report(event: dict[str, Any]) -> dict[str, Any]:
    """Build a report; reports for unknown customers fail."""
    if event["customer"] == "unknown":
        raise LookupError("no such customer")
    return {"url": f"https://reports.example/{event['customer']}.pdf"}


async def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/omnidaemon"
    async with app.running():
        await app.publish("report.requested", {"customer": "acme"}, webhook=url)
        await app.publish("report.requested", {"customer": "unknown"}, webhook=url)
        if not await anyio.to_thread.run_sync(both_received.wait, 30):
            raise TimeoutError("no webhook arrived within 30 s")
    server.shutdown()
    for hook in sorted(received, key=lambda h: h["status"]):
        outcome = hook.get("result") or hook.get("error")
        print(f"{hook['status']:<14} signature ok: {hook['signature_ok']}  {outcome}")
    await app.close()


if __name__ == "__main__":
    anyio.run(main)
