"""The results table (printed to stdout) and bench/RESULTS.md."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
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

_MARK = {True: "✓", False: "✗", None: ""}


def table(results: Runs, cfg: Config) -> tuple[str, list[bool]]:
    """The markdown table, and the outcome of each target that could be checked."""
    lines = [
        "| case | figure | median | vs raw | runs | target | |",
        "|---|---|--:|--:|---|---|:-:|",
    ]
    outcomes: list[bool] = []
    for row in ROWS:
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
        lines.append(
            f"| {row.case} | {row.figure} | {row.fmt(value)} | {ratio} | {shown} | {target} "
            f"| {_MARK[ok]} |"
        )
    return "\n".join(lines), outcomes


def header(cfg: Config, info: Mapping[str, str], elapsed: float) -> str:
    peers = info.get("peers", "not run")
    reps = f"median of {cfg.reps} run{'s' if cfg.reps != 1 else ''}"
    return "\n".join(
        [
            f"## omnidaemon benchmark ({cfg.mode}): N = {cfg.n:,} events of ~200 bytes, "
            f"validated into a pydantic model, no-op async handler; {reps}",
            "",
            f"- machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores, "
            f"{info.get('memory', '?')} RAM, {info.get('os', '?')}",
            f"- versions: Python {info.get('python', '?')}, redis-py {info.get('redis-py', '?')} "
            f"(hiredis {info.get('hiredis', '?')}), "
            f"pydantic {info.get('pydantic', '?')}, redis-server {info.get('redis-server', '?')}, "
            f"omnidaemon {info.get('omnidaemon', '?')}; peers: {peers}",
            f"- ran {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, took {elapsed:.0f} s",
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


def render(
    results: Runs,
    cfg: Config,
    info: Mapping[str, str],
    elapsed: float,
    notes: Sequence[str],
) -> tuple[str, str, list[bool]]:
    """(what to print, the RESULTS.md text, the targets' outcomes)."""
    body, outcomes = table(results, cfg)
    passed = sum(outcomes)
    summary = f"targets met: {passed} of {len(outcomes)}"
    parts = [header(cfg, info, elapsed), "", body, "", summary]
    if notes:
        parts += ["", *(f"- note: {note}" for note in notes)]
    printed = "\n".join(parts)
    markdown = "\n".join(["# Benchmark results", "", printed, "", METHOD])
    return printed, markdown, outcomes
