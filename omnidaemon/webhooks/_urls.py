"""Which webhook URLs may be called: schemes, credentials, the allow-list and SSRF."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import httpx

from omnidaemon.errors import OmniDaemonError
from omnidaemon.webhooks._settings import WebhookSettings, _ip_text, _is_ip

__all__ = ["Resolver", "WebhookRefused", "check_url"]

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""`resolve(host, port)` returns the IP addresses a connection to `host` may use."""

_ALLOW_PRIVATE_HINT = "set OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE=1 to allow private addresses"
_CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class WebhookRefused(OmniDaemonError):
    """A webhook URL that must not be called; the message says why and which setting allows it."""


class _Unresolved(OSError):
    """The host name did not resolve; a transient failure, worth another attempt."""


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
    port: int  # the scheme's default when the URL names none
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
    return _Target(parsed, port, tuple(addresses))


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
