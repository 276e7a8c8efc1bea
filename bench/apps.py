"""The omnidaemon apps the benchmark's workers run.

`python -m omnidaemon worker bench.apps:drain` (or `:latency`, `:retry`) builds its app from
the environment:

- `OMNI_BENCH_TOPIC`: the topic (default `bench.events`);
- `OMNI_BENCH_FANOUT`: how many agents consume it (`drain` only; default 1); each is its own
  consumer group, so each gets every event;
- `OMNI_BENCH_TOPICS`: several topics, comma-separated (`drain` only), each consumed by one
  agent, instead of `OMNI_BENCH_TOPIC` and `OMNI_BENCH_FANOUT` (the cluster case spreads its
  events over topics on different masters);
- `OMNI_BENCH_EXPECT`: how many handler calls this process will see, if known (then its CPU
  time is read at the first and the last one);
- `OMNI_BENCH_RATE_LIMIT`: `never-binds` gives the `drain` agents `NEVER_BINDS`, a rate limit
  far above any rate they reach (`--cases flow`: what flow control costs when it never waits);
- `OMNI_BENCH_OUT`: a folder; the worker writes `ready-<pid>` there once started, and
  `stats-<pid>.json` (what it handled, when, and the latencies) when it stops.

The handlers do nothing but count: the payload is validated into `BenchEvent` by omnidaemon
before the handler runs, which is the work the benchmark measures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.peers._shared import BenchEvent, Recorder
from omnidaemon import App, RateLimit, Retry
from omnidaemon.brokers import Broker

__all__ = ["NEVER_BINDS", "BenchEvent", "build_app"]

KINDS = ("drain", "latency", "retry")

# A million starts a second, a million at once: every start asks the bus, none ever waits.
NEVER_BINDS = RateLimit(1_000_000, per=1, burst=1_000_000)


def build_app(
    kind: str,
    *,
    topic: str = "bench.events",
    fanout: int = 1,
    topics: Sequence[str] = (),
    broker: str | Broker | None = None,
    recorder: Recorder | None = None,
    out: Path | None = None,
    rate_limit: RateLimit | None = None,
) -> App:
    """The app of `kind`:

    - `drain`: `fanout` agents `sink_0`, `sink_1`, ... on `topic`, each a no-op that counts;
      with `topics`, one such agent on each of them instead (`sink_<i>` on `topics[i]`);
      each with `rate_limit` if given;
    - `latency`: one agent `latency` recording each event's time since it was sent;
    - `retry`: one agent `parked` whose handler raises `Retry(delay=3600)`, so every event it
      gets waits in the agent's scheduled retries.

    The benchmark's publishers use the same apps (without `out`), so that publishing checks
    payloads against the agents' declared `BenchEvent` type as it does in real use.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown bench app {kind!r} (one of {', '.join(KINDS)})")
    app = App(f"bench-{kind}", broker=broker)
    rec = recorder if recorder is not None else Recorder()

    if kind == "drain":

        async def sink(event: BenchEvent) -> None:
            rec.hit()

        for i, on in enumerate(topics or [topic] * fanout):
            app.agent(on, name=f"sink_{i}", rate_limit=rate_limit)(sink)
    elif kind == "latency":

        @app.agent(topic, name="latency")
        async def latency(event: BenchEvent) -> None:
            rec.latency(event)

    else:

        @app.agent(topic, name="parked", max_retries=3)
        async def parked(event: BenchEvent) -> None:
            rec.hit()
            raise Retry(delay=3600, reason="parked by the benchmark")

    if out is not None:

        @app.on_startup
        async def ready() -> None:
            (out / f"ready-{os.getpid()}").touch()

        @app.on_shutdown
        async def report() -> None:
            path = out / f"stats-{os.getpid()}.json"
            path.write_text(json.dumps(rec.summary()))

    return app


def _from_env(kind: str) -> App:
    env = os.environ
    expect = env.get("OMNI_BENCH_EXPECT")
    out = env.get("OMNI_BENCH_OUT")
    return build_app(
        kind,
        topic=env.get("OMNI_BENCH_TOPIC", "bench.events"),
        fanout=int(env.get("OMNI_BENCH_FANOUT", "1")),
        topics=[t for t in env.get("OMNI_BENCH_TOPICS", "").split(",") if t],
        recorder=Recorder(int(expect) if expect else None),
        out=Path(out) if out else None,
        rate_limit=_rate_limit(env.get("OMNI_BENCH_RATE_LIMIT", "")),
    )


def _rate_limit(value: str) -> RateLimit | None:
    if value not in ("", "never-binds"):
        raise ValueError(f"OMNI_BENCH_RATE_LIMIT={value!r}: the one value known is never-binds")
    return NEVER_BINDS if value else None


_apps: dict[str, App] = {}


def __getattr__(name: str) -> Any:
    # `bench.apps:drain` etc.: built on first use, from the environment of the worker.
    if name in KINDS:
        if name not in _apps:
            _apps[name] = _from_env(name)
        return _apps[name]
    raise AttributeError(f"module 'bench.apps' has no attribute {name!r}")
