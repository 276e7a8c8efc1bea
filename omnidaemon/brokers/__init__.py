"""Brokers: the event buses omnidaemon runs on, behind one contract (`base.Broker`)."""

from __future__ import annotations

import importlib.util
from urllib.parse import urlsplit

from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.brokers.redis import RedisBroker
from omnidaemon.brokers.redis import redact_url as _redact_redis_url
from omnidaemon.brokers.redis._cluster import seeds
from omnidaemon.errors import ConfigurationError

__all__ = [
    "Broker",
    "Delivery",
    "MemoryBroker",
    "RedisBroker",
    "Subscription",
    "open_broker",
    "redact_url",
]

_SUPPORTED = ("redis://", "rediss://", "unix://", "memory://", "nats://", "tls://")


def redact_url(url: str) -> str:
    """`url` with its credentials masked (`***`), for any broker's scheme: a password, a NATS
    token (`nats://***@host`), and secret query parameters. Safe to log and to put in errors.
    """
    scheme = url.partition("://")[0].lower()
    if scheme not in ("nats", "tls"):
        return _redact_redis_url(url)
    try:
        from omnidaemon.brokers.nats import redact_nats_url
    except ImportError:  # no NATS client installed: mask everything that may be secret
        head, question, _ = url.partition("?")
        prefix, sep, rest = head.partition("://")
        _, at, hosts = rest.rpartition("@")
        masked = f"{prefix}{sep}{'***@' if at else ''}{hosts}"
        return f"{masked}?***" if question else masked
    return redact_nats_url(url)


def open_broker(url: str, *, maxlen: int | None = None) -> Broker:
    """Make the broker a URL names (not yet connected).

    `maxlen` caps each topic stream of a Redis broker (approximately).

    Raises:
        ConfigurationError: the URL's scheme is not one this release supports.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        name = url[len("memory://") :] if url.startswith("memory://") else ""
        return MemoryBroker(name)
    if scheme == "unix":
        return RedisBroker(url) if maxlen is None else RedisBroker(url, maxlen=maxlen)
    if scheme in ("redis", "rediss"):
        if not urlsplit(url).netloc.rpartition("@")[2]:
            raise ConfigurationError(f"broker URL {redact_url(url)} names no host")
        seeds(url)  # every host and port checked; the error never echoes the URL
        return RedisBroker(url) if maxlen is None else RedisBroker(url, maxlen=maxlen)
    if scheme in ("nats", "tls"):
        if importlib.util.find_spec("nats") is None:
            raise ConfigurationError(
                "a nats:// broker URL needs the NATS client: pip install 'omnidaemon[nats]'"
            )
        from omnidaemon.brokers.nats import NatsBroker

        return NatsBroker(url) if maxlen is None else NatsBroker(url, maxlen=maxlen)
    # Never echo the URL itself: it may carry a password.
    raise ConfigurationError(
        f"unsupported broker URL scheme {scheme!r}; this release supports: {', '.join(_SUPPORTED)}"
    )
