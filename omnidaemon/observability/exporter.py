"""A worker's Prometheus endpoint: `/metrics`, with liveness and readiness beside it.

A worker started with `--metrics-port` serves, on that port:

- `GET /metrics`: its own per-agent counts (`AgentMetricsSnapshot`s) in the Prometheus text
  format, rendered by `render_prometheus`.
- `GET /livez` (and `/healthz`): `200 ok` whenever the event loop answers at all.
- `GET /readyz`: `200 ready` when the worker is ready to take events, `503 not ready` otherwise.

`HEAD` works on each; any other method is answered `405`, any other path `404`.

The server is a small HTTP/1.1 responder on anyio rather than a web framework: it answers one
request per connection and closes it, which is all scrapers and probes need. It must never
take the worker down, so a malformed request gets `400`, an oversized request head `431`, a
client that stays silent is cut off after a few seconds, and an error while answering is
logged (logger `omnidaemon.metrics`) and answered `500`.

The metrics, each labelled `app`, `topic` and `agent` (see `omnidaemon.metrics` for what is
counted):

- `omnidaemon_events_received_total`, `omnidaemon_events_succeeded_total`,
  `omnidaemon_events_failed_total`, `omnidaemon_events_retried_total`,
  `omnidaemon_events_dead_lettered_total`: counters.
- `omnidaemon_events_in_flight`: a gauge, the handlers running now.
- `omnidaemon_handler_duration_seconds`: a histogram of handler run times.
- `omnidaemon_event_latency_seconds`: a histogram of end-to-end latency of succeeded events.

plus `omnidaemon_worker_info{worker, app, version}`, always 1, to tell workers apart.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator, Sequence

import anyio
import anyio.abc
import structlog
from prometheus_client import generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from omnidaemon.errors import ConfigurationError
from omnidaemon.metrics import AgentMetricsSnapshot, HistogramSnapshot

__all__ = ["render_prometheus", "serve_metrics"]

_log = structlog.get_logger("omnidaemon.metrics")

# The classic text format, which is what `generate_latest` writes. prometheus_client's own
# CONTENT_TYPE_LATEST names version 1.0.0 since 0.22, which it only sends when the scraper
# asks for it; without content negotiation 0.0.4 is the honest label.
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LABELS = ("app", "topic", "agent")
_COUNTERS = (
    ("received", "Deliveries taken for handling, every attempt included."),
    ("succeeded", "Handler runs that finished and whose outputs were written."),
    ("failed", "Handler runs that raised, timed out or returned a mistyped value."),
    ("retried", "Retries scheduled."),
    ("dead_lettered", "Events moved to the dead-letter queue, whatever the reason."),
)

# Module globals rather than constants so that tests can shorten them.
_TIMEOUT = 5.0
"""Seconds a client has to send its request head and take the response."""
_LINGER = 1.0
"""Seconds spent draining what the client still sends after the response."""
_MAX_HEAD = 8192
"""Bytes a request line and its headers may take."""
_MAX_DRAIN = 65536
_MAX_CONNECTIONS = 64
_ACCEPT_BACKOFF = 0.1

# Accept fails with these when the process or the system is short of resources, or when a
# client gave up while queued; they pass, so waiting a little and accepting again is right.
_TRANSIENT_ACCEPT_ERRORS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
)

_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_BREAK = re.compile(rb"\r?\n")
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110's tchar, for methods and header names
_REQUEST_LINE = re.compile(rb"(?P<method>" + _TOKEN + rb") (?P<target>\S+) HTTP/1\.\d")
_HEADER_LINE = re.compile(_TOKEN + rb":")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def render_prometheus(snapshots: Sequence[AgentMetricsSnapshot], *, worker: str, app: str) -> bytes:
    """The snapshots in the Prometheus text format (version 0.0.4), UTF-8 encoded.

    Args:
        snapshots: One worker's per-agent metrics, at most one per `(topic, agent)`.
        worker: The worker's name, for `omnidaemon_worker_info`.
        app: The app's name, the `app` label of every series.
    """
    return generate_latest(_SnapshotCollector(snapshots, worker=worker, app=app))


class _SnapshotCollector:
    """Turns snapshots into metric families; a new one per scrape, so it holds no state."""

    def __init__(self, snapshots: Sequence[AgentMetricsSnapshot], *, worker: str, app: str):
        self._snapshots = snapshots
        self._worker = worker
        self._app = app

    def collect(self) -> Iterator[Metric]:
        # Imported here: the package's __init__ imports most of omnidaemon.
        from omnidaemon import __version__

        info = GaugeMetricFamily(
            "omnidaemon_worker_info",
            "The worker's name, app and omnidaemon version; always 1.",
            labels=("worker", "app", "version"),
        )
        info.add_metric((self._worker, self._app, __version__), 1)
        yield info

        counters = [
            (name, CounterMetricFamily(f"omnidaemon_events_{name}_total", doc, labels=_LABELS))
            for name, doc in _COUNTERS
        ]
        in_flight = GaugeMetricFamily(
            "omnidaemon_events_in_flight", "Handlers running now.", labels=_LABELS
        )
        duration = HistogramMetricFamily(
            "omnidaemon_handler_duration_seconds",
            "Handler run times, successes and failures alike.",
            labels=_LABELS,
        )
        latency = HistogramMetricFamily(
            "omnidaemon_event_latency_seconds",
            "End-to-end latency of succeeded events, from publication to the handler's end.",
            labels=_LABELS,
        )
        for snapshot in self._snapshots:
            labels = (self._app, snapshot.topic, snapshot.agent)
            for name, family in counters:
                family.add_metric(labels, getattr(snapshot, name))
            in_flight.add_metric(labels, snapshot.in_flight)
            duration.add_metric(labels, _buckets(snapshot.duration), snapshot.duration.total)
            latency.add_metric(labels, _buckets(snapshot.latency), snapshot.latency.total)
        for _, family in counters:
            yield family
        yield in_flight
        yield duration
        yield latency


def _buckets(histogram: HistogramSnapshot) -> list[tuple[str, float]]:
    # `le` values written as prometheus_client's own histograms write them ("1.0", "+Inf").
    return [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in histogram.cumulative()
    ]


async def serve_metrics(
    host: str,
    port: int,
    *,
    snapshots: Callable[[], Sequence[AgentMetricsSnapshot]],
    ready: Callable[[], bool],
    worker: str,
    app: str,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `/metrics`, `/livez`, `/healthz` and `/readyz` over HTTP until cancelled.

    Start it with `task_group.start(...)` to learn the port it listens on.

    Args:
        host: The address to listen on (`127.0.0.1`, `0.0.0.0`, `::`, a host name).
        port: The TCP port; 0 picks a free one.
        snapshots: Called on every scrape for the worker's current per-agent metrics.
        ready: Called on every `/readyz`: whether the worker takes events.
        worker: The worker's name, for `omnidaemon_worker_info`.
        app: The app's name, the `app` label of every series.
        task_status: Given the port actually listened on once the server accepts connections.

    Raises:
        ConfigurationError: The address cannot be listened on (port taken, unknown host...).
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port} for metrics: {exc}") from exc

    def respond(head: bytes) -> bytes:
        return _respond(head, snapshots=snapshots, ready=ready, worker=worker, app=app)

    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        slots = anyio.Semaphore(_MAX_CONNECTIONS)
        async with anyio.create_task_group() as tg:
            # A host name may resolve to several addresses, hence several listeners.
            for sub in listener.listeners:
                tg.start_soon(_accept_loop, sub, respond, slots, tg)
            _log.info("metrics endpoint listening", host=host, port=bound)
            task_status.started(bound)


async def _accept_loop(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    respond: Callable[[bytes], bytes],
    slots: anyio.Semaphore,
    tg: anyio.abc.TaskGroup,
) -> None:
    # Accepting here rather than with `listener.serve` so that running out of file
    # descriptors is waited out instead of ending the server (and the worker with it).
    if not isinstance(listener, anyio.abc.SocketListener):
        raise TypeError(f"expected a socket listener, got {listener!r}")
    while True:
        # A slot is taken before accepting: past the limit, clients wait in the backlog
        # instead of each costing a descriptor.
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                raise
            _log.warning("metrics endpoint cannot accept a connection", error=str(exc))
            await anyio.sleep(_ACCEPT_BACKOFF)
            continue
        except BaseException:
            slots.release()
            raise
        tg.start_soon(_serve_connection, stream, respond, slots)


async def _serve_connection(
    stream: anyio.abc.SocketStream, respond: Callable[[bytes], bytes], slots: anyio.Semaphore
) -> None:
    try:
        async with stream:
            await _exchange(stream, respond)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        _log.debug("metrics client went away", error=repr(exc))
    except Exception:
        # Whatever went wrong, it concerns this connection only: the server goes on.
        _log.exception("metrics endpoint connection failed")
    finally:
        slots.release()


async def _exchange(stream: anyio.abc.SocketStream, respond: Callable[[bytes], bytes]) -> None:
    """Read one request head, answer it, then drain what the client still sends."""
    with anyio.move_on_after(_TIMEOUT) as scope:
        try:
            head = await _read_head(stream)
        except _BadHead as exc:
            response = _response(exc.status, exc.body)
        else:
            if head is None:
                return  # connected and left without a word, like a TCP health check
            response = respond(head)
        await stream.send(response)
        # The end of our side tells the client the response is complete.
        await stream.send_eof()
    if scope.cancelled_caught:
        return  # too slow: cut off
    # Closing a socket with unread input makes the kernel reset the connection, which can
    # destroy the response before the client has read it; so read until the client closes.
    with anyio.move_on_after(_LINGER):
        drained = 0
        while drained < _MAX_DRAIN:
            try:
                drained += len(await stream.receive())
            except anyio.EndOfStream:
                break


class _BadHead(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


async def _read_head(stream: anyio.abc.SocketStream) -> bytes | None:
    """The request line and headers, without the blank line that ends them.

    `None` when the client closed without sending anything.

    Raises:
        _BadHead: The client closed mid-head, or sent more than `_MAX_HEAD` bytes of it.
    """
    buffer = bytearray()
    while True:
        try:
            buffer += await stream.receive()
        except anyio.EndOfStream:
            if not buffer:
                return None
            raise _BadHead(400, b"bad request") from None
        # HTTP asks servers to skip blank lines before the request line.
        start = len(buffer) - len(buffer.lstrip(b"\r\n"))
        end = _HEAD_END.search(buffer, start)
        if end is not None and end.start() <= _MAX_HEAD:
            return bytes(buffer[start : end.start()])
        # Blank lines count too: the buffer must not grow without bound.
        if end is not None or len(buffer) > _MAX_HEAD:
            raise _BadHead(431, b"request head too large")


def _respond(
    head: bytes,
    *,
    snapshots: Callable[[], Sequence[AgentMetricsSnapshot]],
    ready: Callable[[], bool],
    worker: str,
    app: str,
) -> bytes:
    """The whole HTTP response to a request head."""
    request_line, *header_lines = _LINE_BREAK.split(head)
    request = _REQUEST_LINE.fullmatch(request_line)
    if request is None or not all(_HEADER_LINE.match(line) for line in header_lines):
        return _response(400, b"bad request")
    method = request["method"]
    if method not in (b"GET", b"HEAD"):
        return _response(405, b"method not allowed", allow="GET, HEAD")
    path = request["target"].partition(b"?")[0]
    try:
        if path == b"/metrics":
            body = render_prometheus(snapshots(), worker=worker, app=app)
            response = _response(200, body, content_type=_METRICS_CONTENT_TYPE)
        elif path in (b"/livez", b"/healthz"):
            response = _response(200, b"ok")
        elif path == b"/readyz":
            response = _response(200, b"ready") if ready() else _response(503, b"not ready")
        else:
            response = _response(404, b"not found")
    except Exception:
        _log.exception("metrics endpoint request failed", path=path.decode("latin-1"))
        response = _response(500, b"internal server error")
    if method == b"HEAD":
        response = response[: response.index(b"\r\n\r\n") + 4]
    return response


def _response(
    status: int,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str | None = None,
) -> bytes:
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow is not None:
        headers.append(f"Allow: {allow}")
    return "\r\n".join(headers).encode("ascii") + b"\r\n\r\n" + body
