"""Webhook settings: signing key, allowed hosts, private addresses, timeouts."""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from omnidaemon._env import env_count, env_flag, env_seconds
from omnidaemon.errors import ConfigurationError
from omnidaemon.retry import Backoff

__all__ = ["WebhookSettings"]

# Frozen, so one shared default is safe.
_DEFAULT_BACKOFF = Backoff(initial=1.0, maximum=60.0)


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
        max_in_flight: `OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT`, deliveries a worker runs at once
            (each one until delivered, refused or out of retry time); at least 1.
        max_queued_bytes: `OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES`, encoded bodies a worker keeps
            waiting for a delivery slot, in bytes (16 MiB by default). A webhook that does not
            fit is dropped: logged (`webhook dropped`) and counted, never waited for, so a
            slow or silent receiver costs a worker bounded memory and never delays
            acknowledgements. `0` queues nothing.
    """

    secret: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    timeout: float = 10.0
    max_elapsed: float = 300.0
    backoff: Backoff = _DEFAULT_BACKOFF
    max_in_flight: int = 32
    max_queued_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ConfigurationError(
                f"webhook max_in_flight={self.max_in_flight!r} must be at least 1"
            )
        if self.max_queued_bytes < 0:
            raise ConfigurationError(
                f"webhook max_queued_bytes={self.max_queued_bytes!r} must be >= 0"
            )
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
            allow_private=env_flag(env, "OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE", False),
            timeout=env_seconds(env, "OMNIDAEMON_WEBHOOK_TIMEOUT", 10.0, zero_ok=False),
            max_elapsed=env_seconds(env, "OMNIDAEMON_WEBHOOK_MAX_ELAPSED", 300.0, zero_ok=True),
            max_in_flight=env_count(env, "OMNIDAEMON_WEBHOOK_MAX_IN_FLIGHT", 32, minimum=1),
            max_queued_bytes=env_count(
                env, "OMNIDAEMON_WEBHOOK_MAX_QUEUED_BYTES", 16 * 1024 * 1024, minimum=0
            ),
        )
