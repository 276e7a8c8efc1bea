"""The exceptions omnidaemon raises, all under `OmniDaemonError`."""

from __future__ import annotations

__all__ = [
    "AgentFailed",
    "AppLoadError",
    "BusUnavailable",
    "Cancelled",
    "ConfigurationError",
    "DelayTooLong",
    "NotFound",
    "NotReplicated",
    "OmniDaemonError",
    "PayloadTooLarge",
    "PayloadValidationError",
]


class OmniDaemonError(Exception):
    """Base of every error omnidaemon raises on purpose."""


class ConfigurationError(OmniDaemonError):
    """A setting, broker URL or agent declaration cannot work; the message says what to change."""


class BusUnavailable(OmniDaemonError):
    """The bus did not answer within the timeout; the message names it (without password)."""


class NotReplicated(BusUnavailable):
    """The bus stored a publish, but fewer replicas than `min_replicas` confirmed it in time.

    Raised only under `OMNIDAEMON_REDIS_MIN_REPLICAS` (or `RedisBroker(min_replicas=...)`):
    the event is on the master and is delivered unless that master fails before a replica
    copies it. Publishing it again is safe (delivery is at least once) but may deliver it twice.
    """


class NotFound(OmniDaemonError, LookupError):
    """A topic, agent or event named by the caller is not on the bus; the message says which."""


class AgentFailed(OmniDaemonError):
    """The agent handling an `App.request` gave up on it (it was dead-lettered).

    Attributes:
        error_type: The remote exception's class name (`ValueError`, `Reject`, ...).
        message: The remote exception's message.
        agent: The agent that failed.
        event_id: The request's event id.
    """

    def __init__(self, error_type: str, message: str, *, agent: str, event_id: str) -> None:
        super().__init__(f"agent {agent!r} failed on {event_id}: {error_type}: {message}")
        self.error_type = error_type
        self.message = message
        self.agent = agent
        self.event_id = event_id


class Cancelled(AgentFailed):
    """The event of an `App.request` was cancelled (`App.cancel`) before its agent finished
    it. `message` is the reason given to the cancel."""


class AppLoadError(OmniDaemonError):
    """`module:attribute` did not name an importable `App`."""


class PayloadValidationError(OmniDaemonError):
    """A payload or return value did not match the type its agent declared."""


class PayloadTooLarge(OmniDaemonError, ValueError):
    """An encoded event is larger than `max_payload_bytes` (`OMNIDAEMON_MAX_PAYLOAD_BYTES`).

    Raised by publishing, before anything is sent. A worker dead-letters an entry over its own
    limit at once, without reading it, with this class's name as the error type.

    Attributes:
        topic: Where the event was to be published.
        size: The encoded event's size in bytes.
        limit: The `max_payload_bytes` it exceeds.
    """

    def __init__(self, topic: str, size: int, limit: int) -> None:
        super().__init__(
            f"cannot publish to {topic!r}: the event is {size:,} bytes, over "
            f"max_payload_bytes ({limit:,}; OMNIDAEMON_MAX_PAYLOAD_BYTES)"
        )
        self.topic = topic
        self.size = size
        self.limit = limit


class DelayTooLong(OmniDaemonError, ValueError):
    """A publish asked to hold its event back longer than `max_delay` (`OMNIDAEMON_MAX_DELAY`,
    30 days by default).

    A delayed event waits on the bus outside the topic's `stream_maxlen`, so without a bound a
    publisher could keep any amount of data there for any time. Raised by publishing, before
    anything is sent.

    Attributes:
        topic: Where the event was to be published.
        delay: The seconds asked for (`inf` included).
        limit: The `max_delay` it exceeds.
    """

    def __init__(self, topic: str, delay: float, limit: float) -> None:
        super().__init__(
            f"cannot publish to {topic!r}: a delay of {delay:,.0f} s is over max_delay "
            f"({limit:,.0f} s = {limit / 86_400:g} days; OMNIDAEMON_MAX_DELAY)"
        )
        self.topic = topic
        self.delay = delay
        self.limit = limit
