"""Regression tests for issue 14, items 4 to 7: the outcome of an event must survive faults.

Each test reproduces one defect of the audit with real `python -m omnidaemon worker` processes
on a real bus (each broker's: redis-server, nats-server), and asserts what a user sees once it
is fixed: the handlers' own records (one JSON line per step, `O_APPEND` + `fsync`, so SIGKILL
and SIGSTOP lose nothing recorded), stored results (`App.result`), the agent's metrics on the
bus (`fleet_metrics`), its dead-letter queue, `App.request` outcomes and webhook receipts;
never the broker's internals.

- item 4: a worker frozen mid-handler (SIGSTOP) loses its delivery to another worker; the
  redelivery must wait for the live holder's idempotency claim, not charge a second time.
- item 5: when that frozen worker resumes and its handler fails, it must not overwrite the
  outcome the other worker recorded (result, metrics, DLQ, request reply, webhook).
- item 6: an event waiting on an idempotency claim whose holder died must not stop the agent
  from handling unrelated events.
- item 7: a failure whose stream entry was trimmed while the handler ran must be retried or
  dead-lettered, never dropped.

The apps use `reclaim_idle=1`: a delivery whose worker stops renewing it is taken over about
1-1.5 s later (lease renewal every 0.33 s, a reclaim pass every 0.5 s). The few fixed sleeps
only give something that must not happen the chance to happen (a second charge, a retry a
stale worker scheduled, lease renewals on a trimmed entry); everything else polls.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from pprint import pformat
from typing import Any
from uuid import uuid4

import anyio
import pytest

from omnidaemon import App
from omnidaemon.brokers import open_broker
from omnidaemon.fleet import fleet_metrics
from omnidaemon.metrics import AgentMetricsSnapshot
from omnidaemon.results import Result
from tests.conformance.test_worker_processes import BROKER_BUSES, BUSES, SETTLE, Fleet
from tests.e2e._support import WorkerProcess, wait_for
from tests.http_receiver import Receiver, serving

pytestmark = pytest.mark.slow


@pytest.fixture(params=BROKER_BUSES)
def bus_url(request: pytest.FixtureRequest) -> str:
    return BUSES[request.param](request)


# The embedded bus (Valkey, the Redis broker's code) runs the SIGSTOP case of item 4 too.
on_every_bus = pytest.mark.parametrize("bus_url", ["embedded", *BROKER_BUSES], indirect=True)


@pytest.fixture
def fleet(bus_url: str, tmp_path: Path, spawn: Callable[..., WorkerProcess]) -> Iterator[Fleet]:
    f = Fleet(
        url=bus_url,
        topic=f"t{uuid4().hex[:12]}.jobs",
        cwd=tmp_path,
        log=tmp_path / "handlers.log",
        spawn=spawn,
    )
    try:
        yield f
    finally:
        f.close()


# What the test reads, through the public API ----------------------------------------------


def stored_result(fleet: Fleet, event_id: str, agent: str) -> Result:
    """The event's stored result for `agent` now (`App.result`, `omnidaemon result`)."""

    async def go() -> Result:
        async with App("inspector", broker=fleet.broker()) as app:
            return await app.result(event_id, agent=agent)

    return anyio.run(go)


def agent_metrics(fleet: Fleet, agent: str) -> AgentMetricsSnapshot:
    """The agent's counts summed over every worker, as `omnidaemon metrics` shows them."""

    async def go() -> AgentMetricsSnapshot:
        async with App("inspector", broker=fleet.broker()) as app:
            found = await fleet_metrics(app.broker, topic=fleet.topic, agent=agent)
        return found[0] if found else AgentMetricsSnapshot(fleet.topic, agent)

    return anyio.run(go)


def publish_with_webhook(fleet: Fleet, payloads: Sequence[dict[str, Any]], url: str) -> list[str]:
    async def go() -> list[str]:
        async with App("publisher", broker=fleet.broker()) as app:
            return [await app.publish(fleet.topic, p, webhook=url) for p in payloads]

    return anyio.run(go)


def webhook_statuses(receiver: Receiver) -> dict[str, list[str]]:
    """The statuses each event's webhook received, by event id, in order of arrival."""
    statuses: dict[str, list[str]] = {}
    for request in list(receiver.requests):
        body = json.loads(request.body)
        statuses.setdefault(body["event_id"], []).append(body["status"])
    return statuses


class Requests:
    """`App.request` calls made from a thread of their own while the test goes on."""

    def __init__(self, fleet: Fleet, payloads: Sequence[dict[str, Any]]) -> None:
        self._fleet = fleet
        self._payloads = list(payloads)
        self.outcomes: dict[str, Any] = {}  # by payload key: the reply, or what was raised
        self._thread = threading.Thread(target=anyio.run, args=(self._run,), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        async with (
            App("requester", broker=self._fleet.broker()) as app,
            anyio.create_task_group() as tg,
        ):
            for payload in self._payloads:
                tg.start_soon(self._one, app, payload)

    async def _one(self, app: App, payload: dict[str, Any]) -> None:
        try:
            self.outcomes[payload["k"]] = await app.request(self._fleet.topic, payload, timeout=30)
        except Exception as exc:
            self.outcomes[payload["k"]] = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def described(self) -> dict[str, Any]:
        return {
            k: f"raised {type(v).__name__}: {v}" if isinstance(v, BaseException) else v
            for k, v in sorted(self.outcomes.items())
        }


def took_over(worker: WorkerProcess) -> bool:
    return worker.has_logged("took over")


def started_by(fleet: Fleet, worker: WorkerProcess, keys: set[str]) -> bool:
    """True once `worker`'s handlers recorded a 'begin' for each of `keys`."""
    return keys <= {s.key for s in fleet.steps("begin") if s.pid == worker.proc.pid}


# Item 4: an idempotency key succeeds at most once inside its lease ------------------------

CHARGE_AGENT = """
    @app.agent(
        TOPIC,
        name="charge",
        reclaim_idle=1.0,
        max_retries=2,
        concurrency=4,
        store_results=True,
        idempotency_key=lambda e: e["k"],
    )
    async def charge(event: dict, ctx: Context) -> dict:
        note("charge", event["k"], ctx, "begin")
        with anyio.move_on_after(15):  # the card is charged once the test says so
            while not os.path.exists(RELEASE):
                await anyio.sleep(0.02)
        note("charge", event["k"], ctx, "charged")
        return {"receipt": "rcpt-" + event["k"]}
"""


@on_every_bus
def test_idempotency_key_succeeds_once_when_its_paused_holder_resumes(fleet: Fleet) -> None:
    """Item 4: no `timeout`, so the claim's lease is 10 minutes and the frozen worker's run is
    well inside it. The redelivery of the same event to another worker must wait for the live
    holder's claim (the lease decides, not the event id): the card is charged exactly once."""
    release = fleet.cwd / "release"
    fleet.env["T_RELEASE"] = str(release)
    fleet.write_app(CHARGE_AGENT)
    a = fleet.start_ready()
    [event_id] = fleet.publish([{"k": "pay-9"}])
    wait_for(lambda: started_by(fleet, a, {"pay-9"}), SETTLE, "worker A to begin the charge")
    b = fleet.start_ready()

    a.send(signal.SIGSTOP)  # a GC pause, a VM freeze: A holds the claim and will come back
    try:
        wait_for(
            lambda: took_over(b) or stored_result(fleet, event_id, "charge").attempts >= 2,
            SETTLE,
            "worker B to take over the frozen worker's delivery",
        )
        time.sleep(0.5)  # B's chance to (wrongly) run the handler while A is frozen
    finally:
        a.send(signal.SIGCONT)
    release.touch()

    result = wait_for(
        lambda: (r := stored_result(fleet, event_id, "charge")).finished and r,
        SETTLE,
        "the event to finish",
    )
    wait_for(lambda: fleet.settled("charge"), SETTLE, "every delivery of the event to settle")

    charges = [(s.pid, s.attempt) for s in fleet.steps("charged")]
    history = [(s.phase, s.pid, s.attempt) for s in fleet.steps()]
    assert len(charges) == 1, (
        f"key pay-9 charged {len(charges)} times (pid, attempt): {charges}; "
        f"A={a.proc.pid} B={b.proc.pid}; steps: {history}"
    )
    assert (result.status, result.result) == ("succeeded", {"receipt": "rcpt-pay-9"})
    assert fleet.dead_letters("charge") == []


# Item 5: a stale worker must not overwrite the true outcome -------------------------------

SETTLE_AGENT = """
    from omnidaemon import Reject

    WHO = os.environ["WHO"]
    HOLD = os.environ["T_HOLD"]


    @app.agent(
        TOPIC,
        name="settle",
        reclaim_idle=1.0,
        max_retries=2,
        retry_backoff=0.05,
        concurrency=8,
        store_results=True,
    )
    async def settle(event: dict, ctx: Context) -> dict:
        note("settle", event["k"], ctx, "begin")
        # Worker A's handlers fail once RELEASE exists; worker B's succeed once HOLD exists.
        with anyio.move_on_after(15):
            while not os.path.exists(RELEASE if WHO == "A" else HOLD):
                await anyio.sleep(0.02)
        if WHO == "A":
            note("settle", event["k"], ctx, "fail")
            if event["fail"] == "reject":
                raise Reject("worker A gave up on it")  # dead-letters at once
            raise RuntimeError("worker A failed it")  # attempt 1 of 3: a retry
        note("settle", event["k"], ctx, "done")
        return {"ok": event["k"]}
"""


@pytest.mark.parametrize(
    "takeover_finished_first",
    [True, False],
    ids=["stale-failure-after-takeover-succeeded", "stale-failure-while-takeover-runs"],
)
def test_stale_worker_failure_does_not_overwrite_the_outcome(
    fleet: Fleet, takeover_finished_first: bool
) -> None:
    """Item 5: worker A is frozen mid-handler past `reclaim_idle`; worker B takes its four
    deliveries over and succeeds. A then resumes and its handlers fail: two raise (a retry
    on attempt 1 of 3), two `Reject` (a dead letter at once). A lost those deliveries, so it
    must record nothing, count nothing, send nothing: every event stays `succeeded`, with
    one success each, nothing dead-lettered or retried, and no failure reply or webhook.

    Both orders: B finished before A fails, or A fails while B's runs are still going."""
    release, hold = fleet.cwd / "release", fleet.cwd / "hold"
    fleet.env.update(T_RELEASE=str(release), T_HOLD=str(hold), OMNIDAEMON_WEBHOOK_ALLOW_PRIVATE="1")
    if takeover_finished_first:
        hold.touch()
    fleet.write_app(SETTLE_AGENT)
    keys = {"retry-hook", "reject-hook", "retry-request", "reject-request"}
    with serving() as receiver:
        a = fleet.start_ready(WHO="A")
        hooked = publish_with_webhook(
            fleet,
            [{"k": "retry-hook", "fail": "retry"}, {"k": "reject-hook", "fail": "reject"}],
            receiver.url(),
        )
        event_ids = dict(zip(["retry-hook", "reject-hook"], hooked, strict=True))
        requests = Requests(
            fleet,
            [{"k": "retry-request", "fail": "retry"}, {"k": "reject-request", "fail": "reject"}],
        )
        wait_for(lambda: started_by(fleet, a, keys), SETTLE, "worker A to begin all four")
        b = fleet.start_ready(WHO="B")

        a.send(signal.SIGSTOP)
        try:
            if takeover_finished_first:
                wait_for(
                    lambda: (
                        {s.key for s in fleet.steps("done") if s.pid == b.proc.pid} == keys
                        and requests.done()
                        and all(
                            stored_result(fleet, e, "settle").status == "succeeded"
                            for e in event_ids.values()
                        )
                    ),
                    SETTLE,
                    "worker B to take over and finish all four",
                )
            else:
                wait_for(
                    lambda: started_by(fleet, b, keys), SETTLE, "worker B to take over all four"
                )
        finally:
            a.send(signal.SIGCONT)
        release.touch()  # A's handlers fail now
        # A graceful stop lets A's handlers end and flushes what A counted and sends: from
        # here on A can change nothing more.
        a.send(signal.SIGTERM)
        a.wait_exit(timeout=SETTLE)
        hold.touch()  # B's handlers finish now (already finished in the first order)
        wait_for(
            lambda: (
                {s.key for s in fleet.steps("done") if s.pid == b.proc.pid} >= keys
                and requests.done()
            ),
            SETTLE,
            "worker B to finish all four",
        )
        # A retry A wrongly scheduled would run in B within a fetch timeout (2 s): let it.
        time.sleep(2.5)
        # B's graceful stop ends what its handlers started and flushes its counts.
        b.send(signal.SIGTERM)
        b.wait_exit(timeout=SETTLE)
        webhooks = webhook_statuses(receiver)

    metrics = agent_metrics(fleet, "settle")
    observed = {
        "requests": requests.described(),
        "results": {
            k: (r.status, r.result)
            for k, e in event_ids.items()
            for r in [stored_result(fleet, e, "settle")]
        },
        "webhooks": {k: webhooks.get(e, []) for k, e in event_ids.items()},
        "dead letters": [(d.payload, d.error_type) for d in fleet.dead_letters("settle")],
        "metrics": {
            "succeeded": metrics.succeeded,
            "retried": metrics.retried,
            "dead_lettered": metrics.dead_lettered,
        },
        "handler successes": dict(fleet.done_counts("settle")),
    }
    expected = {
        "requests": {
            "reject-request": {"ok": "reject-request"},
            "retry-request": {"ok": "retry-request"},
        },
        "results": {k: ("succeeded", {"ok": k}) for k in event_ids},
        "webhooks": {k: ["succeeded"] for k in event_ids},
        "dead letters": [],
        "metrics": {"succeeded": 4, "retried": 0, "dead_lettered": 0},
        "handler successes": dict.fromkeys(sorted(keys), 1),
    }
    history = [(s.phase, s.key, s.pid, s.attempt) for s in fleet.steps()]
    assert observed == expected, (
        f"observed: {pformat(observed)}\nA={a.proc.pid} B={b.proc.pid}; steps: {history}"
    )


# Item 6: waiting on an idempotency claim never stops the agent's other work ---------------

CLAIM_LEASE = 10.0  # the agent's timeout, so its claims' lease
PROMPT = 4.0  # seconds within which an unrelated event must be handled

KEYED_AGENT = f"""
    WHO = os.environ["WHO"]


    @app.agent(
        TOPIC,
        name="keyed",
        reclaim_idle=1.0,
        timeout={CLAIM_LEASE},
        max_retries=1,
        concurrency=4,
        store_results=True,
        idempotency_key=lambda e: e["k"],
    )
    async def keyed(event: dict, ctx: Context) -> dict:
        note("keyed", event["k"], ctx, "begin")
        if WHO == "A":
            await anyio.sleep(60)  # SIGKILLed here, holding the key's claim
        note("keyed", event["k"], ctx, "charged")
        return {{"receipt": "rcpt-" + event["k"]}}
"""


def test_waiting_on_an_idempotency_claim_does_not_stop_the_agents_other_work(
    fleet: Fleet,
) -> None:
    """Item 6: worker A dies holding key K's claim (lease 10 s). The client sends K again as
    a new event E2, which may wait for that claim, and then an unrelated event U: worker B
    must handle U at once, not after K's lease. `max_retries=1` makes B's takeover of A's
    delivery E1 its last attempt, the delivery today's worker runs alone (isolation).

    Then, as docs/patterns.md promises (at most one successful run per key; a run that dies
    does not count), K is charged exactly once and both E1 and E2 succeed with its result."""
    fleet.write_app(KEYED_AGENT)
    a = fleet.start_ready(WHO="A")
    [e1] = fleet.publish([{"k": "K", "n": 1}])
    wait_for(lambda: started_by(fleet, a, {"K"}), SETTLE, "worker A to begin E1")
    b = fleet.start_ready(WHO="B")
    a.send(signal.SIGKILL)
    a.wait_exit(timeout=5)
    killed_at = time.monotonic()

    [e2] = fleet.publish([{"k": "K", "n": 2}])
    # U goes out once B has taken E1 over (about reclaim_idle after the kill).
    wait_for(
        lambda: took_over(b) or time.monotonic() - killed_at > 3.0,
        SETTLE,
        "worker B to take over the dead worker's delivery",
    )
    fleet.publish([{"k": "U"}])
    wait_for(
        lambda: [s for s in fleet.steps("charged") if s.key == "U"],
        PROMPT,
        "the unrelated event U to be handled while E2 waits on K's claim",
    )

    def both_finished() -> list[Result] | None:
        results = [stored_result(fleet, e, "keyed") for e in (e1, e2)]
        return results if all(r.finished for r in results) else None

    results = wait_for(both_finished, CLAIM_LEASE + SETTLE, "E1 and E2 to finish", interval=0.1)
    charges = [(s.pid, s.attempt) for s in fleet.steps("charged") if s.key == "K"]
    history = [(s.phase, s.key, s.pid, s.attempt) for s in fleet.steps()]
    assert len(charges) == 1, f"key K charged {len(charges)} times; steps: {history}"
    assert [(r.status, r.result) for r in results] == [("succeeded", {"receipt": "rcpt-K"})] * 2
    assert fleet.dead_letters("keyed") == []


# Item 7: a failure is not dropped when its entry was trimmed mid-handler ------------------

MAXLEN = 10

TRIMMED_AGENT = """
    @app.agent(
        TOPIC,
        name="trimmed",
        reclaim_idle=1.0,
        max_retries=2,
        retry_backoff=0.05,
        concurrency=4,
    )
    async def trimmed(event: dict, ctx: Context) -> None:
        if event.get("filler"):
            return
        note("trimmed", event["k"], ctx, "begin")
        if ctx.attempt == 1:
            with anyio.move_on_after(15):  # fails once the test says so
                while not os.path.exists(RELEASE):
                    await anyio.sleep(0.02)
            note("trimmed", event["k"], ctx, "fail")
            raise RuntimeError("the first attempt fails")
        note("trimmed", event["k"], ctx, "done")
"""


def test_failure_of_an_entry_trimmed_mid_handler_is_retried_or_dead_lettered(
    fleet: Fleet,
) -> None:
    """Item 7: the topic keeps about 10 entries (`maxlen`); while X's first attempt runs,
    300 more events are published and X's entry is trimmed from the stream. The attempt then
    fails: the worker still holds X, so X must be retried (attempt 2 runs) or dead-lettered
    with a reason, never dropped."""
    release = fleet.cwd / "release"
    fleet.env.update(T_RELEASE=str(release), OMNIDAEMON_STREAM_MAXLEN=str(MAXLEN))
    fleet.write_app(TRIMMED_AGENT)
    worker = fleet.start_ready()
    [x] = fleet.publish([{"k": "X"}])
    wait_for(lambda: started_by(fleet, worker, {"X"}), SETTLE, "X's first attempt to begin")

    async def flood() -> None:
        async with App("publisher", broker=open_broker(fleet.url, maxlen=MAXLEN)) as app:
            await app.publish_many(
                [(fleet.topic, {"k": f"f{i}", "filler": True}) for i in range(300)]
            )

    anyio.run(flood)
    # The set-up holds: X's entry is no longer in the topic's stream.
    kept = fleet.call(lambda bus: bus.entries(fleet.topic, 1000))
    assert not [i for i, data in kept if x.encode() in data], (
        "the set-up failed: X's entry was not trimmed"
    )
    time.sleep(1.0)  # lease renewals (every 0.33 s) run on the trimmed entry meanwhile
    release.touch()  # X's first attempt fails now

    def outcome() -> str | None:
        if [s for s in fleet.steps("done") if s.key == "X"]:
            return "retried"
        if [d for d in fleet.dead_letters("trimmed") if d.event_id == x]:
            return "dead-lettered"
        return None

    try:
        how = wait_for(outcome, 10, "X to be retried or dead-lettered", interval=0.1)
    except AssertionError as exc:
        said = [(e["level"], e["event"]) for e in worker.logs() if e["level"] != "info"]
        raise AssertionError(
            f"X's failure was dropped: {exc}; the worker said {said}; "
            f"X's steps: {[(s.phase, s.attempt) for s in fleet.steps() if s.key == 'X']}"
        ) from None
    attempts = [(s.phase, s.attempt) for s in fleet.steps() if s.key == "X"]
    if how == "retried":
        assert attempts == [("begin", 1), ("fail", 1), ("begin", 2), ("done", 2)], attempts
    else:
        [letter] = [d for d in fleet.dead_letters("trimmed") if d.event_id == x]
        assert letter.error_type and letter.error_message, letter
        assert letter.payload == {"k": "X"}
    assert Counter(s.phase for s in fleet.steps() if s.key == "X")["done"] <= 1
    assert worker.proc.poll() is None, worker.stderr
