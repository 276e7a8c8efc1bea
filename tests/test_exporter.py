"""The worker's Prometheus endpoint: what a scraper reads, and probes that never break it."""

from __future__ import annotations

import selectors
import socket
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import anyio
import anyio.abc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from structlog.testing import capture_logs

import omnidaemon
from omnidaemon.errors import ConfigurationError
from omnidaemon.metrics import BUCKETS, AgentMetrics, AgentMetricsSnapshot
from omnidaemon.observability import exporter
from omnidaemon.observability.exporter import render_prometheus, serve_metrics

pytestmark = pytest.mark.anyio

HOST = "127.0.0.1"


def resize_metrics() -> AgentMetrics:
    metrics = AgentMetrics("image.uploaded", "resize")
    metrics.received += 4
    metrics.succeeded += 2
    metrics.failed += 2
    metrics.retried += 1
    metrics.dead_lettered += 1
    metrics.in_flight = 3
    for seconds in (0.003, 0.1, 0.2, 7.0):  # 0.1 sits exactly on a bound: counted in it
        metrics.observe_duration(seconds)
    for seconds in (0.05, 4000.0):  # above the largest bound: only in +Inf
        metrics.observe_latency(seconds)
    return metrics


def samples_of(text: str) -> dict[str, list[Sample]]:
    """Every sample of the exposition by sample name (`x_bucket`, `x_total`, ...)."""
    samples: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def value(
    samples: dict[str, list[Sample]], name: str, agent: str = "resize", **labels: str
) -> float:
    [match] = [
        s
        for s in samples[name]
        if s.labels.get("agent") == agent and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return match.value


@asynccontextmanager
async def serving(
    snapshots: Callable[[], Sequence[AgentMetricsSnapshot]] = list,
    ready: Callable[[], bool] = lambda: True,
) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    """The endpoint on a free loopback port, and a client for it (proxies from env ignored)."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            partial(
                serve_metrics,
                HOST,
                0,
                snapshots=snapshots,
                ready=ready,
                worker="worker-1",
                app="shop",
            )
        )
        async with httpx.AsyncClient(
            base_url=f"http://{HOST}:{port}", trust_env=False, timeout=2
        ) as client:
            yield client, port
        tg.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes, *, hang_up: bool = False) -> bytes:
    """Send raw bytes (then end our side if `hang_up`), return all the server sends."""
    async with await anyio.connect_tcp(HOST, port) as stream:
        await stream.send(data)
        if hang_up:
            await stream.send_eof()
        received = bytearray()
        with anyio.fail_after(2):
            while True:
                try:
                    received += await stream.receive()
                except anyio.EndOfStream:
                    return bytes(received)


# Rendering --------------------------------------------------------------------------------------


def test_counters_and_gauge_carry_the_counts_and_labels() -> None:
    text = render_prometheus([resize_metrics().snapshot()], worker="worker-1", app="shop").decode()
    samples = samples_of(text)
    labels = {"app": "shop", "topic": "image.uploaded", "agent": "resize"}
    for name, expected in [
        ("omnidaemon_events_received_total", 4),
        ("omnidaemon_events_succeeded_total", 2),
        ("omnidaemon_events_failed_total", 2),
        ("omnidaemon_events_retried_total", 1),
        ("omnidaemon_events_dead_lettered_total", 1),
        ("omnidaemon_events_in_flight", 3),
    ]:
        [sample] = samples[name]
        assert sample.labels == labels
        assert sample.value == expected, name
    assert "# TYPE omnidaemon_events_received_total counter" in text
    assert "# TYPE omnidaemon_events_in_flight gauge" in text
    [info] = samples["omnidaemon_worker_info"]
    assert info.labels == {"worker": "worker-1", "app": "shop", "version": omnidaemon.__version__}
    assert info.value == 1


def test_histograms_are_cumulative_with_count_and_sum() -> None:
    text = render_prometheus([resize_metrics().snapshot()], worker="w", app="shop").decode()
    samples = samples_of(text)
    assert "# TYPE omnidaemon_handler_duration_seconds histogram" in text

    duration = {
        s.labels["le"]: s.value for s in samples["omnidaemon_handler_duration_seconds_bucket"]
    }
    assert list(duration) == [repr(bound) for bound in BUCKETS] + ["+Inf"]
    assert duration["0.0025"] == 0
    assert duration["0.005"] == 1  # 0.003
    assert duration["0.05"] == 1
    assert duration["0.1"] == 2  # 0.1 is "at or below" 0.1
    assert duration["0.25"] == 3  # 0.2
    assert duration["5.0"] == 3
    assert duration["10.0"] == 4  # 7.0
    assert duration["3600.0"] == 4 and duration["+Inf"] == 4
    counts = list(duration.values())
    assert counts == sorted(counts)
    assert value(samples, "omnidaemon_handler_duration_seconds_count") == 4
    assert value(samples, "omnidaemon_handler_duration_seconds_sum") == pytest.approx(7.303)

    latency = {s.labels["le"]: s.value for s in samples["omnidaemon_event_latency_seconds_bucket"]}
    assert latency["0.025"] == 0
    assert latency["0.05"] == 1
    assert latency["3600.0"] == 1 and latency["+Inf"] == 2  # 4000 s is above every bound
    assert value(samples, "omnidaemon_event_latency_seconds_count") == 2
    assert value(samples, "omnidaemon_event_latency_seconds_sum") == pytest.approx(4000.05)


def test_one_series_per_agent_and_awkward_labels_survive() -> None:
    other = AgentMetrics('odd "topic" \\ with\nnewline', "thumbnail")
    other.received += 7
    text = render_prometheus(
        [resize_metrics().snapshot(), other.snapshot()], worker="w", app="shop"
    ).decode()
    samples = samples_of(text)
    assert value(samples, "omnidaemon_events_received_total") == 4
    assert value(samples, "omnidaemon_events_received_total", agent="thumbnail") == 7
    [odd] = [s for s in samples["omnidaemon_events_received_total"] if s.value == 7]
    assert odd.labels["topic"] == 'odd "topic" \\ with\nnewline'
    # An agent that saw nothing still has its (empty) histogram, so rates start at zero.
    assert value(samples, "omnidaemon_handler_duration_seconds_count", agent="thumbnail") == 0
    assert value(samples, "omnidaemon_handler_duration_seconds_sum", agent="thumbnail") == 0


def test_no_agents_renders_only_the_worker_info() -> None:
    samples = samples_of(render_prometheus([], worker="w", app="shop").decode())
    assert list(samples) == ["omnidaemon_worker_info"]


# Serving ----------------------------------------------------------------------------------------


async def test_metrics_endpoint_serves_the_current_counts() -> None:
    metrics = resize_metrics()
    async with serving(lambda: [metrics.snapshot()]) as (client, _):
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        samples = samples_of(response.text)
        assert value(samples, "omnidaemon_events_received_total") == 4
        assert value(samples, "omnidaemon_handler_duration_seconds_bucket", le="0.25") == 3

        metrics.received += 1
        metrics.observe_duration(0.2)
        samples = samples_of((await client.get("/metrics?ignored=1")).text)
        assert value(samples, "omnidaemon_events_received_total") == 5
        assert value(samples, "omnidaemon_handler_duration_seconds_bucket", le="0.25") == 4

        head = await client.head("/metrics")
        assert head.status_code == 200 and head.content == b""
        assert int(head.headers["content-length"]) > 0


async def test_liveness_and_readiness() -> None:
    ready = False
    async with serving(ready=lambda: ready) as (client, _):
        for path in ("/livez", "/healthz"):
            response = await client.get(path)
            assert (response.status_code, response.text) == (200, "ok")
        response = await client.get("/readyz")
        assert (response.status_code, response.text) == (503, "not ready")
        ready = True
        response = await client.get("/readyz")
        assert (response.status_code, response.text) == (200, "ready")


async def test_unknown_paths_and_methods() -> None:
    async with serving() as (client, _):
        assert (await client.get("/")).status_code == 404
        assert (await client.get("/metrics/extra")).status_code == 404
        response = await client.post("/metrics", content=b"x" * 100_000)
        assert response.status_code == 405
        assert response.headers["allow"] == "GET, HEAD"
        assert (await client.delete("/livez")).status_code == 405
        assert (await client.get("/livez")).status_code == 200


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello, more or less
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # HTTP/0.9
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n",  # half a request, then the client ends its side
    ],
)
async def test_garbage_gets_400_and_the_server_goes_on(garbage: bytes) -> None:
    async with serving() as (client, port):
        answer = await raw_exchange(port, garbage, hang_up=not garbage.endswith(b"\r\n\r\n"))
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert (await client.get("/livez")).status_code == 200


async def test_bare_newlines_and_leading_blank_lines_are_accepted() -> None:
    async with serving() as (_, port):
        answer = await raw_exchange(port, b"\r\nGET /livez HTTP/1.0\nHost: x\n\n")
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok")


async def test_oversized_request_head_gets_431() -> None:
    async with serving() as (client, port):
        huge = b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * 20_000 + b"\r\n\r\n"
        answer = await raw_exchange(port, huge)
        assert answer.startswith(b"HTTP/1.1 431 ")
        assert (await client.get("/livez")).status_code == 200


async def test_idle_client_is_cut_off_without_blocking_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(exporter, "_TIMEOUT", 0.3)
    async with serving() as (client, port), await anyio.connect_tcp(HOST, port) as idle:
        await idle.send(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        # Connections are served concurrently: the idle one does not hold this one up.
        assert (await client.get("/livez")).status_code == 200
        with anyio.fail_after(2):
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                await idle.receive()


class IdleFlood:
    """Keeps `size` connections open that never get a response out of the server, and opens a
    new one for each the server closes.

    A third send nothing, a third half a request, a third a whole request whose response they
    never read (and they never close).
    """

    STARTS = (b"", b"GET /livez HTTP/1.1\r\n", b"GET /metrics HTTP/1.1\r\n\r\n")

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.opened = 0
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> IdleFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            try:
                while not self._stop.is_set():
                    while len(selector.get_map()) < self.size:
                        conn = socket.create_connection((HOST, self.port), timeout=5)
                        conn.sendall(self.STARTS[self.opened % 3])
                        selector.register(conn, selectors.EVENT_READ)
                        self.opened += 1
                    for key, _ in selector.select(timeout=0.05):
                        conn = key.fileobj
                        assert isinstance(conn, socket.socket)
                        try:
                            if conn.recv(65536):
                                continue  # a response, which this client ignores
                        except OSError:
                            pass
                        selector.unregister(conn)
                        conn.close()
                        self.closed_by_server += 1
            finally:
                for key in list(selector.get_map().values()):
                    key.fileobj.close()  # type: ignore[union-attr]


async def test_idle_connections_refilled_as_they_are_cut_cannot_keep_probes_out() -> None:
    size = exporter._MAX_CONNECTIONS + 16  # more than the server serves at once
    probes = 40
    async with serving() as (_, port):
        with IdleFlood(port, size) as flood:
            with anyio.fail_after(10):
                while flood.opened < size:
                    await anyio.sleep(0.01)
            answers = []
            for _ in range(probes):
                # What a liveness probe with a 1 s timeout does.
                try:
                    with anyio.fail_after(1):
                        answer = await raw_exchange(port, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
                except TimeoutError:
                    answer = b"timed out"
                answers.append(answer.split(b"\r\n")[0])
                await anyio.sleep(0.05)  # probes spread over a few seconds, as a prober's are
            assert answers == [b"HTTP/1.1 200 OK"] * probes
            # The flood was kept up: its connections were cut (to let the probes in, or for
            # saying nothing) and opened again.
            assert flood.closed_by_server >= probes
            assert flood.opened >= size + probes


async def test_a_failing_snapshot_gives_500_and_is_logged() -> None:
    def broken() -> list[AgentMetricsSnapshot]:
        raise RuntimeError("boom")

    with capture_logs() as logs:
        async with serving(broken) as (client, _):
            response = await client.get("/metrics")
            assert response.status_code == 500
            assert (await client.get("/livez")).status_code == 200
    [entry] = [e for e in logs if e["event"] == "metrics endpoint request failed"]
    assert entry["log_level"] == "error" and entry["path"] == "/metrics"


async def test_port_in_use_is_a_configuration_error() -> None:
    async with await anyio.create_tcp_listener(local_host=HOST) as taken:
        port = taken.extra(anyio.abc.SocketAttribute.local_port)
        with pytest.raises(ConfigurationError, match=f"cannot listen on {HOST}:{port} for metrics"):
            await serve_metrics(
                HOST, port, snapshots=list, ready=lambda: True, worker="w", app="shop"
            )


async def test_cancelling_the_server_frees_the_port() -> None:
    async with serving() as (_, port):
        pass
    async with await anyio.create_tcp_listener(local_host=HOST, local_port=port):
        pass
