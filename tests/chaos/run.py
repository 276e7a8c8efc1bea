"""One chaos run: a real redis-server (AOF), three worker processes behind a fault-injecting
proxy, a steady publisher, and faults at seeded random times; then the checker's report.

    python -m tests.chaos --events 3000 --seconds 600 --seed 7

Faults (each chosen at random, spread over the run):

- `kill worker`: SIGKILL a worker (often mid-handler) and start a new one;
- `stop worker`: SIGTERM a worker (graceful stop) and start a new one;
- `restart bus`: SIGTERM redis-server and start it again on the same port and data;
- `kill bus`: the same with SIGKILL (AOF with `appendfsync always` keeps every acknowledged
  write);
- `pause network` / `cut network` / `slow network`: for 1-4 s, between the workers and Redis;
- `poison raise` / `poison exit`: publish an event whose handlers always raise, or kill
  their own worker;
- `garbage`: write an entry straight into the stream: random bytes, invalid JSON, a JSON
  value that is no envelope, an envelope from a future version, a payload that fails
  validation, or a 2 MB payload.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import redis

from omnidaemon import App, BusUnavailable
from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.envelope import encode_new
from tests.chaos.app import AGENTS, TOPIC, ChaosEvent
from tests.chaos.checker import RunReport, check
from tests.chaos.proxy import ChaosProxy
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 3
FAULTS = (
    "kill worker", "stop worker", "restart bus", "kill bus", "pause network", "cut network",
    "slow network", "poison raise", "poison exit", "garbage",
)  # fmt: skip


def log(message: str) -> None:
    print(f"[chaos {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


_START = time.monotonic()


class Workers:
    """The worker processes; a watcher starts a new one in the place of any that ends."""

    def __init__(self, folder: Path, url: str) -> None:
        self._folder = folder
        self._url = url
        self._procs: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self.exits: Counter[int] = Counter()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        with self._lock:
            self._procs = [self._spawn() for _ in range(WORKERS)]
        self._watcher.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "OMNIDAEMON_BROKER_URL": self._url,
            "OMNI_CHAOS_LOG": str(self._folder / "log"),
            "OMNIDAEMON_HEARTBEAT_INTERVAL": "1",
            "OMNIDAEMON_LOG_FORMAT": "json",
        }
        out = open(self._folder / "workers.log", "ab")  # noqa: SIM115 (owned by the child)
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "omnidaemon", "worker", "tests.chaos.app:app",
                 "--log-level", "WARNING", "--shutdown-grace", "5"],
                cwd=ROOT, env=env, stdout=out, stderr=out,
            )  # fmt: skip
        finally:
            out.close()

    def _watch(self) -> None:
        while not self._stopping:
            with self._lock:
                for i, proc in enumerate(self._procs):
                    code = proc.poll()
                    if code is not None and not self._stopping:
                        self.exits[code] += 1
                        self._procs[i] = self._spawn()
            time.sleep(0.05)

    def signal_one(self, rng: random.Random, sig: signal.Signals) -> None:
        with self._lock:
            proc = rng.choice(self._procs)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    def stop(self) -> None:
        self._stopping = True
        self._watcher.join(timeout=5)
        with self._lock:
            for proc in self._procs:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            for proc in self._procs:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Publisher(threading.Thread):
    """Publishes `events` ordinary events at a steady rate over `seconds`, plus the poison
    events the injector asks for; records what the bus acknowledged."""

    def __init__(self, url: str, folder: Path, events: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self._url = url
        self._out = folder / "published.jsonl"
        self._events = events
        self._seconds = seconds
        self._poison: list[str] = []
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.seq = 0

    def poison(self, kind: str) -> None:
        with self._lock:
            self._poison.append(kind)

    def run(self) -> None:
        anyio.run(self._run)

    async def _run(self) -> None:
        app = App("chaos-publisher", broker=RedisBroker(self._url, publish_timeout=15.0))
        interval = self._seconds / max(1, self._events)
        start = time.monotonic()
        with self._out.open("a") as out:
            async with app:
                for i in range(self._events):
                    await anyio.sleep(max(0.0, start + i * interval - time.monotonic()))
                    with self._lock:
                        kinds, self._poison = ["ok", *self._poison], []
                    for kind in kinds:
                        await self._publish(app, out, kind)
                with self._lock:  # poison asked for after the last ordinary event
                    kinds, self._poison = self._poison, []
                for kind in kinds:
                    await self._publish(app, out, kind)
        self.done.set()

    async def _publish(self, app: App, out: Any, kind: str) -> None:
        seq, self.seq = self.seq, self.seq + 1
        event = ChaosEvent(seq=seq, kind=kind)  # type: ignore[arg-type]
        try:
            event_id = await app.publish(TOPIC, event)
        except BusUnavailable as exc:
            out.write(json.dumps({"seq": seq, "kind": kind, "ok": False, "error": str(exc)}))
        else:
            out.write(json.dumps({"seq": seq, "kind": kind, "ok": True, "id": event_id}))
        out.write("\n")
        out.flush()


def garbage_entry(rng: random.Random, n: int) -> tuple[str, bytes]:
    """One entry another program might write: `(marker, bytes)`; the marker is in the bytes."""
    marker = f"chaos-garbage-{n}"
    kind = rng.choice(["bytes", "json", "shape", "version", "payload", "huge"])
    if kind == "bytes":
        return marker, marker.encode() + bytes(rng.randrange(256) for _ in range(64))
    if kind == "json":
        return marker, f'{{"v": 1, "id": "{marker}", "topic": '.encode()
    if kind == "shape":
        return marker, json.dumps({"hello": marker}).encode()
    _, data = encode_new(TOPIC, {"seq": -1, "kind": "ok", "body": marker})
    envelope = json.loads(data)
    if kind == "version":
        envelope["v"] = 99
    elif kind == "payload":
        envelope["payload"] = {"seq": marker, "kind": "nope"}
    else:
        envelope["payload"] = {"seq": -1, "kind": "ok", "body": marker + "x" * 2_000_000}
        envelope["payload"]["kind"] = "huge"  # fails validation, after a 2 MB read
    return marker, json.dumps(envelope).encode()


def backlog(client: redis.Redis) -> int | None:
    """Unread plus unsettled entries over the topic's groups (None while the bus is away)."""
    try:
        groups = client.xinfo_groups(f"omni:{{{TOPIC}}}:stream")
    except (redis.RedisError, OSError):
        return None
    return sum(int(g.get("lag") or 0) + int(g["pending"]) for g in groups)


def run(events: int, seconds: float, seed: int, folder: Path) -> RunReport:
    """Run the whole scenario in `folder` and return the checker's report."""
    rng = random.Random(seed)
    (folder / "log").mkdir(parents=True, exist_ok=True)
    server = RedisServer(folder, appendonly=True)
    server.start()
    proxy = ChaosProxy("127.0.0.1", server.port)
    proxy.start()
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    workers = Workers(folder, proxy.url)
    publisher = Publisher(server.url, folder, events, seconds)
    faults: Counter[str] = Counter()
    samples: list[tuple[float, int | None]] = []
    fault_ends: list[tuple[str, float]] = []
    try:
        workers.start()
        time.sleep(2.0)  # workers connect and create their groups before events flow
        publisher.start()
        # A fault every 4 s on average, and every kind at least once however short the run.
        count = max(len(FAULTS), int(seconds / 4))
        plan = sorted(rng.uniform(1.0, max(2.0, seconds - 2.0)) for _ in range(count))
        kinds = [FAULTS[i % len(FAULTS)] for i in range(len(plan))]
        rng.shuffle(kinds)
        begun = time.monotonic()
        garbage_out = (folder / "garbage.jsonl").open("a")
        for at, kind in zip(plan, kinds, strict=True):
            while time.monotonic() - begun < at:
                samples.append((time.monotonic(), backlog(client)))
                time.sleep(0.2)
            log(f"fault: {kind}")
            faults[kind] += 1
            _inject(kind, rng, workers, server, proxy, publisher, client, garbage_out, faults)
            fault_ends.append((kind, time.monotonic()))
        garbage_out.close()
        publisher.done.wait(timeout=seconds + 120)
        # Drain: until every group has read and settled everything (or a deadline).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            left = backlog(client)
            samples.append((time.monotonic(), left))
            if left == 0:
                break
            time.sleep(0.2)
        log(f"published {publisher.seq} events; backlog at the end: {backlog(client)}")
    finally:
        workers.stop()
        proxy.stop()
    try:
        return _report(folder, server, faults, _recoveries(fault_ends, samples), workers)
    finally:
        client.close()
        server.stop()


def _inject(
    kind: str,
    rng: random.Random,
    workers: Workers,
    server: RedisServer,
    proxy: ChaosProxy,
    publisher: Publisher,
    client: redis.Redis,
    garbage_out: Any,
    faults: Counter[str],
) -> None:
    if kind == "kill worker":
        workers.signal_one(rng, signal.SIGKILL)
    elif kind == "stop worker":
        workers.signal_one(rng, signal.SIGTERM)
    elif kind in ("restart bus", "kill bus"):
        server.restart(signal.SIGTERM if kind == "restart bus" else signal.SIGKILL)
    elif kind.endswith("network"):
        action: Callable[[], None] = {
            "pause network": proxy.pause,
            "cut network": proxy.cut,
            "slow network": lambda: proxy.slow(0.05),
        }[kind]
        action()
        time.sleep(rng.uniform(1.0, 4.0))
        proxy.resume()
    elif kind.startswith("poison"):
        publisher.poison(kind.split()[1])
    else:
        marker, data = garbage_entry(rng, faults[kind])
        with contextlib.suppress(redis.RedisError):
            client.xadd(f"omni:{{{TOPIC}}}:stream", {"e": data})
            garbage_out.write(json.dumps({"marker": marker}) + "\n")
            garbage_out.flush()


def _recoveries(
    fault_ends: list[tuple[str, float]], samples: list[tuple[float, int | None]]
) -> list[tuple[str, float | None]]:
    # Normal: the backlog at or below the run's median, i.e. what steady publishing leaves.
    known = sorted(b for _, b in samples if b is not None)
    normal = max(known[len(known) // 2] if known else 0, 5)
    out: list[tuple[str, float | None]] = []
    for kind, ended in fault_ends:
        after = [t for t, b in samples if t >= ended and b is not None and b <= normal]
        out.append((kind, after[0] - ended if after else None))
    return out


def _report(
    folder: Path,
    server: RedisServer,
    faults: Counter[str],
    recoveries: list[tuple[str, float | None]],
    workers: Workers,
) -> RunReport:
    async def read() -> tuple[dict[str, list[dict[str, Any]]], set[int]]:
        broker = RedisBroker(server.url)
        async with broker:
            letters = {
                agent: [
                    json.loads(r)
                    for _, r in await broker.dead_letters(Subscription(TOPIC, agent), 100_000)
                ]
                for agent in AGENTS
            }
            seqs = set()
            for _, fields in await broker.client.xrange(broker.stream_key(TOPIC)):
                with contextlib.suppress(Exception):
                    seqs.add(int(json.loads(fields[b"e"])["payload"]["seq"]))
        return letters, seqs

    letters, seqs = anyio.run(read)
    crashed = sum(n for code, n in workers.exits.items() if code != 0)
    faults = faults.copy()
    faults["worker exits seen (any cause)"] = crashed
    return check(folder, letters, seqs, faults, recoveries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--events", type=int, default=3000, help="ordinary events to publish")
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to publish for")
    parser.add_argument("--seed", type=int, default=7, help="seed of the fault schedule")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args(argv)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="omnichaos-"))
    folder.mkdir(parents=True, exist_ok=True)
    report = run(args.events, args.seconds, args.seed, folder)
    print(report.table())
    ok = report.lost == 0 and report.poison_ok and report.garbage_ok
    print(f"\nresult: {'PASS' if ok else 'FAIL'} (lost {report.lost}); histories in {folder}")
    return 0 if ok else 1
