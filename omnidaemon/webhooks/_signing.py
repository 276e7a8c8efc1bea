"""Signing webhook deliveries, and checking them on the receiving side."""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["sign", "verify"]


def sign(body: bytes, timestamp: int, secret: str) -> str:
    """The `X-Omnidaemon-Signature` value for `body` sent at `timestamp` (unix seconds).

    The HMAC-SHA256 covers `f"{timestamp}."` followed by the body, so a captured delivery
    cannot be replayed later with a fresh timestamp.

    Example:
        ```python
        sign(b'{"status":"succeeded"}', 1767225600, "s3cret")  # 'sha256=7a988ae1...'
        ```
    """
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    body: bytes,
    signature: str | None,
    timestamp: int | str | None,
    secret: str,
    *,
    tolerance: float = 300,
    now: float | None = None,
) -> bool:
    """Check a webhook delivery on the receiving side.

    Args:
        body: The raw request body, exactly as received (before any JSON parsing).
        signature: The `X-Omnidaemon-Signature` header (`None` if missing: not verified).
        timestamp: The `X-Omnidaemon-Timestamp` header, unix seconds (`None` if missing).
        secret: The shared `OMNIDAEMON_WEBHOOK_SECRET`.
        tolerance: Seconds the timestamp may differ from `now`, either way; older deliveries
            are rejected as possible replays.
        now: The current unix time; default: `time.time()`.

    Returns:
        `True` only if the signature matches and the timestamp is within the tolerance.
    """
    if signature is None or timestamp is None:
        return False
    try:
        sent_at = int(timestamp)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - sent_at) > tolerance:
        return False
    expected = sign(body, sent_at, secret).encode()
    # Constant time, so response timing does not leak how much of a forged signature matched.
    return hmac.compare_digest(expected, signature.encode("utf-8", "replace"))
