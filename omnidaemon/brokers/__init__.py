"""Brokers: the event buses omnidaemon runs on, behind one contract (`base.Broker`)."""

from __future__ import annotations

from urllib.parse import urlsplit

from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.brokers.memory import MemoryBroker
from omnidaemon.errors import ConfigurationError

__all__ = ["Broker", "Delivery", "MemoryBroker", "Subscription", "open_broker"]

_SUPPORTED = ("memory://",)


def open_broker(url: str) -> Broker:
    """Make the broker a URL names (not yet connected).

    Raises:
        ConfigurationError: the URL's scheme is not one this release supports.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        name = url[len("memory://") :] if url.startswith("memory://") else ""
        return MemoryBroker(name)
    # Never echo the URL itself: it may carry a password.
    raise ConfigurationError(
        f"unsupported broker URL scheme {scheme!r}; this release supports: {', '.join(_SUPPORTED)}"
    )
