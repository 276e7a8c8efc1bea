"""NATS JetStream (`--cases nats`): omnidaemon on one local nats-server (`nats://`, the
`NatsBroker`) against nats-py doing the same work on the same server in the same run.

- raw (nats-py's JetStream API on a stream of its own, `bench_raw`, file storage, at most
  100,000 messages like an omnidaemon topic's stream):
  - publish: `js.publish_async` for a batch of 1,000 then awaiting their acks (nats-py's
    pipelined publish), and one awaited `js.publish` at a time;
  - drain: a durable pull consumer, `fetch(100)` and `msg.ack()` for each message, every
    message validated into `BenchEvent` and passed to a no-op async handler, in a process of
    its own (`python -m bench.cases.nats`);
  - latency: the same consumer fetching one message at a time (`fetch(1)`: nats-py's
    `fetch(100)` returns only once 100 arrived or the request expired), while the benchmark
    publishes at a steady rate.
- omnidaemon: the same rows as on Redis (`bench.cases.omni`'s publishers, and a worker
  process `python -m omnidaemon worker bench.apps:drain`), with `OMNIDAEMON_BROKER_URL` the
  server's `nats://` URL.

A drain starts as on Redis: the consumer (raw's, or the agent's, made by the broker's own
`subscribe`) exists before the consumer process starts, but is *paused* (JetStream's consumer
pause) while N-1 events are pre-filled; once the process waits in a pull request (`num_waiting`
in the server's `/jsz`), the consumer is resumed and the N-th event published, which wakes it.
The rate is timed inside the consumer process, from its first handled event to its N-th; the
benchmark waits until the consumer's ack floor reaches the last event before it stops a worker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, StorageType, StreamConfig

from bench.apps import build_app
from bench.cases import omni
from bench.cases.raw import _result, latencies
from bench.common import BenchError, Children, Config, NatsServer, make_event, progress, wait_until
from bench.peers._shared import BenchEvent, Recorder, paced
from omnidaemon.brokers import Subscription, open_broker
from omnidaemon.brokers.nats._names import Names  # where the broker keeps a topic's stream

TOPIC = omni.TOPIC
STREAM = "bench_raw"
SUBJECT = "bench.raw"
DURABLE = "raw"
MAXLEN = 100_000  # an omnidaemon topic stream's bound (`maxlen`), raw's too
FETCH = 100
PAUSED_UNTIL = "2099-01-01T00:00:00Z"
RESUMED = "1970-01-01T00:00:00Z"  # a time past: the consumer runs again


def omni_stream(topic: str = TOPIC) -> str:
    """The topic's stream, as omnidaemon names it on NATS."""
    return Names().stream(topic)


def versions(server: NatsServer) -> dict[str, str]:
    """nats-server's and nats-py's versions, for the section's header."""
    return {"nats-server": server.version(), "nats-py": version("nats-py")}


def _data(event: BenchEvent) -> bytes:
    return event.model_dump_json().encode()


async def _connect(url: str) -> tuple[Any, JetStreamContext]:
    nc = await nats.connect(url, name="omnibench")
    return nc, nc.jetstream()


async def _reset(js: JetStreamContext) -> None:
    """Delete every stream (the NATS `FLUSHALL`): each case starts on an empty server."""
    for info in await js.streams_info():
        if info.config.name:
            await js.delete_stream(info.config.name)


async def _raw_stream(js: JetStreamContext) -> None:
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            storage=StorageType.FILE,
            max_msgs_per_subject=MAXLEN,
            discard=DiscardPolicy.OLD,
        )
    )


async def _raw_consumer(js: JetStreamContext, *, paused: bool) -> None:
    config = ConsumerConfig(
        durable_name=DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=30.0,
        max_ack_pending=-1,
        pause_until=PAUSED_UNTIL if paused else None,
    )
    await js.add_consumer(STREAM, config)


async def _pipelined(js: JetStreamContext, events: Sequence[BenchEvent]) -> None:
    """Publish every event before awaiting any ack (nats-py's asynchronous publish)."""
    acks = [await js.publish_async(SUBJECT, _data(event)) for event in events]
    await asyncio.gather(*acks)


async def _prefill(js: JetStreamContext, n: int, batch: int) -> None:
    for i in range(0, n, batch):
        await _pipelined(js, [make_event(j) for j in range(i, min(n, i + batch))])


def _waiting(server: NatsServer, stream: str, consumer: str) -> bool:
    """Whether a pull request waits in the consumer (its reader started and found nothing)."""
    state = server.consumer(stream, consumer)
    return state is not None and state.get("num_waiting", 0) >= 1


def _acked(server: NatsServer, stream: str, consumer: str, n: int) -> bool:
    """Whether the consumer has every one of the stream's first `n` entries acknowledged."""
    state = server.consumer(stream, consumer)
    if state is None:
        return False
    floor = (state.get("ack_floor") or {}).get("stream_seq", 0)
    return bool(floor >= n and not state.get("num_ack_pending") and not state.get("num_pending"))


@contextlib.contextmanager
def _stopped_on_failure(proc: subprocess.Popen[bytes]) -> Iterator[None]:
    """Stop a consumer process whose case failed: left running, it would read the next case's
    events (its consumer is made again under the same name)."""
    try:
        yield
    except BaseException:
        Children.stop(proc, timeout=5)
        raise


# Publishing -----------------------------------------------------------------------------------


async def _raw_publish_rates(url: str, events: list[BenchEvent], batch: int) -> dict[str, float]:
    nc, js = await _connect(url)
    try:
        await _reset(js)
        await _raw_stream(js)
        # Warm-up (not timed): the code paths hot, the stream's first blocks written.
        await _pipelined(js, events[:batch])
        for event in events[:100]:
            await js.publish(SUBJECT, _data(event))

        start = time.perf_counter()
        for i in range(0, len(events), batch):
            await _pipelined(js, events[i : i + batch])
        pipelined = len(events) / (time.perf_counter() - start)

        start = time.perf_counter()
        for event in events:
            await js.publish(SUBJECT, _data(event))
        awaited = len(events) / (time.perf_counter() - start)
    finally:
        await nc.close()
    return {"nats.raw.publish_pipelined": pipelined, "nats.raw.publish_awaited": awaited}


def raw_publish(server: NatsServer, cfg: Config) -> dict[str, float]:
    events = [make_event(i) for i in range(cfg.n)]
    return asyncio.run(_raw_publish_rates(server.url, events, cfg.batch))


async def _empty(url: str) -> None:
    nc, js = await _connect(url)
    try:
        await _reset(js)
    finally:
        await nc.close()


def omni_publish(server: NatsServer, cfg: Config) -> dict[str, float]:
    """`bench.cases.omni`'s publishers (same warm-up, same batches) on the NATS server."""
    asyncio.run(_empty(server.url))
    events = [make_event(i) for i in range(cfg.n)]
    figures = asyncio.run(omni._publish_rates(server.url, events, cfg.batch))
    return {f"nats.{key}": value for key, value in figures.items()}


# Draining -------------------------------------------------------------------------------------


def _consumer(children: Children, server: NatsServer, mode: str, expect: int, out: Path) -> Any:
    argv = [sys.executable, "-m", "bench.cases.nats", mode, "--url", server.url]
    argv += ["--expect", str(expect)]
    return children.start(argv, stdout=subprocess.PIPE, log=out / "raw-consumer.log")


async def _raw_fill(url: str, n: int, batch: int) -> None:
    nc, js = await _connect(url)
    try:
        await _reset(js)
        await _raw_stream(js)
        await _raw_consumer(js, paused=True)
        await _prefill(js, n, batch)
    finally:
        await nc.close()


async def _resume(url: str, stream: str, consumer: str) -> None:
    nc, js = await _connect(url)
    try:
        await js.pause_consumer(stream, consumer, RESUMED)
    finally:
        await nc.close()


async def _raw_release(url: str, seq: int) -> None:
    nc, js = await _connect(url)
    try:
        await js.pause_consumer(STREAM, DURABLE, RESUMED)
        await js.publish(SUBJECT, _data(make_event(seq)))
    finally:
        await nc.close()


def raw_drain(server: NatsServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """One consumer process draining N pre-filled messages with nats-py's pull consumer."""
    n = cfg.n
    asyncio.run(_raw_fill(server.url, n - 1, cfg.batch))
    proc = _consumer(children, server, "drain", n, out)
    with _stopped_on_failure(proc):
        wait_until(
            lambda: _waiting(server, STREAM, DURABLE) or proc.poll() is not None,
            timeout=30,
            what="the raw consumer to start",
        )
        asyncio.run(_raw_release(server.url, n - 1))
        stats = _result(proc, out, timeout=60 + n / 1000)
    return {
        "nats.raw.drain": n / (stats["last"] - stats["first"]),
        "nats.raw.drain_cpu": stats["cpu"] / n,
    }


async def _omni_fill(url: str, group: str, n: int, batch: int) -> None:
    nc, js = await _connect(url)
    broker = open_broker(url)
    try:
        await _reset(js)
        await broker.connect()
        # The agent's consumer, made as its worker would make it, then paused.
        await broker.subscribe(Subscription(TOPIC, group))
        await js.pause_consumer(omni_stream(), group, PAUSED_UNTIL)
    finally:
        await broker.close()
        await nc.close()
    await omni._prefill(url, n, batch)


def omni_drain(
    server: NatsServer,
    children: Children,
    cfg: Config,
    out: Path,
    *,
    concurrency: int | None = None,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], None] | None = None,
) -> dict[str, float]:
    """A worker process (`concurrency` as `--concurrency`, default the agent's own; `env`
    added to its environment) draining N pre-filled events; started and timed as the raw
    consumer is. `setup` runs once the bus is filled, before the worker starts."""
    n, group, stream = cfg.n, "sink_0", omni_stream()
    asyncio.run(_omni_fill(server.url, group, n - 1, cfg.batch))
    if setup is not None:
        setup()
    worker = omni.WorkerRun(
        children, server, "drain", out, expect=n, concurrency=concurrency, env=env
    )
    with _stopped_on_failure(worker.proc):
        worker.wait(
            lambda: _waiting(server, stream, group),
            timeout=60,
            what="the worker to start and wait for events",
        )
        asyncio.run(_resume(server.url, stream, group))
        asyncio.run(omni._publish_one(server.url, n - 1))
        worker.wait(
            lambda: _acked(server, stream, group, n),
            timeout=60 + n / 500,
            what=f"the worker to drain {n} events",
        )
    stats = worker.stop()
    handled = sum(s["count"] for s in stats)
    if handled != n:
        raise BenchError(f"the worker handled {handled} events, not {n}")
    name = "nats.omni.drain" if concurrency is None else "nats.omni.drain_batch"
    result = {name: n / (stats[0]["last"] - stats[0]["first"])}
    if stats[0]["cpu"] is not None:
        result[f"{name}_cpu"] = stats[0]["cpu"] / n
    return result


# Latency --------------------------------------------------------------------------------------


async def _raw_latency_setup(url: str) -> None:
    nc, js = await _connect(url)
    try:
        await _reset(js)
        await _raw_stream(js)
        await _raw_consumer(js, paused=False)
    finally:
        await nc.close()


def raw_latency(server: NatsServer, children: Children, cfg: Config, out: Path) -> dict[str, float]:
    """One awaited `js.publish` at a steady rate while a consumer process waits in a pull."""
    warmup = round(cfg.warmup_seconds * cfg.rate)
    total = warmup + round(cfg.latency_seconds * cfg.rate)
    asyncio.run(_raw_latency_setup(server.url))
    proc = _consumer(children, server, "latency", total, out)

    async def publish() -> None:
        nc, js = await _connect(server.url)
        try:

            async def send(i: int) -> None:
                await js.publish(SUBJECT, _data(make_event(i, sent_at=time.monotonic())))

            await paced(cfg.rate, total, send)
        finally:
            await nc.close()

    with _stopped_on_failure(proc):
        wait_until(
            lambda: _waiting(server, STREAM, DURABLE) or proc.poll() is not None,
            timeout=30,
            what="the raw consumer to start",
        )
        asyncio.run(publish())
        stats = _result(proc, out, timeout=60)
    return latencies("nats.raw", stats["latencies"], warmup)


def omni_latency(
    server: NatsServer, children: Children, cfg: Config, out: Path
) -> dict[str, float]:
    """`app.publish` at a steady rate from this process; a worker process handles them."""
    warmup = round(cfg.warmup_seconds * cfg.rate)
    total = warmup + round(cfg.latency_seconds * cfg.rate)
    stream = omni_stream()
    asyncio.run(_empty(server.url))
    worker = omni.WorkerRun(children, server, "latency", out, expect=total)

    async def publish() -> None:
        app = build_app("latency", topic=TOPIC, broker=server.url)
        async with app:

            async def send(i: int) -> None:
                await app.publish(TOPIC, make_event(i, sent_at=time.monotonic()))

            achieved = await paced(cfg.rate, total, send)
        if achieved < 0.95 * cfg.rate:
            progress(f"  note: the publisher reached only {achieved:,.0f} events/s")

    with _stopped_on_failure(worker.proc):
        worker.wait(lambda: _waiting(server, stream, "latency"), timeout=60, what="the worker")
        asyncio.run(publish())
        worker.wait(
            lambda: _acked(server, stream, "latency", total),
            timeout=60,
            what="the worker to handle the latency run's events",
        )
    stats = worker.stop()
    return latencies("nats.omni", stats[0]["latencies"], warmup)


# python -m bench.cases.nats drain|latency --url ... --expect N ---------------------------------


async def _consume(url: str, mode: str, expect: int) -> dict[str, Any]:
    nc, js = await _connect(url)
    rec = Recorder(expect)

    if mode == "drain":

        async def handle(event: BenchEvent) -> None:
            rec.hit()
    else:

        async def handle(event: BenchEvent) -> None:
            rec.latency(event)

    try:
        psub = await js.pull_subscribe_bind(DURABLE, STREAM)
        while rec.count < expect:
            # Never more than is left: a fetch of 100 waits until 100 came or it expired.
            batch = 1 if mode == "latency" else min(FETCH, expect - rec.count)
            try:
                msgs = await psub.fetch(batch, timeout=2.0)
            except TimeoutError:  # nats-py's fetch timeouts are TimeoutErrors
                continue
            for msg in msgs:
                await handle(BenchEvent.model_validate_json(msg.data))
                await msg.ack()
    finally:
        await nc.close()
    return rec.summary()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cases.nats")
    parser.add_argument("mode", choices=["drain", "latency"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--expect", type=int, required=True)
    args = parser.parse_args()
    try:
        summary = asyncio.run(_consume(args.url, args.mode, args.expect))
    except NatsError as exc:
        print(f"raw NATS consumer: {exc!r}", file=sys.stderr)
        raise SystemExit(1) from None
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
