"""A fault-injecting TCP proxy between worker processes and redis-server.

Workers are pointed at `ChaosProxy.url` instead of the server. The orchestrating test, plain
synchronous code, then pauses, cuts or slows the traffic while the workers run::

    with ChaosProxy("127.0.0.1", server.port) as proxy:
        worker = start_worker(proxy.url)
        proxy.pause()    # a partition: bytes are held, connections stay open
        proxy.resume()   # the held bytes flow again, in order
        proxy.cut()      # every connection reset, new ones refused, until resume()
        proxy.slow(0.2)  # 0.2 s more latency on every chunk, both ways

The proxy runs an asyncio event loop of its own in a daemon thread; every control blocks until
the loop has applied it, so whatever the caller does next already sees the new behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, Self

__all__ = ["ChaosProxy", "State"]

State = Literal["normal", "paused", "cut", "slow"]

_CHUNK = 64 * 1024
# Chunks read but not yet forwarded, per direction. Bounded so that a paused or slowed link pushes
# back on the sender through TCP flow control instead of buffering without limit here.
_QUEUED_CHUNKS = 16
# Long enough for any control on a loaded machine; a control that takes longer means a bug.
_CONTROL_TIMEOUT = 10.0
# A graceful close waits for the kernel to take our buffered bytes; a peer that never reads
# must not hang the link (or stop()) forever.
_CLOSE_TIMEOUT = 2.0


def _reset(sock: socket.socket) -> None:
    """Make the next close of `sock` send RST rather than FIN, as a crashed peer or a dropped
    NAT entry would: the other side gets ECONNRESET, not a polite end of stream."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    except OSError:
        pass  # the connection had already failed; it is closed all the same


class _Link:
    """One proxied connection: the client's socket, and ours to the server once opened."""

    def __init__(self, client: socket.socket, accepted_at: float) -> None:
        self.client = client
        self.accepted_at = accepted_at
        self.writers: list[asyncio.StreamWriter] = []
        self.task: asyncio.Task[None] | None = None
        self.dropped = False

    def abort(self, *, reset: bool) -> None:
        """Close both sides at once, discarding whatever is held for them."""
        if reset:
            _reset(self.client)
            for writer in self.writers:
                _reset(writer.get_extra_info("socket"))
        for writer in self.writers:
            writer.transport.abort()
        if not self.writers:
            # Not yet handed to a transport (held while paused): the socket is still ours.
            self.client.close()

    async def close(self) -> None:
        for writer in self.writers:
            await _close_writer(writer)
        # A no-op once the client's transport has closed it; otherwise nothing else will.
        self.client.close()


class ChaosProxy:
    """A TCP proxy on 127.0.0.1 to `target_host:target_port` that can pause, cut or slow traffic.

    `listen_port` fixes the port to listen on (a free one otherwise; the same one again if the
    proxy is restarted). Controls are thread-safe and each one replaces the previous:
    `pause()`, `cut()`, `slow(delay)`, and `resume()` back to plain forwarding. On a connection
    that stays open, bytes are never lost or reordered.
    """

    def __init__(
        self, target_host: str, target_port: int, *, listen_port: int | None = None
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state: State = "normal"
        self._delay = 0.0
        self._connections_total = 0
        self._connections_open = 0
        self._links: set[_Link] = set()
        # Replaced (after being set) on every change of state, to wake whoever waits on it.
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()

    # -- Lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Listen and start forwarding; returns once connections are accepted.

        The state starts as "normal". Raises `OSError` if the port cannot be bound, and
        `RuntimeError` if the proxy is already running.
        """
        with self._lock:
            if self._thread is not None:
                raise RuntimeError("the proxy is already running")
            listener = socket.create_server(("127.0.0.1", self._listen_port or 0))
            listener.setblocking(False)
            self._listen_port = int(listener.getsockname()[1])
            self._state, self._delay = "normal", 0.0
            ready: Future[asyncio.AbstractEventLoop] = Future()
            thread = threading.Thread(
                target=self._run,
                args=(listener, ready),
                name=f"chaos-proxy:{self._listen_port}",
                daemon=True,
            )
            thread.start()
            try:
                self._loop = ready.result(timeout=_CONTROL_TIMEOUT)
            except BaseException:
                thread.join(timeout=_CONTROL_TIMEOUT)
                raise
            self._thread = thread

    def stop(self) -> None:
        """Close every connection and the listener, and end the proxy's thread. Idempotent."""
        with self._lock:
            thread, loop = self._thread, self._loop
            if thread is None or loop is None:
                return
            if thread is threading.current_thread():
                raise RuntimeError("stop() cannot be called from the proxy's own thread")
            # The loop is closed already if its thread died of an error: nothing to stop.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._stopping.set)
            thread.join(timeout=_CONTROL_TIMEOUT + _CLOSE_TIMEOUT)
            if thread.is_alive():
                raise RuntimeError("the chaos proxy's thread did not end")
            self._thread = self._loop = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- What the caller sees ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started, unless given)."""
        if self._listen_port is None:
            raise RuntimeError("the proxy has no port until start()")
        return self._listen_port

    @property
    def url(self) -> str:
        """A Redis URL that reaches the target server through the proxy (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def state(self) -> State:
        """The current state: "normal", "paused", "cut" or "slow"."""
        return self._state

    @property
    def delay(self) -> float:
        """The latency added to every chunk while "slow", in seconds (0 otherwise)."""
        return self._delay

    @property
    def connections_total(self) -> int:
        """Connections accepted since the proxy was made, refused ones (while cut) included."""
        return self._connections_total

    @property
    def connections_open(self) -> int:
        """Client connections currently open through the proxy."""
        return self._connections_open

    # -- Controls ----------------------------------------------------------------------------

    def pause(self) -> None:
        """Hold every byte, both ways, until `resume()`; connections stay open.

        New connections are accepted, and held too: the server sees them only on `resume()`.
        """
        self._control(lambda: self._set_state("paused", 0.0))

    def cut(self) -> None:
        """Reset every open connection (both sides), and reset new ones as soon as they are
        accepted, until `resume()`. Bytes held for the cut connections are discarded."""
        self._control(self._cut)

    def slow(self, delay: float) -> None:
        """Deliver every chunk, both ways, `delay` seconds after it arrived, until `resume()`.

        Latency, not a bandwidth limit: chunks in flight are delayed together, in order.
        `slow(0)` is `resume()`.
        """
        if not (math.isfinite(delay) and delay >= 0):
            raise ValueError(f"delay must be a finite number of seconds >= 0, not {delay!r}")
        if delay == 0:
            self.resume()
        else:
            self._control(lambda: self._set_state("slow", delay))

    def resume(self) -> None:
        """Forward normally again: held bytes flow, new connections are accepted."""
        self._control(lambda: self._set_state("normal", 0.0))

    def _control(self, action: Callable[[], Coroutine[Any, Any, None]]) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            raise RuntimeError("the proxy is not running: call start() first")
        if thread is threading.current_thread():
            raise RuntimeError("controls cannot be called from the proxy's own thread")
        asyncio.run_coroutine_threadsafe(action(), loop).result(timeout=_CONTROL_TIMEOUT)

    # -- The event loop's side ---------------------------------------------------------------

    def _run(self, listener: socket.socket, ready: Future[asyncio.AbstractEventLoop]) -> None:
        try:
            asyncio.run(self._main(listener, ready))
        except BaseException as exc:
            if ready.done():
                raise
            ready.set_exception(exc)
        finally:
            listener.close()

    async def _main(
        self, listener: socket.socket, ready: Future[asyncio.AbstractEventLoop]
    ) -> None:
        # Made anew on each start: an asyncio.Event belongs to the first loop that waits on it.
        self._changed = asyncio.Event()
        self._stopping = asyncio.Event()
        accepting = asyncio.create_task(self._accept(listener))
        ready.set_result(asyncio.get_running_loop())
        await self._stopping.wait()
        accepting.cancel()
        await asyncio.wait({accepting})
        listener.close()
        await self._drop_links(reset=False)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError:
                # A connection aborted before accept, or out of descriptors: neither should end
                # the proxy, and a short pause keeps the latter from spinning.
                await asyncio.sleep(0.01)
                continue
            self._connections_total += 1
            if self._state == "cut":
                _reset(client)
                client.close()
                continue
            link = _Link(client, loop.time())
            self._links.add(link)
            self._connections_open += 1
            link.task = asyncio.create_task(self._serve(link))

    async def _serve(self, link: _Link) -> None:
        try:
            await self._hold(link.accepted_at)
            client_reader, client_writer = await asyncio.open_connection(
                sock=link.client, limit=_CHUNK
            )
            link.writers.append(client_writer)
            server_reader, server_writer = await asyncio.open_connection(
                self.target_host, self.target_port, limit=_CHUNK
            )
            link.writers.append(server_writer)
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pipe(client_reader, server_writer))
                group.create_task(self._pipe(server_reader, client_writer))
        except* OSError:
            # One side failed (server down, peer reset): pass the failure on to the other side
            # as abruptly as it happened.
            link.abort(reset=True)
        finally:
            await link.close()
            self._links.discard(link)
            self._connections_open -= 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward one direction, chunk by chunk and in order, each no earlier than its
        arrival plus the delay, and none while paused. End of stream is forwarded too."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED_CHUNKS)
        async with asyncio.TaskGroup() as group:
            # Reading goes on while the writer waits, so a chunk's delay runs from its arrival,
            # not from when the one before it was sent.
            group.create_task(self._read(reader, queue))
            while True:
                arrived, chunk = await queue.get()
                await self._hold(arrived)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(chunk)
                await writer.drain()

    @staticmethod
    async def _read(
        reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            chunk = await reader.read(_CHUNK)
            await queue.put((loop.time(), chunk))
            if not chunk:
                return

    async def _hold(self, arrived: float) -> None:
        """Wait until something that arrived at `arrived` may be forwarded."""
        loop = asyncio.get_running_loop()
        while True:
            changed = self._changed
            if self._state == "paused":
                await changed.wait()
                continue
            remaining = arrived + self._delay - loop.time()
            if remaining <= 0:
                return
            # Woken early by any change of state, so that resume() ends a delay at once.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    async def _set_state(self, state: State, delay: float) -> None:
        self._state, self._delay = state, delay
        self._changed.set()
        self._changed = asyncio.Event()

    async def _cut(self) -> None:
        await self._set_state("cut", 0.0)
        await self._drop_links(reset=True)

    async def _drop_links(self, *, reset: bool) -> None:
        tasks: set[asyncio.Task[None]] = set()
        for link in list(self._links):
            if link.task is None:
                continue
            tasks.add(link.task)
            if not link.dropped:
                link.dropped = True
                link.abort(reset=reset)
                link.task.cancel()
        if tasks:
            await asyncio.wait(tasks)
