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
client that does not send its request within 2 seconds is cut off, and an error while
answering is logged (logger `omnidaemon.metrics`) and answered `500`. It serves at most 64
connections at once; past that, each new connection is served by cutting the one that has
been idle longest (silent, or done with its response), so clients that connect and say
nothing cannot keep `/livez` probes out.

The metrics themselves are described in `omnidaemon.observability.prometheus`.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import anyio
import anyio.abc

from omnidaemon.errors import ConfigurationError
from omnidaemon.metrics import AgentMetricsSnapshot
from omnidaemon.observability.logging import get_logger
from omnidaemon.observability.prometheus import render_prometheus

__all__ = ["render_prometheus", "serve_metrics"]

_log = get_logger("omnidaemon.metrics")

# The classic text format, which is what `generate_latest` writes. prometheus_client's own
# CONTENT_TYPE_LATEST names version 1.0.0 since 0.22, which it only sends when the scraper
# asks for it; without content negotiation 0.0.4 is the honest label.
_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Module globals rather than constants so that tests can shorten them.
_HEAD_TIMEOUT = 2.0
"""Seconds a client has to send its request head: probes and scrapers send it at once."""
_TIMEOUT = 5.0
"""Seconds a client has, in all, to send its request head and take the response."""
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


async def serve_metrics(
    host: str,
    port: int,
    *,
    snapshots: Callable[[], Sequence[AgentMetricsSnapshot]],
    ready: Callable[[], bool],
    worker: str,
    app: str,
    budgets: Callable[[], Mapping[str, tuple[float, float]]] | None = None,
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
        budgets: Called on every scrape for the app's budgets' `(level, capacity)` by name.
        task_status: Given the port actually listened on once the server accepts connections.

    Raises:
        ConfigurationError: The address cannot be listened on (port taken, unknown host...).
    """
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise ConfigurationError(f"cannot listen on {host}:{port} for metrics: {exc}") from exc

    def respond(head: bytes) -> bytes:
        return _respond(
            head, snapshots=snapshots, ready=ready, worker=worker, app=app, budgets=budgets
        )

    async with listener:
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        connections = _Connections(_MAX_CONNECTIONS)
        async with anyio.create_task_group() as tg:
            # A host name may resolve to several addresses, hence several listeners.
            for sub in listener.listeners:
                tg.start_soon(_accept_loop, sub, respond, connections, tg)
            _log.info("metrics endpoint listening", host=host, port=bound)
            task_status.started(bound)


class _Connection:
    """One connection's place among those served; `idle` while it may be cut to make room."""

    __slots__ = ("cut", "idle", "scope")

    def __init__(self) -> None:
        self.scope = anyio.CancelScope()
        self.idle = False
        self.cut = False


class _Connections:
    """The connections being served, at most `limit`; a new one cuts the longest idle one.

    No slot can be kept for probes: a probe cannot be told from a client that will never
    speak until its request head arrives. A flood of silent connections costs its sender
    nothing to refill, and with slots taken first come, first served it kept every slot and
    left probes in the backlog past their timeouts. So a new connection always gets in, by
    cutting the connection idle longest (waiting for its request head, or lingering after its
    response): the flood's connections are older than the probe that has just arrived, and a
    probe needs its slot for a millisecond. Only when every connection is being answered does
    a new one wait.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._open: dict[_Connection, None] = {}  # in order of acceptance, oldest first
        self._changed = anyio.Event()

    async def reserve(self) -> _Connection:
        """A place for the next connection accepted, made by cutting an idle one if need be."""
        while len(self._open) >= self._limit:
            if not any(c.cut for c in self._open):
                oldest = next((c for c in self._open if c.idle), None)
                if oldest is not None:
                    oldest.cut = True
                    oldest.scope.cancel()
            # Wait for the one cut (or any other) to go, or for one to become idle.
            await self._changed.wait()
        connection = _Connection()
        self._open[connection] = None
        return connection

    def accepted(self, connection: _Connection) -> None:
        """The connection is in and waits for its request: the newest, and idle."""
        # Its age counts from now, not from when its place was reserved.
        del self._open[connection]
        self._open[connection] = None
        self.set_idle(connection, True)

    def set_idle(self, connection: _Connection, idle: bool) -> None:
        connection.idle = idle
        self._notify()

    def release(self, connection: _Connection) -> None:
        del self._open[connection]
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


async def _accept_loop(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    respond: Callable[[bytes], bytes],
    connections: _Connections,
    tg: anyio.abc.TaskGroup,
) -> None:
    # Accepting here rather than with `listener.serve` so that running out of file
    # descriptors is waited out instead of ending the server (and the worker with it).
    if not isinstance(listener, anyio.abc.SocketListener):
        raise TypeError(f"expected a socket listener, got {listener!r}")
    while True:
        # A place is taken before accepting: past the limit, clients wait in the backlog
        # instead of each costing a descriptor.
        connection = await connections.reserve()
        try:
            stream = await listener.accept()
        except OSError as exc:
            connections.release(connection)
            if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                raise
            _log.warning("metrics endpoint cannot accept a connection", error=str(exc))
            await anyio.sleep(_ACCEPT_BACKOFF)
            continue
        except BaseException:
            connections.release(connection)
            raise
        connections.accepted(connection)
        tg.start_soon(_serve_connection, stream, respond, connections, connection)


async def _serve_connection(
    stream: anyio.abc.SocketStream,
    respond: Callable[[bytes], bytes],
    connections: _Connections,
    connection: _Connection,
) -> None:
    try:
        with connection.scope:
            async with stream:
                await _exchange(stream, respond, partial(connections.set_idle, connection))
        if connection.scope.cancelled_caught:
            _log.debug("metrics client cut off to make room for another")
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
        _log.debug("metrics client went away", error=repr(exc))
    except Exception:
        # Whatever went wrong, it concerns this connection only: the server goes on.
        _log.exception("metrics endpoint connection failed")
    finally:
        connections.release(connection)


async def _exchange(
    stream: anyio.abc.SocketStream,
    respond: Callable[[bytes], bytes],
    set_idle: Callable[[bool], None],
) -> None:
    """Read one request head, answer it, then drain what the client still sends.

    `set_idle(False)` is called while the response is being made and sent: the only time the
    connection is not to be cut to make room for another.
    """
    with anyio.move_on_after(_TIMEOUT) as scope:
        try:
            with anyio.fail_after(_HEAD_TIMEOUT):
                head = await _read_head(stream)
        except TimeoutError:
            return  # silent too long: cut off
        except _BadHead as exc:
            response = _response(exc.status, exc.body)
        else:
            if head is None:
                return  # connected and left without a word, like a TCP health check
            response = respond(head)
        set_idle(False)  # from here until the response is sent, the connection is working
        await stream.send(response)
        # The end of our side tells the client the response is complete.
        await stream.send_eof()
        set_idle(True)
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
    budgets: Callable[[], Mapping[str, tuple[float, float]]] | None = None,
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
            levels = budgets() if budgets is not None else {}
            body = render_prometheus(snapshots(), worker=worker, app=app, budgets=levels)
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
