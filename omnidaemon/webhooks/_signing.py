"""Signing webhook deliveries, and checking them on the receiving side."""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["sign", "verify"]


def sign(body: bytes, timestamp: int, secret: str, *, event_id: str) -> str:
    """The `X-Omnidaemon-Signature` value for `body` of event `event_id`, sent at `timestamp`.

    The HMAC-SHA256, keyed with `secret`, covers the bytes
    `f"{timestamp}\n{event_id}\n".encode() + body`: the `X-Omnidaemon-Timestamp` header (unix
    seconds), the `X-Omnidaemon-Event-Id` header and the body, each after a line break. A
    captured delivery can therefore be replayed neither later with a fresh timestamp nor as
    another event with a fresh event id (which receivers deduplicate on). A header value
    cannot hold a line break, so the three parts cannot be shifted into one another.

    Example:
        ```python
        sign(b'{"status":"succeeded"}', 1767225600, "s3cret", event_id="0192...")
        ```
    """
    message = f"{timestamp}\n{event_id}\n".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    body: bytes,
    signature: str | None,
    timestamp: int | str | None,
    secret: str,
    *,
    event_id: str | None = None,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Check a webhook delivery on the receiving side.

    Args:
        body: The raw request body, exactly as received (before any JSON parsing).
        signature: The `X-Omnidaemon-Signature` header (`None` if missing: not verified).
        timestamp: The `X-Omnidaemon-Timestamp` header, unix seconds (`None` if missing).
        secret: The shared `OMNIDAEMON_WEBHOOK_SECRET`.
        event_id: The `X-Omnidaemon-Event-Id` header, which the signature covers too, so that
            deduplicating on it is safe. Required: `None` (the header missing, or not passed)
            is not verified.
        tolerance: Seconds the timestamp may differ from `now`, either way; older deliveries
            are rejected as possible replays.
        now: The current unix time; default: `time.time()`.

    Returns:
        `True` only if the signature matches the body, timestamp and event id, and the
        timestamp is within the tolerance.

    Example:
        ```python
        ok = verify(
            request.body,
            request.headers.get("X-Omnidaemon-Signature"),
            request.headers.get("X-Omnidaemon-Timestamp"),
            os.environ["OMNIDAEMON_WEBHOOK_SECRET"],
            event_id=request.headers.get("X-Omnidaemon-Event-Id"),
        )
        ```
    """
    if signature is None or timestamp is None or event_id is None:
        return False
    if "\n" in event_id or "\r" in event_id:
        return False  # no header carries one; it would let bytes move between id and body
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        return False
    expected = sign(body, sent_at, secret, event_id=event_id).encode()
    # Constant time, so response timing does not leak how much of a forged signature matched.
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))
