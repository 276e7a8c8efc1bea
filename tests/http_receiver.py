"""An HTTP receiver on loopback for webhook tests: records every request, answers as told."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Answer:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # hold the request until the test ends (a receiver that never answers)


class Receiver:
    """Records every request and answers with the scripted answers, then 200s.

    With `tls`, it speaks https and records the server name (SNI) of every handshake and the
    handshakes that failed (a client that refused the certificate, for one).
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.server_names: list[str | None] = []
        self.failed_handshakes: list[str] = []
        self.scheme = "https" if tls is not None else "http"
        self._answers: list[Answer] = []
        self._lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, dict(self.headers), body))
                    answer = receiver._answers.pop(0) if receiver._answers else Answer()
                if answer.hang:
                    receiver.release.wait(10)
                    return
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def finish_request(self, request: Any, client_address: Any) -> None:
                # Here, in the connection's own thread: a slow or failed handshake must not
                # hold up accepting the next connection.
                if tls is None:
                    super().finish_request(request, client_address)
                    return
                try:
                    wrapped = tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    receiver.failed_handshakes.append(str(exc))
                    return
                try:
                    super().finish_request(wrapped, client_address)
                finally:
                    wrapped.close()

        if tls is not None:

            def note_server_name(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
                receiver.server_names.append(name)

            tls.sni_callback = note_server_name  # type: ignore[assignment]
        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def script(self, *answers: int | Answer) -> None:
        with self._lock:
            self._answers = [a if isinstance(a, Answer) else Answer(a) for a in answers]


@contextmanager
def serving(tls: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    """A `Receiver` answering on a free loopback port until the block ends (https with `tls`)."""
    rec = Receiver(tls)
    thread = threading.Thread(
        target=rec.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        rec.server.shutdown()
        rec.server.server_close()
        thread.join(5)


class BlackHole:
    """Accepts TCP connections and reads whatever comes, but never answers a byte.

    Counts the connections open at once (`peak`), which is how many deliveries a sender has
    under way against a receiver that never answers.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self.accepted = 0
        self.open = 0
        self.peak = 0
        self._connections: list[socket.socket] = []
        self._closed = threading.Event()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.open += 1
                self.peak = max(self.peak, self.open)
                self._connections.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        with self._lock:
            self.open -= 1

    def close(self) -> None:
        self._closed.set()
        with suppress(OSError):  # wakes the blocked accept(), which close() alone does not
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@contextmanager
def black_hole() -> Iterator[BlackHole]:
    """A `BlackHole` on a free loopback port until the block ends."""
    hole = BlackHole()
    thread = threading.Thread(target=hole._accept_loop, daemon=True)
    thread.start()
    try:
        yield hole
    finally:
        hole.close()
        thread.join(5)
