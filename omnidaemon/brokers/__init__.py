"""Brokers: the event buses omnidaemon runs on, behind one contract (`base.Broker`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.brokers.redis import RedisBroker, redact_url
from omnidaemon.brokers.redis._cluster import names_several_nodes, seeds
from omnidaemon.errors import ConfigurationError

__all__ = ["Broker", "Delivery", "MemoryBroker", "RedisBroker", "Subscription", "open_broker"]

_SUPPORTED = ("redis://", "rediss://", "unix://", "memory://")


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
    if scheme in ("redis", "rediss") and names_several_nodes(url):
        seeds(url)  # a Redis Cluster's seed list: every host and port is checked
        return RedisBroker(url) if maxlen is None else RedisBroker(url, maxlen=maxlen)
    if scheme in ("redis", "rediss", "unix"):
        try:
            urlsplit(url).port  # noqa: B018 - parsing it is the check
        except ValueError:
            # Never echo the URL: it may carry a password.
            raise ConfigurationError(
                "the broker URL's port is not a number from 0 to 65535"
            ) from None
        if scheme != "unix" and not urlsplit(url).hostname:
            raise ConfigurationError(f"broker URL {redact_url(url)} names no host")
        return RedisBroker(url) if maxlen is None else RedisBroker(url, maxlen=maxlen)
    # Never echo the URL itself: it may carry a password.
    raise ConfigurationError(
        f"unsupported broker URL scheme {scheme!r}; this release supports: {', '.join(_SUPPORTED)}"
    )
