"""The chaos run on NATS JetStream (`python -m tests.chaos --nats`): one nats-server with
JetStream (file store) behind the fault proxy, the workers and the publisher reaching it
through the proxy, the injector and the checker reaching it directly.

Faults, besides the worker faults every run has (`tests/chaos/run.py`):

- `restart bus`: SIGTERM nats-server and start it again on the same port and store;
- `kill bus`: the same with SIGKILL (the store holds every acknowledged publish: a `PubAck`
  is sent once the message is written, and a killed process loses nothing written). A
  consumer's state is written a moment after it changes, so the settles of that last moment
  are lost: those entries are handed out afresh, at attempt 1, and the checker counts them
  apart ("delivered afresh");
- `pause network` / `cut network` / `slow network`: for 1-4 s, between the workers and the
  publisher on one side and nats-server on the other.

`garbage` publishes raw bytes straight to the topic's subject (`Names.entries`), awaiting the
stream's acknowledgement. NATS refuses messages over its `max_payload` (1 MB by default), so
the oversized garbage entry is 900 kB here, not 2 MB.

The backlog is read from the server's monitoring endpoint (`/jsz`): each of the topic
stream's consumers' unread (`num_pending`) plus unsettled (`num_ack_pending`, which counts
retries waiting for their delay too) entries.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import time
import urllib.error
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import nats

from omnidaemon.brokers.base import Subscription
from omnidaemon.brokers.nats import NatsBroker
from omnidaemon.brokers.nats._names import Names
from tests.chaos.app import AGENTS, TOPIC
from tests.chaos.proxy import ChaosProxy
from tests.chaos.run import log
from tests.nats import HOST, NatsServer

__all__ = ["NATS_FAULTS", "NatsBus"]

NATS_FAULTS = (
    "kill worker", "stop worker", "restart bus", "kill bus", "pause network", "cut network",
    "slow network", "poison raise", "poison exit", "garbage",
)  # fmt: skip

_NAMES = Names()
_STREAM = _NAMES.stream(TOPIC)


class NatsBus:
    """One nats-server with JetStream, and the proxy the workers and the publisher reach it
    through."""

    faults = NATS_FAULTS
    huge_garbage = 900_000  # the oversized garbage entry: under nats-server's 1 MB max_payload

    def __init__(self, folder: Path) -> None:
        self.server = NatsServer(folder / "nats")
        self.server.start()
        self.proxy = ChaosProxy(HOST, self.server.port)
        self.proxy.start()
        self.timings: dict[str, list[float]] = defaultdict(list)

    @property
    def worker_url(self) -> str:
        """The workers' and the publisher's URL: through the proxy."""
        return f"nats://{HOST}:{self.proxy.port}"

    @property
    def url(self) -> str:
        """The server itself (the injector's and the checker's)."""
        return self.server.url

    # What the run reads --------------------------------------------------------------------

    def consumers(self) -> list[dict[str, Any]] | None:
        """The topic stream's consumers as `/jsz` shows them; None while the server is away,
        [] before the stream exists."""
        try:
            jsz = self.server.monitor("/jsz?consumers=true")
        except (urllib.error.URLError, OSError, ValueError):
            return None
        for account in jsz.get("account_details") or []:
            for stream in account.get("stream_detail") or []:
                if stream.get("name") == _STREAM:
                    return list(stream.get("consumer_detail") or [])
        return []

    def backlog(self) -> int | None:
        """Unread plus unsettled entries over the topic's consumers (None while away)."""
        found = self.consumers()
        if found is None:
            return None
        return sum(int(c["num_pending"]) + int(c["num_ack_pending"]) for c in found)

    def wait_subscribed(self, timeout: float = 30.0) -> None:
        """Until every agent's consumer exists (a consumer made after a publish would not
        see it: agents start from new entries)."""
        wanted = {_NAMES.consumer(agent) for agent in AGENTS}
        deadline = time.monotonic() + timeout
        while {c["name"] for c in self.consumers() or []} < wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the workers made no consumers {sorted(wanted)} in {timeout} s")
            time.sleep(0.1)

    def describe_groups(self) -> Any:
        return self.consumers()

    def outcome(self) -> tuple[dict[str, list[dict[str, Any]]], Counter[int]]:
        """Per agent its dead letters (as dicts), and how many copies of each event (by `seq`)
        the topic's stream holds, read through the broker's own inspection."""

        async def read() -> tuple[dict[str, list[dict[str, Any]]], Counter[int]]:
            async with NatsBroker(self.url) as broker:
                letters = {
                    agent: [
                        json.loads(record)
                        for _, record in await broker.dead_letters(
                            Subscription(TOPIC, agent), 100_000
                        )
                    ]
                    for agent in AGENTS
                }
                seqs: Counter[int] = Counter()
                for _, data in await broker.entries(TOPIC, 1_000_000):
                    with contextlib.suppress(Exception):
                        seqs[int(json.loads(data)["payload"]["seq"])] += 1
            return letters, seqs

        return anyio.run(read)

    # Faults --------------------------------------------------------------------------------

    def write_garbage(self, data: bytes) -> bool:
        """Publish `data` as it is to the topic's subject; True once the stream stored it."""

        async def publish() -> None:
            nc = await nats.connect(self.url, connect_timeout=2, allow_reconnect=False)
            try:
                await nc.jetstream(timeout=5).publish(_NAMES.entries(TOPIC), data)
            finally:
                await nc.close()

        try:
            anyio.run(publish)
        except Exception as exc:  # the server away, or the entry refused: not written
            log(f"  garbage not written: {type(exc).__name__}: {exc}")
            return False
        return True

    def inject(self, kind: str, rng: random.Random) -> None:
        if kind in ("restart bus", "kill bus"):
            sig = signal.SIGTERM if kind == "restart bus" else signal.SIGKILL
            began = time.monotonic()
            self.server.restart(sig)  # returns once JetStream is healthy again
            self.timings[f"{kind} ({sig.name} to JetStream healthy)"].append(
                time.monotonic() - began
            )
            return
        action: Callable[[], None] = {
            "pause network": self.proxy.pause,
            "cut network": self.proxy.cut,
            "slow network": lambda: self.proxy.slow(0.05),
        }[kind]
        action()
        time.sleep(rng.uniform(1.0, 4.0))  # how long the fault lasts
        self.proxy.resume()

    def settle(self) -> None:
        """A restarted server is healthy before `inject` returns: nothing left broken."""

    def stop_proxy(self) -> None:
        self.proxy.stop()

    def close(self) -> None:
        self.server.stop()
