"""The NATS broker's state and connection: URL handling, settings, the nats-py client, the
JetStream requests every part uses, and making sure streams and consumers exist.

The connection is opened on first use, not by `connect` (a worker started before its bus waits
for it with `ping`); nats-py then reconnects by itself, to any seed, for as long as it runs.
"""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from omnidaemon._env import env_count
from omnidaemon.brokers.base import Broker, Delivery, Subscription
from omnidaemon.brokers.nats._names import Names
from omnidaemon.brokers.nats._url import parse_nats_url, redact_nats_url
from omnidaemon.errors import BusUnavailable, ConfigurationError
from omnidaemon.observability.logging import get_logger

__all__ = [
    "REPLICAS_ENV",
    "JetStreamError",
    "NatsCore",
    "Reader",
    "msg_seq",
    "server_time",
]

_log = get_logger("omnidaemon.broker")

REPLICAS_ENV = "OMNIDAEMON_NATS_REPLICAS"
REQUEST_TIMEOUT = 5  # one JetStream API request or publish; a publish retries until its own
_NOT_FOUND_CODES = frozenset({10059, 10014})  # stream not found, consumer not found


class JetStreamError(Exception):
    """An error reply of the JetStream API (`code` is the HTTP-like code, `err_code` NATS's)."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(f"{description} (code {code}, err_code {err_code})")
        self.code = code
        self.err_code = err_code

    @property
    def not_found(self) -> bool:
        return self.err_code in _NOT_FOUND_CODES or self.code == 404


@dataclass(slots=True)
class Held:
    """A delivery this process handed out and has not settled: what its lease needs."""

    delivery: Delivery
    delivered: int  # the server's delivery count when it was handed out
    renewed_at: float  # monotonic time the lease was last (re)started, at the latest
    # Deliveries of the entry that were never run (see `_fetching`, parked takeovers): not
    # attempts. `parked`: this one too, for as long as it waits in its reader.
    free: int = 0
    parked: bool = False


@dataclass(slots=True)
class Reader:
    """One consumer (a worker's reader of one agent) in this process: its inbox, the messages
    the server pushed to it that no fetch returned yet, and what it holds."""

    inbox: str
    sub: Any = None  # the nats-py subscription on `inbox.*`
    # (message, monotonic time it arrived): entries and pull statuses, in arrival order
    buffer: list[tuple[Msg, float]] = field(default_factory=list)
    held: dict[int, Held] = field(default_factory=dict)
    # Held deliveries the server handed out again after another consumer's lease ran out:
    # kept for `reclaim` to hand out (a takeover), renewed by this process meanwhile.
    parked: list[Delivery] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)
    interrupted: anyio.Event = field(default_factory=anyio.Event)
    request_seq: int = 0
    registered_at: float = -1e9  # monotonic time of its last registry write
    # The reply subject of a waiting pull request the server may still answer (one whose
    # fetch was interrupted), and until when (monotonic).
    waiting: str | None = None
    waiting_until: float = 0.0

    async def on_message(self, msg: Msg) -> None:
        if msg.subject == self.waiting:
            self.waiting = None  # answered: an entry (the request asks for one) or its end
        # The event loop's clock (asyncio's is `time.monotonic`), read without anyio's
        # lookup of the running backend: this runs for every message.
        self.buffer.append((msg, time.monotonic()))
        self.arrived.set()


class NatsCore(Broker):
    """A NATS broker's state and connection; `NatsBroker` adds the commands."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "omni",
        maxlen: int = 100_000,
        topic_maxlen: Mapping[str, int] | None = None,
        publish_timeout: float = 10.0,
        replicas: int | None = None,
        lease: float = 30.0,
    ) -> None:
        self._raw_url = url
        self._target = parse_nats_url(url)
        self._url = redact_nats_url(url)
        self._prefix = prefix
        self._names = Names(prefix)
        self._maxlen = maxlen
        self._topic_maxlen = dict(topic_maxlen or {})
        self._publish_timeout = publish_timeout
        if replicas is None:
            replicas = env_count(os.environ, REPLICAS_ENV, 1)
        if not 1 <= replicas <= 5:
            raise ConfigurationError(f"replicas must be 1 to 5, not {replicas}")
        self._replicas = replicas
        self._lease = lease
        self._client: Client | None = None
        self._connecting = anyio.Lock()
        self._connected = False
        self._streams: set[str] = set()  # streams known to exist (a cache; cleared on loss)
        self._groups: dict[Subscription, float] = {}  # groups known to exist -> their AckWait
        self._last_error: BaseException | None = None  # nats-py's last, while connecting
        self._readers: dict[tuple[Subscription, str], Reader] = {}

    @property
    def url(self) -> str:
        return self._url

    async def connect(self) -> None:
        self._connected = True

    async def close(self) -> None:
        self._connected = False
        client, self._client = self._client, None
        readers, self._readers = list(self._readers.values()), {}
        self._streams.clear()
        self._groups.clear()
        if client is None:
            return
        with anyio.CancelScope(shield=True):
            for reader in readers:
                reader.interrupted.set()
            try:
                with anyio.move_on_after(2.0):
                    await client.close()
            except Exception as exc:  # closing a broken connection: nothing left to do
                _log.debug("closing the NATS connection failed", error=repr(exc))

    # The client ----------------------------------------------------------------------------

    async def _nc(self) -> Client:
        client = self._client
        if client is not None and client.is_connected:
            return client
        if client is not None and not client.is_closed:
            # nats-py reconnects by itself meanwhile; failing now (rather than queueing in its
            # buffer) lets every caller retry with its own backoff and say the bus is away.
            raise ConnectionError(f"the connection to NATS at {self._url} is down; reconnecting")
        async with self._connecting:
            if self._client is not None and not self._client.is_closed:
                return self._client
            self._client = await self._open()
            return self._client

    async def _open(self) -> Client:
        target = self._target
        options: dict[str, Any] = {
            "servers": list(target.servers),
            "connect_timeout": 2,
            "allow_reconnect": True,
            # Each seed tried twice at first (nats-py would try for ever): a bus that is not
            # there fails this call, and the caller retries with its own backoff. Once
            # connected, reconnecting goes on for ever (set below).
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.5,
            "ping_interval": 10,
            "max_outstanding_pings": 3,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnect,
            "reconnected_cb": self._on_reconnect,
            "name": "omnidaemon",
        }
        if target.user is not None:
            options["user"], options["password"] = target.user, target.password
        if target.token is not None:
            options["token"] = target.token
        if target.creds is not None:
            options["user_credentials"] = target.creds
        if target.nkey is not None:
            options["nkeys_seed"] = target.nkey
        if target.tls:
            context = ssl.create_default_context(cafile=target.tls_ca)
            options["tls"] = context
        self._last_error = None
        try:
            client = await nats.connect(**options)
        except (NatsError, OSError, TimeoutError) as exc:
            if _is_auth_error(exc) or _is_auth_error(self._last_error):
                raise ConfigurationError(
                    f"the bus at {self._url} refused the broker URL's credentials"
                ) from None
            raise ConnectionError(
                f"cannot reach NATS at {self._url}: {type(exc).__name__}: {exc}"
            ) from None
        client.options["max_reconnect_attempts"] = -1
        return client

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        _log.debug("NATS client error", error=f"{type(exc).__name__}: {exc}")

    async def _on_disconnect(self) -> None:
        _log.debug("NATS connection lost; reconnecting", bus=self._url)

    async def _on_reconnect(self) -> None:
        _log.debug("NATS connection back", bus=self._url)

    # JetStream requests ---------------------------------------------------------------------

    async def _api(
        self,
        subject: str,
        body: Mapping[str, Any] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """One JetStream API request (`$JS.API.<subject>`); raises `JetStreamError` on an error
        reply, `ConnectionError` when the bus does not answer."""
        client = await self._nc()
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            reply = await client.request(f"$JS.API.{subject}", payload, timeout=timeout)
        except NoRespondersError:
            raise ConnectionError(f"JetStream at {self._url} does not answer") from None
        except NatsTimeout:
            raise TimeoutError(f"JetStream at {self._url} did not answer in time") from None
        return _checked(json.loads(reply.data))

    async def _publish(
        self,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
    ) -> dict[str, Any]:
        """Publish to a stream and wait for its acknowledgement (the `PubAck`): durable when
        this returns. Raises `NoRespondersError` when no stream takes the subject."""
        client = await self._nc()
        try:
            reply = await client.request(subject, data, timeout=timeout, headers=headers)
        except NatsTimeout:
            raise TimeoutError(f"JetStream at {self._url} did not acknowledge in time") from None
        return _checked(json.loads(reply.data))

    async def _direct_get_last(self, stream: str, subject: str) -> Msg | None:
        """The last message on `subject` in `stream` (its headers carry `Nats-Sequence` and
        `Nats-Time-Stamp`), or `None`."""
        client = await self._nc()
        try:
            msg = await client.request(
                f"$JS.API.DIRECT.GET.{stream}.{subject}", b"", timeout=REQUEST_TIMEOUT
            )
        except NoRespondersError:
            # Direct gets are answered by the stream itself: no stream, no answer.
            return None
        except NatsTimeout:
            raise TimeoutError(f"JetStream at {self._url} did not answer in time") from None
        status = (msg.headers or {}).get("Status")
        if status == "404":
            return None
        if status:
            raise JetStreamError(int(status), 0, (msg.headers or {}).get("Description", ""))
        return msg

    async def _has_entry(self, stream: str, seq: int) -> bool:
        """Whether `stream` still holds the message `seq` (not trimmed or purged away)."""
        client = await self._nc()
        try:
            msg = await client.request(
                f"$JS.API.DIRECT.GET.{stream}",
                json.dumps({"seq": seq}).encode(),
                timeout=REQUEST_TIMEOUT,
            )
        except NoRespondersError:
            return False
        except NatsTimeout:
            raise TimeoutError(f"JetStream at {self._url} did not answer in time") from None
        return not (msg.headers or {}).get("Status")

    async def _flush(self) -> None:
        client = await self._nc()
        try:
            await client.flush(timeout=REQUEST_TIMEOUT)
        except NatsTimeout:
            raise TimeoutError(f"NATS at {self._url} did not answer a flush in time") from None


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    error = reply.get("error")
    if error:
        raise JetStreamError(
            int(error.get("code", 0)), int(error.get("err_code", 0)), error.get("description", "")
        )
    return reply


def _is_auth_error(exc: BaseException | None) -> bool:
    if exc is None:
        return False
    text = str(exc).lower()
    return "authorization" in text or "authentication" in text


def unavailable(url: str, exc: BaseException) -> BusUnavailable:
    """The error a publish raises once it gave up on a bus that does not answer."""
    return BusUnavailable(f"the bus at {url} is unavailable: {type(exc).__name__}: {exc}")


def msg_seq(msg: Msg) -> int:
    """The stream sequence a direct get's reply carries (0 if none)."""
    return int((msg.headers or {}).get("Nats-Sequence", 0))


def server_time(text: str | None) -> float:
    """An RFC 3339 time of the server as a Unix time; 0 when absent or unreadable."""
    try:
        return datetime.fromisoformat(text).timestamp() if text else 0.0
    except ValueError:
        return 0.0
