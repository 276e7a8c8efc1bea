"""Every `omnidaemon` command against the embedded bus (a real Valkey server) and a real
worker process.

Each bus is private to this module (`health` and `bus stats` read the whole bus, so nothing
another module leaves behind may be on it), with one worker process running LANES_APP: one
agent per "lane", each on its own topic, so the tests sharing the bus do not see each other's
events. Every lane's agent doubles `n`; it raises when the payload says `fail` or while the
lane's marker file exists, and dead-letters at once (`max_retries=0`); a payload that is not a
`Job` is dead-lettered without running it. Results are stored (`store_results=True`).

The commands run in the test process (`tests/e2e/_in_process.py`): a `python -m omnidaemon`
subprocess costs half a second of start-up, which made most of this module's time. One
command still runs as a subprocess (`publish -`, reading a real standard input); the worker
is always a process of its own. The state the tests read is built once per bus where it can be.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from omnidaemon.brokers.embedded_server import ensure_server, stop_server
from tests.e2e._in_process import Ran, run_in_process
from tests.e2e._support import CLI, WorkerProcess, cli_env, read_lines, wait_for, write_module
from tests.servers import free_port

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT = 20.0  # seconds a fresh worker may take to import and start handling

SETTLE = 10.0  # seconds the bus may take to show what the worker did (replays: a fetch or two)

LANES = ("reply", "results", "handled", "replay", "purged", "lazy", "stopped")
# `lazy` and `stopped`: served only when a test says so
SERVED = [lane for lane in LANES if lane not in ("lazy", "stopped")]

LANES_APP = """
    import os
    from pathlib import Path

    from pydantic import BaseModel

    from omnidaemon import App, Context

    app = App("lanes")

    SUFFIX = os.environ["E2E_SUFFIX"]
    MARKERS = Path(os.environ["E2E_MARKERS"])
    LOG = os.environ["E2E_LOG"]
    LANES = ("reply", "results", "handled", "replay", "purged", "lazy", "stopped")


    class Job(BaseModel):
        n: int
        fail: bool = False


    def lane_agent(lane):
        async def handle(job: Job, ctx: Context) -> dict:
            failing = job.fail or (MARKERS / lane).exists()
            with open(LOG, "a") as log:
                log.write(f"{lane} {ctx.event.id} {'fail' if failing else 'ok'}\\n")
            if failing:
                raise RuntimeError(f"job {job.n} failed")
            return {"doubled": job.n * 2}

        return handle


    for lane in LANES:
        app.agent(f"{lane}.{SUFFIX}", name=lane, max_retries=0, store_results=True)(
            lane_agent(lane)
        )
"""


def run(args: Sequence[str], env: dict[str, str], cwd: Path, stdin: str | None = None) -> Ran:
    """`omnidaemon ARGS`, in process, to completion, output captured."""
    return run_in_process(args, cwd, env, stdin)


def run_subprocess(
    args: Sequence[str], env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m omnidaemon ARGS` as a real subprocess, to completion, output captured."""
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def parse(done: Ran | subprocess.CompletedProcess[str], status: int = 0) -> Any:
    """The JSON a `--json` run printed, after checking its exit status."""
    assert done.returncode == status, f"{done.args}: {done.returncode}\n{done.stdout}{done.stderr}"
    return orjson.loads(done.stdout)


def rows(text: str) -> list[list[str]]:
    """The cells of a plain (piped) table, split on runs of spaces."""
    return [line.split() for line in text.splitlines()]


@dataclass
class Bus:
    """One bus under test, the environment that selects it, and the worker running on it."""

    env: dict[str, str]
    cwd: Path
    suffix: str
    markers: Path
    handler_log: Path
    worker: WorkerProcess | None = None

    def topic(self, lane: str) -> str:
        return f"{lane}.{self.suffix}"

    def cli(self, *args: str, stdin: str | None = None) -> Ran:
        return run(args, self.env, self.cwd, stdin)

    def json(self, *args: str, status: int = 0) -> Any:
        return parse(self.cli(*args, "--json"), status)

    def each(self, *commands: Sequence[str]) -> list[Ran]:
        """Run commands one after the other; their results in the same order."""
        return [self.cli(*args) for args in commands]

    def publish(self, lane: str, *payloads: Any) -> list[str]:
        """Publish each payload to the lane's topic; their event ids, in order."""
        done = self.each(
            *(["publish", self.topic(lane), orjson.dumps(p).decode()] for p in payloads)
        )
        for d in done:
            assert d.returncode == 0, d.stderr
        return [d.stdout.strip() for d in done]

    def poll(self, args: Sequence[str], until: Callable[[Any], bool], status: int = 0) -> Any:
        """Run `args --json` until `until(output)` holds (within SETTLE seconds)."""
        seen: list[Any] = []

        def check() -> bool:
            seen[:] = [self.json(*args, status=status)]
            return until(seen[0])

        try:
            wait_for(check, SETTLE, interval=0.1)
        except AssertionError:
            raise AssertionError(f"{args} never matched; last output: {seen}") from None
        return seen[0]

    def handled(self, lane: str, event_id: str) -> list[str]:
        """What the lane's handler did with the event so far: `ok` or `fail`, per run."""
        prefix = f"{lane} {event_id} "
        return [
            line[len(prefix) :] for line in read_lines(self.handler_log) if line.startswith(prefix)
        ]


def start_worker(bus: Bus, *args: str) -> WorkerProcess:
    worker = WorkerProcess(["lanes:app", *args], bus.cwd, bus.env)
    try:
        wait_for(lambda: worker.has_logged("worker started"), STARTUP_TIMEOUT, "the worker")
    except AssertionError:
        worker.kill()
        raise AssertionError(f"the worker did not start:\n{worker.stderr}") from None
    return worker


def stop_worker(worker: WorkerProcess) -> None:
    """SIGTERM, and the worker must exit with status 0."""
    try:
        worker.send(signal.SIGTERM)
        status, _ = worker.wait_exit(timeout=10)
    finally:
        worker.kill()  # if it is still running; closes its stderr file
    assert status == 0, worker.stderr


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    """A private embedded bus, with the worker running every lane but `lazy` and `stopped`.

    One bus kind only, for the suite's time: the embedded bus is the default users get and
    runs the same Redis broker as a `redis://` URL, which `test_cli_startup.py`,
    `test_cli_wait.py` and the API tests drive.
    """
    cwd = tmp_path_factory.mktemp("cli-embedded")
    write_module(cwd, "lanes", LANES_APP)
    markers = cwd / "markers"
    markers.mkdir()
    extra = {
        "E2E_SUFFIX": uuid.uuid4().hex[:8],
        "E2E_MARKERS": str(markers),
        "E2E_LOG": str(cwd / "handlers.log"),
    }
    home = Path(tempfile.mkdtemp(prefix="odc"))  # short: a unix socket path has a size limit
    try:
        ensure_server(home)
        env = cli_env(OMNIDAEMON_HOME=str(home), **extra)
        del env["OMNIDAEMON_BROKER_URL"]  # no URL: the embedded bus of OMNIDAEMON_HOME
        yield from _with_worker(cwd, env)
    finally:
        stop_server(home)
        shutil.rmtree(home, ignore_errors=True)


def _with_worker(cwd: Path, env: dict[str, str]) -> Iterator[Bus]:
    bus = Bus(
        env=env,
        cwd=cwd,
        suffix=env["E2E_SUFFIX"],
        markers=Path(env["E2E_MARKERS"]),
        handler_log=Path(env["E2E_LOG"]),
    )
    bus.worker = start_worker(bus, "--agents", ",".join(SERVED))
    try:
        yield bus
    finally:
        stop_worker(bus.worker)


@dataclass
class Handled:
    """The `handled` lane after the worker handled two good events, one that failed, and one
    whose payload is not a `Job`."""

    topic: str
    failed: str
    invalid: str


@pytest.fixture(scope="module")
def handled(bus: Bus) -> Handled:
    _, _, failed, invalid = bus.publish(
        "handled", {"n": 1}, {"n": 2}, {"n": 3, "fail": True}, {"n": "three"}
    )
    topic = bus.topic("handled")

    def settled(topics: list[dict[str, Any]]) -> bool:
        groups = [g for t in topics if t["topic"] == topic for g in t["groups"]]
        done = (0, 0, 0, 2)  # lag, pending, retries, dead letters: all handled, all acked
        return [(g["lag"], g["pending"], g["retries"], g["dead_letters"]) for g in groups] == [done]

    bus.poll(["bus", "list"], settled)
    return Handled(topic, failed, invalid)


def worker_pid(bus: Bus) -> int:
    assert bus.worker is not None
    return bus.worker.proc.pid


# --- publish and result --------------------------------------------------------------------


def test_publish_takes_json_text_a_file_or_stdin_and_inspect_shows_the_last(
    bus: Bus, tmp_path: Path
) -> None:
    topic = f"inbox.{uuid.uuid4().hex[:8]}"  # no agent reads it: the entries stay as published
    payload_file = tmp_path / "payload.json"
    payload_file.write_text('{"n": 2, "from": "file"}')
    text = bus.cli("publish", topic, '{"n": 1, "from": "text"}')
    from_file = bus.cli("publish", topic, f"@{payload_file}")
    # A real standard input, and the entry point itself: a subprocess.
    from_stdin = run_subprocess(
        ["publish", topic, "-"], bus.env, bus.cwd, stdin='{"n": 3, "from": "stdin"}'
    )
    as_json = bus.cli("publish", topic, '{"n": 4, "from": "json"}', "--json")  # the last one
    for done in (text, from_file, from_stdin):
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("\n") == 1  # the event id alone
    published = parse(as_json)
    assert published == {"event_id": published["event_id"], "topic": topic}
    ids = [d.stdout.strip() for d in (text, from_file, from_stdin)] + [published["event_id"]]
    assert len(set(ids)) == 4

    every, last_two = (
        parse(d)
        for d in bus.each(
            ["bus", "inspect", topic, "--json"], ["bus", "inspect", topic, "-n", "2", "--json"]
        )
    )

    payloads = {e["id"]: e["payload"] for e in every}
    assert [payloads.get(i) for i in ids] == [
        {"n": 1, "from": "text"},
        {"n": 2, "from": "file"},
        {"n": 3, "from": "stdin"},
        {"n": 4, "from": "json"},
    ]
    assert all(e["topic"] == topic and e["source"] == "cli" for e in every)
    stream_order = [tuple(map(int, e["entry_id"].split("-"))) for e in every]
    assert stream_order == sorted(stream_order)  # oldest first
    assert last_two == every[-2:]  # the most recent two
    assert last_two[-1]["id"] == published["event_id"]


def test_publish_wait_prints_the_agents_reply(bus: Bus) -> None:
    done = bus.cli("publish", bus.topic("reply"), '{"n": 21}', "--wait", "--timeout", "20")

    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"doubled": 42}


def test_result_reports_succeeded_dead_lettered_and_pending(bus: Bus) -> None:
    good, bad = bus.publish("results", {"n": 5}, {"n": "five"})
    plain, as_json, dead, unknown = bus.each(
        ["result", good, "--wait", "--timeout", "20"],
        ["result", good, "--wait", "--timeout", "20", "--json"],
        ["result", bad, "--wait", "--timeout", "20", "--json"],
        ["result", f"no-such-{uuid.uuid4().hex}", "--json"],
    )

    assert plain.returncode == 0, plain.stderr
    first, *rest = plain.stdout.splitlines()
    assert first.split() == [good, "results", "succeeded", "attempts=1"]
    assert orjson.loads("\n".join(rest)) == {"doubled": 10}
    [record] = parse(as_json)
    assert record["status"] == "succeeded"
    assert record["agent"] == "results"
    assert record["result"] == {"doubled": 10}
    [record] = parse(dead, status=1)
    assert record["status"] == "dead_lettered"
    assert record["error"]["type"] == "PayloadValidationError"
    [record] = parse(unknown, status=3)
    assert record["status"] == "pending"
    assert record["agent"] is None


# --- bus: list, groups, stats, dlq -----------------------------------------------------------


def test_bus_list_shows_each_topic_with_its_agents_counts(bus: Bus, handled: Handled) -> None:
    as_json, plain = bus.each(["bus", "list", "--json"], ["bus", "list"])

    [topic] = [t for t in parse(as_json) if t["topic"] == handled.topic]
    assert topic["length"] == 4
    assert topic["delayed"] == 0
    [group] = topic["groups"]
    assert group["agent"] == "handled"
    assert (group["lag"], group["pending"], group["retries"]) == (0, 0, 0)
    assert group["dead_letters"] == 2
    assert not any(t["topic"].startswith("omni-reply.") for t in parse(as_json))

    assert plain.returncode == 0, plain.stderr
    table = rows(plain.stdout)
    assert table[0] == ["TOPIC", "LENGTH", "DELAYED", "AGENT", "LAG", "PENDING", "RETRIES", "DLQ"]
    assert [handled.topic, "4", "0", "handled", "0", "0", "0", "2"] in table


def test_bus_groups_lists_the_running_workers_consumer(bus: Bus, handled: Handled) -> None:
    [group] = bus.json("bus", "groups", handled.topic)

    assert group["agent"] == "handled"
    assert group["consumers"] == 1
    [consumer] = group["consumer_details"]
    assert f":{worker_pid(bus)}:" in consumer["name"]  # <host>:<pid>:<random>
    assert consumer["pending"] == 0


def test_bus_stats_lists_the_live_worker(bus: Bus, handled: Handled) -> None:
    stats = bus.json("bus", "stats")

    [worker] = stats["workers"]
    assert worker["pid"] == worker_pid(bus)
    assert worker["app"] == "lanes"
    assert sorted(worker["agents"]) == sorted(SERVED)
    assert stats["totals"]["workers"] == 1
    assert stats["totals"]["dead_letters"] >= 2
    assert stats["server"]["server"].split()[0] in ("redis", "valkey")


def test_publish_bounds_delay_and_bus_stats_shows_what_delayed_events_hold(bus: Bus) -> None:
    topic = bus.topic("held")
    refused = bus.cli("publish", topic, "{}", "--delay", "1e12")
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith(
        "is over max_delay (2,592,000 s = 30 days; OMNIDAEMON_MAX_DELAY)"
    )
    blob = orjson.dumps({"blob": "x" * 40_000}).decode()
    for done in bus.each(*[["publish", topic, blob, "--delay", "3600"]] * 2):
        assert done.returncode == 0, done.stderr

    stats = bus.json("bus", "stats")
    assert stats["totals"]["delayed"] >= 2
    assert stats["totals"]["delayed_bytes"] >= 80_000
    [listed] = [t for t in bus.json("bus", "list") if t["topic"] == topic]
    assert listed["delayed"] == 2
    assert 80_000 <= listed["delayed_bytes"] <= 100_000


def test_bus_dlq_shows_error_attempts_and_payload(bus: Bus, handled: Handled) -> None:
    by_topic, by_agent, other_agent, plain = bus.each(
        ["bus", "dlq", handled.topic, "--json"],
        ["bus", "dlq", "--agent", "handled", "--json"],
        ["bus", "dlq", handled.topic, "--agent", "nobody", "--json"],
        ["bus", "dlq", handled.topic],
    )

    letters = {d["event_id"]: d for d in parse(by_topic)}
    assert set(letters) == {handled.failed, handled.invalid}
    failed = letters[handled.failed]
    assert (failed["error_type"], failed["error_message"]) == ("RuntimeError", "job 3 failed")
    assert failed["attempts"] == 1
    assert failed["payload"] == {"n": 3, "fail": True}
    assert (failed["topic"], failed["agent"]) == (handled.topic, "handled")
    invalid = letters[handled.invalid]
    assert invalid["error_type"] == "PayloadValidationError"
    assert invalid["payload"] == {"n": "three"}
    assert {d["event_id"] for d in parse(by_agent)} == set(letters)  # every topic searched
    # An agent that does not read the topic is an error, as for `bus replay`: not "none".
    assert (other_agent.returncode, other_agent.stdout) == (1, "")
    assert "no agent 'nobody' reads topic" in other_agent.stderr

    assert plain.returncode == 0, plain.stderr
    header, *lines = plain.stdout.splitlines()
    assert header.split() == [
        "FAILED", "AT", "TOPIC", "AGENT", "EVENT", "ID", "ATTEMPTS", "ERROR", "PAYLOAD",
    ]  # fmt: skip
    [row] = [line for line in lines if handled.failed in line]
    assert "RuntimeError: job 3 failed" in row
    assert '{"n":3,"fail":true}' in row


def test_bus_inspect_and_dlq_of_an_unknown_topic_say_so_in_one_line(bus: Bus) -> None:
    topic = f"nowhere.{uuid.uuid4().hex[:8]}"
    commands = [
        ("bus inspect", ["bus", "inspect", topic]),
        ("bus inspect", ["bus", "inspect", topic, "--json"]),
        ("bus dlq", ["bus", "dlq", topic]),
        ("bus dlq", ["bus", "dlq", topic, "--agent", "handled", "--json"]),
    ]

    runs = bus.each(*(args for _, args in commands))

    for (command, args), done in zip(commands, runs, strict=True):
        # Not a usage error (status 2): the arguments are fine, the bus has no such topic.
        assert done.returncode == 1, (args, done.stderr)
        assert done.stdout == ""
        assert done.stderr.splitlines() == [
            f"omnidaemon {command}: error: no topic {topic!r} on the bus"
        ], args


# --- bus replay and purge ----------------------------------------------------------------------


def test_bus_replay_delivers_dead_letters_again(bus: Bus) -> None:
    topic = bus.topic("replay")
    marker = bus.markers / "replay"
    marker.touch()  # the handler fails while it exists
    first, second, third = bus.publish("replay", {"n": 1}, {"n": 2}, {"n": 3})
    bus.poll(["bus", "dlq", topic], lambda letters: len(letters) == 3)

    dry = bus.cli("bus", "replay", topic, "--agent", "replay", "--all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    *would, summary = dry.stdout.splitlines()
    assert sorted(would) == sorted(
        f"would replay {event} (RuntimeError: job {n} failed)"
        for n, event in enumerate((first, second, third), start=1)
    )
    assert summary == "3 of 3 dead letters would be replayed (dry run)"
    assert len(bus.json("bus", "dlq", topic)) == 3  # the dry run changed nothing
    assert bus.handled("replay", first) == ["fail"]

    marker.unlink()
    one = bus.cli("bus", "replay", topic, "--agent", "replay", "--id", first)
    assert one.returncode == 0, one.stderr
    assert one.stdout == f"replayed 1 event to replay on {topic}\n"
    # The record left the dead-letter queue as it was replayed.
    assert {d["event_id"] for d in bus.json("bus", "dlq", topic)} == {second, third}
    rest = bus.cli("bus", "replay", topic, "--agent", "replay", "--all")
    assert rest.returncode == 0, rest.stderr
    assert rest.stdout == f"replayed 2 events to replay on {topic}\n"

    events = (first, second, third)
    wait_for(
        lambda: all(bus.handled("replay", e) == ["fail", "ok"] for e in events),
        SETTLE,
        "the replayed events to be handled again",
    )
    empty, *results = bus.each(
        ["bus", "dlq", topic, "--json"], *(["result", e, "--json"] for e in (first, third))
    )
    assert parse(empty) == []
    assert [parse(r)[0]["result"] for r in results] == [{"doubled": 2}, {"doubled": 6}]


def test_bus_purge_dlq_empties_the_dead_letters_and_keeps_the_topic(bus: Bus) -> None:
    topic = bus.topic("purged")
    bus.publish("purged", {"n": 1, "fail": True}, {"n": 2, "fail": True})
    bus.poll(["bus", "dlq", topic], lambda letters: len(letters) == 2)

    refused = bus.cli("bus", "purge", topic, "--dlq")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    purged = bus.cli("bus", "purge", topic, "--dlq", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"removed 2 dead letters from {topic}\n"  # none went on refusal

    [after] = [t for t in bus.json("bus", "list") if t["topic"] == topic]
    assert after["length"] == 2
    assert after["groups"][0]["dead_letters"] == 0


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_count_exactly_what_the_worker_did(bus: Bus, handled: Handled) -> None:
    expected = {"received": 4, "succeeded": 2, "failed": 1, "retried": 0, "dead_lettered": 2}

    def counts(snapshot: dict[str, Any]) -> dict[str, Any]:
        return {k: snapshot[k] for k in expected}

    [snapshot] = bus.poll(
        ["metrics", "--topic", handled.topic],
        lambda found: len(found) == 1 and counts(found[0]) == expected,
    )
    assert snapshot["agent"] == "handled"
    assert snapshot["in_flight"] == 0
    assert snapshot["duration_seconds"]["count"] == 3  # handler runs: 2 ok, 1 raised
    assert snapshot["latency_seconds"]["count"] == 2  # succeeded events

    plain = bus.cli("metrics", "--topic", handled.topic, "--agent", "handled")
    assert plain.returncode == 0, plain.stderr
    header, row = rows(plain.stdout)
    assert header[:8] == [
        "TOPIC",
        "AGENT",
        "RECEIVED",
        "OK",
        "FAILED",
        "RETRIED",
        "DLQ",
        "THROTTLED",
    ]
    assert row[:8] == [handled.topic, "handled", "4", "2", "1", "0", "2", "0"]


def test_a_graceful_stop_leaves_exact_counts_and_health_sees_the_agents_it_left(
    bus: Bus,
) -> None:
    # One extra worker, for two checks of what a stopped worker leaves behind (a worker
    # process costs seconds to start): agent `stopped` handles events before the stop, agent
    # `lazy` has its group made and gets its events only after it.
    topic = bus.topic("stopped")
    worker = start_worker(bus, "--agents", "stopped,lazy")
    try:
        bus.publish("stopped", {"n": 1}, {"n": 2}, {"n": 3, "fail": True}, {"n": "three"})

        def settled(topics: list[dict[str, Any]]) -> bool:
            groups = [g for t in topics if t["topic"] == topic for g in t["groups"]]
            return [(g["lag"], g["pending"], g["dead_letters"]) for g in groups] == [(0, 0, 2)]

        bus.poll(["bus", "list"], settled)
    finally:
        stop_worker(worker)

    # Issue 16: counts reach the bus up to a second after the work; a worker that stops on
    # SIGTERM must write them before it exits, so the first `metrics` after it is exact.
    [snapshot] = bus.json("metrics", "--topic", topic)  # read once: no waiting for counts
    assert {k: snapshot[k] for k in ("received", "succeeded", "failed", "dead_lettered")} == {
        "received": 4,
        "succeeded": 2,
        "failed": 1,
        "dead_lettered": 2,
    }
    assert snapshot["duration_seconds"]["count"] == 3
    assert snapshot["in_flight"] == 0

    # Events that arrive for an agent no live worker runs make the bus degraded.
    lazy = bus.topic("lazy")
    bus.publish("lazy", {"n": 1}, {"n": 2})

    report = bus.json("health", status=1)
    assert report["status"] == "degraded"
    assert report["problems"] == [f"{lazy}/lazy: 2 events wait and no live worker runs this agent"]

    purged = bus.cli("bus", "purge", lazy, "--yes")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"purged topic {lazy} (2 entries, 1 agent)\n"
    listed, healthy = bus.each(["bus", "list", "--json"], ["health", "--json"])
    assert lazy not in [t["topic"] for t in parse(listed)]
    assert parse(healthy)["status"] == "healthy"


# --- health -------------------------------------------------------------------------------------


def test_health_is_healthy_while_the_worker_runs(bus: Bus, handled: Handled) -> None:
    report = bus.json("health", status=0)

    assert report["status"] == "healthy"
    assert report["bus"]["reachable"] is True
    assert report["problems"] == []
    assert [w["pid"] for w in report["workers"]] == [worker_pid(bus)]
    assert {"topic": handled.topic, "agent": "handled"}.items() <= next(
        g for g in report["groups"] if g["topic"] == handled.topic
    ).items()


def test_health_is_degraded_by_dead_letters_above_the_limit(bus: Bus, handled: Handled) -> None:
    report = bus.json("health", "--max-dead-letters", "0", status=1)

    assert report["status"] == "degraded"
    assert f"{handled.topic}/handled: 2 dead letters (above 0)" in report["problems"]


def test_health_is_down_when_redis_does_not_answer(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there

    report = parse(run(["health", "--json", "--broker", url], cli_env(), tmp_path), status=2)

    assert report["status"] == "down"
    assert report["bus"] == {"url": url, "reachable": False}
    [problem] = report["problems"]
    assert problem.startswith(f"the bus at {url} is unreachable")


def test_health_is_down_and_starts_nothing_when_the_embedded_bus_is_stopped() -> None:
    parent = Path(tempfile.mkdtemp(prefix="odd")).resolve()
    home = parent / "home"
    env = cli_env(OMNIDAEMON_HOME=str(home))
    del env["OMNIDAEMON_BROKER_URL"]
    try:
        report = parse(run(["health", "--json"], env, parent), status=2)
        plain = run(["health"], env, parent)

        assert report["status"] == "down"
        assert report["bus"]["reachable"] is False
        assert "not running" in report["problems"][0]
        assert plain.returncode == 2
        assert plain.stdout.splitlines()[0] == f"down: embedded://{home}"
        assert list(parent.rglob("*.sock")) == []  # no server was started
        assert run(["bus", "status"], env, parent).returncode == 1
    finally:
        stop_server(home)  # in case one was started after all
        shutil.rmtree(parent, ignore_errors=True)


# --- agents and graph (the app's code, no bus) ---------------------------------------------------
