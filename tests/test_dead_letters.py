"""Reading dead letters back: a record omnidaemon did not write (a hand-typed XADD into a
dead-letter queue, a damaged copy) is skipped and reported by `App.dead_letters`, `App.replay_
dead_letters`, `omnidaemon bus dlq` and `omnidaemon bus replay`, and the others are served."""

from __future__ import annotations

import json
from uuid import uuid4

import anyio
import pytest
from structlog.testing import capture_logs

from omnidaemon import App
from omnidaemon.brokers import RedisBroker, Subscription
from omnidaemon.cli import main
from tests.bad_records import Seeded, seed_dead_letters


@pytest.mark.anyio
async def test_the_python_api_skips_and_logs_undecodable_records_and_replays_the_rest(
    redis_url: str,
) -> None:
    topic = f"bad{uuid4().hex[:8]}.jobs"
    app = App("shop", broker=RedisBroker(redis_url))
    handled: list[int] = []

    @app.agent(topic)
    async def keeper(event: dict[str, int]) -> None:
        handled.append(event["n"])

    await app.connect()
    try:
        assert isinstance(app.broker, RedisBroker)
        seeded = await seed_dead_letters(app.broker, topic, "keeper")
        with capture_logs() as logs:
            letters = await app.dead_letters("keeper")
        assert [d.event_id for d in letters] == seeded.event_ids
        _assert_reported(logs, seeded, "skipped")

        with capture_logs() as logs:
            assert await app.replay_dead_letters("keeper") == 2
        _assert_reported(logs, seeded, "not replayable, left in the queue")
        async with app.running():
            with anyio.fail_after(10):
                while sorted(handled) != [0, 1]:
                    await anyio.sleep(0.02)
        left = await app.broker.dead_letters(Subscription(topic, "keeper"), 10)
        assert {record_id for record_id, _ in left} == set(seeded.bad)
        assert await app.dead_letters("keeper") == []
    finally:
        await app.close()


def _assert_reported(logs: list[dict[str, object]], seeded: Seeded, what: str) -> None:
    warned = {e["record_id"]: e for e in logs if e["log_level"] == "warning"}
    assert set(warned) == set(seeded.bad), logs
    for record_id, reason in seeded.bad.items():
        assert warned[record_id]["event"] == f"dead-letter record cannot be read; {what}"
        assert str(warned[record_id]["reason"]).startswith(reason)


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["table", "json"])
def test_bus_dlq_and_replay_report_undecodable_records_and_serve_the_rest(
    redis_url: str, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    topic = f"bad{uuid4().hex[:8]}.jobs"

    async def seed() -> Seeded:
        async with RedisBroker(redis_url) as broker:
            return await seed_dead_letters(broker, topic, "keeper")

    seeded = anyio.run(seed)

    def run(*args: str) -> tuple[str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            main([*args, "--broker", redis_url])
        out, err = capsys.readouterr()
        assert done.value.code == 0, err
        return out, err

    out, err = run("bus", "dlq", topic, *extra)
    assert all(event_id in out for event_id in seeded.event_ids)
    if extra:
        assert [d["event_id"] for d in json.loads(out)] == seeded.event_ids
    for record_id, reason in seeded.bad.items():
        assert f"warning: record {record_id} of keeper on {topic} cannot be read ({reason}" in err
        assert record_id not in out, "stdout holds the readable records only"

    out, err = run("bus", "replay", topic, "--agent", "keeper", "--all", "--dry-run")
    assert "2 of 5 dead letters would be replayed (dry run)" in out
    assert err.count("it would not be replayed") == 3

    out, err = run("bus", "replay", topic, "--agent", "keeper", "--all")
    assert f"replayed 2 events to keeper on {topic}" in out
    assert all(f"record {record_id} of keeper" in err for record_id in seeded.bad)
    assert err.count("not replayed, left in the queue") == 3
