"""Webhooks: POST a finished event's outcome to a URL, signed, retried, and never to a private host.

A receiver checks a delivery with `verify`:

```python
from omnidaemon.webhooks import verify

ok = verify(
    request.body,
    request.headers["X-Omnidaemon-Signature"],
    request.headers["X-Omnidaemon-Timestamp"],
    secret=os.environ["OMNIDAEMON_WEBHOOK_SECRET"],
    event_id=request.headers["X-Omnidaemon-Event-Id"],
)
```

The signature covers the timestamp, the event id and the body (see `sign`), so a receiver may
deduplicate on `X-Omnidaemon-Event-Id` once `verify` accepts the delivery.

URLs come from whoever publishes an event, so they are untrusted: `check_url` refuses schemes
other than http(s), URLs with credentials, hosts outside the allow-list and any host that
resolves to a loopback, private, link-local (cloud metadata) or otherwise non-public address.
"""

from omnidaemon.webhooks._sender import WebhookOutcome, WebhookSender, WebhookStatus
from omnidaemon.webhooks._settings import WebhookSettings
from omnidaemon.webhooks._signing import sign, verify
from omnidaemon.webhooks._urls import Resolver, WebhookRefused, check_url

__all__ = [
    "Resolver",
    "WebhookOutcome",
    "WebhookRefused",
    "WebhookSender",
    "WebhookSettings",
    "WebhookStatus",
    "check_url",
    "sign",
    "verify",
]
