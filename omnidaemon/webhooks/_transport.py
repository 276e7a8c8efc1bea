"""An HTTP transport that connects to the address the URL check approved, never to a new lookup.

The URL keeps its host name, so TLS sends it as SNI and verifies the certificate against it,
the `Host` header carries it, and the connection pool keys connections by it: a connection
verified for one name is never reused for another name that happens to share its address.
Only the TCP connect is redirected, to the address `pinned` names for the request's host and
port; with none pinned, nothing is connected at all.

httpx itself offers no hook at the connect (its transport builds its own httpcore pool), so
this transport drives an httpcore pool with a network backend of ours, through httpcore's
public API, and maps httpcore's errors to httpx's so that callers see httpx errors only.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import cast

import httpcore
import httpx

__all__ = ["PinnedTransport", "pinned"]

# Per task: concurrent deliveries each connect where their own check pointed. httpcore
# connects a new connection in the task whose request it was made for, so the value is seen.
_pin: ContextVar[tuple[str, int, str] | None] = ContextVar("omnidaemon_webhook_pin", default=None)

# Most specific first: a subclass must match before its base class does.
_ERRORS: tuple[tuple[type[Exception], type[httpx.TransportError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextmanager
def pinned(host: str, port: int, address: str) -> Iterator[None]:
    """Within the block, a new connection to `host:port` goes to `address` (an IP literal).

    `host` is spelled as httpcore sees it: the URL's `raw_host` (IDNA-encoded, IPv6 without
    brackets), and `port` is the effective port, the scheme's default included.
    """
    token = _pin.set((host, port, address))
    try:
        yield
    finally:
        _pin.reset(token)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        for theirs, ours in _ERRORS:
            if isinstance(exc, theirs):
                raise ours(str(exc)) from exc
        raise


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self._backend = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pin = _pin.get()
        if pin is None or pin[:2] != (host, port):
            # Resolving here would connect to an address nobody checked (DNS rebinding).
            raise httpcore.ConnectError(f"no checked address for {host}:{port}")
        return await self._backend.connect_tcp(
            pin[2],
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks are never sent over unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _as_httpx_errors():
            async for part in self._stream:
                yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            with _as_httpx_errors():
                await close()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport whose new connections go to the address `pinned` for their host.

    Args:
        ssl_context: Certificate verification for https; the host name is checked against it.
        limits: Connection pool limits.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` over the pool, connecting a new connection to the pinned address."""
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path
            ),
            headers=request.headers.raw,
            content=cast(AsyncIterable[bytes], request.stream),
            extensions=request.extensions,
        )
        with _as_httpx_errors():
            response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(cast(AsyncIterable[bytes], response.stream)),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._pool.aclose()
