"""Debounce across three worker processes on real buses: bursts interleaved across 50 keys, each
handler call getting exactly its key's burst in publish order, every message handled in exactly
one batch, and nothing lost when workers are SIGKILLed while windows are open: one while it
collects a burst, another while the burst's windows are flushed and its batches run
(replacements are started, as a supervisor would).

Every handler call writes one fsynced JSON line (its batch's event id and message ids) after
its work, so a SIGKILL loses nothing already recorded; a batch whose worker died before its
ack runs again elsewhere (at least once), which the checks tell apart by the batch's event id.
The buses run side by side, each with its own workers: Redis, NATS JetStream and a Redis
Cluster (windows on several masters).
"""

from __future__ import annotations

import json
import secrets
import signal
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from omnidaemon import App
from tests.e2e._support import (
    WorkerProcess,
    buses_chosen,
    cli_env,
    read_lines,
    side_by_side,
    wait_for,
    write_module,
)

pytestmark = pytest.mark.slow

STARTUP = 30.0
KEYS = 50
PER_BURST = 3  # messages per key per burst
BURSTS = 2  # the second is the one workers are SIGKILLed in
SETTLE = 30.0  # seconds a burst's batches may take to be handled (the killed one: reclaims)
# The quiet time that ends a burst. A burst's messages are timed when they are collected: on
# a loaded machine, collecting 150 messages with three workers took over 1 s, which split
# bursts the test expects whole.
DEBOUNCE = 2.5

SOURCE = """
    import json
    import os
    import time

    import anyio

    from omnidaemon import App, Context

    app = App("debounce-test")
    LOG = os.environ["T_LOG"]


    @app.agent(
        os.environ["T_TOPIC"],
        debounce=float(os.environ["T_DEBOUNCE"]),
        debounce_key=lambda m: m["k"],
        debounce_max_wait=3 * float(os.environ["T_DEBOUNCE"]),
        reclaim_idle=1.0,
        max_retries=10,
        retry_backoff=0.2,
    )
    async def chat(messages: list[dict], ctx: Context) -> None:
        await anyio.sleep(0.2)  # batches in flight when a worker is killed
        line = {
            "pid": os.getpid(),
            "event": ctx.event_id,
            "key": ctx.event.headers["omnidaemon-batch-key"],
            "ids": ctx.batch_ids,
            "ks": [m["k"] for m in messages],
            "attempt": ctx.attempt,
            "at": time.time(),
        }
        # One O_APPEND write, then fsync: a SIGKILL loses nothing already recorded.
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
"""


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(log)]


def _scenario(bus_url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess]) -> str:
    tmp_path.mkdir()
    write_module(tmp_path, "debounce_app", SOURCE)
    log = tmp_path / "calls.jsonl"
    topic = f"chat.message.t{secrets.token_hex(4)}"  # the servers are shared by the session
    env = cli_env(
        OMNIDAEMON_BROKER_URL=bus_url, T_LOG=str(log), T_TOPIC=topic, T_DEBOUNCE=str(DEBOUNCE)
    )
    workers = [spawn(["debounce_app:app"], tmp_path, env) for _ in range(3)]
    for worker in workers:
        wait_for(partial(worker.has_logged, "worker started"), STARTUP, "a worker to start")
    # bursts[b][key]: the ids of key's messages of burst b, in publish order.
    bursts: list[dict[str, list[str]]] = []
    publisher = App("debounce-publisher", broker=bus_url)
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(publisher):

        def handled(sent: dict[str, list[str]]) -> bool:
            done = {i for call in _calls(log) for i in call["ids"]}
            return all(i in done for ids in sent.values() for i in ids)

        for burst in range(BURSTS):
            sent: dict[str, list[str]] = defaultdict(list)
            for n in range(PER_BURST):  # interleaved: key 0, 1, ..., 49, then again
                if burst == 1 and n == 1:
                    # Mid-burst, its windows open: a worker dies while collecting.
                    workers[0].send(signal.SIGKILL)
                # One round trip per round: a burst is published well within `debounce`,
                # however loaded the machine (one by one, 150 events took over 1 s).
                keys = [f"k{k}" for k in range(KEYS)]
                events = [(topic, {"k": key, "n": n, "burst": burst}) for key in keys]
                ids = portal.call(publisher.publish_many, events)
                for key, event_id in zip(keys, ids, strict=True):
                    sent[key].append(event_id)
            bursts.append(sent)
            if burst == 1:
                # Then another while the burst's checks seal windows and its batches run;
                # replacements start, as a supervisor would start them.
                time.sleep(DEBOUNCE + 0.2)
                workers[1].send(signal.SIGKILL)
                workers += [spawn(["debounce_app:app"], tmp_path, env) for _ in range(2)]
            try:
                wait_for(partial(handled, sent), SETTLE, f"burst {burst} to be handled")
            except AssertionError:
                done = {i for call in _calls(log) for i in call["ids"]}
                missing = {k: [i for i in ids if i not in done] for k, ids in sent.items()}
                missing = {k: ids for k, ids in missing.items() if ids}
                windows = portal.call(publisher.broker.scan_values, "debounce:")
                problems = [
                    line
                    for w in workers
                    for line in read_lines(w.stderr_path)
                    if '"level": "error"' in line or '"level": "warning"' in line
                ]
                infos = [
                    portal.call(partial(publisher.broker.describe, t, consumers=True))
                    for t in (
                        topic,
                        f"{topic}#debounce-checks.chat",
                        f"{topic}#debounce.chat",
                    )
                ]
                raise AssertionError(
                    f"{bus_url}: burst {burst} not handled: topics {infos}; missing {missing}; "
                    f"windows "
                    f"{ {k: v for k, v in windows.items() if any(m in k for m in missing)} }; "
                    f"worker problems: {problems[-20:]}"
                ) from None
        time.sleep(1.2)  # a late duplicate batch would be recorded by now

    # Each distinct batch (a batch run again after a SIGKILL is the same event) holds one
    # key's messages in publish order, and every message is in exactly one batch.
    calls = _calls(log)
    batches: dict[str, list[str]] = {}
    for call in calls:
        ids = call["ids"]
        assert batches.setdefault(call["event"], ids) == ids
        assert set(call["ks"]) == {call["key"]}
    order = {i: (b, k, n) for b, sent in enumerate(bursts) for k, ids in sent.items()
             for n, i in enumerate(ids)}  # fmt: skip
    seen: dict[str, str] = {}
    for event, ids in batches.items():
        assert [order[i] for i in ids] == sorted(order[i] for i in ids), "publish order"
        assert len({order[i][1] for i in ids}) == 1, "one key per batch"
        for i in ids:
            assert i not in seen, f"message {i} in batches {seen[i]} and {event}"
            seen[i] = event
    assert set(seen) == set(order), "every message handled"
    # Without a crash, each key's burst is one call with exactly its messages.
    by_ids = {tuple(ids) for ids in batches.values()}
    for key, ids in bursts[0].items():
        assert tuple(ids) in by_ids, (bus_url, key, [b for b in by_ids if ids[0] in b])
    killed = bursts[1]
    split = sum(1 for ids in killed.values() if tuple(ids) not in by_ids)
    rerun = len(calls) - len(batches)
    taken = sum(1 for call in calls if call["attempt"] > 1)
    return (
        f"{len(batches)} batches, {taken} taken over from a killed worker, {rerun} run twice "
        f"(killed after their run), {split} bursts split by the SIGKILLs"
    )


def test_bursts_across_three_processes_are_handled_whole_and_survive_a_sigkill(
    request: pytest.FixtureRequest, tmp_path: Path, spawn: Callable[..., WorkerProcess]
) -> None:
    urls = buses_chosen(request, "T_DEBOUNCE_BUSES")  # T_DEBOUNCE_BUSES=redis runs one
    side_by_side(
        {name: partial(_scenario, url, tmp_path / name, spawn) for name, url in urls.items()}
    )
