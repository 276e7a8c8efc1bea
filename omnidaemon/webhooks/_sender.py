"""Delivering webhooks: one HTTP connection pool, signed POSTs, retries within a time bound."""

from __future__ import annotations

import importlib.metadata
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal

import anyio
import httpx

from omnidaemon.envelope import dumps
from omnidaemon.observability.logging import get_logger
from omnidaemon.webhooks._settings import WebhookSettings
from omnidaemon.webhooks._signing import sign
from omnidaemon.webhooks._transport import PinnedTransport, pinned
from omnidaemon.webhooks._urls import (
    Resolver,
    WebhookRefused,
    _getaddrinfo,
    _Target,
    _Unresolved,
    _vet,
)

__all__ = ["WebhookOutcome", "WebhookSender", "WebhookStatus"]

_log = get_logger("omnidaemon.webhooks")

WebhookStatus = Literal["delivered", "failed", "refused"]

_SIGNATURE_HEADER = "X-Omnidaemon-Signature"
_TIMESTAMP_HEADER = "X-Omnidaemon-Timestamp"
_EVENT_ID_HEADER = "X-Omnidaemon-Event-Id"

# A receiver's response body is never used; reading a little lets a keep-alive connection be
# reused, and the cap stops a hostile receiver from streaming gigabytes into memory.
_MAX_RESPONSE_BYTES = 64 * 1024
# A retry needs at least this long to mean anything; less is left to the last answer.
_SHORTEST_ATTEMPT = 0.05


def _user_agent() -> str:
    # Not `omnidaemon.__version__`: the package's __init__ imports the app, which will import
    # this module, so the attribute does not exist yet while we load.
    try:
        return f"omnidaemon/{importlib.metadata.version('omnidaemon')}"
    except importlib.metadata.PackageNotFoundError:
        return "omnidaemon"


_USER_AGENT = _user_agent()


# Delivery -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WebhookOutcome:
    """How one webhook delivery ended.

    Attributes:
        status: `delivered` (a 2xx answer), `failed` (retries exhausted) or `refused` (the URL
            must not be called; no request was sent for it).
        attempts: Requests tried, including those that failed before an answer.
        status_code: The last HTTP status received, or `None`.
        error: The last error, or `None` when delivered.
        elapsed: Seconds from the start of the delivery to its outcome.
    """

    status: WebhookStatus
    attempts: int
    status_code: int | None
    error: str | None
    elapsed: float


def _retry_after(value: str | None) -> float | None:
    """Seconds a `Retry-After` header asks for (delta seconds or an HTTP date), or `None`."""
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() also accepts "²" or "٣", which float() then refuses.
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except Exception:  # the receiver's header: anything it sends is only advice
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class WebhookSender:
    """Delivers webhooks over one HTTP connection pool; use it as an async context manager.

    Every new connection goes to an address the URL check approved for the attempt, over http
    and https alike: the name is not looked up again (DNS rebinding); a kept-alive connection
    is reused only for its own host name. Over https the URL's host name is
    still the TLS server name (SNI) and the name the certificate must be valid for, and the
    `Host` header carries it. Redirects are not followed (a redirect could point at a private
    address) and proxy environment variables are ignored (the address checked must be the
    address connected to).

    Args:
        settings: Signing, allow-list and retry settings; default: `WebhookSettings.from_env()`.
        resolve: Host name resolver, for tests; default: the system resolver.
        ssl_context: Certificates trusted for https receivers, for a private CA or tests;
            default: certifi's CA bundle, as httpx uses.

    Attributes:
        counts: Outcomes so far by status, e.g. `{"delivered": 10, "failed": 1, "refused": 0}`.

    Example:
        ```python
        async with WebhookSender() as sender:
            outcome = await sender.deliver(url, {"status": "succeeded"}, event_id=event.id)
        ```
    """

    def __init__(
        self,
        settings: WebhookSettings | None = None,
        *,
        resolve: Resolver | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings if settings is not None else WebhookSettings.from_env()
        self.counts: dict[WebhookStatus, int] = {"delivered": 0, "failed": 0, "refused": 0}
        self._resolve = resolve or _getaddrinfo
        self._ssl_context = ssl_context
        self._client: httpx.AsyncClient | None = None
        self._warned_unsigned = False

    async def __aenter__(self) -> WebhookSender:
        if self._client is not None:
            raise RuntimeError("WebhookSender is already open")
        ssl_context = self._ssl_context or httpx.create_ssl_context(trust_env=False)
        self._client = httpx.AsyncClient(
            # httpx's default pool size, but never below the notifier's bound on deliveries,
            # so that the pool never becomes a second, hidden limit with its own timeouts.
            transport=PinnedTransport(
                ssl_context=ssl_context,
                limits=httpx.Limits(max_connections=max(100, self.settings.max_in_flight)),
            ),
            follow_redirects=False,
            trust_env=False,
            timeout=self.settings.timeout,
            headers={"User-Agent": _USER_AGENT},
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def deliver(
        self, url: str, body: Mapping[str, Any] | bytes, *, event_id: str
    ) -> WebhookOutcome:
        """POST `body` as JSON to `url`, retrying until delivered or `max_elapsed` has passed.

        Never raises for a delivery problem: the outcome says what happened, and is logged
        (with the host, never the full URL) and counted in `counts`.

        Args:
            url: The webhook URL, as published (untrusted: it is checked before each attempt).
            body: The JSON object to send, or its JSON encoding, sent as it is (a queue of
                deliveries keeps the bytes only).
            event_id: The event's id, sent as `X-Omnidaemon-Event-Id` for deduplication.

        Raises:
            TypeError: `body` cannot be encoded as JSON.
            RuntimeError: The sender is not open (`async with WebhookSender(...)`).
        """
        client = self._client
        if client is None:
            raise RuntimeError("WebhookSender is not open; use `async with WebhookSender(...)`")
        data = body if isinstance(body, bytes) else dumps(dict(body))
        settings = self.settings
        if settings.secret is None and not self._warned_unsigned:
            self._warned_unsigned = True
            _log.warning(
                "webhooks are unsigned",
                hint="set OMNIDAEMON_WEBHOOK_SECRET so receivers can verify deliveries",
            )
        start = anyio.current_time()
        deadline = start + settings.max_elapsed
        attempts = 0
        status_code: int | None = None
        error: str | None = None

        def finish(status: WebhookStatus) -> WebhookOutcome:
            outcome = WebhookOutcome(
                status, attempts, status_code, error, anyio.current_time() - start
            )
            self._record(outcome, url, event_id)
            return outcome

        while True:
            # The first attempt gets the full timeout; later ones never run past the deadline.
            limit = settings.timeout
            if attempts:
                left = deadline - anyio.current_time()
                if left < min(limit, _SHORTEST_ATTEMPT):
                    # The sleep overran the deadline: an attempt this short would only replace
                    # the receiver's last answer with a meaningless timeout.
                    return finish("failed")
                limit = min(limit, left)
            attempts += 1
            retry_after: float | None = None
            try:
                with anyio.fail_after(limit):
                    target = await _vet(url, settings, self._resolve)
                    status_code, retry_header = await self._post(
                        client, target, attempts, data, event_id
                    )
            except WebhookRefused as exc:
                attempts -= 1  # nothing was sent for this one
                error = str(exc)
                return finish("refused")
            except TimeoutError:
                error = f"timed out after {limit:.3g} s"
            except _Unresolved as exc:  # DNS may recover: retried like a network error
                error = str(exc)
            except httpx.HTTPError as exc:
                error = _describe(exc)
            else:
                if 200 <= status_code < 300:
                    error = None
                    return finish("delivered")
                error = f"HTTP {status_code}"
                if 300 <= status_code < 400:
                    error += " (redirects are not followed: publish the final URL)"
                if status_code in (429, 503):
                    retry_after = _retry_after(retry_header)
            delay = settings.backoff.delay(attempts)
            if retry_after is not None and retry_after > delay:
                # The receiver's "not before". The backoff stays the minimum, so that
                # `Retry-After: 0` cannot make us hammer a struggling receiver.
                delay = retry_after
                if anyio.current_time() + delay >= deadline:
                    error = f"{error}; Retry-After {retry_after:.3g} s is past the retry time left"
            if anyio.current_time() + delay + min(settings.timeout, _SHORTEST_ATTEMPT) > deadline:
                return finish("failed")
            await anyio.sleep(delay)

    async def _post(
        self, client: httpx.AsyncClient, target: _Target, attempt: int, data: bytes, event_id: str
    ) -> tuple[int, str | None]:
        timestamp = int(time.time())  # per attempt, so a late retry is not taken for a replay
        headers = {
            "Content-Type": "application/json",
            _EVENT_ID_HEADER: event_id,
            _TIMESTAMP_HEADER: str(timestamp),
        }
        if self.settings.secret is not None:
            headers[_SIGNATURE_HEADER] = sign(
                data, timestamp, self.settings.secret, event_id=event_id
            )
        url = target.url
        # A new connection goes to the address just checked, not to whatever a second lookup
        # returns (DNS rebinding); each attempt tries the next one. The URL keeps the name, for
        # SNI, certificate verification and `Host`.
        address = target.addresses[(attempt - 1) % len(target.addresses)]
        with pinned(url.raw_host.decode("ascii"), target.port, address):
            async with client.stream("POST", url, content=data, headers=headers) as response:
                received = 0
                async for chunk in response.aiter_raw():
                    received += len(chunk)
                    if received > _MAX_RESPONSE_BYTES:
                        break
                return response.status_code, response.headers.get("Retry-After")

    def _record(self, outcome: WebhookOutcome, url: str, event_id: str) -> None:
        self.counts[outcome.status] += 1
        try:
            host: str | None = httpx.URL(url).host or None
        except (httpx.InvalidURL, TypeError):
            host = None
        log = _log.info if outcome.status == "delivered" else _log.warning
        log(
            f"webhook {outcome.status}",
            event_id=event_id,
            host=host,
            status=outcome.status,
            attempts=outcome.attempts,
            status_code=outcome.status_code,
            error=outcome.error,
            elapsed=round(outcome.elapsed, 3),
        )
