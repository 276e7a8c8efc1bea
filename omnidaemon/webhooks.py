"""Webhooks: POST a finished event's outcome to a URL, signed, retried, and never to a private host.

A receiver checks a delivery with `verify`:

```python
from omnidaemon.webhooks import verify

ok = verify(
    request.body,
    request.headers["X-Omnidaemon-Signature"],
    request.headers["X-Omnidaemon-Timestamp"],
    secret=os.environ["OMNIDAEMON_WEBHOOK_SECRET"],
)
```

URLs come from whoever publishes an event, so they are untrusted: `check_url` refuses schemes
other than http(s), URLs with credentials, hosts outside the allow-list and any host that
resolves to a loopback, private, link-local (cloud metadata) or otherwise non-public address.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import ipaddress
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Literal

import anyio
import httpx
import structlog

from omnidaemon.envelope import dumps
from omnidaemon.errors import ConfigurationError, OmniDaemonError
from omnidaemon.retry import Backoff

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

_log = structlog.get_logger("omnidaemon.webhooks")

WebhookStatus = Literal["delivered", "failed", "refused"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""`resolve(host, port)` returns the IP addresses a connection to `host` may use."""

_SIGNATURE_HEADER = "X-Omnidaemon-Signature"
_TIMESTAMP_HEADER = "X-Omnidaemon-Timestamp"
_EVENT_ID_HEADER = "X-Omnidaemon-Event-Id"

_ALLOW_PRIVATE_HINT = "set OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE=1 to allow private addresses"
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# A receiver's response body is never used; reading a little lets a keep-alive connection be
# reused, and the cap stops a hostile receiver from streaming gigabytes into memory.
_MAX_RESPONSE_BYTES = 64 * 1024
# A retry needs at least this long to mean anything; less is left to the last answer.
_SHORTEST_ATTEMPT = 0.05
# Frozen, so one shared default is safe.
_DEFAULT_BACKOFF = Backoff(initial=1.0, maximum=60.0)


def _user_agent() -> str:
    # Not `omnidaemon.__version__`: the package's __init__ imports the app, which will import
    # this module, so the attribute does not exist yet while we load.
    try:
        return f"omnidaemon/{importlib.metadata.version('omnidaemon')}"
    except importlib.metadata.PackageNotFoundError:
        return "omnidaemon"


_USER_AGENT = _user_agent()


class WebhookRefused(OmniDaemonError):
    """A webhook URL that must not be called; the message says why and which setting allows it."""


class _Unresolved(OSError):
    """The host name did not resolve; a transient failure, worth another attempt."""


# Settings -----------------------------------------------------------------------------------


def _env_seconds(env: Mapping[str, str], name: str, default: float, *, zero_ok: bool) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        bound = "at least 0" if zero_ok else "more than 0"
        raise ConfigurationError(f"{name}={raw!r} must be a finite number {bound}")
    return value


def _env_bool(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ConfigurationError(f"{name}={raw!r}: use 1/true to enable or 0/false to disable")


def _normalize_host_pattern(entry: str) -> str:
    """Lower-case a host name or `*.suffix` pattern the way httpx normalizes URL hosts.

    Raises:
        ValueError: `entry` is not a host name, an IP address or `*.` and a host name.
    """
    if _is_ip(entry):
        return _ip_text(entry)
    wildcard = entry.startswith("*.")
    name = entry[2:] if wildcard else entry
    if not name or any(c in name for c in "*/:@?#[] "):
        raise ValueError(entry)
    try:
        host = httpx.URL(f"http://{name}/").host.rstrip(".")
    except httpx.InvalidURL:
        raise ValueError(entry) from None
    if not host:
        raise ValueError(entry)
    return f"*.{host}" if wildcard else host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return False
    return True


def _ip_text(text: str) -> str:
    return str(ipaddress.ip_address(text.strip("[]")))


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """How webhooks are signed, where they may go, and how long they are retried.

    Attributes:
        secret: `OMNIDAEMON_WEBHOOK_SECRET`, the HMAC key; `None` sends unsigned webhooks (and
            each sender warns once). Never shown in `repr`.
        allowed_hosts: `OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS`, comma-separated host names; an
            entry `*.example.com` allows every subdomain of example.com (not example.com
            itself). Empty allows any public host.
        allow_private: `OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE` (`1`/`true`): allow loopback, private,
            link-local and other non-public addresses. Off by default, so that a published
            event cannot make the worker call internal services (SSRF).
        timeout: `OMNIDAEMON_WEBHOOK_TIMEOUT`, seconds one request may take in all.
        max_elapsed: `OMNIDAEMON_WEBHOOK_MAX_ELAPSED`, seconds after the first attempt during
            which failed deliveries are retried; no attempt starts later. `0` tries once.
        backoff: The delay between attempts.
    """

    secret: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    timeout: float = 10.0
    max_elapsed: float = 300.0
    backoff: Backoff = _DEFAULT_BACKOFF

    def __post_init__(self) -> None:
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise ConfigurationError(f"webhook timeout={self.timeout!r} must be more than 0")
        if not (math.isfinite(self.max_elapsed) and self.max_elapsed >= 0):
            raise ConfigurationError(f"webhook max_elapsed={self.max_elapsed!r} must be >= 0")
        normalized = []
        for entry in self.allowed_hosts:
            try:
                normalized.append(_normalize_host_pattern(entry.strip()))
            except ValueError:
                raise ConfigurationError(
                    f"webhook allowed host {entry!r} is not a host name: use names like "
                    "'hooks.example.com' or '*.example.com', without scheme, port or path"
                ) from None
        # Frozen: normalizing in place is the one write, before anyone can see the object.
        object.__setattr__(self, "allowed_hosts", tuple(normalized))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WebhookSettings:
        """Read the settings from `env` (default: `os.environ`).

        Raises:
            ConfigurationError: A variable has a value that cannot work; the message names it.
        """
        env = os.environ if env is None else env
        hosts_var = "OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS"
        entries = [e.strip() for e in env.get(hosts_var, "").split(",") if e.strip()]
        for entry in entries:
            if entry == "*":
                raise ConfigurationError(
                    f"{hosts_var}='*': leave it empty to allow any public host"
                )
            try:
                _normalize_host_pattern(entry)
            except ValueError:
                raise ConfigurationError(
                    f"{hosts_var}: {entry!r} is not a host name; use names like "
                    "'hooks.example.com' or '*.example.com', without scheme, port or path"
                ) from None
        return cls(
            secret=env.get("OMNIDAEMON_WEBHOOK_SECRET") or None,
            allowed_hosts=tuple(entries),
            allow_private=_env_bool(env, "OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE"),
            timeout=_env_seconds(env, "OMNIDAEMON_WEBHOOK_TIMEOUT", 10.0, zero_ok=False),
            max_elapsed=_env_seconds(env, "OMNIDAEMON_WEBHOOK_MAX_ELAPSED", 300.0, zero_ok=True),
        )


# Signatures ---------------------------------------------------------------------------------


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


# URL checks ---------------------------------------------------------------------------------


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


def _non_public_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `address` is not a public unicast address, or `None` if it is one."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that IPv4 address; judge that.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return _non_public_reason(embedded)
    if address.is_unspecified:
        return "an unspecified"
    if address.is_loopback:
        return "a loopback"
    if address.is_link_local:
        return "a link-local (cloud metadata services live here)"
    if address.is_multicast:
        return "a multicast"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10)"
    if address.is_reserved:
        return "a reserved"
    if address.is_private or (isinstance(address, ipaddress.IPv6Address) and address.is_site_local):
        return "a private"
    if not address.is_global:
        return "a non-public"
    return None


def _shown(url: httpx.URL) -> str:
    # What a message may show: never the credentials, path or query, which often hold tokens.
    port = f":{url.port}" if url.port is not None else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}"


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    name = _ip_text(host) if _is_ip(host) else host.rstrip(".")
    for pattern in allowed:
        if pattern.startswith("*."):
            if name.endswith(pattern[1:]):
                return True
        elif name == pattern:
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Target:
    url: httpx.URL
    addresses: tuple[str, ...]


async def _vet(url: str, settings: WebhookSettings, resolve: Resolver) -> _Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise WebhookRefused("webhook URL is not a valid URL; use http(s)://host/path") from None
    if parsed.scheme not in ("http", "https"):
        raise WebhookRefused(
            f"webhook URL scheme {parsed.scheme!r} is refused: only http and https are called"
        )
    if not parsed.host:
        raise WebhookRefused("webhook URL has no host; use http(s)://host/path")
    if parsed.userinfo:
        raise WebhookRefused(
            f"webhook URL {_shown(parsed)} carries credentials (user:password@), which are "
            "refused: receivers authenticate deliveries with the signature "
            "(OMNIDAEMON_WEBHOOK_SECRET)"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise WebhookRefused(f"webhook URL {_shown(parsed)} has an invalid port")
    host = parsed.host
    if settings.allowed_hosts and not _host_allowed(host, settings.allowed_hosts):
        raise WebhookRefused(
            f"webhook host {host!r} is not allowed: add it to OMNIDAEMON_WEBHOOK_ALLOWED_HOSTS"
        )
    if _is_ip(host):
        addresses = [_ip_text(host)]
    else:
        try:
            addresses = list(dict.fromkeys(await resolve(host, port)))
        except OSError as exc:
            raise _Unresolved(f"cannot resolve {host!r}: {exc}") from exc
        if not addresses:
            raise _Unresolved(f"cannot resolve {host!r}: no address")
    if not settings.allow_private:
        for text in addresses:
            # A zone (`fe80::1%eth0`) is not part of the address.
            reason = _non_public_reason(ipaddress.ip_address(text.split("%", 1)[0]))
            if reason is None:
                continue
            where = text if text == host else f"{host!r}, which resolves to {text}"
            raise WebhookRefused(
                f"webhook to {where} is refused: {reason} address; {_ALLOW_PRIVATE_HINT}"
            )
    return _Target(parsed, tuple(addresses))


async def check_url(
    url: str, settings: WebhookSettings, *, resolve: Resolver | None = None
) -> None:
    """Refuse a webhook URL that must not be called.

    Only http and https URLs without credentials are accepted; the host must match
    `settings.allowed_hosts` when that is set; and, unless `settings.allow_private`, every
    address the host resolves to must be public: loopback, private, link-local (cloud
    metadata), multicast, reserved, unspecified and carrier-grade NAT addresses are refused,
    also as literals and inside IPv4-mapped IPv6 addresses.

    Args:
        url: The URL as published.
        settings: The allow-list and private-address policy.
        resolve: `resolve(host, port)` returns the host's addresses; default: the system
            resolver (`anyio.getaddrinfo`). Tests pass a fake one.

    Raises:
        WebhookRefused: The URL must not be called; the message says why and which setting
            allows it, without the URL's credentials, path or query.
        OSError: The host name could not be resolved (a transient failure `deliver` retries).
    """
    await _vet(url, settings, resolve or _getaddrinfo)


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

    Redirects are not followed (a redirect could point at a private address) and proxy
    environment variables are ignored (the address checked must be the address connected to).

    Args:
        settings: Signing, allow-list and retry settings; default: `WebhookSettings.from_env()`.
        resolve: Host name resolver, for tests; default: the system resolver.

    Attributes:
        counts: Outcomes so far by status, e.g. `{"delivered": 10, "failed": 1, "refused": 0}`.

    Example:
        ```python
        async with WebhookSender() as sender:
            outcome = await sender.deliver(url, {"status": "succeeded"}, event_id=event.id)
        ```
    """

    def __init__(
        self, settings: WebhookSettings | None = None, *, resolve: Resolver | None = None
    ) -> None:
        self.settings = settings if settings is not None else WebhookSettings.from_env()
        self.counts: dict[WebhookStatus, int] = {"delivered": 0, "failed": 0, "refused": 0}
        self._resolve = resolve or _getaddrinfo
        self._client: httpx.AsyncClient | None = None
        self._warned_unsigned = False

    async def __aenter__(self) -> WebhookSender:
        if self._client is not None:
            raise RuntimeError("WebhookSender is already open")
        self._client = httpx.AsyncClient(
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

    async def deliver(self, url: str, body: Mapping[str, Any], *, event_id: str) -> WebhookOutcome:
        """POST `body` as JSON to `url`, retrying until delivered or `max_elapsed` has passed.

        Never raises for a delivery problem: the outcome says what happened, and is logged
        (with the host, never the full URL) and counted in `counts`.

        Args:
            url: The webhook URL, as published (untrusted: it is checked before each attempt).
            body: The JSON object to send.
            event_id: The event's id, sent as `X-Omnidaemon-Event-Id` for deduplication.

        Raises:
            TypeError: `body` cannot be encoded as JSON.
            RuntimeError: The sender is not open (`async with WebhookSender(...)`).
        """
        client = self._client
        if client is None:
            raise RuntimeError("WebhookSender is not open; use `async with WebhookSender(...)`")
        data = dumps(dict(body))
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
            headers[_SIGNATURE_HEADER] = sign(data, timestamp, self.settings.secret)
        url = target.url
        if url.scheme == "http":
            # Connect to the address just checked, not to whatever a second DNS lookup returns
            # (DNS rebinding). Over https the certificate check for the host name stops a
            # rebound connection before any request byte is sent, so the name is kept for SNI.
            address = target.addresses[(attempt - 1) % len(target.addresses)]
            headers["Host"] = url.netloc.decode("ascii")
            url = url.copy_with(host=address.split("%", 1)[0])
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
